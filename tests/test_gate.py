"""The promotion gate: pure decisions over metric dictionaries."""

import pytest

from models.gate import DEFAULT_MIN_LIFT, DEFAULT_TOLERANCE, gate_decision

BASELINES = {"popularity": {"ndcg@10": 0.079}, "candidate_order": {"ndcg@10": 0.060}}


def test_defaults_are_a_5_percent_lift_and_a_2_percent_tolerance():
    assert (DEFAULT_MIN_LIFT, DEFAULT_TOLERANCE) == (0.05, 0.02)


def test_passes_when_it_beats_the_baselines_and_holds_up_against_production():
    decision = gate_decision({"ndcg@10": 0.175}, BASELINES, {"ndcg@10": 0.171})
    assert decision.passed
    assert decision.best_baseline == "popularity"
    assert decision.lift_over_baseline == pytest.approx(0.175 / 0.079 - 1)
    assert decision.change_vs_production == pytest.approx(0.175 / 0.171 - 1)
    assert decision.message.startswith("passed: ")
    assert "popularity 0.079" in decision.message and "above production 0.171" in decision.message


def test_a_small_drop_within_the_tolerance_passes():
    decision = gate_decision({"ndcg@10": 0.169}, BASELINES, {"ndcg@10": 0.171})
    assert decision.passed
    assert "1.2% below production 0.171 (tolerance 2%)" in decision.message


def test_fails_when_it_does_not_beat_the_best_baseline_by_the_margin():
    decision = gate_decision({"ndcg@10": 0.081}, BASELINES, None, min_lift=0.10)
    assert not decision.passed
    assert decision.message == (
        "failed: ndcg@10 0.081 does not beat the best baseline popularity 0.079 by the required "
        "10% (lift 2.5%)"
    )


def test_fails_when_it_is_too_far_below_production():
    decision = gate_decision({"ndcg@10": 0.150}, BASELINES, {"ndcg@10": 0.171}, tolerance=0.05)
    assert not decision.passed
    assert decision.message == (
        "failed: ndcg@10 0.150 is 12.3% below production 0.171, beyond the 5% tolerance"
    )
    assert decision.change_vs_production == pytest.approx(0.150 / 0.171 - 1)


def test_both_failures_are_reported():
    decision = gate_decision({"ndcg@10": 0.080}, BASELINES, {"ndcg@10": 0.171})
    assert not decision.passed
    assert "best baseline popularity" in decision.message
    assert "below production 0.171" in decision.message


def test_without_production_only_the_baselines_count():
    decision = gate_decision({"ndcg@10": 0.100}, BASELINES, None)
    assert decision.passed
    assert "no production model yet" in decision.message
    assert decision.production_value is None


def test_the_margins_are_inclusive():
    assert gate_decision({"ndcg@10": 0.105}, {"p": {"ndcg@10": 0.1}}, {"ndcg@10": 0.107}).passed
    assert gate_decision({"ndcg@10": 0.098}, {}, {"ndcg@10": 0.1}).passed


def test_another_metric_can_be_gated():
    decision = gate_decision(
        {"ndcg@10": 0.2, "recall@20": 0.10},
        {"popularity": {"ndcg@10": 0.1, "recall@20": 0.2}},
        None,
        metric="recall@20",
    )
    assert not decision.passed and "recall@20 0.100" in decision.message


def test_a_zero_baseline_must_be_exceeded():
    assert not gate_decision({"ndcg@10": 0.0}, {"p": {"ndcg@10": 0.0}}, None).passed
    assert gate_decision({"ndcg@10": 0.01}, {"p": {"ndcg@10": 0.0}}, None).passed


def test_production_without_the_metric_is_not_compared():
    decision = gate_decision({"ndcg@10": 0.2}, BASELINES, {"recall@20": 0.3})
    assert decision.passed and "production reports no ndcg@10" in decision.message


def test_missing_metrics_and_negative_margins_are_errors():
    with pytest.raises(ValueError, match="candidate has no ndcg@10"):
        gate_decision({"recall@20": 0.2}, BASELINES, None)
    with pytest.raises(ValueError, match="popularity have no ndcg@10"):
        gate_decision({"ndcg@10": 0.2}, {"popularity": {"recall@20": 0.1}}, None)
    with pytest.raises(ValueError, match=">= 0"):
        gate_decision({"ndcg@10": 0.2}, BASELINES, None, min_lift=-0.1)
