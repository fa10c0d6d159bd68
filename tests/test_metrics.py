import math
from datetime import UTC, datetime

import polars as pl
import pytest

from models.metrics import (
    catalog_coverage,
    evaluation_metrics,
    item_interactions,
    mean_metrics,
    novelty,
    per_user_metrics,
    ranking_metrics,
    top_k,
)

AS_OF = datetime(2026, 1, 1, tzinfo=UTC)


def frame(rows, columns):
    return pl.DataFrame([(AS_OF, *row) for row in rows], schema=["as_of", *columns], orient="row")


def test_ndcg_and_recall_match_hand_computed_values():
    labels = frame([("u1", "a", 3), ("u1", "b", 1)], ["user_id", "item_id", "label"])
    recs = frame([("u1", "b", 1), ("u1", "x", 2), ("u1", "a", 3)], ["user_id", "item_id", "rank"])
    metrics = ranking_metrics(recs, labels, k_values=(2, 3))
    dcg3 = 1 / math.log2(2) + 7 / math.log2(4)
    idcg = 7 / math.log2(2) + 1 / math.log2(3)
    assert metrics["ndcg@3"] == pytest.approx(dcg3 / idcg)
    assert metrics["ndcg@2"] == pytest.approx((1 / math.log2(2)) / idcg)
    assert metrics["recall@2"] == pytest.approx(0.5)
    assert metrics["recall@3"] == pytest.approx(1.0)
    assert metrics["users"] == 1


def test_users_without_positive_are_excluded_and_users_without_recs_count_zero():
    labels = frame([("u1", "a", 2), ("u2", "b", 1)], ["user_id", "item_id", "label"])
    # u3 has recommendations but no positive: not averaged. u2 has no recommendations: scores 0.
    recs = frame([("u1", "a", 1), ("u3", "c", 1)], ["user_id", "item_id", "rank"])
    metrics = ranking_metrics(recs, labels, k_values=(10,))
    assert metrics["users"] == 2
    assert metrics["ndcg@10"] == pytest.approx(0.5)
    assert metrics["recall@10"] == pytest.approx(0.5)


def test_positives_outside_the_recommendations_lower_recall():
    labels = frame(
        [("u1", "a", 1), ("u1", "b", 1), ("u1", "c", 1), ("u1", "d", 1)],
        ["user_id", "item_id", "label"],
    )
    recs = frame([("u1", "a", 1)], ["user_id", "item_id", "rank"])
    assert ranking_metrics(recs, labels, k_values=(10,))["recall@10"] == pytest.approx(0.25)


def test_top_k_orders_by_score_and_breaks_ties_by_item_id():
    scored = frame(
        [("u1", "b", 1.0), ("u1", "a", 1.0), ("u1", "c", 2.0), ("u2", "z", 0.1)],
        ["user_id", "item_id", "score"],
    )
    result = top_k(scored, "score", 2).sort("user_id", "rank")
    assert result.select("user_id", "item_id", "rank").rows() == [
        ("u1", "c", 1),
        ("u1", "a", 2),
        ("u2", "z", 1),
    ]


