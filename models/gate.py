"""The promotion gate: may a newly trained ranker replace production?

Pure logic over the evaluation's numbers (no Dagster, no BentoML), so the pipeline, the CLI and
tests share one rule. A candidate passes when, on one per-user metric (NDCG@10 by default), both
hold:

1. It is better than the best baseline with 95% confidence: the LOWER bound of the paired
   bootstrap interval of `candidate - best baseline` (the same resampled users for both; see
   `models.confidence`) is above `min_paired_lower_bound` (default 0, in the metric's own
   units: 0.01 demands at least 0.01 NDCG more). The best baseline is the one with the highest
   point value among those given: the caller passes the applicable baselines only (not the
   candidate, production or the oracle; a baseline the data cannot define is not in the
   metrics at all). A ranker that merely matches buy-again has an interval around 0 and is
   refused, however its point value happens to fall. This replaces the former relative rule
   (point value at least 5% above the best baseline): a point lift says nothing about noise,
   with 300 users a 5% lift can be chance and with 50,000 a 2% lift can be certain. The point
   lift is still reported (`lift_over_baseline`), never decisive.
2. It is not worse than production beyond a relative tolerance: its value is at least
   `production * (1 - tolerance)`. Default `tolerance` 2%: evaluation windows move from week to
   week, so a fresh ranker trained on newer data may score slightly lower on its own window and
   still be the better choice; a larger drop blocks it. (This rule is deliberately lenient and
   stays on point values; the paired difference against production is reported by the
   evaluation.)

3. No user segment is served worse than its fallback (when the evaluation's segments are given:
   `evaluation/metrics.json` `segments_vs_fallback.segments`). Each segment (`new`, `light`,
   `heavy` by events before the cutoff) is judged *as served*: the segment policy, chosen on
   the validation cutoff and shipped with the model (`models.segments`), serves it either the
   ranker or its fallback (popularity, what the service serves a user it does not know). A
   segment served the fallback gets exactly the fallback's lists (difference 0) and cannot fail.
   A segment served the ranker fails when the ranker is *significantly worse* than popularity
   there: its point difference is below 0 AND the upper bound of the paired 95% interval of
   `ranker - popularity` on the segment's users is below `-segment_tolerance` (default 0).
   Not the lower bound: a small segment (a few hundred light users) has a wide interval, so
   "lower bound below 0" would block nearly every ranker on noise; the validation choice
   already sent any segment the ranker did not win to the fallback, and this rule catches a
   segment where that choice was wrong beyond doubt on the evaluation cutoff. The fix for such
   a failure is a policy that serves that segment its fallback (retrain, or a validation window
   that shows it), never a silently worse segment. A segment without evaluated users is not
   judged. Every segment's numbers are in the decision (`segments`, and flattened in
   `metadata()`), and a segment whose lower bound is below 0 is named as "not shown better".

Without baselines rule 1 is skipped; without a production model (a new installation) rule 2 is;
a production model that does not report the metric is not compared (and the message says so);
without segments rule 3 is skipped. `decided_by` names the rule(s) that decided: on a pass
`paired_lower_bound` (or `production_tolerance` / `no_comparison` when there was no baseline),
on a failure every rule that failed (`segment_vs_fallback` for rule 3).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_METRIC = "ndcg@10"
DEFAULT_MIN_PAIRED_LOWER_BOUND = 0.0
DEFAULT_TOLERANCE = 0.02
PAIRED_LOWER_BOUND = "paired_lower_bound"
PRODUCTION_TOLERANCE = "production_tolerance"
NO_COMPARISON = "no_comparison"
SEGMENT_VS_FALLBACK = "segment_vs_fallback"
DEFAULT_SEGMENT_TOLERANCE = 0.0
_EPSILON = 1e-12


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict.

    Attributes:
        passed: Whether the candidate may be promoted.
        message: Every comparison made, and for a failure which one failed and by how much.
        metric: The metric compared.
        candidate: The candidate's value.
        decided_by: The rule(s) that decided (`paired_lower_bound`, `production_tolerance`,
            comma-separated when both failed; `no_comparison` when nothing was compared).
        best_baseline: Name of the best baseline, if any baseline was given.
        baseline_value: The best baseline's value, if any.
        paired_difference: The candidate's value minus the best baseline's, on the same users.
        paired_lower_bound: Lower bound of the paired difference's 95% interval.
        paired_upper_bound: Upper bound of that interval.
        min_paired_lower_bound: The margin the lower bound had to be above.
        lift_over_baseline: Relative point lift over the best baseline (0.05 = 5%), if defined;
            reported only.
        production_value: Production's value, if compared.
        change_vs_production: Relative change against production (-0.03 = 3% below), if defined.
        segment_tolerance: How far below 0 a served segment's paired upper bound must be to fail.
        segments: Segment → `users`, `served_by`, `diff`, `lower`, `upper` (served minus its
            fallback on `metric`, 95% paired interval) and `worse` (1.0 when it failed rule 3).
    """

    passed: bool
    message: str
    metric: str
    candidate: float
    decided_by: str
    best_baseline: str | None = None
    baseline_value: float | None = None
    paired_difference: float | None = None
    paired_lower_bound: float | None = None
    paired_upper_bound: float | None = None
    min_paired_lower_bound: float = DEFAULT_MIN_PAIRED_LOWER_BOUND
    lift_over_baseline: float | None = None
    production_value: float | None = None
    change_vs_production: float | None = None
    segment_tolerance: float = DEFAULT_SEGMENT_TOLERANCE
    segments: dict[str, dict[str, float | str]] = field(default_factory=dict)

    def metadata(self) -> dict[str, float | str | bool | None]:
        """The decision's numbers as plain values (for asset-check metadata).

        Segments are flattened as `segment_<name>_<key>` (e.g. `segment_light_upper`).
        """
        return {
            "passed": self.passed,
            "decided_by": self.decided_by,
            "metric": self.metric,
            "candidate": self.candidate,
            "best_baseline": self.best_baseline,
            "baseline_value": self.baseline_value,
            "paired_difference": self.paired_difference,
            "paired_lower_bound": self.paired_lower_bound,
            "paired_upper_bound": self.paired_upper_bound,
            "min_paired_lower_bound": self.min_paired_lower_bound,
            "lift_over_baseline": self.lift_over_baseline,
            "production_value": self.production_value,
            "change_vs_production": self.change_vs_production,
            **({"segment_tolerance": self.segment_tolerance} if self.segments else {}),
            **{
                f"segment_{segment}_{key}": value
                for segment, values in self.segments.items()
                for key, value in values.items()
            },
        }


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _relative(value: float, reference: float) -> float | None:
    return None if reference == 0 else (value - reference) / abs(reference)


