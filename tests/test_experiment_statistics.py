"""The decision rules of experiment_results on simulated experiments: null experiments (identical
arms) name a winner at the stated error rate, real effects name the right winner; split and
team-draft interleaving alike. Pure Python, seeded, a few seconds."""

import numpy as np
import pytest
from scipy import stats

from models.confidence import bootstrap_means, percentile_interval
from models.experiment_results import (
    DEFAULT_ALPHA,
    compare_interleaved,
    compare_split,
    rate_estimate,
    relative_lift,
    sign_test,
)

EXPERIMENTS = 400


def shoppers(rng: np.random.Generator, users: int, effect: float = 1.0) -> np.ndarray:
    """Per-user sums of one arm (impressions, clicks, carts, purchases, revenue).

    Shoppers are very unequal: a user's click propensity is Beta(0.4, 3.6) (mean 0.1, a few
    click a lot), so a user's impressions are not independent of each other. `effect`
    multiplies every propensity (the arm shows better items)."""
    impressions = rng.integers(1, 30, users)
    propensity = np.minimum(rng.beta(0.4, 3.6, users) * effect, 1.0)
    clicks = rng.binomial(impressions, propensity)
    carts = rng.binomial(clicks, 0.3)
    purchases = rng.binomial(carts, 0.5)
    revenue = purchases * rng.lognormal(3.0, 1.0, users)
    return np.column_stack([impressions, clicks, carts, purchases, revenue]).astype(float)


def as_impressions(per_user: np.ndarray) -> np.ndarray:
    """The same clicks with every impression its own "user" (the mistake to guard against)."""
    rows = []
    for impressions, clicks, *_ in per_user.astype(int):
        row = np.zeros((impressions, 5))
        row[:, 0] = 1
        row[:clicks, 1] = 1
        rows.append(row)
    return np.vstack(rows)


def tolerance(experiments: int, rate: float = DEFAULT_ALPHA) -> tuple[int, int]:
    """The central 99.9% range of the winners among null experiments at the stated rate."""
    low, high = stats.binom.ppf([0.0005, 0.9995], experiments, rate)
    return int(low), int(high)


def test_a_null_split_experiment_names_a_winner_at_the_stated_rate():
    rng = np.random.default_rng(20261206)
    winners = []
    for _ in range(EXPERIMENTS):
        per_user = {"control": shoppers(rng, 400), "treatment": shoppers(rng, 400)}
        winners.append(compare_split(per_user, ["control", "treatment"]).winner)
    named = sum(winner is not None for winner in winners)
    low, high = tolerance(EXPERIMENTS)
    assert low <= named <= high, f"{named} of {EXPERIMENTS} null experiments named a winner"
    # Both directions occur (the rule is two-sided: the control can win too).
    assert "control" in winners and "treatment" in winners


def test_clicks_counted_per_impression_would_find_winners_in_null_experiments():
    """The simulation has teeth: the same null experiments analysed with impressions as the
    unit (ignoring that they cluster in users) name winners far above 5%."""
    rng = np.random.default_rng(7)
    named = 0
    for _ in range(100):
        per_user = {"control": shoppers(rng, 300), "treatment": shoppers(rng, 300)}
        per_impression = {arm: as_impressions(rows) for arm, rows in per_user.items()}
        named += compare_split(per_impression, ["control", "treatment"]).winner is not None
    assert named > tolerance(100)[1]


def test_a_null_experiment_of_four_arms_stays_at_the_rate():
    """Three arms against the control: the lift intervals are Bonferroni-corrected, so the
    chance of any winner stays at most 5%."""
    rng = np.random.default_rng(11)
    arms = ["control", "a", "b", "c"]
    named = sum(
        compare_split({arm: shoppers(rng, 300) for arm in arms}, arms).winner is not None
        for _ in range(EXPERIMENTS)
    )
    assert named <= tolerance(EXPERIMENTS)[1]
    # Uncorrected, three comparisons at 5% each would name a winner in about 14%.
    assert named < 0.1 * EXPERIMENTS


def test_a_real_split_effect_names_the_right_winner():
    rng = np.random.default_rng(5)
    winners = []
    for _ in range(50):
        per_user = {"control": shoppers(rng, 1500), "better": shoppers(rng, 1500, effect=1.3)}
        winners.append(compare_split(per_user, ["control", "better"]).winner)
    assert winners.count("better") >= 45 and "control" not in winners


