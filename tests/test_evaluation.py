import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from models.baselines import Validation
from models.evaluation import (
    NOT_BASELINES,
    EvaluationReport,
    buy_again_baseline,
    candidate_order_baseline,
    covisitation_baseline,
    evaluate,
    evaluated_users,
    oracle_baseline,
    oracle_scores,
    past_items,
    popularity_baseline,
    trending_baseline,
    user_segments,
    without_past_items,
)
from models.features import FEATURE_COLUMNS
from models.gate import gate_decision
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


def run_evaluate(with_truth=True, **options):
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
        **options,
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


PER_USER_METRICS = ("ndcg", "recall", "map", "hit_rate", "mrr")


def test_every_per_user_metric_has_a_95_interval_and_list_metrics_have_none():
    exported = run_evaluate().to_dict()
    for approach, metrics in exported["metrics"].items():
        for k in (10, 20):
            for name in PER_USER_METRICS:
                value, (lower, upper) = metrics[f"{name}@{k}"], metrics[f"{name}@{k}_ci95"]
                assert type(lower) is float and type(upper) is float
                assert lower <= value + 1e-12 and value <= upper + 1e-12, (approach, name, k)
        assert "coverage@10_ci95" not in metrics and "novelty@10_ci95" not in metrics
    assert exported["confidence"]["resamples"] == 1000
    assert exported["confidence"]["level"] == 0.95


def test_paired_differences_are_the_ranker_minus_each_approach_on_the_same_users():
    report = run_evaluate()
    exported = report.to_dict()
    assert set(exported["paired"]) == set(report.approaches) - {"ranker"}
    for approach, paired in exported["paired"].items():
        for k in (10, 20):
            for name in PER_USER_METRICS:
                metric = f"{name}@{k}"
                expected = report.metrics["ranker"][metric] - report.metrics[approach][metric]
                assert paired[f"{metric}_diff"] == pytest.approx(expected)
                lower, upper = paired[f"{metric}_diff_ci95"]
                assert lower - 1e-12 <= paired[f"{metric}_diff"] <= upper + 1e-12
    # The perfect ranker's paired difference to itself would be 0; to buy-again (which misses
    # u2's and u3's positives) it is positive on every resample.
    assert exported["paired"]["buy_again"]["ndcg@10_diff_ci95"][0] > 0


def test_the_intervals_are_deterministic():
    assert run_evaluate().to_dict() == run_evaluate().to_dict()


def test_production_is_scored_and_paired_in_the_same_evaluation():
    report = run_evaluate(with_truth=False, production=-perfect_scores(candidates()))
    assert report.approaches[-1] == "production"
    assert report.metrics["production"]["users"] == 3
    assert report.paired["production"]["ndcg@10"] > 0
    # Production is no baseline: not the best one, even when it scores highest.
    assert headline_ratios(report)["best_baseline"] != "production"


def without_views(features):
    return features.with_columns(pl.lit(0).alias("views_7d"))


def without_repeats(history):
    return history.with_columns(pl.col("purchases").clip(upper_bound=1))


def test_baselines_the_data_cannot_define_are_not_applicable_instead_of_zero():
    assembled = candidates().with_columns(pl.lit(None, dtype=pl.Float64).alias("covisit_score"))
    report = evaluate(
        assembled,
        perfect_scores(assembled),
        labels(),
        without_views(items()),
        user_features(),
        without_repeats(user_items()),
    )
    assert set(report.not_applicable) == {"trending", "buy_again", "covisitation"}
    assert "viewed" in report.not_applicable["trending"]
    assert "twice" in report.not_applicable["buy_again"]
    assert "co-visitation" in report.not_applicable["covisitation"]
    assert report.approaches == ["ranker", "candidate_order", "popularity"]
    exported = report.to_dict()
    assert set(exported["not_applicable"]) == {"trending", "buy_again", "covisitation"}
    assert set(exported["paired"]) == {"candidate_order", "popularity"}
    assert "### Not applicable" in render_markdown(report)
    # Defined baselines stay, whatever they score.
    assert run_evaluate().not_applicable == {}


