"""The promotion gate: pure decisions over the evaluation's metrics and paired intervals."""

import pytest

from models.gate import DEFAULT_MIN_PAIRED_LOWER_BOUND, DEFAULT_TOLERANCE, gate_decision

BASELINES = {"buy_again": {"ndcg@10": 0.127}, "popularity": {"ndcg@10": 0.033}}


def paired(diff, lower, upper, baseline="buy_again", metric="ndcg@10"):
    return {baseline: {f"{metric}_diff": diff, f"{metric}_diff_ci95": [lower, upper]}}


CLEARLY_BETTER = {
    **paired(0.048, 0.031, 0.065),
    **paired(0.142, 0.120, 0.160, baseline="popularity"),
}


def test_defaults_are_a_zero_margin_on_the_lower_bound_and_a_2_percent_tolerance():
    assert (DEFAULT_MIN_PAIRED_LOWER_BOUND, DEFAULT_TOLERANCE) == (0.0, 0.02)


def test_passes_when_the_paired_lower_bound_is_above_zero_and_it_holds_up_against_production():
    decision = gate_decision({"ndcg@10": 0.175}, BASELINES, {"ndcg@10": 0.171}, CLEARLY_BETTER)
    assert decision.passed
    assert decision.decided_by == "paired_lower_bound"
    assert decision.best_baseline == "buy_again"
    assert decision.paired_lower_bound == pytest.approx(0.031)
    assert decision.paired_upper_bound == pytest.approx(0.065)
    assert decision.paired_difference == pytest.approx(0.048)
    # The point lift is still reported, never decisive.
    assert decision.lift_over_baseline == pytest.approx(0.175 / 0.127 - 1)
    assert decision.change_vs_production == pytest.approx(0.175 / 0.171 - 1)
    assert decision.message.startswith("passed: ")
    assert "best baseline buy_again +0.0480 [+0.0310, +0.0650]" in decision.message
    assert "lower bound 0.0310 is above 0" in decision.message
    assert "above production 0.171" in decision.message
    assert decision.metadata()["decided_by"] == "paired_lower_bound"
    assert decision.metadata()["best_baseline"] == "buy_again"


def test_a_paired_interval_straddling_zero_is_refused_whatever_the_point_lift():
    # 10% above buy-again on the point value, but the paired interval holds 0: no better.
    decision = gate_decision(
        {"ndcg@10": 0.140}, BASELINES, None, {**CLEARLY_BETTER, **paired(0.013, -0.004, 0.030)}
    )
    assert not decision.passed
    assert decision.decided_by == "paired_lower_bound"
    assert decision.best_baseline == "buy_again"
    assert decision.paired_lower_bound == pytest.approx(-0.004)
    assert decision.message == (
        "failed: ndcg@10 is not shown better than the best baseline buy_again: paired ndcg@10 "
        "difference over the best baseline buy_again +0.0130 [-0.0040, +0.0300] (95%; ndcg@10 "
        "0.140 vs 0.127); its lower bound -0.0040 is not above 0"
    )


def test_the_same_lists_as_the_best_baseline_are_refused():
    # A ranker that reproduces buy-again: every paired difference, and its interval, is 0.
    decision = gate_decision({"ndcg@10": 0.127}, BASELINES, None, paired(0.0, 0.0, 0.0))
    assert not decision.passed and decision.decided_by == "paired_lower_bound"