def _interval(paired: Mapping[str, Any], metric: str, baseline: str) -> tuple[float, float, float]:
    difference = paired.get(f"{metric}_diff")
    bounds = paired.get(f"{metric}_diff_ci95")
    if difference is None or not isinstance(bounds, Sequence) or len(bounds) != 2:
        raise ValueError(
            f"no paired {metric} difference with a 95% interval against the best baseline "
            f"{baseline} (the evaluation writes paired.<baseline>.{metric}_diff and _diff_ci95 "
            "for per-user metrics)"
        )
    return float(difference), float(bounds[0]), float(bounds[1])


def gate_decision(
    candidate: Mapping[str, Any],
    baselines: Mapping[str, Mapping[str, Any]],
    production: Mapping[str, Any] | None,
    paired: Mapping[str, Mapping[str, Any]],
    metric: str = DEFAULT_METRIC,
    min_paired_lower_bound: float = DEFAULT_MIN_PAIRED_LOWER_BOUND,
    tolerance: float = DEFAULT_TOLERANCE,
    segments: Mapping[str, Mapping[str, Any]] | None = None,
    segment_tolerance: float = DEFAULT_SEGMENT_TOLERANCE,
) -> GateDecision:
    """Decides whether a candidate ranker may be promoted to production.

    Args:
        candidate: The candidate's metrics, e.g. `{"ndcg@10": 0.175, "recall@20": 0.239}`.
        baselines: Each applicable baseline's metrics by name, e.g.
            `{"buy_again": {"ndcg@10": 0.127}}`. Empty: the baseline rule is skipped.
        production: The production ranker's metrics; None when there is no production model.
        paired: Per approach, the candidate's paired difference against it, as the
            evaluation writes it (`evaluation/metrics.json` `paired`): `{"buy_again":
            {"ndcg@10_diff": 0.056, "ndcg@10_diff_ci95": [0.041, 0.071]}}`. Only the best
            baseline's entry is read.
        metric: The metric compared (higher is better; a per-user metric, which has a paired
            interval).
        min_paired_lower_bound: The paired interval's lower bound must be above this (>= 0).
        tolerance: Allowed relative drop below production (0.02 = 2%).
        segments: Per segment, as the evaluation writes it (`evaluation/metrics.json`
            `segments_vs_fallback.segments`): `{"light": {"users": 812, "served_by": "ranker",
            "served_minus_fallback": {"ndcg@10_diff": 0.021, "ndcg@10_diff_ci95": [0.004,
            0.038]}}}`. None skips rule 3.
        segment_tolerance: A served segment fails when its paired upper bound is below minus
            this (>= 0), and its point difference below 0.

    Returns:
        The decision, with a message naming the comparisons and, on failure, the gap.

    Raises:
        ValueError: The candidate or a baseline lacks the metric, the best baseline has no
            paired interval, or a margin is negative.
    """
    if min_paired_lower_bound < 0 or tolerance < 0 or segment_tolerance < 0:
        raise ValueError(
            "min_paired_lower_bound, tolerance and segment_tolerance must be >= 0, got "
            f"{min_paired_lower_bound}, {tolerance} and {segment_tolerance}"
        )
    if metric not in candidate:
        raise ValueError(f"the candidate has no {metric} (it has {sorted(candidate)})")
    missing = sorted(name for name, values in baselines.items() if metric not in values)
    if missing:
        raise ValueError(f"baseline(s) {', '.join(missing)} have no {metric}")

    value = float(candidate[metric])
    failed: list[str] = []
    failures: list[str] = []
    notes: list[str] = []
    best_name = best_value = lift = difference = lower = upper = None
    if baselines:
        best_name = max(baselines, key=lambda name: float(baselines[name][metric]))
        best_value = float(baselines[best_name][metric])
        lift = _relative(value, best_value)
        difference, lower, upper = _interval(paired.get(best_name, {}), metric, best_name)
        shown = (
            f"paired {metric} difference over the best baseline {best_name} {difference:+.4f} "
            f"[{lower:+.4f}, {upper:+.4f}] (95%; {metric} {value:.3f} vs {best_value:.3f})"
        )
        # Strictly above the margin: a lower bound of exactly 0 (the same lists) is no evidence.
        if lower > min_paired_lower_bound + _EPSILON:
            notes.append(
                f"{shown}: its lower bound {lower:.4f} is above {min_paired_lower_bound:g}"
            )
        else:
            failed.append(PAIRED_LOWER_BOUND)
            failures.append(
                f"{metric} is not shown better than the best baseline {best_name}: {shown}; its "
                f"lower bound {lower:.4f} is not above {min_paired_lower_bound:g}"
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
            failed.append(PRODUCTION_TOLERANCE)
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

    judged = _judge_segments(segments or {}, metric, segment_tolerance)
    worse = [name for name, values in judged.items() if values["worse"]]
    if worse:
        failed.append(SEGMENT_VS_FALLBACK)
        failures.append(
            f"segment(s) {', '.join(worse)} served by the ranker are worse than their fallback "
            f"(popularity) beyond doubt: {_segments_text(judged, worse, metric)}; the upper "
            f"bound must not be below {-segment_tolerance:g}"
        )
    elif judged:
        notes.append(_segments_note(judged, metric))

    passed = not failures
    if failed:
        decided_by = ",".join(failed)
    elif best_name is not None:
        decided_by = PAIRED_LOWER_BOUND
    elif production_value is not None:
        decided_by = PRODUCTION_TOLERANCE
    else:
        decided_by = NO_COMPARISON
    message = "; ".join(failures) if failures else "; ".join(notes)
    return GateDecision(
        passed=passed,
        message=("passed: " if passed else "failed: ") + message,
        metric=metric,
        candidate=value,
        decided_by=decided_by,
        best_baseline=best_name,
        baseline_value=best_value,
        paired_difference=difference,
        paired_lower_bound=lower,
        paired_upper_bound=upper,
        min_paired_lower_bound=float(min_paired_lower_bound),
        lift_over_baseline=lift,
        production_value=production_value,
        change_vs_production=change,
        segment_tolerance=float(segment_tolerance),
        segments=judged,
    )


def _judge_segments(
    segments: Mapping[str, Mapping[str, Any]], metric: str, segment_tolerance: float
) -> dict[str, dict[str, float | str]]:
    judged: dict[str, dict[str, float | str]] = {}
    for name, values in segments.items():
        users = int(values.get("users", 0))
        if users == 0:
            continue
        served_by = str(values.get("served_by", "ranker"))
        served = values.get("served_minus_fallback", {})
        bounds = served.get(f"{metric}_diff_ci95")
        if f"{metric}_diff" not in served or not isinstance(bounds, Sequence) or len(bounds) != 2:
            raise ValueError(
                f"segment {name} has no paired {metric} difference against its fallback with a "
                "95% interval (the evaluation writes segments_vs_fallback.segments.<segment>."
                f"served_minus_fallback.{metric}_diff and _diff_ci95)"
            )
        difference, lower, upper = (
            float(served[f"{metric}_diff"]),
            float(bounds[0]),
            float(bounds[1]),
        )
        worse = difference < 0 and upper < -segment_tolerance - _EPSILON
        judged[name] = {
            "users": float(users),
            "served_by": served_by,
            "diff": difference,
            "lower": lower,
            "upper": upper,
            "worse": 1.0 if worse else 0.0,
        }
    return judged


def _segment_text(name: str, values: Mapping[str, float | str]) -> str:
    return (
        f"{name} ({int(values['users'])} users, served by {values['served_by']}) "
        f"{float(values['diff']):+.4f} [{float(values['lower']):+.4f}, "
        f"{float(values['upper']):+.4f}]"
    )


def _segments_text(
    judged: Mapping[str, Mapping[str, float | str]], names: Sequence[str], metric: str
) -> str:
    shown = "; ".join(_segment_text(name, judged[name]) for name in names)
    return f"paired {metric} difference served minus popularity: {shown}"


def _segments_note(judged: Mapping[str, Mapping[str, float | str]], metric: str) -> str:
    unsure = [
        name
        for name, values in judged.items()
        if values["served_by"] == "ranker" and float(values["lower"]) <= 0.0
    ]
    shown = _segments_text(judged, list(judged), metric)
    note = f"no segment is served worse than popularity: {shown}"
    if unsure:
        note += f" ({', '.join(unsure)} not shown better than popularity, nor worse)"
    return note
