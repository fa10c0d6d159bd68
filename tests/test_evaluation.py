import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from models.evaluation import (
    EvaluationReport,
    buy_again_baseline,
    candidate_order_baseline,
    covisitation_baseline,
    evaluate,
    evaluated_users,
    oracle_baseline,
    oracle_scores,
    popularity_baseline,
    trending_baseline,
    user_segments,
)
from models.features import FEATURE_COLUMNS
from models.report import headline_ratios, render_markdown, render_png

AS_OF = datetime(2026, 1, 8, tzinfo=UTC)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def frame(rows, columns):
    return pl.DataFrame([(AS_OF, *row) for row in rows], schema=["as_of", *columns], orient="row")


def items():
    # popularity_rank a..f = 1..6; trend x views_7d: a 10, b 20, c 2, d excluded, e 15, f 1.
    return frame(
        [
            ("a", 1, 1.0, 10, 10.0),
            ("b", 2, 2.0, 10, 10.0 * math.exp(0.55)),
            ("c", 3, 0.5, 4, 10.0),
            ("d", 4, 3.0, 0, 10.0),
            ("e", 5, 1.5, 10, 10.0),
            ("f", 6, None, 1, 10.0),
        ],
        ["item_id", "popularity_rank", "trend", "views_7d", "price"],
    )


def users_frame(*user_ids):
    return frame([(user,) for user in user_ids], ["user_id"])


def user_features():
    # u1 heavy, u2 light, u3 unknown (new), u4 no events (new, and without a positive).
    return frame([("u1", 25), ("u2", 3), ("u4", 0)], ["user_id", "events"])


def user_items():
    return frame(
        [
            ("u1", "a", 1, 1, 2, 5.0),
            ("u1", "c", 3, 0, 2, 1.0),
            ("u1", "d", 10, 0, 0, 0.5),
            ("u1", "e", 10, 0, 0, 2.0),
            ("u2", "b", 1, 0, 0, 3.0),
        ],
        ["user_id", "item_id", "views", "carts", "purchases", "days_since_last"],
    )


def candidates():
    return frame(
        [
            ("u1", "a", 1, None),
            ("u1", "b", 2, 0.5),
            ("u1", "f", 3, 2.0),
            ("u1", "c", 4, 0.5),
            ("u2", "e", 1, 1.0),
            ("u2", "a", 2, None),
            ("u3", "a", 1, None),
            ("u3", "b", 2, None),
        ],
        ["user_id", "item_id", "candidate_rank", "covisit_score"],
    )


def labels():
    return frame(
        [("u1", "f", 3), ("u1", "c", 1), ("u2", "a", 1), ("u3", "b", 2), ("u4", "a", 0)],
        ["user_id", "item_id", "label"],
    )


def lists(recommendations):
    result: dict[str, list[str]] = {}
    for user, item in recommendations.sort("user_id", "rank").select("user_id", "item_id").rows():
        result.setdefault(user, []).append(item)
    return result


def test_evaluated_users_are_those_with_a_positive():
    assert evaluated_users(labels()).get_column("user_id").to_list() == ["u1", "u2", "u3"]


def test_popularity_baseline_gives_everyone_the_top_items():
    result = popularity_baseline(users_frame("u1", "u2"), items(), 3)
    assert lists(result) == {"u1": ["a", "b", "c"], "u2": ["a", "b", "c"]}
    assert result.get_column("rank").to_list() == [1, 2, 3, 1, 2, 3]


def test_trending_baseline_ranks_by_trend_times_recent_views():
    result = trending_baseline(users_frame("u1"), items(), 10)
    # d has no view in 7 days; f has no trend (taken as 1).
    assert lists(result) == {"u1": ["b", "e", "a", "c", "f"]}


def test_candidate_order_baseline_keeps_the_generators_order():
    assert lists(candidate_order_baseline(candidates(), 3)) == {
        "u1": ["a", "b", "f"],
        "u2": ["e", "a"],
        "u3": ["a", "b"],
    }


def test_covisitation_baseline_ranks_only_covisited_candidates_by_score():
    # b and c tie on score: item_id breaks the tie. u3 has no co-visited candidate.
    assert lists(covisitation_baseline(candidates(), 10)) == {"u1": ["f", "b", "c"], "u2": ["e"]}


