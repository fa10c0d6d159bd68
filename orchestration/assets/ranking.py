import time
from collections.abc import Iterator

import dagster as dg
import polars as pl
import pyarrow as pa

from models import artifacts
from models.candidates import (
    CandidateConfig,
    CandidateSources,
    generate_candidates_in_chunks,
    generator_recall_per_user,
    mean_recall,
)
from models.collaborative import NEIGHBOURS_PER_ITEM, item_neighbours
from models.features import (
    ASSEMBLY_CHUNK_ROWS,
    FEATURE_COLUMNS,
    TABLE_NAMES,
)
from models.marts import Marts
from models.queries import QUERY, at_cutoffs, restrict_to_queries, sample_queries
from models.ranker import (
    RankerParams,
    feature_importance,
    model_text,
    train_ranker_with_validation_model,
)
from models.training_set import build_training_set, label_queries
from orchestration.concurrency import MEMORY_HEAVY
from orchestration.configs import config_from, to_params
from orchestration.resources import ShelfwiseResource

CandidatesConfig = config_from(
    CandidateConfig,
    "CandidatesConfig",
    "Generator sizes (models.candidates.CandidateConfig), chunking and the query samples.",
    {
        "chunk_queries": (
            int,
            20_000,
            "Queries (as_of, user) generated at a time: memory is one chunk's candidates and "
            "generator intermediates, not the role's (the rows are the same).",
        ),
        # A cutoff with fewer queries is not sampled, so a shop of up to 25,000 users (the demo
        # has 20,000) trains and evaluates on all of them; at 400,000 users the full sets would
        # be 70+ million training rows.
        "max_training_queries_per_cutoff": (
            int | None,
            25_000,
            "Seeded sample of the labelled training queries per cutoff (None: all).",
        ),
        "max_evaluation_queries": (
            int | None,
            50_000,
            "Seeded sample of the labelled evaluation queries (None: all).",
        ),
        "sample_seed": (int, 7, "Seed of the query samples."),
    },
)


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
ROLES = ("training", "evaluation", "serving")


@dg.asset(deps=CANDIDATE_MARTS, group_name="ranking", op_tags=MEMORY_HEAVY)
def candidates(shelfwise: ShelfwiseResource, config: CandidatesConfig) -> dg.MaterializeResult:
    """Candidate items per user and cutoff from nine generators (history, buy-again,
    co-visitation, bought-together, collaborative, category-popular, new items by content,
    trending, popular),
    each generator's score kept as a feature. Training and evaluation cutoffs cover the users with
    something to learn from in the window after (a seeded sample of them per cutoff in a large
    shop, saved in candidates/queries.parquet); the serving cutoff covers every user with
    history. Generated chunk by chunk of users and streamed into one file per role. The metadata
    reports each generator's recall on the held-out evaluation window."""
    lake = shelfwise.lake()
    plan = artifacts.load_plan(lake)
    started = time.perf_counter()

    generator = to_params(config, CandidateConfig)
    # Later assets (the serving snapshot's re-buy rule) use the sizes this run generated with.
    artifacts.write_candidate_config(lake, generator)
    sources = CandidateSources.from_lake(lake, generator)
    fitted = time.perf_counter() - started
    # The collaborative model's strongest weights per item, for /similar and sessions.
    artifacts.write_item_collaborative(
        lake,
        item_neighbours(
            sources.item_models, NEIGHBOURS_PER_ITEM, sources.user_items.schema["as_of"]
        ),
    )
    labels = artifacts.read_labels(lake)
    labelled = label_queries(labels)
    all_queries = {
        "training": at_cutoffs(labelled, *plan.training),
        "evaluation": at_cutoffs(labelled, plan.evaluation),
        "serving": at_cutoffs(sources.users.select("as_of", "user_id"), plan.serving),
    }
    limits = {
        "training": config.max_training_queries_per_cutoff,
        "evaluation": config.max_evaluation_queries,
        "serving": None,
    }
    queries = {
        role: sample_queries(all_queries[role], limits[role], config.sample_seed) for role in ROLES
    }
    artifacts.write_sampled_queries(lake, queries)
    evaluation_labels = restrict_to_queries(
        at_cutoffs(labels, plan.evaluation), queries["evaluation"]
    )
    recall_parts: list[pl.DataFrame] = []

    def chunks(role: str) -> Iterator[pa.Table]:
        for frame in generate_candidates_in_chunks(
            queries[role], sources, generator, config.chunk_queries
        ):
            if role == "evaluation":
                chunk_labels = restrict_to_queries(evaluation_labels, frame)
                recall_parts.append(generator_recall_per_user(frame, chunk_labels))
            yield frame.to_arrow()

    counts, seconds = {}, {}
    for role in ROLES:
        role_started = time.perf_counter()
        counts[role] = artifacts.write_candidates(lake, role, chunks(role))
        seconds[role] = round(time.perf_counter() - role_started, 2)
    recall = mean_recall(pl.concat(recall_parts)) if recall_parts else {}
    return dg.MaterializeResult(
        metadata={
            **{f"{role}_rows": rows for role, rows in counts.items()},
            **{f"{role}_users": queries[role].height for role in ROLES},
            **{
                f"{role}_labelled_queries": all_queries[role].height
                for role in artifacts.SAMPLED_ROLES
            },
            **{f"{role}_seconds": value for role, value in seconds.items()},
            **{f"recall_{name}": value for name, value in recall.items()},
            "collaborative_items_in_model": {
                as_of.isoformat(): len(model.items) for as_of, model in sources.item_models.items()
            },
            "read_and_fit_seconds": round(fitted, 2),
            "chunk_queries": config.chunk_queries,
            "sample_seed": config.sample_seed,
            "seconds": round(time.perf_counter() - started, 2),
            "cutoffs": [c.isoformat() for c in plan.all],
        }
    )