def test_map_hit_rate_and_mrr_match_hand_computed_values():
    labels = frame([("u1", "a", 3), ("u1", "b", 1)], ["user_id", "item_id", "label"])
    recs = frame([("u1", "b", 1), ("u1", "x", 2), ("u1", "a", 3)], ["user_id", "item_id", "rank"])
    metrics = ranking_metrics(recs, labels, k_values=(2, 3))
    # Relevant at ranks 1 and 3: precision 1/1 and 2/3, divided by min(k, 2 positives).
    assert metrics["map@2"] == pytest.approx(1.0 / 2)
    assert metrics["map@3"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert metrics["hit_rate@2"] == pytest.approx(1.0)
    assert metrics["mrr@2"] == pytest.approx(1.0)
    assert metrics["mrr@3"] == pytest.approx(1.0)


def test_mrr_and_map_when_first_hit_is_lower_and_users_without_hits_count_zero():
    labels = frame(
        [("u1", "c", 1), ("u2", "d", 2), ("u3", "e", 1), ("u3", "f", 1)],
        ["user_id", "item_id", "label"],
    )
    recs = frame(
        [
            ("u1", "x", 1),
            ("u1", "c", 2),
            ("u2", "y", 1),  # u2: no hit
            ("u3", "y", 1),
            ("u3", "z", 2),
            ("u3", "f", 3),  # beyond k = 2: ignored at 2, counts at 3
        ],
        ["user_id", "item_id", "rank"],
    )
    at2 = ranking_metrics(recs, labels, k_values=(2,))
    assert at2["users"] == 3
    assert at2["mrr@2"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert at2["hit_rate@2"] == pytest.approx(1 / 3)
    assert at2["map@2"] == pytest.approx((0.5 / 1 + 0 + 0) / 3)
    at3 = ranking_metrics(recs, labels, k_values=(3,))
    assert at3["mrr@3"] == pytest.approx((0.5 + 0 + 1 / 3) / 3)
    assert at3["hit_rate@3"] == pytest.approx(2 / 3)
    # u3: one hit at rank 3 (precision 1/3), over min(3, 2 positives).
    assert at3["map@3"] == pytest.approx((0.5 + 0 + (1 / 3) / 2) / 3)


def test_no_positive_gives_zero_for_every_metric():
    labels = frame([("u1", "a", 0)], ["user_id", "item_id", "label"])
    recs = frame([("u1", "a", 1)], ["user_id", "item_id", "rank"])
    metrics = ranking_metrics(recs, labels, k_values=(10,))
    assert metrics == {
        "users": 0.0,
        "ndcg@10": 0.0,
        "recall@10": 0.0,
        "map@10": 0.0,
        "hit_rate@10": 0.0,
        "mrr@10": 0.0,
    }


def catalog_frame(items):
    return frame([(item,) for item in items], ["item_id"])


def test_catalog_coverage_counts_distinct_catalog_items_in_any_top_k():
    recs = frame(
        [
            ("u1", "a", 1),
            ("u1", "b", 2),
            ("u2", "a", 1),
            ("u2", "z", 2),  # not in the catalog: ignored
            ("u2", "c", 11),  # beyond k
        ],
        ["user_id", "item_id", "rank"],
    )
    catalog = catalog_frame(["a", "b", "c", "d"])
    assert catalog_coverage(recs, catalog, k=10) == pytest.approx(2 / 4)
    assert catalog_coverage(recs, catalog, k=11) == pytest.approx(3 / 4)
    assert catalog_coverage(recs, catalog_frame([]).head(0), k=10) == 0.0


def test_item_interactions_sum_views_carts_purchases_over_users():
    user_items = frame(
        [("u1", "a", 3, 1, 1), ("u2", "a", 1, 0, None), ("u1", "b", 2, 0, 0)],
        ["user_id", "item_id", "views", "carts", "purchases"],
    )
    counts = item_interactions(user_items).sort("item_id")
    assert counts.select("item_id", "interactions").rows() == [("a", 6.0), ("b", 2.0)]


def test_novelty_is_mean_self_information_with_laplace_smoothing():
    interactions = frame([("a", 6.0), ("b", 2.0)], ["item_id", "interactions"])
    catalog = catalog_frame(["a", "b", "c", "d"])
    recs = frame(
        [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "c", 11)],
        ["user_id", "item_id", "rank"],
    )
    # 4 items, 8 interactions: shares (6+1)/12, (2+1)/12; c (beyond k) would be 1/12.
    expected = (-math.log2(7 / 12) * 2 - math.log2(3 / 12)) / 3
    assert novelty(recs, interactions, catalog, k=10) == pytest.approx(expected)
    with_c = (-math.log2(7 / 12) * 2 - math.log2(3 / 12) - math.log2(1 / 12)) / 4
    assert novelty(recs, interactions, catalog, k=11) == pytest.approx(with_c)
    assert novelty(recs.head(0), interactions, catalog) == 0.0


def test_evaluation_metrics_adds_list_metrics_over_users_with_a_positive():
    labels = frame([("u1", "a", 1), ("u2", "b", 0)], ["user_id", "item_id", "label"])
    recs = frame([("u1", "a", 1), ("u2", "b", 1)], ["user_id", "item_id", "rank"])
    catalog = catalog_frame(["a", "b"])
    interactions = frame([("a", 1.0), ("b", 1.0)], ["item_id", "interactions"])
    metrics = evaluation_metrics(recs, labels, catalog, interactions, k_values=(10,))
    # u2 has no positive: its list does not count in coverage or novelty.
    assert metrics["coverage@10"] == pytest.approx(0.5)
    assert metrics["novelty@10"] == pytest.approx(1.0)  # share (1+1)/(2+2)
    assert metrics["ndcg@10"] == pytest.approx(1.0)


def test_per_user_metrics_are_what_ranking_metrics_averages():
    labels = frame(
        [("u1", "a", 3), ("u1", "b", 1), ("u2", "c", 1), ("u3", "z", 0)],
        ["user_id", "item_id", "label"],
    )
    recs = frame(
        [("u1", "b", 1), ("u1", "a", 2), ("u2", "x", 1), ("u2", "c", 2), ("u3", "z", 1)],
        ["user_id", "item_id", "rank"],
    )
    per_user = per_user_metrics(recs, labels, k_values=(1, 2))
    # u3 has no positive: absent. Sorted by query.
    assert per_user.get_column("user_id").to_list() == ["u1", "u2"]
    rows = {row["user_id"]: row for row in per_user.iter_rows(named=True)}
    idcg2 = 7 + 1 / math.log2(3)
    assert rows["u1"]["ndcg@2"] == pytest.approx((1 + 7 / math.log2(3)) / idcg2)
    assert rows["u1"]["ndcg@1"] == pytest.approx(1 / 7)
    assert rows["u2"]["mrr@2"] == pytest.approx(0.5)
    assert rows["u2"]["hit_rate@1"] == 0.0 and rows["u2"]["hit_rate@2"] == 1.0
    assert rows["u1"]["recall@1"] == pytest.approx(0.5)
    averaged = ranking_metrics(recs, labels, k_values=(1, 2))
    assert averaged == mean_metrics(per_user)
    assert averaged["users"] == 2
    for name in per_user.columns[2:]:
        assert averaged[name] == pytest.approx(per_user.get_column(name).mean())


def test_mean_metrics_of_no_users_are_zero():
    empty = per_user_metrics(
        frame([("u1", "a", 1)], ["user_id", "item_id", "rank"]),
        frame([("u1", "a", 0)], ["user_id", "item_id", "label"]),
        k_values=(10,),
    )
    assert empty.height == 0
    assert mean_metrics(empty) == {"users": 0.0, **dict.fromkeys(empty.columns[2:], 0.0)}