def test_buy_again_ranks_purchases_then_interactions_then_recency():
    result = buy_again_baseline(users_frame("u1", "u2", "u3"), user_items(), 10)
    # a and c: 2 purchases each, c has more interactions; d and e: same interactions, d recent.
    assert lists(result) == {"u1": ["c", "a", "d", "e"], "u2": ["b"]}
    assert lists(buy_again_baseline(users_frame("u1"), user_items(), 2)) == {"u1": ["c", "a"]}


def test_user_segments_by_events_before_the_cutoff():
    features = frame([("u1", 0), ("u2", 1), ("u3", 5), ("u4", 6)], ["user_id", "events"])
    segments = user_segments(users_frame("u1", "u2", "u3", "u4", "u5"), features, 5)
    assert segments.select("user_id", "events", "segment").rows() == [
        ("u1", 0, "new"),
        ("u2", 1, "light"),
        ("u3", 5, "light"),
        ("u4", 6, "heavy"),
        ("u5", 0, "new"),
    ]


def ground_truth(with_profiles=False):
    tables = {
        "user_category_tastes": pl.DataFrame(
            {"user_id": ["u1", "u1"], "category_id": ["L1", "L2"], "weight": [0.8, 0.2]}
        ),
        "user_brand_affinities": pl.DataFrame(
            {"user_id": ["u1"], "brand": ["X"], "affinity": [4.0]}
        ),
        "item_profiles": pl.DataFrame(
            {
                "item_id": ["a", "b", "c", "f", "g"],
                "category_id": ["L1", "L1", "L2", "L2", "L3"],
                "brand": ["X", "Y", "Y", "X", "Y"],
                "base_popularity": [1.0, 3.0, 1.0, 1.0, 1.0],
                "trend_slope": [0.1, 0.0, 0.0, 0.0, 0.0],
                # f went out of stock before the cutoff: 0.15 of its weight.
                "out_of_stock_at": [None, None, None, AS_OF - timedelta(days=1), None],
            },
            schema_overrides={"out_of_stock_at": pl.Datetime("us", "UTC")},
        ),
    }
    if with_profiles:
        tables["categories"] = pl.DataFrame(
            {
                "category_id": ["L1", "L2", "L3"],
                "popularity": [0.5, 0.3, 0.2],
                "price_median": [10.0, 10.0, 10.0],
            }
        )
        tables["user_profiles"] = pl.DataFrame({"user_id": ["u1"], "price_level": [0.0]})
    return tables


def oracle_candidates():
    return frame([("u1", item) for item in ["a", "b", "c", "f", "zz"]], ["user_id", "item_id"])


def scores_by_item(scored):
    return dict(scored.select("item_id", "score").rows())


def test_oracle_scores_follow_the_generators_choice_probability():
    scores = scores_by_item(oracle_scores(oracle_candidates(), ground_truth()))
    # taste 0.88 * weight x popularity / leaf popularity x brand affinity (no trend pivot).
    assert scores["a"] == pytest.approx(0.88 * 0.8 * 1.0 / 4.0 * 4.0)
    assert scores["b"] == pytest.approx(0.88 * 0.8 * 3.0 / 4.0)
    assert scores["c"] == pytest.approx(0.88 * 0.2 * 1.0 / 1.15)
    assert scores["f"] == pytest.approx(0.88 * 0.2 * 0.15 / 1.15 * 4.0)
    assert scores["zz"] == 0.0
    assert lists(oracle_baseline(oracle_candidates(), ground_truth(), 3)) == {"u1": ["a", "b", "c"]}


def test_oracle_uses_trend_explore_share_and_price_fit_when_available():
    pivot = AS_OF - timedelta(days=3.5)  # middle of a 7-day label window: 7 days after
    scores = scores_by_item(
        oracle_scores(oracle_candidates(), ground_truth(with_profiles=True), items(), pivot)
    )
    popularity_a = math.exp(0.1 * 7)
    leaf = popularity_a + 3.0
    assert scores["a"] == pytest.approx((0.88 * 0.8 + 0.12 * 0.5) * popularity_a / leaf * 4.0)
    # b costs e^0.55 times the leaf median: one width from the user's price level.
    assert scores["b"] == pytest.approx((0.88 * 0.8 + 0.12 * 0.5) * 3.0 / leaf * math.exp(-0.5))


def test_oracle_requires_its_tables():
    with pytest.raises(ValueError, match="user_brand_affinities"):
        oracle_scores(oracle_candidates(), {"user_category_tastes": pl.DataFrame()})


