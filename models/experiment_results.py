"""Results of online experiments, and the decision rules that name a winner.

Per arm: rates with intervals and lifts against the control (split), or the lists each arm won
(team-draft interleaving).

**The unit.** An experiment randomises users (split mode: a stable hash of the user id picks the
arm), so a user's impressions are not independent of each other: a keen shopper clicks many of
them. Every rate is a ratio of sums over users (CTR = Σ clicks / Σ impressions), and its variance
is that of a ratio of two per-user means, by the delta method (Deng, Knoblich & Lu, "Applying the
Delta Method in Metric Analytics", 2018): with R = Σy / Σx over n users,

    Var(R) ≈ n / (n - 1) · Σ (y_i - R·x_i)² / (Σ x_i)²,

the linearisation that treats each user's impressions as one cluster. Treating impressions as
independent instead understates the variance and finds winners in null experiments far more
often than stated (tests/test_experiment_results.py simulates both kinds of shoppers). The delta
method costs one pass over the users, has no resampling noise in the decision and agrees with
a bootstrap over users (`models.confidence`) on the interval (tested).

**Split: the relative lift.** An arm's lift on a rate is R_arm / R_control - 1. Arms hold
disjoint users, so Var(log R_arm - log R_control) = Var(R_arm)/R_arm² + Var(R_control)/R_control²,
and the interval exp(log-ratio ± z·se) - 1 is asymmetric as a ratio's should be.

**Split: the decision.** The primary metric is the CTR: clicks are by far the most frequent
outcome, so they show a difference first; carts, purchases and revenue per impression are reported
with their intervals and lifts beside it. With m arms compared to the control, each lift interval
is at confidence 1 - alpha/m (Bonferroni: with two arms, the plain 95% interval). The winner is

- the arm with the largest lift among those whose lift interval lies above 0, unless its lift
  on a guardrail (purchase rate, revenue per impression) lies entirely below 0: more clicks
  bought with fewer sales is no win; else
- the control, when every other arm's lift interval lies below 0; else
- none.

Under the null (all arms alike) a winner is named with probability at most alpha (5%): each
upward claim has probability alpha/(2m), the control's claim at most alpha/(2m). Every arm needs
`min_users` users first: below that the normal approximation is not trusted. The rate holds for
one look at a fixed horizon: reading the results after every pipeline run and stopping at the
first winner raises it (decide the duration before starting).

**Interleaving.** Every list merges two arms by team draft and each item remembers the arm that
drafted it. An arm's score in a list is the number of its drafted items the shopper engaged with:
clicked, carted or bought from the list (each item counted once, so a view followed by a purchase
is not two; a cart straight from the list counts although no view was sent). The arm with more
engaged items wins the list; lists with engagement on both sides alike are ties; lists without
any engagement say nothing and are not counted. The p-value is the two-sided exact binomial
(sign) test of one arm's wins among the non-tied lists against one half, and the arm with more
wins is the winner when p < alpha. With identical arms each list's winner is decided by the
draft's coin flips, so the test is exact under that null (its rate is at most alpha, less with
few lists since the test is discrete). Lists of one user are not independent when the arms
differ; the test counts lists, as interleaving studies do.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl
from scipy import stats

from shelfwise.experiments import (
    ArmResult,
    Experiment,
    ExperimentResults,
    InterleavingResult,
)

DEFAULT_ALPHA = 0.05
# Users every arm needs before a winner may be named (the delta method's normal approximation).
DEFAULT_MIN_USERS = 50
# Per-user sums, in the column order of the matrices the functions below take.
OUTCOMES = ("impressions", "clicks", "carts", "purchases", "revenue")
# The columns of the `experiment_outcomes` mart that `analyse` reads.
MART_COLUMNS = [
    "experiment",
    "arm",
    "drafted_by",
    "user_id",
    "rec_id",
    "is_clicked",
    "is_carted",
    "is_purchased",
    "revenue",
]
# Each rate: its numerator among OUTCOMES, over impressions.
RATES = {
    "ctr": "clicks",
    "cart_rate": "carts",
    "purchase_rate": "purchases",
    "revenue_per_impression": "revenue",
}
PRIMARY_METRIC = "ctr"
# A split arm cannot win while its lift on one of these lies significantly below 0.
GUARDRAILS = ("purchase_rate", "revenue_per_impression")
# The mart's arm for a list merged from two arms (the item's arm is in drafted_by).
INTERLEAVED = "interleaved"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval (None where the data cannot define one).

    Attributes:
        value: The estimate.
        low: Lower bound of the interval.
        high: Upper bound of the interval.
    """

    value: float | None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class ArmSummary:
    """One arm's totals, rates and (split mode, not the control) lifts.

    Attributes:
        arm: The arm's name.
        users: Users with at least one impression of the arm.
        totals: Sums over its users, by name in `OUTCOMES`.
        rates: Per name in `RATES`, the rate with its (1 - alpha) interval.
        lifts: Per name in `RATES`, the relative lift against the control with its
            simultaneous interval; empty for the control and when interleaving.
    """

    arm: str
    users: int
    totals: dict[str, float]
    rates: dict[str, Estimate]
    lifts: dict[str, Estimate] = field(default_factory=dict)


