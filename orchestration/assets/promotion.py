"""Promotion: every trained ranker registered in the model store, the gate that decides whether
it may serve, and the production alias the service and the bento use."""

import dagster as dg

from models import artifacts
from models.compiled_ranker import LIBRARY_FILE, write_compiled
from models.evaluation import NOT_BASELINES, PRODUCTION
from models.gate import (
    DEFAULT_METRIC,
    DEFAULT_MIN_PAIRED_LOWER_BOUND,
    DEFAULT_SEGMENT_TOLERANCE,
    DEFAULT_TOLERANCE,
    gate_decision,
)
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import FEATURE_BUILD_MARKER, FEATURE_CUTOFFS, FEATURES
from shelfwise.runtime.registry import (
    DATA_READ_AT,
    lake_fingerprint,
    list_rankers,
    production,
    production_path,
    promote,
    register_ranker,
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
    info = artifacts.read_ranker_info(lake)
    report = artifacts.read_evaluation_report(lake)
    metrics = report["metrics"]
    # The segment policy ships with the model: the service serves each segment as it says.
    policy = report.get("segment_policy")
    if policy:
        info = {**info, "segment_policy": policy}
    # When the feature build started reading the events: feedback published later is new to
    # this ranker (what the feedback sensor counts).
    data_read_at = lake.list_modified(FEATURES, suffix=".json").get(FEATURE_BUILD_MARKER)
    if data_read_at is None:  # features built by a version without the marker
        data_read_at = lake.list_modified(FEATURES)[FEATURE_CUTOFFS]
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
        "data_end": artifacts.load_plan(lake).serving.isoformat(),
        DATA_READ_AT: data_read_at.isoformat(),
    }
    tag = register_ranker(
        settings.bentoml_home,
        artifacts.read_ranker_text(lake),
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
    use): the newly registered ranker, once it passed the promotion gate, with its compiled form
    (`models.compiled_ranker`) when lleaves can compile it here."""
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
    # The compiled ranker goes into the production folder: the bento carries it.
    tag = promote(home, newest, add_files=write_compiled)
    current = production(home)
    return dg.MaterializeResult(
        metadata={
            "production_tag": tag,
            "source_tag": current.source_tag,
            "previous_source_tag": str(current.previous_source_tag),
            "compiled": (production_path(home) / LIBRARY_FILE).is_file(),
        }
    )