def perfect_scores(assembled):
    wanted = {("u1", "f"): 3.0, ("u1", "c"): 2.0, ("u2", "a"): 1.0, ("u3", "b"): 1.0}
    return np.array(
        [wanted.get((u, i), 0.0) for u, i in assembled.select("user_id", "item_id").rows()]
    )


def run_evaluate(with_truth=True):
    assembled = candidates()
    return evaluate(
        assembled,
        perfect_scores(assembled),
        labels(),
        items(),
        user_features(),
        user_items(),
        ground_truth=ground_truth() if with_truth else None,
        k=20,
    )


def test_evaluate_scores_every_approach_on_the_same_users_and_segments():
    report = run_evaluate()
    assert report.approaches == [
        "ranker",
        "candidate_order",
        "covisitation",
        "buy_again",
        "popularity",
        "trending",
        "oracle",
    ]
    for metrics in report.metrics.values():
        assert metrics["users"] == 3
        for name in ("ndcg@10", "recall@20", "map@10", "hit_rate@10", "mrr@10", "coverage@10"):
            assert 0.0 <= metrics[name] <= 1.0
        assert metrics["novelty@10"] >= 0.0
    ranker = report.metrics["ranker"]
    assert ranker["ndcg@10"] == pytest.approx(1.0)
    assert ranker["mrr@10"] == pytest.approx(1.0)
    # Ranker lists: u1 f, c, a, b; u2 a, e; u3 b, a: 5 of the 6 catalog items (not d).
    assert ranker["coverage@10"] == pytest.approx(5 / 6)
    assert report.segment_users == {"new": 1, "light": 1, "heavy": 1}
    assert set(report.segments) == {"new", "light", "heavy"}
    assert report.segments["new"]["ranker"]["users"] == 1
    # Buy-again has nothing for the new user u3.
    assert report.segments["new"]["buy_again"]["ndcg@10"] == 0.0
    # Popularity lists a, b, c...: u3's positive b is second.
    assert report.segments["new"]["popularity"]["mrr@10"] == pytest.approx(0.5)
    assert report.evaluation_cutoffs == [AS_OF.isoformat()]


def test_evaluate_accepts_a_booster_and_works_without_ground_truth():
    assembled = candidates()

    class FixedBooster:
        params: dict[str, int] = {}

        def predict(self, matrix, num_threads=0):
            return perfect_scores(assembled)

    with_features = assembled.with_columns([pl.lit(0.0).alias(name) for name in FEATURE_COLUMNS])
    report = evaluate(
        with_features, FixedBooster(), labels(), items(), user_features(), user_items()
    )
    assert "oracle" not in report.metrics
    assert report.metrics["ranker"]["ndcg@10"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one value per assembled row"):
        evaluate(assembled, np.zeros(2), labels(), items(), user_features(), user_items())


def test_report_to_dict_is_plain_and_json_ready():
    exported = run_evaluate().to_dict()
    json.dumps(exported)

    def check(value):
        if isinstance(value, dict):
            for key, inner in value.items():
                assert type(key) is str
                check(inner)
        elif isinstance(value, list):
            for inner in value:
                check(inner)
        else:
            assert type(value) in (float, int, str)

    check(exported)
    assert exported["metrics"]["ranker"]["users"] == 3
    assert type(exported["metrics"]["ranker"]["users"]) is int
    assert exported["segment_users"]["heavy"] == 1


def test_markdown_report_lists_every_approach_segment_and_ratios():
    report = run_evaluate()
    text = render_markdown(report)
    for approach in report.approaches:
        assert f"| {approach} |" in text
    for segment in ("new (1 users)", "light (1 users)", "heavy (1 users)"):
        assert segment in text
    ratios = headline_ratios(report)
    assert ratios["best_baseline"] in report.approaches
    assert f"{ratios['ratio_to_best_baseline']:.2f}× the best baseline" in text
    assert f"{ratios['ratio_to_oracle']:.2f}× the oracle" in text
    assert "no oracle" in render_markdown(run_evaluate(with_truth=False))


def test_headline_ratios_handle_missing_denominators():
    report = EvaluationReport(
        metrics={"ranker": {"ndcg@10": 0.2, "users": 1.0}, "popularity": {"ndcg@10": 0.0}},
        segments={},
        segment_users={},
        k=20,
        heavy_threshold=20,
    )
    assert headline_ratios(report) == {
        "best_baseline": "popularity",
        "ratio_to_best_baseline": None,
        "ratio_to_oracle": None,
    }
    assert "no baseline" in render_markdown(report)


def test_png_report_is_a_png():
    data = render_png(run_evaluate())
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000