def test_the_margin_applies_to_the_lower_bound():
    decision = gate_decision(
        {"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER, min_paired_lower_bound=0.04
    )
    assert not decision.passed
    assert "lower bound 0.0310 is not above 0.04" in decision.message
    assert decision.min_paired_lower_bound == 0.04


def test_the_best_baseline_is_the_highest_point_value_and_its_interval_decides():
    # Far better than popularity, not than buy-again (the best): refused, naming buy-again.
    baselines = {"buy_again": {"ndcg@10": 0.127}, "popularity": {"ndcg@10": 0.033}}
    intervals = {**paired(0.005, -0.002, 0.012), **paired(0.1, 0.09, 0.11, "popularity")}
    decision = gate_decision({"ndcg@10": 0.132}, baselines, None, intervals)
    assert not decision.passed and decision.best_baseline == "buy_again"


def test_a_small_drop_within_the_tolerance_passes():
    decision = gate_decision({"ndcg@10": 0.169}, BASELINES, {"ndcg@10": 0.171}, CLEARLY_BETTER)
    assert decision.passed
    assert "1.2% below production 0.171 (tolerance 2%)" in decision.message


def test_fails_when_it_is_too_far_below_production():
    decision = gate_decision(
        {"ndcg@10": 0.150}, BASELINES, {"ndcg@10": 0.171}, CLEARLY_BETTER, tolerance=0.05
    )
    assert not decision.passed
    assert decision.decided_by == "production_tolerance"
    assert decision.message == (
        "failed: ndcg@10 0.150 is 12.3% below production 0.171, beyond the 5% tolerance"
    )
    assert decision.change_vs_production == pytest.approx(0.150 / 0.171 - 1)


def test_both_failures_are_reported():
    decision = gate_decision(
        {"ndcg@10": 0.128}, BASELINES, {"ndcg@10": 0.171}, paired(0.001, -0.01, 0.012)
    )
    assert not decision.passed
    assert decision.decided_by == "paired_lower_bound,production_tolerance"
    assert "best baseline buy_again" in decision.message
    assert "below production 0.171" in decision.message


def test_without_production_only_the_baselines_count():
    decision = gate_decision({"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER)
    assert decision.passed
    assert "no production model yet" in decision.message
    assert decision.production_value is None


def test_without_baselines_production_decides():
    decision = gate_decision({"ndcg@10": 0.098}, {}, {"ndcg@10": 0.1}, {})
    assert decision.passed and decision.decided_by == "production_tolerance"
    assert "no baselines to compare with" in decision.message
    nothing = gate_decision({"ndcg@10": 0.098}, {}, None, {})
    assert nothing.passed and nothing.decided_by == "no_comparison"


def test_another_metric_can_be_gated():
    decision = gate_decision(
        {"ndcg@10": 0.2, "recall@20": 0.10},
        {"popularity": {"ndcg@10": 0.1, "recall@20": 0.2}},
        None,
        {
            "popularity": {
                "ndcg@10_diff": 0.1,
                "ndcg@10_diff_ci95": [0.05, 0.15],
                "recall@20_diff": -0.1,
                "recall@20_diff_ci95": [-0.15, -0.05],
            }
        },
        metric="recall@20",
    )
    assert not decision.passed and "recall@20 0.100 vs 0.200" in decision.message


def test_production_without_the_metric_is_not_compared():
    decision = gate_decision({"ndcg@10": 0.2}, BASELINES, {"recall@20": 0.3}, CLEARLY_BETTER)
    assert decision.passed and "production reports no ndcg@10" in decision.message


def test_missing_metrics_intervals_and_negative_margins_are_errors():
    with pytest.raises(ValueError, match="candidate has no ndcg@10"):
        gate_decision({"recall@20": 0.2}, BASELINES, None, CLEARLY_BETTER)
    with pytest.raises(ValueError, match="popularity have no ndcg@10"):
        gate_decision({"ndcg@10": 0.2}, {"popularity": {"recall@20": 0.1}}, None, {})
    with pytest.raises(ValueError, match="no paired ndcg@10 difference .* buy_again"):
        gate_decision({"ndcg@10": 0.2}, BASELINES, None, paired(0.1, 0.05, 0.15, "popularity"))
    with pytest.raises(ValueError, match=">= 0"):
        gate_decision({"ndcg@10": 0.2}, BASELINES, None, CLEARLY_BETTER, min_paired_lower_bound=-1)


def segment(diff, lower, upper, served_by="ranker", users=400, metric="ndcg@10"):
    return {
        "users": users,
        "served_by": served_by,
        "served_minus_fallback": {f"{metric}_diff": diff, f"{metric}_diff_ci95": [lower, upper]},
    }


def test_a_segment_served_significantly_worse_than_its_fallback_blocks_promotion():
    segments = {
        "new": segment(0.0, 0.0, 0.0, served_by="fallback", users=120),
        "light": segment(-0.030, -0.052, -0.009, users=300),
        "heavy": segment(0.080, 0.060, 0.100, users=2_000),
    }
    decision = gate_decision({"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER, segments=segments)
    assert not decision.passed
    # Overall the ranker beats the best baseline: only the segment rule failed.
    assert decision.decided_by == "segment_vs_fallback"
    assert "segment(s) light served by the ranker are worse than their fallback" in (
        decision.message
    )
    assert "light (300 users, served by ranker) -0.0300 [-0.0520, -0.0090]" in decision.message
    assert decision.segments["light"]["worse"] == 1.0
    assert decision.segments["heavy"]["worse"] == 0.0
    metadata = decision.metadata()
    assert metadata["segment_light_upper"] == pytest.approx(-0.009)
    assert metadata["segment_new_served_by"] == "fallback"
    assert metadata["segment_tolerance"] == 0.0


def test_a_small_segment_with_a_wide_interval_around_zero_does_not_block():
    # 40 light users: the interval is wide, the ranker is not shown worse (nor better).
    segments = {"light": segment(-0.010, -0.120, 0.090, users=40)}
    decision = gate_decision({"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER, segments=segments)
    assert decision.passed, decision.message
    assert decision.decided_by == "paired_lower_bound"
    assert "light not shown better than popularity, nor worse" in decision.message


def test_a_segment_served_its_fallback_cannot_fail_and_the_tolerance_is_honoured():
    fallback = {"light": segment(0.0, 0.0, 0.0, served_by="fallback")}
    assert gate_decision(
        {"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER, segments=fallback
    ).passed
    slightly_worse = {"light": segment(-0.004, -0.007, -0.001)}
    assert not gate_decision(
        {"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER, segments=slightly_worse
    ).passed
    decision = gate_decision(
        {"ndcg@10": 0.175},
        BASELINES,
        None,
        CLEARLY_BETTER,
        segments=slightly_worse,
        segment_tolerance=0.005,
    )
    assert decision.passed, decision.message
    # A segment without users is not judged; one without its interval is an error.
    assert (
        gate_decision(
            {"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER, segments={"new": {"users": 0}}
        ).segments
        == {}
    )
    with pytest.raises(ValueError, match="segment light has no paired ndcg@10"):
        gate_decision(
            {"ndcg@10": 0.175}, BASELINES, None, CLEARLY_BETTER, segments={"light": {"users": 3}}
        )