def test_a_not_applicable_baseline_is_never_the_best_one():
    # Without views trending is undefined: absent from the metrics and the paired differences,
    # so neither the headline nor the gate can pick it (or its 0) as the best baseline.
    report = evaluate(
        candidates(),
        perfect_scores(candidates()),
        labels(),
        without_views(items()),
        user_features(),
        user_items(),
    )
    assert "trending" not in report.metrics and "trending" not in report.paired
    assert "trending" not in report.segments["heavy"]
    applicable = {"candidate_order", "covisitation", "buy_again", "popularity"}
    assert headline_ratios(report)["best_baseline"] in applicable
    assert gate_on(report).best_baseline in applicable


def test_buy_again_counts_only_repeat_purchases_of_recommendable_items():
    # u1 bought postage p twice, nothing else twice: no repeat purchase of a real item.
    history = frame(
        [("u1", "p", 0, 0, 2, 1.0), ("u1", "a", 1, 0, 1, 2.0)],
        ["user_id", "item_id", "views", "carts", "purchases", "days_since_last"],
    )
    catalog = frame(
        [("p", 1, 1.0, 3, 1.0, False), ("a", 2, 1.0, 3, 1.0, True)],
        ["item_id", "popularity_rank", "trend", "views_7d", "price", "is_recommendable"],
    )
    report = evaluate(
        candidates(), perfect_scores(candidates()), labels(), catalog, user_features(), history
    )
    assert "buy_again" in report.not_applicable
    recommendable = catalog.with_columns(pl.lit(True).alias("is_recommendable"))
    assert (
        "buy_again"
        not in evaluate(
            candidates(),
            perfect_scores(candidates()),
            labels(),
            recommendable,
            user_features(),
            history,
        ).not_applicable
    )


def catalog_with_fees(flags):
    """items() with an is_recommendable column: b is a fee, f unknown (null)."""
    return items().with_columns(pl.Series("is_recommendable", flags, dtype=pl.Boolean))


FEES = [True, False, True, True, True, None]  # a, b (fee), c, d, e, f (null: recommendable)


def test_popularity_and_trending_skip_items_that_are_not_recommendable():
    catalog = catalog_with_fees(FEES)
    assert lists(popularity_baseline(users_frame("u1"), catalog, 3)) == {"u1": ["a", "c", "d"]}
    assert lists(trending_baseline(users_frame("u1"), catalog, 10)) == {"u1": ["e", "a", "c", "f"]}
    # Without the column (older marts) nothing is dropped.
    assert lists(popularity_baseline(users_frame("u1"), items(), 3)) == {"u1": ["a", "b", "c"]}


def test_buy_again_skips_items_that_are_not_recommendable():
    # c (u1's most bought) is a fee now; d and e follow a.
    flags = [True, True, False, True, True, None]
    result = buy_again_baseline(users_frame("u1", "u2"), user_items(), 10, catalog_with_fees(flags))
    assert lists(result) == {"u1": ["a", "d", "e"], "u2": ["b"]}
    # Absent column, or no item_features: every item is kept.
    assert lists(buy_again_baseline(users_frame("u1"), user_items(), 10, items())) == {
        "u1": ["c", "a", "d", "e"]
    }


def test_the_report_shows_intervals_and_paired_differences():
    report = run_evaluate()
    text = render_markdown(report)
    ndcg = report.metrics["ranker"]["ndcg@10"]
    lower, upper = report.intervals["popularity"]["ndcg@10"]
    popularity = report.metrics["popularity"]["ndcg@10"]
    assert f"| ranker | {ndcg:.3f} [" in text
    assert f"{popularity:.3f} [{lower:.3f}, {upper:.3f}]" in text
    assert "### Ranker minus each approach, on the same users (paired, 95% interval)" in text
    diff = report.paired["buy_again"]["ndcg@10"]
    low, high = report.paired_intervals["buy_again"]["ndcg@10"]
    assert f"| buy_again | {diff:+.3f} [{low:+.3f}, {high:+.3f}] |" in text


