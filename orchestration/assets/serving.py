import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow as pa

from models.business_rules import SERVING_ITEMS, SERVING_PURCHASES, serving_facts
from models.candidates import CandidateConfig
from models.evaluation import NOT_BASELINES, PRODUCTION
from models.features import TABLE_NAMES, FeatureTables, tables_for_queries
from models.gate import (
    DEFAULT_METRIC,
    DEFAULT_MIN_PAIRED_LOWER_BOUND,
    DEFAULT_SEGMENT_TOLERANCE,
    DEFAULT_TOLERANCE,
    gate_decision,
)
from models.queries import QUERY
from models.serving import serving_popular, serving_snapshot
from models.session import BOUGHT_TOGETHER, COLLABORATIVE, COVISIT
from orchestration.assets.shared import (
    ASSEMBLY_CHUNK_ROWS,
    ITEM_COLLABORATIVE,
    RANKER_FILE,
    RANKER_INFO,
    at_cutoffs,
    candidate_chunks,
    load_plan,
)
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import (
    EVALUATION,
    FEATURE_BUILD_MARKER,
    FEATURES,
    SERVING_CANDIDATES,
    SERVING_NEIGHBOURS,
    SERVING_POPULAR,
)
from shelfwise.registry import (
    DATA_READ_AT,
    lake_fingerprint,
    list_rankers,
    production,
    promote,
    register_ranker,
)

SERVING_POPULAR_ITEMS = 200
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENTOFILE = PROJECT_ROOT / "bentos" / "bentofile.yaml"
# The bentoml of this virtual environment, also when it is not activated.
BENTOML_EXECUTABLE = str(Path(sys.executable).with_name("bentoml"))


class ServingFeaturesConfig(dg.Config):
    """How much of the snapshot is assembled at a time."""

    # Candidate rows read and assembled at a time (rounded to whole users): memory holds one
    # chunk's feature vectors, not the snapshot's (60 million rows at 300,000 users).
    chunk_rows: int = ASSEMBLY_CHUNK_ROWS


@dg.asset(
    deps=[
        "candidates",
        "category_repurchase_rates",
        "item_covisitation",
        "item_bought_together",
        *TABLE_NAMES,
    ],
    group_name="serving",
)
def serving_features(
    shelfwise: ShelfwiseResource, config: ServingFeaturesConfig
) -> dg.MaterializeResult:
    """The serving snapshot as of the end of the data: every known user's candidates with feature
    vectors assembled exactly as for training, the item neighbours (co-visitation, bought
    together, collaborative) that sessions and `/similar` use, the popular in-stock items for
    everyone else (never an item the catalog marks as not recommendable), and the facts the
    business rules read
    (catalog stock, price, whether an item may be recommended, repeatable categories, purchases).
    The snapshot is assembled chunk by chunk of users and streamed into one file."""
    lake = shelfwise.lake()
    plan = load_plan(lake)
    tables = FeatureTables.load(lake, [plan.serving])
    users = 0

    def snapshot_chunks() -> Iterator[pa.Table]:
        nonlocal users
        for chunk in candidate_chunks(lake, "serving", config.chunk_rows):
            users += chunk.select(QUERY).n_unique()
            yield serving_snapshot(chunk, tables_for_queries(tables, chunk)).to_arrow()

    rows = lake.write_parquet_tables(snapshot_chunks(), SERVING_CANDIDATES)
    popular = serving_popular(tables.items, SERVING_POPULAR_ITEMS)
    lake.write_parquet(popular.to_arrow(), SERVING_POPULAR)
    rates = at_cutoffs(
        lake.read_frame(f"{FEATURES}/category_repurchase_rates.parquet"), plan.serving
    )
    items, purchases = serving_facts(
        tables.items, rates, tables.user_items, CandidateConfig().min_repeat_rate
    )
    lake.write_parquet(items.to_arrow(), SERVING_ITEMS)
    lake.write_parquet(purchases.to_arrow(), SERVING_PURCHASES)
    neighbours = pl.concat(
        [
            at_cutoffs(lake.read_frame(path), plan.serving).select(
                pl.lit(kind).alias("kind"),
                "item_id",
                "neighbour_item_id",
                pl.col("score").cast(pl.Float64),
            )
            for kind, path in (
                (COVISIT, f"{FEATURES}/item_covisitation.parquet"),
                (BOUGHT_TOGETHER, f"{FEATURES}/item_bought_together.parquet"),
                (COLLABORATIVE, ITEM_COLLABORATIVE),
            )
        ]
    )
    lake.write_parquet(neighbours.to_arrow(), SERVING_NEIGHBOURS)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "users": users,
            "popular_items": popular.height,
            "as_of": plan.serving.isoformat(),
        }
    )