@dataclass(frozen=True)
class ListWins:
    """Team-draft interleaving's comparison of two arms over the lists.

    Attributes:
        wins: Per arm, the lists its drafted items won.
        ties: Lists with engagement, as much on each side.
        p_value: Two-sided exact binomial test of the wins against an even split.
    """

    wins: dict[str, int]
    ties: int
    p_value: float


@dataclass(frozen=True)
class Analysis:
    """An experiment's results and the decision.

    Attributes:
        experiment: Its name.
        mode: `split` or `interleave`.
        arms: Every arm of the experiment, control first.
        winner: The arm the decision rule names, or None.
        reason: Why that winner (or why none), in a sentence.
        interleaving: The list wins when interleaving.
    """

    experiment: str
    mode: str
    arms: list[ArmSummary]
    winner: str | None
    reason: str
    interleaving: ListWins | None = None

    def to_results(self, updated_at: datetime) -> ExperimentResults:
        """The results document of the lake and the service (`EXPERIMENT_RESULTS`)."""
        arms = []
        for summary in self.arms:
            ctr = summary.rates[PRIMARY_METRIC]
            lift = summary.lifts.get(PRIMARY_METRIC, Estimate(None))
            arms.append(
                ArmResult(
                    arm=summary.arm,
                    impressions=int(summary.totals["impressions"]),
                    clicks=int(summary.totals["clicks"]),
                    carts=int(summary.totals["carts"]),
                    purchases=int(summary.totals["purchases"]),
                    revenue_per_impression=summary.rates["revenue_per_impression"].value,
                    ctr=ctr.value,
                    ctr_low=ctr.low,
                    ctr_high=ctr.high,
                    lift_vs_control=lift.value,
                    lift_low=lift.low,
                    lift_high=lift.high,
                )
            )
        interleaving = None
        if self.interleaving is not None:
            interleaving = InterleavingResult(
                wins=self.interleaving.wins,
                ties=self.interleaving.ties,
                p_value=self.interleaving.p_value,
            )
        return ExperimentResults(
            updated_at=updated_at, arms=arms, interleaving=interleaving, winner=self.winner
        )


def ratio_variance(numerators: np.ndarray, denominators: np.ndarray) -> tuple[float, float]:
    """A ratio of sums over users and its variance by the delta method.

    Args:
        numerators: Per user, the numerator's sum (e.g. clicks).
        denominators: Per user, the denominator's sum (e.g. impressions).

    Returns:
        (R, Var(R)) with R = Σ numerators / Σ denominators; NaN when there are no
        denominators, a variance of NaN with fewer than two users.
    """
    y = np.asarray(numerators, dtype=np.float64)
    x = np.asarray(denominators, dtype=np.float64)
    total = x.sum()
    if total <= 0:
        return float("nan"), float("nan")
    ratio = y.sum() / total
    users = len(x)
    if users < 2:
        return float(ratio), float("nan")
    residuals = y - ratio * x
    variance = users / (users - 1) * float(residuals @ residuals) / total**2
    return float(ratio), variance