def repeat_shop(users=300, seed=5):
    """A shop where buy-again is strong: each user's held-out purchase is mostly the item they
    bought most before. The candidates are the user's own past items, in a random order."""
    rng = np.random.default_rng(seed)
    history, candidate_rows, label_rows, feature_rows = [], [], [], []
    for index in range(users):
        user = f"u{index:03d}"
        own = rng.choice(40, size=5, replace=False)
        purchases = rng.permutation([4, 3, 2, 1, 0])
        for item, bought in zip(own, purchases, strict=True):
            history.append((user, f"i{item:02d}", 2, 1, int(bought), float(rng.integers(1, 30))))
        for rank, item in enumerate(rng.permutation(own), start=1):
            candidate_rows.append((user, f"i{item:02d}", rank, None))
        favourite = own[int(np.argmax(purchases))]
        wanted = favourite if rng.random() < 0.6 else rng.choice(own)
        label_rows.append((user, f"i{wanted:02d}", 3))
        feature_rows.append((user, 12))
    catalog = frame(
        [(f"i{item:02d}", item + 1, 1.0, 40 - item, 10.0) for item in range(40)],
        ["item_id", "popularity_rank", "trend", "views_7d", "price"],
    )
    return (
        frame(candidate_rows, ["user_id", "item_id", "candidate_rank", "covisit_score"]),
        frame(label_rows, ["user_id", "item_id", "label"]),
        catalog,
        frame(feature_rows, ["user_id", "events"]),
        frame(history, ["user_id", "item_id", "views", "carts", "purchases", "days_since_last"]),
    )


def gate_on(report):
    exported = report.to_dict()
    metrics = exported["metrics"]
    return gate_decision(
        metrics["ranker"],
        {name: values for name, values in metrics.items() if name not in NOT_BASELINES},
        metrics.get("production"),
        exported["paired"],
    )


def test_a_ranker_that_reproduces_buy_again_is_refused_by_the_gate():
    assembled, held_out, catalog, features, history = repeat_shop()
    # The ranker's scores are buy-again's order: its lists are buy-again's lists.
    again = buy_again_baseline(evaluated_users(held_out), history, 20)
    order = {(user, item): rank for _, user, item, rank in again.rows()}
    scores = np.array(
        [-order[(u, i)] for u, i in assembled.select("user_id", "item_id").rows()], dtype=float
    )
    report = evaluate(assembled, scores, held_out, catalog, features, history)
    assert report.metrics["ranker"]["ndcg@10"] == pytest.approx(
        report.metrics["buy_again"]["ndcg@10"]
    )
    assert headline_ratios(report)["best_baseline"] == "buy_again"
    assert report.paired["buy_again"]["ndcg@10"] == pytest.approx(0.0, abs=1e-12)
    decision = gate_on(report)
    assert not decision.passed
    assert decision.decided_by == "paired_lower_bound"
    assert decision.best_baseline == "buy_again"
    assert "not shown better than the best baseline buy_again" in decision.message


def test_a_ranker_clearly_better_than_buy_again_passes_the_gate():
    assembled, held_out, catalog, features, history = repeat_shop()
    wanted = set(held_out.select("user_id", "item_id").rows())
    scores = np.array(
        [float((u, i) in wanted) for u, i in assembled.select("user_id", "item_id").rows()]
    )
    report = evaluate(assembled, scores, held_out, catalog, features, history)
    decision = gate_on(report)
    assert decision.passed, decision.message
    assert decision.best_baseline == "buy_again"
    assert decision.paired_lower_bound > 0


def test_new_items_only_removes_past_items_from_the_lists_before_the_cut_and_from_the_truth():
    # u1's past items are a, c, d, e (user_items); c is also one of u1's positives.
    view = run_evaluate(with_truth=False).new_items_only
    assert view is not None and view.users == 3 and view.dropped_users == 0
    # Popularity's list is a, b, c, d, e, f for everyone. Without u1's past items it is b, f:
    # u1's positive f is 2nd (were a, c, d, e left in, f would be 6th, and were c left in the
    # truth, u1 could not reach 1.0 either). u2 (past b) gets a, c, ...: a is 1st. u3 (no
    # past) gets a, b: b is 2nd.
    second = 1 / math.log2(3)
    assert view.metrics["popularity"]["ndcg@10"] == pytest.approx((second + 1 + second) / 3)
    # The ranker's perfect lists stay perfect on new items: f first for u1.
    assert view.metrics["ranker"]["ndcg@10"] == pytest.approx(1.0)
    # Buy-again recommends only past items: nothing is left of it.
    assert view.metrics["buy_again"]["ndcg@10"] == 0.0
    assert view.paired["buy_again"]["ndcg@10"] == pytest.approx(1.0)
    exported = run_evaluate(with_truth=False).to_dict()["new_items_only"]
    assert exported["metrics"]["popularity"]["ndcg@10_ci95"][0] <= (2 * second + 1) / 3
    assert set(exported["paired"]) == {
        "candidate_order",
        "covisitation",
        "buy_again",
        "popularity",
        "trending",
    }
    assert "ndcg@10_diff_ci95" in exported["paired"]["popularity"]