def test_the_best_of_several_better_arms_wins_and_a_worse_one_never_does():
    rng = np.random.default_rng(8)
    arms = ["control", "worse", "good", "best"]
    effects = {"control": 1.0, "worse": 0.7, "good": 1.25, "best": 1.6}
    per_user = {arm: shoppers(rng, 2000, effect) for arm, effect in effects.items()}
    analysis = compare_split(per_user, arms)
    assert analysis.winner == "best"
    lifts = {arm.arm: arm.lifts["ctr"] for arm in analysis.arms[1:]}
    assert lifts["worse"].high < 0 < lifts["good"].low
    assert lifts["best"].value > lifts["good"].value


def test_a_worse_treatment_makes_the_control_the_winner():
    rng = np.random.default_rng(9)
    per_user = {"control": shoppers(rng, 1500), "worse": shoppers(rng, 1500, effect=0.7)}
    assert compare_split(per_user, ["control", "worse"]).winner == "control"


def test_more_clicks_with_fewer_purchases_is_no_win():
    """The guardrails: an arm whose CTR lift is significant but whose purchase rate is
    significantly lower does not win, and the reason says why."""
    rng = np.random.default_rng(14)
    baiting = shoppers(rng, 2000, effect=1.5)
    baiting[:, 2] = rng.binomial(baiting[:, 1].astype(int), 0.05)  # clicked, rarely carted
    baiting[:, 3] = rng.binomial(baiting[:, 2].astype(int), 0.5)
    baiting[:, 4] = baiting[:, 3] * 20.0
    analysis = compare_split({"control": shoppers(rng, 2000), "bait": baiting}, ["control", "bait"])
    lifts = analysis.arms[1].lifts
    assert lifts["ctr"].low > 0 and lifts["purchase_rate"].high < 0
    assert analysis.winner is None and "purchase_rate" in analysis.reason


def test_too_few_users_name_no_winner_however_large_the_difference():
    rng = np.random.default_rng(10)

    def even_shoppers(ctr: float) -> np.ndarray:
        rows = np.zeros((30, 5))
        rows[:, 0] = 10
        rows[:, 1] = rng.binomial(10, ctr, 30)
        return rows

    per_user = {"control": even_shoppers(0.1), "better": even_shoppers(0.5)}
    analysis = compare_split(per_user, ["control", "better"], min_users=50)
    assert analysis.winner is None and "too few users" in analysis.reason
    assert compare_split(per_user, ["control", "better"], min_users=10).winner == "better"


def test_an_arm_without_impressions_has_no_rates_and_no_winner():
    rng = np.random.default_rng(12)
    analysis = compare_split({"control": shoppers(rng, 200)}, ["control", "silent"])
    silent = analysis.arms[1]
    assert silent.users == 0 and silent.totals["impressions"] == 0
    assert silent.rates["ctr"].value is None and silent.lifts["ctr"].value is None
    assert analysis.winner is None


def test_the_delta_method_interval_agrees_with_a_bootstrap_over_users():
    """The CTR's interval and the lift's, against the percentile bootstrap of
    models.confidence resampling users (independently per arm for the lift)."""
    rng = np.random.default_rng(13)
    control, treatment = shoppers(rng, 2000), shoppers(rng, 2000, effect=1.1)
    estimate = rate_estimate(control[:, 1], control[:, 0])
    means = bootstrap_means(control[:, :2], resamples=2000, seed=1)
    low, high = percentile_interval((means[:, 1] / means[:, 0])[:, None])
    assert estimate.low == pytest.approx(low[0], rel=0.02)
    assert estimate.high == pytest.approx(high[0], rel=0.02)

    lift = relative_lift((treatment[:, 1], treatment[:, 0]), (control[:, 1], control[:, 0]))
    arm_means = bootstrap_means(treatment[:, :2], resamples=2000, seed=2)
    lifts = (arm_means[:, 1] / arm_means[:, 0]) / (means[:, 1] / means[:, 0]) - 1
    low, high = percentile_interval(lifts[:, None])
    width = high[0] - low[0]
    assert abs(lift.low - low[0]) < 0.05 * width and abs(lift.high - high[0]) < 0.05 * width