def _z(alpha: float) -> float:
    """The two-sided normal quantile of a 1 - alpha interval."""
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def rate_estimate(
    numerators: np.ndarray,
    denominators: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    upper: float | None = None,
) -> Estimate:
    """A rate per impression with its (1 - alpha) interval, users being the unit.

    Args:
        numerators: Per user, the numerator's sum.
        denominators: Per user, the impressions.
        alpha: One minus the interval's coverage.
        upper: A bound the rate cannot exceed (1 for a share of impressions), or None.

    Returns:
        The rate and its interval, clipped to [0, upper]; None without impressions, bounds
        None with fewer than two users.
    """
    ratio, variance = ratio_variance(numerators, denominators)
    if not np.isfinite(ratio):
        return Estimate(None)
    if not np.isfinite(variance):
        return Estimate(ratio)
    half = _z(alpha) * np.sqrt(variance)
    high = ratio + half if upper is None else min(ratio + half, upper)
    return Estimate(ratio, max(ratio - half, 0.0), float(high))


def relative_lift(
    arm: tuple[np.ndarray, np.ndarray],
    control: tuple[np.ndarray, np.ndarray],
    alpha: float = DEFAULT_ALPHA,
) -> Estimate:
    """An arm's rate relative to the control's, minus 1, with its (1 - alpha) interval.

    The arms hold different users (independent samples); the interval is taken on the log of
    the ratio of the two rates and mapped back.

    Args:
        arm: The arm's per-user (numerators, denominators).
        control: The control's per-user (numerators, denominators).
        alpha: One minus the interval's coverage.

    Returns:
        The lift and its interval; None where a rate is undefined or 0 (no relative
        difference to state), bounds None when a variance is.
    """
    arm_rate, arm_variance = ratio_variance(*arm)
    control_rate, control_variance = ratio_variance(*control)
    if not (np.isfinite(arm_rate) and np.isfinite(control_rate)) or control_rate <= 0:
        return Estimate(None)
    lift = arm_rate / control_rate - 1.0
    if arm_rate <= 0:
        return Estimate(lift)
    log_variance = arm_variance / arm_rate**2 + control_variance / control_rate**2
    if not np.isfinite(log_variance):
        return Estimate(lift)
    half = _z(alpha) * np.sqrt(log_variance)
    log_ratio = np.log(arm_rate / control_rate)
    return Estimate(lift, float(np.expm1(log_ratio - half)), float(np.expm1(log_ratio + half)))


def _rows(per_user: Mapping[str, np.ndarray] | None, arm: str) -> np.ndarray:
    """An arm's per-user sums as a (users, len(OUTCOMES)) matrix (no rows without any)."""
    rows = (per_user or {}).get(arm)
    if rows is None:
        return np.zeros((0, len(OUTCOMES)))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(OUTCOMES))


def _summary(arm: str, per_user: np.ndarray, alpha: float) -> ArmSummary:
    """An arm's totals and rates from its per-user sums (columns: `OUTCOMES`)."""
    impressions = per_user[:, 0]
    rates = {
        name: rate_estimate(
            per_user[:, OUTCOMES.index(outcome)],
            impressions,
            alpha,
            upper=None if outcome == "revenue" else 1.0,
        )
        for name, outcome in RATES.items()
    }
    totals = {name: float(per_user[:, index].sum()) for index, name in enumerate(OUTCOMES)}
    return ArmSummary(arm=arm, users=len(per_user), totals=totals, rates=rates)


