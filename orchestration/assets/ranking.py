import time

import dagster as dg
import polars as pl

from models.candidates import (
    CandidateConfig,
    CandidateSources,
    generate_candidates,
    generator_recall,
)
from models.features import FEATURE_COLUMNS, TABLE_NAMES, FeatureTables
from models.ranker import RankerParams, feature_importance, train_ranker
from models.training_set import build_training_set, label_queries
from orchestration.assets.shared import RANKER_FILE, RANKER_INFO, at_cutoffs, load_plan
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import CANDIDATES, FEATURES, TRAINING


class CandidatesConfig(dg.Config):
    """Generator sizes (see models/candidates.py)."""

    recent_items: int = 20
    min_repeat_rate: float = 0.05
    top_categories: int = 3
    per_category: int = 15
    new_item_days: float = 14.0
    trending_items: int = 30
    popular_items: int = 50
    max_candidates: int = 200


CANDIDATE_MARTS = [
    "item_features",
    "user_item_features",
    "item_covisitation",
    "item_bought_together",
    "user_category_features",
    "user_features",
    "category_repurchase_rates",
    "interaction_labels",
    "feature_cutoffs",
]


@dg.asset(deps=CANDIDATE_MARTS, group_name="ranking")
def candidates(shelfwise: ShelfwiseResource, config: CandidatesConfig) -> dg.MaterializeResult:
    """Candidate items per user and cutoff from eight generators (history, buy-again,
    co-visitation, bought-together, category-popular, new items by content, trending, popular),
    each generator's score kept as a feature. Training and evaluation cutoffs cover the users with
    something to learn from in the window after; the serving cutoff covers every user with
    history. The metadata reports each generator's recall on the held-out evaluation window."""
    lake = shelfwise.lake()
    plan = load_plan(lake)
    started = time.perf_counter()

    def mart(name: str) -> pl.DataFrame:
        return lake.read_frame(f"{FEATURES}/{name}.parquet")

    sources = CandidateSources(
        user_items=mart("user_item_features"),
        item_features=mart("item_features"),
        covisitation=mart("item_covisitation"),
        bought_together=mart("item_bought_together"),
        user_categories=mart("user_category_features"),
        user_features=mart("user_features"),
        repurchase_rates=mart("category_repurchase_rates"),
    )
    labels = mart("interaction_labels")
    generator = CandidateConfig(**config.model_dump())
    queries = {
        "training": at_cutoffs(label_queries(labels), *plan.training),
        "evaluation": at_cutoffs(label_queries(labels), plan.evaluation),
        "serving": at_cutoffs(sources.user_features.select("as_of", "user_id"), plan.serving),
    }
    counts = {}
    recall: dict[str, float] = {}
    for role, role_queries in queries.items():
        frame = generate_candidates(role_queries, sources, generator)
        lake.write_parquet(frame.to_arrow(), f"{CANDIDATES}/{role}.parquet")
        counts[role] = frame.height
        if role == "evaluation":
            recall = generator_recall(frame, at_cutoffs(labels, plan.evaluation))
    return dg.MaterializeResult(
        metadata={
            **{f"{role}_rows": rows for role, rows in counts.items()},
            **{f"{role}_users": q.height for role, q in queries.items()},
            **{f"recall_{name}": value for name, value in recall.items()},
            "seconds": round(time.perf_counter() - started, 2),
            "cutoffs": [c.isoformat() for c in plan.all],
        }
    )


@dg.asset(deps=["candidates", "interaction_labels", *TABLE_NAMES], group_name="ranking")
def training_set(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """Labelled feature rows at every training cutoff: one ranking query per (cutoff, user),
    graded labels (purchase 3 > cart 2 > view 1 > nothing 0) from the week after the cutoff."""
    lake = shelfwise.lake()
    plan = load_plan(lake)
    labels = at_cutoffs(lake.read_frame(f"{FEATURES}/interaction_labels.parquet"), *plan.training)
    tables = FeatureTables.load(lake, list(plan.training))
    rows = build_training_set(lake.read_frame(f"{CANDIDATES}/training.parquet"), labels, tables)
    lake.write_parquet(rows.to_arrow(), f"{TRAINING}/training_set.parquet")
    queries = rows.select("as_of", "user_id").n_unique()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows.height,
            "queries": queries,
            "positive_share": float((rows.get_column("label") > 0).mean()),
            "features": len(FEATURE_COLUMNS),
        }
    )


class RankerConfig(dg.Config):
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 50
    num_boost_round: int = 300
    early_stopping_rounds: int = 30
    num_threads: int = 2
    seed: int = 7


@dg.asset(deps=["training_set"], group_name="ranking")
def ranker(shelfwise: ShelfwiseResource, config: RankerConfig) -> dg.MaterializeResult:
    """LightGBM LambdaRank ranker, trained on all training cutoffs but the last, which is the
    validation window for early stopping (later in time than what it trains on)."""
    lake = shelfwise.lake()
    plan = load_plan(lake)
    rows = lake.read_frame(f"{TRAINING}/training_set.parquet")
    params = RankerParams(**config.model_dump())
    # The latest training cutoff validates (early stopping) when there is more than one.
    if len(plan.training) > 1:
        trained_on, validation_cutoff = plan.training[:-1], plan.training[-1]
        train, validation = at_cutoffs(rows, *trained_on), at_cutoffs(rows, validation_cutoff)
    else:
        trained_on, validation_cutoff = plan.training, None
        train, validation = rows, None
    started = time.perf_counter()
    booster = train_ranker(train, validation, params)
    seconds = time.perf_counter() - started
    importances = feature_importance(booster)
    info = {
        "features": FEATURE_COLUMNS,
        "params": params.lightgbm_params(),
        "best_iteration": booster.best_iteration,
        "training_cutoffs": [c.isoformat() for c in trained_on],
        "validation_cutoff": validation_cutoff.isoformat() if validation_cutoff else None,
        "training_rows": train.height,
    }
    lake.write_text(
        booster.model_to_string(num_iteration=booster.best_iteration or None), RANKER_FILE
    )
    lake.write_json(info, RANKER_INFO)
    return dg.MaterializeResult(
        metadata={
            "training_rows": train.height,
            "validation_rows": validation.height if validation is not None else 0,
            "best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "training_seconds": round(seconds, 2),
            "feature_importance_gain": dg.MetadataValue.json(
                {name: round(gain, 2) for name, gain in list(importances.items())[:20]}
            ),
        }
    )
