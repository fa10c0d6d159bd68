"""The promotion gate: may a newly trained ranker replace production?

Pure logic over metric dictionaries (no Dagster, no BentoML), so the pipeline, the CLI and tests
share one rule. A candidate passes when, on one metric (NDCG@10 by default), both hold:

1. It beats the best baseline (popularity, candidate order, …) by a relative margin: its value is at
   least `best * (1 + min_lift)`. Default `min_lift` 5%: a ranker that is not clearly better than
   what needs no model is not worth its serving cost.
2. It is not worse than production beyond a relative tolerance: its value is at least
   `production * (1 - tolerance)`. Default `tolerance` 2%: evaluation windows move from week to
   week, so a fresh ranker trained on newer data may score slightly lower on its own window and
   still be the better choice; a larger drop blocks it.

Margins are relative to the magnitude of the reference (`abs`), so they also behave for a zero or
negative reference. Without a production model (a new installation) only the first rule applies;
a production model that does not report the metric is not compared (and the message says so).
Values within 1e-12 of a threshold count as meeting it (floating-point noise).
"""

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_METRIC = "ndcg@10"
DEFAULT_MIN_LIFT = 0.05
DEFAULT_TOLERANCE = 0.02
_EPSILON = 1e-12


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict.

    Attributes:
        passed: Whether the candidate may be promoted.
        message: Every comparison made, and for a failure which one failed and by how much.
        metric: The metric compared.
        candidate: The candidate's value.
        best_baseline: Name of the best baseline, if any baseline was given.
        baseline_value: The best baseline's value, if any.
        lift_over_baseline: Relative lift over the best baseline (0.05 = 5%), if defined.
        production_value: Production's value, if compared.
        change_vs_production: Relative change against production (-0.03 = 3% below), if defined.
    """

    passed: bool
    message: str
    metric: str
    candidate: float
    best_baseline: str | None = None
    baseline_value: float | None = None
    lift_over_baseline: float | None = None
    production_value: float | None = None
    change_vs_production: float | None = None


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _relative(value: float, reference: float) -> float | None:
    return None if reference == 0 else (value - reference) / abs(reference)


def gate_decision(
    candidate: Mapping[str, float],
    baselines: Mapping[str, Mapping[str, float]],
    production: Mapping[str, float] | None,
    metric: str = DEFAULT_METRIC,
    min_lift: float = DEFAULT_MIN_LIFT,
    tolerance: float = DEFAULT_TOLERANCE,
) -> GateDecision:
    """Decides whether a candidate ranker may be promoted to production.

    Args:
        candidate: The candidate's metrics, e.g. `{"ndcg@10": 0.175, "recall@20": 0.239}`.
        baselines: Each baseline's metrics by name, e.g. `{"popularity": {"ndcg@10": 0.033}}`.
            Empty: the baseline rule is skipped.
        production: The production ranker's metrics; None when there is no production model.
        metric: The metric compared (higher is better).
        min_lift: Required relative lift over the best baseline (0.05 = 5%).
        tolerance: Allowed relative drop below production (0.02 = 2%).

    Returns:
        The decision, with a message naming the comparisons and, on failure, the gap.

    Raises:
        ValueError: The candidate or a baseline lacks the metric, or a margin is negative.
    """
    if min_lift < 0 or tolerance < 0:
        raise ValueError(f"min_lift and tolerance must be >= 0, got {min_lift} and {tolerance}")
    if metric not in candidate:
        raise ValueError(f"the candidate has no {metric} (it has {sorted(candidate)})")
    missing = sorted(name for name, values in baselines.items() if metric not in values)
    if missing:
        raise ValueError(f"baseline(s) {', '.join(missing)} have no {metric}")

    value = float(candidate[metric])
    failures: list[str] = []
    notes: list[str] = []
    best_name = best_value = lift = None
    if baselines:
        best_name = max(baselines, key=lambda name: float(baselines[name][metric]))
        best_value = float(baselines[best_name][metric])
        lift = _relative(value, best_value)
        required = best_value + min_lift * abs(best_value)
        shown_lift = "undefined" if lift is None else f"{lift * 100:.1f}%"
        # Against a zero baseline a relative margin means nothing: then "beat" means exceed it.
        beaten = value + _EPSILON >= required and not (best_value == 0 < min_lift and value <= 0)
        if not beaten:
            failures.append(
                f"{metric} {value:.3f} does not beat the best baseline {best_name} "
                f"{best_value:.3f} by the required {_percent(min_lift)} (lift {shown_lift})"
            )
        else:
            notes.append(
                f"{metric} {value:.3f} beats the best baseline {best_name} {best_value:.3f} "
                f"by {shown_lift} (required {_percent(min_lift)})"
            )
    else:
        notes.append("no baselines to compare with")

    production_value = change = None
    if production is None:
        notes.append("no production model yet")
    elif metric not in production:
        notes.append(f"production reports no {metric}; not compared")
    else:
        production_value = float(production[metric])
        change = _relative(value, production_value)
        floor = production_value - tolerance * abs(production_value)
        if value + _EPSILON < floor:
            below = -change if change is not None else 0.0
            failures.append(
                f"{metric} {value:.3f} is {below * 100:.1f}% below production "
                f"{production_value:.3f}, beyond the {_percent(tolerance)} tolerance"
            )
        else:
            direction = "above" if (change or 0.0) >= 0 else "below"
            notes.append(
                f"{metric} {value:.3f} is {abs(change or 0.0) * 100:.1f}% {direction} production "
                f"{production_value:.3f} (tolerance {_percent(tolerance)})"
            )

    passed = not failures
    message = "; ".join(failures) if failures else "; ".join(notes)
    return GateDecision(
        passed=passed,
        message=("passed: " if passed else "failed: ") + message,
        metric=metric,
        candidate=value,
        best_baseline=best_name,
        baseline_value=best_value,
        lift_over_baseline=lift,
        production_value=production_value,
        change_vs_production=change,
    )