def compare_split(
    per_user: Mapping[str, np.ndarray],
    arms: Sequence[str],
    alpha: float = DEFAULT_ALPHA,
    min_users: int = DEFAULT_MIN_USERS,
    experiment: str = "",
) -> Analysis:
    """A split experiment's arms against the control, and the winner (see the module's rule).

    Args:
        per_user: Per arm, one row per user with the sums of `OUTCOMES` (an arm without
            impressions may be missing or empty).
        arms: The arms in the experiment's order; the first is the control.
        alpha: The error rate: intervals are at 1 - alpha (the lifts' simultaneous over the
            arms compared), and a null experiment names a winner with probability <= alpha.
        min_users: Users every arm needs before a winner may be named.
        experiment: The experiment's name (for the analysis).

    Returns:
        Every arm's summary (lifts on every rate), the winner and the reason.
    """
    rows = {arm: _rows(per_user, arm) for arm in arms}
    control, others = arms[0], list(arms[1:])
    # Bonferroni over the arms compared with the control (two arms: the plain interval).
    lift_alpha = alpha / max(len(others), 1)
    summaries = [_summary(control, rows[control], alpha)]
    for arm in others:
        lifts = {
            name: relative_lift(
                (rows[arm][:, OUTCOMES.index(outcome)], rows[arm][:, 0]),
                (rows[control][:, OUTCOMES.index(outcome)], rows[control][:, 0]),
                lift_alpha,
            )
            for name, outcome in RATES.items()
        }
        summaries.append(dataclasses.replace(_summary(arm, rows[arm], alpha), lifts=lifts))
    winner, reason = _split_winner(summaries, alpha, min_users)
    return Analysis(
        experiment=experiment, mode="split", arms=summaries, winner=winner, reason=reason
    )


def _split_winner(
    summaries: list[ArmSummary], alpha: float, min_users: int
) -> tuple[str | None, str]:
    control, others = summaries[0], summaries[1:]
    few = [s.arm for s in summaries if s.users < min_users]
    if few:
        return None, f"too few users to decide (fewer than {min_users} in {', '.join(few)})"
    lifts = {s.arm: s.lifts[PRIMARY_METRIC] for s in others}
    if control.rates[PRIMARY_METRIC].value in (None, 0.0):
        return None, f"the control '{control.arm}' has no {PRIMARY_METRIC} to compare with"
    confidence = f"{1 - alpha / len(others):.1%}" if len(others) > 1 else f"{1 - alpha:.0%}"
    better = {arm: lift for arm, lift in lifts.items() if lift.low is not None and lift.low > 0}
    # Guardrails: more clicks bought with fewer purchases or less revenue is no win.
    by_arm = {summary.arm: summary for summary in others}
    harmed = {
        arm: [name for name in GUARDRAILS if _below_zero(by_arm[arm].lifts[name])] for arm in better
    }
    if better and all(harmed[arm] for arm in better):
        arm = max(better, key=lambda arm: better[arm].value)
        return None, (
            f"'{arm}' has a higher {PRIMARY_METRIC}, but its {' and '.join(harmed[arm])} "
            f"lift interval ({confidence}) lies below 0"
        )
    better = {arm: lift for arm, lift in better.items() if not harmed[arm]}
    if better:
        best = max(better, key=lambda arm: better[arm].value)
        return best, (
            f"'{best}' has the highest {PRIMARY_METRIC} lift of the arms whose {confidence} "
            f"interval lies above 0 ({better[best].value:+.1%})"
        )
    if all(lift.high is not None and lift.high < 0 for lift in lifts.values()):
        return control.arm, (
            f"every other arm's {PRIMARY_METRIC} lift interval ({confidence}) lies below 0"
        )
    return None, f"no arm's {PRIMARY_METRIC} lift interval ({confidence}) excludes 0"


def _below_zero(lift: Estimate) -> bool:
    return lift.high is not None and lift.high < 0


def sign_test(wins: int, losses: int) -> float:
    """The two-sided exact binomial test of `wins` among `wins + losses` against one half.

    Returns:
        The p-value; 1.0 when there is nothing to test.
    """
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(int(wins), int(wins + losses), 0.5).pvalue)