class TrainingSetConfig(dg.Config):
    """How much of the training set is assembled at a time."""

    # Candidate rows read and assembled at a time (rounded to whole queries): memory holds one
    # chunk's joins, not the whole set's (15 million rows at 75,000 sampled queries).
    chunk_rows: int = ASSEMBLY_CHUNK_ROWS


@dg.asset(deps=["candidates", "interaction_labels", *TABLE_NAMES], group_name="ranking")
def training_set(shelfwise: ShelfwiseResource, config: TrainingSetConfig) -> dg.MaterializeResult:
    """Labelled feature rows at every training cutoff: one ranking query per (cutoff, user),
    graded labels (purchase 3 > cart 2 > view 1 > nothing 0) from the week after the cutoff.
    Assembled chunk by chunk of queries and streamed into one file."""
    lake = shelfwise.lake()
    plan = artifacts.load_plan(lake)
    labels = artifacts.read_labels(lake, *plan.training)
    tables = Marts.load(lake, list(plan.training))
    totals = {"queries": 0, "positives": 0}

    def chunks() -> Iterator[pa.Table]:
        for chunk in artifacts.candidate_chunks(lake, "training", config.chunk_rows):
            rows = build_training_set(
                chunk, restrict_to_queries(labels, chunk), tables.for_queries(chunk)
            )
            totals["queries"] += rows.select(QUERY).n_unique()
            totals["positives"] += int((rows.get_column("label") > 0).sum())
            yield rows.to_arrow()

    rows = artifacts.write_training_set(lake, chunks())
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "queries": totals["queries"],
            "positive_share": totals["positives"] / rows if rows else float("nan"),
            "features": len(FEATURE_COLUMNS),
        }
    )


RankerConfig = config_from(
    RankerParams, "RankerConfig", "LambdaRank hyper-parameters (models.ranker.RankerParams)."
)


@dg.asset(deps=["training_set"], group_name="ranking")
def ranker(shelfwise: ShelfwiseResource, config: RankerConfig) -> dg.MaterializeResult:
    """LightGBM LambdaRank ranker. The last training cutoff is the validation window for early
    stopping (later in time than what it trains on); with the rounds chosen there, the ranker is
    trained again on every training cutoff, the last included (`refit_with_validation`)."""
    lake = shelfwise.lake()
    plan = artifacts.load_plan(lake)
    rows = artifacts.read_training_set(lake)
    params = to_params(config, RankerParams)
    # The latest training cutoff validates (early stopping) when there is more than one.
    if len(plan.training) > 1:
        trained_on, validation_cutoff = plan.training[:-1], plan.training[-1]
        train, validation = at_cutoffs(rows, *trained_on), at_cutoffs(rows, validation_cutoff)
    else:
        trained_on, validation_cutoff = plan.training, None
        train, validation = rows, None
    started = time.perf_counter()
    booster, validation_model = train_ranker_with_validation_model(train, validation, params)
    seconds = time.perf_counter() - started
    importances = feature_importance(booster)
    refitted = validation is not None and params.refit_with_validation
    learned_from = rows if refitted else train
    info = {
        "features": FEATURE_COLUMNS,
        "params": params.lightgbm_params(),
        "best_iteration": booster.best_iteration,
        "training_cutoffs": [c.isoformat() for c in (plan.training if refitted else trained_on)],
        "validation_cutoff": validation_cutoff.isoformat() if validation_cutoff else None,
        "refit_with_validation": refitted,
        "training_rows": learned_from.height,
    }
    artifacts.write_ranker(lake, model_text(booster), info)
    if validation_model is not None:
        # The early-stopped model, which never saw the validation window: the segment policy is
        # chosen with it there (the refit model learned from that window).
        artifacts.write_validation_ranker(lake, model_text(validation_model))
    return dg.MaterializeResult(
        metadata={
            "training_rows": learned_from.height,
            "training_queries": learned_from.select(QUERY).n_unique(),
            "validation_rows": validation.height if validation is not None else 0,
            "refit_with_validation": refitted,
            "best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "training_seconds": round(seconds, 2),
            "feature_importance_gain": dg.MetadataValue.json(
                {name: round(gain, 2) for name, gain in list(importances.items())[:20]}
            ),
        }
    )
