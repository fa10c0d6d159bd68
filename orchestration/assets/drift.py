"""Drift: the features of live requests and of the serving snapshot against the training set."""

from datetime import UTC, datetime

import dagster as dg

from models.drift import (
    DEFAULT_BINS,
    DEFAULT_MAX_ROWS,
    DEFAULT_PSI_THRESHOLD,
    Comparison,
    compare_to_training,
)
from models.features import FEATURE_COLUMNS
from orchestration.resources import ShelfwiseResource

FEATURE_DRIFT_CHECK = "feature_drift"


class FeatureDriftConfig(dg.Config):
    """When a feature has drifted, and how much is read (see models/drift.py)."""

    # PSI above this in any comparison warns (0.1–0.2 is read as a moderate shift, above 0.2 as
    # a significant one).
    psi_threshold: float = DEFAULT_PSI_THRESHOLD
    # The snapshot's PSI is reported, not judged, unless this is set: it holds every known user
    # and the training rows only recently active ones (see models.drift.DriftReport).
    snapshot_psi_threshold: float | None = None
    # Days of sampled live requests compared, today (UTC) included.
    live_days: int = 7
    # Quantile bins of the training distribution (10: deciles), plus one for missing values.
    bins: int = DEFAULT_BINS
    # Rows sampled from the training set, the snapshot and the live samples at most.
    max_rows: int = DEFAULT_MAX_ROWS
    # Fewer sampled live requests than this are reported, not judged.
    min_live_requests: int = 100
    seed: int = 0


@dg.asset_check(
    asset="serving_features",
    name=FEATURE_DRIFT_CHECK,
    additional_deps=["training_set", "live_feature_samples"],
    description="Population stability index (PSI) of every ranker feature: the sampled feature "
    "rows of live /recommend requests of the last days, and the serving snapshot, against the "
    "ranker's training rows (bins at the training deciles, missing values a bin of their own). "
    "Warns when a live feature's PSI is above psi_threshold (0.2); the snapshot's PSI is reported "
    "(judged only with snapshot_psi_threshold: it holds every known user, the training rows only "
    "recently active ones). The worst features are in the metadata.",
)
def feature_drift(shelfwise: ShelfwiseResource, config: FeatureDriftConfig) -> dg.AssetCheckResult:
    """Compares the served features with the training set (`models.drift.compare_to_training`)."""
    report = compare_to_training(
        shelfwise.lake(),
        FEATURE_COLUMNS,
        datetime.now(UTC).date(),
        live_days=config.live_days,
        threshold=config.psi_threshold,
        snapshot_threshold=config.snapshot_psi_threshold,
        bins=config.bins,
        max_rows=config.max_rows,
        min_live_requests=config.min_live_requests,
        seed=config.seed,
    )
    metadata: dict[str, object] = {
        "psi": dg.MetadataValue.md(report.markdown()),
        "psi_threshold": float(config.psi_threshold),
        "training_rows_compared": report.reference_rows,
        "live_requests": report.live.requests,
        "live_rows": report.live.rows.height,
        "live_days": dg.MetadataValue.json(report.live.days),
    }
    for comparison in report.comparisons:
        metadata.update(_numbers(comparison, config.psi_threshold))
    if report.training_spread is not None:
        metadata["max_psi_training_spread"] = report.training_spread.max_psi
    return dg.AssetCheckResult(
        passed=report.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=report.description(),
        metadata=metadata,
    )


def _numbers(comparison: Comparison, threshold: float) -> dict[str, object]:
    """A comparison's numeric metadata (plotted across runs in the UI) and its PSI per feature."""
    name = comparison.name
    worst = comparison.psi.row(0, named=True) if comparison.psi.height else None
    return {
        f"max_psi_{name}": comparison.max_psi,
        f"drifted_features_{name}": len(comparison.drifted(threshold)),
        f"worst_feature_{name}": worst["feature"] if worst else "",
        f"rows_compared_{name}": comparison.rows,
        f"psi_by_feature_{name}": dg.MetadataValue.json(
            {row["feature"]: round(row["psi"], 4) for row in comparison.psi.iter_rows(named=True)}
        ),
    }