def compare_interleaved(
    engaged: np.ndarray,
    arms: Sequence[str],
    per_user: Mapping[str, np.ndarray] | None = None,
    alpha: float = DEFAULT_ALPHA,
    experiment: str = "",
) -> Analysis:
    """Two interleaved arms compared over the lists, and the winner (p < alpha).

    Args:
        engaged: One row per list, two columns: the engaged items each arm drafted (in the
            order of `arms`).
        arms: The two arms; the first is the control.
        per_user: Per arm, its drafted items' per-user sums of `OUTCOMES`, for the arms'
            rates (zeros without).
        alpha: The test's level.
        experiment: The experiment's name (for the analysis).

    Returns:
        Both arms' summaries (without lifts), the list wins and the winner.
    """
    if len(arms) != 2:
        raise ValueError(f"interleaving compares two arms, got {list(arms)}")
    engaged = np.asarray(engaged).reshape(-1, 2)
    first = int((engaged[:, 0] > engaged[:, 1]).sum())
    second = int((engaged[:, 1] > engaged[:, 0]).sum())
    ties = int(((engaged[:, 0] == engaged[:, 1]) & (engaged[:, 0] > 0)).sum())
    p_value = sign_test(first, second)
    wins = ListWins(wins={arms[0]: first, arms[1]: second}, ties=ties, p_value=p_value)
    summaries = [_summary(arm, _rows(per_user, arm), alpha) for arm in arms]
    if p_value < alpha and first != second:
        winner = arms[0] if first > second else arms[1]
        reason = (
            f"'{winner}' won {max(first, second)} of {first + second} lists with a winner "
            f"(sign test p = {p_value:.2g} < {alpha:g})"
        )
    else:
        winner = None
        reason = f"the lists won do not differ significantly (p = {p_value:.2g} >= {alpha:g})"
    return Analysis(
        experiment=experiment,
        mode="interleave",
        arms=summaries,
        winner=winner,
        reason=reason,
        interleaving=wins,
    )


def per_user_sums(outcomes: pl.DataFrame, arm_column: str) -> dict[str, np.ndarray]:
    """Per arm, one row per user with the sums of `OUTCOMES` (columns in that order).

    Args:
        outcomes: Rows of the `experiment_outcomes` mart (one per shown item).
        arm_column: `arm` (split) or `drafted_by` (interleaving).
    """
    if outcomes.height == 0:
        return {}
    sums = (
        outcomes.filter(pl.col(arm_column).is_not_null())
        .group_by(arm_column, "user_id")
        .agg(
            pl.len().alias("impressions"),
            pl.col("is_clicked").sum().alias("clicks"),
            pl.col("is_carted").sum().alias("carts"),
            pl.col("is_purchased").sum().alias("purchases"),
            pl.col("revenue").sum().alias("revenue"),
        )
        .sort(arm_column, "user_id")
    )
    return {
        arm: group.select(OUTCOMES).to_numpy().astype(np.float64)
        for (arm,), group in sums.group_by(arm_column, maintain_order=True)
    }


def engaged_per_list(outcomes: pl.DataFrame, arms: Sequence[str]) -> np.ndarray:
    """Per interleaved list, the items each arm drafted that were engaged with.

    An item is engaged with when it was clicked, carted or bought from the list.

    Returns:
        Shape (lists, len(arms)), the lists (rec_ids) sorted.
    """
    if outcomes.height == 0:
        return np.zeros((0, len(arms)), dtype=np.int64)
    engaged = pl.col("is_clicked") | pl.col("is_carted") | pl.col("is_purchased")
    counts = (
        outcomes.group_by("rec_id")
        .agg(
            [
                (engaged & (pl.col("drafted_by") == arm)).sum().alias(f"arm_{index}")
                for index, arm in enumerate(arms)
            ]
        )
        .sort("rec_id")
    )
    return counts.select([f"arm_{index}" for index in range(len(arms))]).to_numpy()