def test_users_whose_positives_are_all_past_items_drop_out_of_the_new_items_view():
    # u2's only positive is b, which u2 viewed before the cutoff.
    only_past = labels().with_columns(
        pl.when(pl.col("user_id") == "u2")
        .then(pl.lit("b"))
        .otherwise(pl.col("item_id"))
        .alias("item_id")
    )
    assembled = candidates()
    report = evaluate(
        assembled, perfect_scores(assembled), only_past, items(), user_features(), user_items()
    )
    assert report.metrics["ranker"]["users"] == 3
    assert report.new_items_only.users == 2
    assert report.new_items_only.dropped_users == 1


def test_without_past_items_cuts_after_removing_them():
    scored = frame(
        [("u1", "a", 4.0), ("u1", "b", 3.0), ("u1", "c", 2.0), ("u1", "d", 1.0)],
        ["user_id", "item_id", "score"],
    )
    past = frame([("u1", "a"), ("u1", "c")], ["user_id", "item_id"])
    assert lists(without_past_items(scored, past, 2)) == {"u1": ["b", "d"]}
    assert lists(without_past_items(scored.head(2), past, 2)) == {"u1": ["b"]}
    assert past_items(user_items()).height == 5


def test_the_segment_policy_is_chosen_on_validation_and_each_segment_is_paired_with_popularity():
    assembled = candidates()
    # On validation the ranker puts u2's (light) positive a behind e; popularity has a first.
    bad_for_light = assembled.select(
        "as_of",
        "user_id",
        "item_id",
        pl.Series("score", perfect_scores(assembled)),
    ).with_columns(
        pl.when((pl.col("user_id") == "u2") & (pl.col("item_id") == "e"))
        .then(5.0)
        .otherwise(pl.col("score"))
        .alias("score")
    )
    validation = Validation(
        users=evaluated_users(labels()),
        labels=labels(),
        bought_together=pl.DataFrame(),
        ranker_scores=bad_for_light,
        item_features=items(),
        user_features=user_features(),
    )
    report = run_evaluate(with_truth=False, validation=validation)
    policy = report.segment_policy
    assert policy.serves == {"new": "fallback", "light": "fallback", "heavy": "ranker"}
    assert policy.chosen_on == AS_OF.isoformat()
    served = report.to_dict()["segments_vs_fallback"]
    assert served["fallback"] == "popularity"
    light = served["segments"]["light"]
    assert light["served_by"] == "fallback"
    assert light["served_minus_fallback"]["ndcg@10_diff"] == 0.0
    assert light["served_minus_fallback"]["ndcg@10_diff_ci95"] == [0.0, 0.0]
    heavy = served["segments"]["heavy"]
    # u1 (heavy): the ranker's f first (1.0) vs popularity's f 6th, c 3rd.
    assert heavy["served_by"] == "ranker"
    assert heavy["ranker_minus_fallback"]["ndcg@10_diff"] == pytest.approx(
        report.segments["heavy"]["ranker"]["ndcg@10"]
        - report.segments["heavy"]["popularity"]["ndcg@10"]
    )
    assert heavy["served_minus_fallback"] == heavy["ranker_minus_fallback"]
    assert report.to_dict()["segment_policy"]["serves"]["light"] == "fallback"
    text = render_markdown(report)
    assert "### Each segment against its fallback (popularity), ndcg@10" in text
    assert "### New items only (3 users; 0 dropped out)" in text
    # Without validation data the ranker serves every segment the service knows.
    assert run_evaluate().segment_policy.serves == {
        "new": "fallback",
        "light": "ranker",
        "heavy": "ranker",
    }