def test_rates_of_shares_stay_within_zero_and_one():
    estimate = rate_estimate(np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0]))
    assert estimate.low == 0.0 and 0 < estimate.value < estimate.high <= 1.0
    everything = rate_estimate(np.array([3.0, 2.0]), np.array([3.0, 2.0]))
    assert (everything.value, everything.high) == (1.0, 1.0)


# Team-draft interleaving, simulated: rankings of a shopper's items, the draft, and clicks that
# depend on the item's appeal to the shopper and on its position.
POSITION_BIAS = 1 / np.log2(np.arange(2, 12))


def team_draft(
    rng: np.random.Generator, first: np.ndarray, second: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each round a coin decides which arm picks first; each arm picks its best item not yet
    in the list. Returns the list's items and the index of the arm that drafted each."""
    items: list[int] = []
    teams: list[int] = []
    heads = [0, 0]
    taken: set[int] = set()
    rankings = (first, second)
    while len(items) < length:
        for arm in (0, 1) if rng.random() < 0.5 else (1, 0):
            if len(items) == length:
                break
            while rankings[arm][heads[arm]] in taken:
                heads[arm] += 1
            item = int(rankings[arm][heads[arm]])
            taken.add(item)
            items.append(item)
            teams.append(arm)
    return np.array(items), np.array(teams)


def interleaved_lists(
    rng: np.random.Generator, lists: int, second_is_better: bool, users: int = 150
) -> np.ndarray:
    """Engaged items per arm per list. Identical arms rank alike; a better second arm ranks by
    the shopper's true appeal with less noise."""
    engaged = np.zeros((lists, 2), dtype=int)
    propensity = rng.beta(0.5, 1.5, users)[rng.integers(0, users, lists)]
    for row in range(lists):
        appeal = rng.beta(1, 4, 60)
        first = np.argsort(-(appeal + rng.normal(0, 0.3, 60)))
        second = np.argsort(-(appeal + rng.normal(0, 0.05, 60))) if second_is_better else first
        items, teams = team_draft(rng, first, second, 10)
        chance = np.minimum(1.0, 2 * propensity[row] * appeal[items] * POSITION_BIAS)
        clicked = rng.random(10) < chance
        engaged[row] = (clicked & (teams == 0)).sum(), (clicked & (teams == 1)).sum()
    return engaged


def test_a_null_interleaving_experiment_names_a_winner_at_most_at_the_stated_rate():
    rng = np.random.default_rng(3)
    experiments = 300
    named = sum(
        compare_interleaved(interleaved_lists(rng, 200, False), ["a", "b"]).winner is not None
        for _ in range(experiments)
    )
    # The exact test is discrete: its rate is at most 5%, a little below with few lists.
    low, high = tolerance(experiments, rate=0.04)
    assert low <= named <= tolerance(experiments)[1], f"{named} of {experiments}"


def test_an_arm_whose_items_shoppers_prefer_wins_the_interleaving():
    rng = np.random.default_rng(4)
    winners = [
        compare_interleaved(interleaved_lists(rng, 200, True), ["a", "b"]).winner for _ in range(40)
    ]
    assert winners.count("b") >= 32 and "a" not in winners


def test_interleaving_counts_wins_ties_and_ignores_lists_without_engagement():
    engaged = np.array([[2, 1], [0, 3], [1, 1], [0, 0], [0, 0], [4, 0]])
    analysis = compare_interleaved(engaged, ["control", "challenger"])
    wins = analysis.interleaving
    assert wins.wins == {"control": 2, "challenger": 1} and wins.ties == 1
    assert wins.p_value == pytest.approx(1.0)  # 2 of 3: nothing to see
    assert analysis.winner is None


def test_the_sign_test_is_the_exact_two_sided_binomial_test():
    # 15 of 20: P(X >= 15) + P(X <= 5) for X ~ Binomial(20, 1/2).
    expected = 2 * sum(stats.binom.pmf(k, 20, 0.5) for k in range(15, 21))
    assert sign_test(15, 5) == pytest.approx(expected)
    assert sign_test(5, 15) == pytest.approx(expected)
    assert sign_test(0, 0) == 1.0
    assert sign_test(10, 10) == pytest.approx(1.0)