def analyse(
    experiment: Experiment,
    outcomes: pl.DataFrame,
    alpha: float = DEFAULT_ALPHA,
    min_users: int = DEFAULT_MIN_USERS,
) -> Analysis:
    """An experiment's results from the `experiment_outcomes` mart.

    Args:
        experiment: The experiment (its arms and mode).
        outcomes: The mart's rows (other experiments' rows are ignored).
        alpha: The error rate of the decision (and 1 - the intervals' coverage).
        min_users: Users every arm needs before a split experiment names a winner.

    Returns:
        The analysis: per arm, totals, rates and lifts; the interleaving's list wins; the
        winner.
    """
    rows = outcomes.filter(pl.col("experiment") == experiment.name) if outcomes.height else outcomes
    names = [arm.name for arm in experiment.arms]
    if experiment.mode == "interleave":
        rows = rows.filter(pl.col("arm") == INTERLEAVED) if rows.height else rows
        return compare_interleaved(
            engaged_per_list(rows, names),
            names,
            per_user_sums(rows, "drafted_by"),
            alpha,
            experiment=experiment.name,
        )
    return compare_split(
        per_user_sums(rows, "arm"), names, alpha, min_users, experiment=experiment.name
    )


def _interval(estimate: Estimate, pattern: str) -> str:
    if estimate.value is None:
        return "–"
    if estimate.low is None or estimate.high is None:
        return format(estimate.value, pattern)
    return (
        f"{format(estimate.value, pattern)} "
        f"[{format(estimate.low, pattern)}, {format(estimate.high, pattern)}]"
    )


def results_markdown(experiment: Experiment, analysis: Analysis) -> str:
    """One experiment's results as Markdown (Dagster metadata): the arms' table, the decision."""
    stopped = experiment.stopped_at
    status = "running" if stopped is None else f"stopped {stopped:%Y-%m-%d %H:%M}"
    lines = [
        f"**{experiment.name}** ({experiment.mode}, {status}; control: {experiment.control.name})",
        "",
        "| arm | users | impressions | clicks | carts | purchases | CTR [95%] | CTR lift "
        "| cart rate lift | purchase rate lift | revenue / impression | revenue lift |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in analysis.arms:
        lift = arm.lifts.get
        lines.append(
            f"| {arm.arm} | {arm.users} | {arm.totals['impressions']:.0f} "
            f"| {arm.totals['clicks']:.0f} | {arm.totals['carts']:.0f} "
            f"| {arm.totals['purchases']:.0f} "
            f"| {_interval(arm.rates['ctr'], '.2%')} "
            f"| {_interval(lift('ctr', Estimate(None)), '+.1%')} "
            f"| {_interval(lift('cart_rate', Estimate(None)), '+.1%')} "
            f"| {_interval(lift('purchase_rate', Estimate(None)), '+.1%')} "
            f"| {_interval(arm.rates['revenue_per_impression'], '.3f')} "
            f"| {_interval(lift('revenue_per_impression', Estimate(None)), '+.1%')} |"
        )
    if analysis.interleaving is not None:
        wins = analysis.interleaving
        won = ", ".join(f"{arm} {count}" for arm, count in wins.wins.items())
        lines += ["", f"Lists won: {won}; ties {wins.ties}; sign test p = {wins.p_value:.3g}."]
    verdict = f"**winner: {analysis.winner}**" if analysis.winner else "**no winner**"
    lines += ["", f"{verdict}: {analysis.reason}."]
    return "\n".join(lines)


def arm_metadata(analysis: Analysis) -> dict[str, float | int]:
    """Numbers per arm as flat metadata (`<experiment>/<arm>/<number>`).

    The Dagster UI plots each numeric entry across materializations: the experiment's chart.
    """
    values: dict[str, float | int] = {}
    for arm in analysis.arms:
        prefix = f"{analysis.experiment}/{arm.arm}"
        values[f"{prefix}/users"] = arm.users
        for name in OUTCOMES[:4]:
            values[f"{prefix}/{name}"] = int(arm.totals[name])
        for name, estimate in arm.rates.items():
            if estimate.value is not None:
                values[f"{prefix}/{name}"] = float(estimate.value)
        for name, estimate in arm.lifts.items():
            if name == PRIMARY_METRIC and estimate.value is not None:
                values[f"{prefix}/{name}_lift"] = float(estimate.value)
        if analysis.interleaving is not None:
            values[f"{prefix}/lists_won"] = analysis.interleaving.wins.get(arm.arm, 0)
    if analysis.interleaving is not None:
        values[f"{analysis.experiment}/p_value"] = float(analysis.interleaving.p_value)
    return values
