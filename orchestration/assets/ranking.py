import time

import dagster as dg
import polars as pl

from models.candidates import CandidateConfig, generate_candidates
from models.cutoffs import CutoffPlan
from models.evaluation import evaluate_against_baselines
from models.features import FEATURE_COLUMNS, TABLE_NAMES, FeatureTables, assemble_features
from models.ranker import RankerParams, feature_importance, train_ranker
from models.serving import serving_snapshot
from models.training_set import build_training_set, label_queries
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import (
    CANDIDATES,
    EVALUATION,
    FEATURES,
    MODELS,
    SERVING_CANDIDATES,
    SERVING_POPULAR,
    TRAINING,
    Lake,
)

SERVING_POPULAR_ITEMS = 200
RANKER_FILE = f"{MODELS}/ranker/model.txt"
RANKER_INFO = f"{MODELS}/ranker/model.json"


def _plan(lake: Lake) -> CutoffPlan:
    cutoffs = lake.read_frame(f"{FEATURES}/feature_cutoffs.parquet").get_column("as_of")
    return CutoffPlan.from_cutoffs(cutoffs.to_list())


def _at(frame: pl.DataFrame, *cutoffs) -> pl.DataFrame:
    wanted = pl.Series(list(cutoffs), dtype=pl.Datetime("us", "UTC"))
    return frame.filter(pl.col("as_of").is_in(wanted.implode()))


class CandidatesConfig(dg.Config):
    recent_items: int = 10
    popular_items: int = 50
    max_candidates: int = 150


@dg.asset(
    deps=[
        "item_features",
        "user_item_features",
        "item_covisitation",
        "interaction_labels",
        "feature_cutoffs",
    ],
    group_name="ranking",
)
def candidates(shelfwise: ShelfwiseResource, config: CandidatesConfig) -> dg.MaterializeResult:
    """Candidate items per user and cutoff: the user's recent items, their co-visitation neighbours
    and popular items, with each generator's signal. Training and evaluation cutoffs cover the
    users with something to learn from in the window after; the serving cutoff covers every user
    with history."""
    lake = shelfwise.lake()
    plan = _plan(lake)
    started = time.perf_counter()
    item_features = lake.read_frame(f"{FEATURES}/item_features.parquet")
    user_items = lake.read_frame(f"{FEATURES}/user_item_features.parquet")
    covisitation = lake.read_frame(f"{FEATURES}/item_covisitation.parquet")
    labels = lake.read_frame(f"{FEATURES}/interaction_labels.parquet")
    users = lake.read_frame(f"{FEATURES}/user_features.parquet", columns=["as_of", "user_id"])
    generator = CandidateConfig(**config.model_dump())
    queries = {
        "training": _at(label_queries(labels), *plan.training),
        "evaluation": _at(label_queries(labels), plan.evaluation),
        "serving": _at(users, plan.serving),
    }
    counts = {}
    for role, role_queries in queries.items():
        frame = generate_candidates(
            role_queries, user_items, covisitation, item_features, generator
        )
        lake.write_parquet(frame.to_arrow(), f"{CANDIDATES}/{role}.parquet")
        counts[role] = frame.height
    return dg.MaterializeResult(
        metadata={
            **{f"{role}_rows": rows for role, rows in counts.items()},
            **{f"{role}_users": q.height for role, q in queries.items()},
            "seconds": round(time.perf_counter() - started, 2),
            "cutoffs": [c.isoformat() for c in plan.all],
        }
    )


@dg.asset(deps=["candidates", "interaction_labels", *TABLE_NAMES], group_name="ranking")
def training_set(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """Labelled feature rows at every training cutoff: one ranking query per (cutoff, user),
    graded labels (purchase 3 > cart 2 > view 1 > nothing 0) from the week after the cutoff."""
    lake = shelfwise.lake()
    plan = _plan(lake)
    labels = _at(lake.read_frame(f"{FEATURES}/interaction_labels.parquet"), *plan.training)
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
    plan = _plan(lake)
    rows = lake.read_frame(f"{TRAINING}/training_set.parquet")
    params = RankerParams(**config.model_dump())
    # The latest training cutoff validates (early stopping) when there is more than one.
    if len(plan.training) > 1:
        trained_on, validation_cutoff = plan.training[:-1], plan.training[-1]
        train, validation = _at(rows, *trained_on), _at(rows, validation_cutoff)
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


def load_ranker(lake: Lake):
    import lightgbm as lgb

    return lgb.Booster(model_str=lake.read_text(RANKER_FILE))


@dg.asset(deps=["ranker", "candidates", "interaction_labels", *TABLE_NAMES], group_name="ranking")
def evaluation(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """Offline quality on the held-out week after the evaluation cutoff (a time split): NDCG@10,
    Recall@10/20 of the ranker against popularity and the candidate order without the ranker,
    averaged over users with at least one positive, computed by our own metric code."""
    lake = shelfwise.lake()
    plan = _plan(lake)
    labels = _at(lake.read_frame(f"{FEATURES}/interaction_labels.parquet"), plan.evaluation)
    tables = FeatureTables.load(lake, [plan.evaluation])
    assembled = assemble_features(lake.read_frame(f"{CANDIDATES}/evaluation.parquet"), tables)
    results = evaluate_against_baselines(assembled, load_ranker(lake), labels, tables.items)
    report = {"evaluation_cutoff": plan.evaluation.isoformat(), "metrics": results}
    lake.write_json(report, f"{EVALUATION}/metrics.json")
    ranker_ndcg = results["ranker"]["ndcg@10"]
    popularity_ndcg = results["popularity"]["ndcg@10"]
    return dg.MaterializeResult(
        metadata={
            "evaluated_users": int(results["ranker"]["users"]),
            **{
                f"{approach}_{metric}": float(value)
                for approach, metrics in results.items()
                for metric, value in metrics.items()
                if metric != "users"
            },
            "ndcg@10_lift_over_popularity": float(ranker_ndcg / popularity_ndcg)
            if popularity_ndcg
            else 0.0,
            "metrics": dg.MetadataValue.json(results),
        }
    )


@dg.asset(
    deps=["candidates", *TABLE_NAMES],
    group_name="serving",
)
def serving_features(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """The serving snapshot as of the end of the data: every known user's candidates with feature
    vectors assembled exactly as for training, and the popular in-stock items for everyone else."""
    lake = shelfwise.lake()
    plan = _plan(lake)
    tables = FeatureTables.load(lake, [plan.serving])
    snapshot = serving_snapshot(lake.read_frame(f"{CANDIDATES}/serving.parquet"), tables)
    lake.write_parquet(snapshot.to_arrow(), SERVING_CANDIDATES)
    popular = (
        tables.items.filter(pl.col("is_in_stock"))
        .sort("popularity_rank")
        .head(SERVING_POPULAR_ITEMS)
        .select("item_id", "popularity")
    )
    lake.write_parquet(popular.to_arrow(), SERVING_POPULAR)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": snapshot.height,
            "users": snapshot.get_column("user_id").n_unique(),
            "popular_items": popular.height,
            "as_of": plan.serving.isoformat(),
        }
    )