GATE_CHECK = "promotion_gate"


class PromotionGateConfig(dg.Config):
    """How much better than the best baseline, and how close to production, a new ranker must be
    (see models/gate.py)."""

    # A per-user metric: the evaluation gives it a paired interval against every baseline.
    metric: str = DEFAULT_METRIC
    # The lower bound of the 95% paired interval of (ranker - best baseline) on `metric` must be
    # above this, in the metric's units (0: better with 95% confidence; 0.01: by at least 0.01).
    min_paired_lower_bound: float = DEFAULT_MIN_PAIRED_LOWER_BOUND
    # Allowed relative drop of `metric` below the production model on the same users.
    tolerance_below_production: float = DEFAULT_TOLERANCE
    # A user segment served by the ranker blocks promotion when it is significantly worse than
    # its fallback (popularity): the upper bound of its paired 95% interval below minus this.
    segment_tolerance: float = DEFAULT_SEGMENT_TOLERANCE


@dg.asset(
    deps=["ranker", "evaluation"],
    group_name="serving",
    check_specs=[
        dg.AssetCheckSpec(
            GATE_CHECK,
            asset="registered_model",
            blocking=True,
            description="The new ranker beats the best baseline with 95% confidence (the lower "
            "bound of the paired bootstrap interval of the difference is above the margin), is "
            "not worse than the production model beyond the tolerance, and serves no user "
            "segment significantly worse than its fallback (popularity); otherwise it is not "
            "promoted and no bento is built.",
        )
    ],
)
def registered_model(shelfwise: ShelfwiseResource, config: PromotionGateConfig):
    """Every trained ranker in the BentoML model store (`shelfwise models list`), with its
    metrics, feature list, training window, data fingerprint and code version in the model's
    metadata, and its segment policy (which user segments it serves, which get popularity;
    chosen on the validation cutoff by the evaluation) in its info, which the service obeys;
    then the promotion gate decides whether it may become production."""
    settings = shelfwise.settings()
    lake = shelfwise.lake()
    info = lake.read_json(RANKER_INFO)
    report = lake.read_json(f"{EVALUATION}/metrics.json")
    metrics = report["metrics"]
    # The segment policy ships with the model: the service serves each segment as it says.
    policy = report.get("segment_policy")
    if policy:
        info = {**info, "segment_policy": policy}
    # When the feature build started reading the events: feedback published later is new to
    # this ranker (what the feedback sensor counts).
    data_read_at = lake.list_modified(FEATURES, suffix=".json").get(FEATURE_BUILD_MARKER)
    if data_read_at is None:  # features built by a version without the marker
        data_read_at = lake.list_modified(FEATURES)[f"{FEATURES}/feature_cutoffs.parquet"]
    metadata = {
        # Point values only (the intervals are in evaluation/metrics.json).
        **{
            name: float(value)
            for name, value in metrics["ranker"].items()
            if isinstance(value, int | float)
        },
        "popularity_ndcg@10": metrics["popularity"]["ndcg@10"],
        "evaluation_cutoff": report["evaluation_cutoff"],
        "training_cutoffs": info["training_cutoffs"],
        "validation_cutoff": info["validation_cutoff"],
        "features": info["features"],
        "best_iteration": info["best_iteration"],
        **(
            {
                f"segment_{name}_served_by": str(served)
                for name, served in policy.get("serves", {}).items()
            }
            if policy
            else {}
        ),
        "data_end": load_plan(lake).serving.isoformat(),
        DATA_READ_AT: data_read_at.isoformat(),
    }
    tag = register_ranker(
        settings.bentoml_home,
        lake.read_text(RANKER_FILE),
        info,
        metadata,
        data_fingerprint=lake_fingerprint(lake),
    )
    yield dg.MaterializeResult(
        metadata={"tag": tag, "store": dg.MetadataValue.path(str(settings.bentoml_home / "models"))}
    )
    decision = gate_decision(
        metrics["ranker"],
        {name: values for name, values in metrics.items() if name not in NOT_BASELINES},
        metrics.get(PRODUCTION),
        report.get("paired", {}),
        metric=config.metric,
        min_paired_lower_bound=config.min_paired_lower_bound,
        tolerance=config.tolerance_below_production,
        segments=report.get("segments_vs_fallback", {}).get("segments"),
        segment_tolerance=config.segment_tolerance,
    )
    yield dg.AssetCheckResult(
        asset_key="registered_model",
        check_name=GATE_CHECK,
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision.message,
        metadata={
            "tag": tag,
            "decision": decision.message,
            **{
                name: value
                for name, value in decision.metadata().items()
                if value is not None and name != "passed"
            },
            "not_applicable": dg.MetadataValue.json(report.get("not_applicable", {})),
        },
    )


