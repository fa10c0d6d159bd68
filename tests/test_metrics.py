import math
from datetime import UTC, datetime

import polars as pl
import pytest

from models.metrics import ranking_metrics, top_k

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