@dg.asset(deps=["registered_model"], group_name="serving")
def production_model(
    context: dg.AssetExecutionContext, shelfwise: ShelfwiseResource
) -> dg.MaterializeResult:
    """The ranker in production (`shelfwise_production:latest`, what the service and the bento
    use): the newly registered ranker, once it passed the promotion gate."""
    home = shelfwise.settings().bentoml_home
    [newest, *_] = list_rankers(home)
    # The blocking check stops this step only within the run that evaluated the gate; this asset
    # can also be materialized on its own, so it reads the gate's latest verdict itself.
    gate = context.instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(dg.AssetKey("registered_model"), GATE_CHECK)
    )
    verdict = gate.evaluation if gate else None
    judged = verdict.metadata["tag"].value if verdict and "tag" in verdict.metadata else None
    if verdict is None or judged != newest:
        raise dg.Failure(
            f"No promotion_gate verdict on {newest}, the newest registered ranker: materialize "
            "registered_model first, or promote by hand with `shelfwise models promote`."
        )
    if not verdict.passed:
        raise dg.Failure(f"{newest} failed the promotion gate: {verdict.description}")
    tag = promote(home, newest)
    current = production(home)
    return dg.MaterializeResult(
        metadata={
            "production_tag": tag,
            "source_tag": current.source_tag,
            "previous_source_tag": str(current.previous_source_tag),
        }
    )


@dg.asset(deps=["production_model", "serving_features"], group_name="serving")
def bento(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """The deployable bento (`shelfwise:<version>`): the service code, the core and ML packages and
    the production ranker, built offline from bentos/bentofile.yaml."""
    settings = shelfwise.settings()
    env = {**os.environ, "BENTOML_HOME": str(settings.bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    # A subprocess: BentoML binds its home when first used, and this run's home must win.
    result = subprocess.run(
        [BENTOML_EXECUTABLE, "build", "-f", str(BENTOFILE), "-o", "tag", str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        check=False,
    )
    if result.returncode != 0:
        raise dg.Failure(f"bentoml build failed:\n{result.stderr[-4000:]}")
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return dg.MaterializeResult(metadata={"tag": tag})
