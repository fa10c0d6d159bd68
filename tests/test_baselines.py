"""The strong baselines (models/baselines.py) on a few hand-made rows with known answers."""

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from models import baselines as bl
from models.collaborative import interaction_matrix
from models.evaluation import evaluate
from models.report import headline_ratios, render_markdown

AS_OF = datetime(2026, 1, 31, tzinfo=UTC)


def events(rows):
    """rows: (user, item, event_type, days before AS_OF; negative = after the cutoff)."""
    return pl.DataFrame(
        [(user, item, kind, AS_OF - timedelta(days=days)) for user, item, kind, days in rows],
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "event_type": pl.String,
            "occurred_at": pl.Datetime("us", "UTC"),
        },
        orient="row",
    )


def users(*user_ids, as_of=AS_OF):
    return pl.DataFrame(
        {"as_of": [as_of] * len(user_ids), "user_id": list(user_ids)},
        schema={"as_of": pl.Datetime("us", "UTC"), "user_id": pl.String},
    )


def catalog(blocked=()):
    ids = ["a", "b", "c", "d", "e", "fee"]
    return pl.DataFrame(
        {
            "as_of": [AS_OF] * len(ids),
            "item_id": ids,
            "is_recommendable": [item not in blocked for item in ids],
        },
        schema={
            "as_of": pl.Datetime("us", "UTC"),
            "item_id": pl.String,
            "is_recommendable": pl.Boolean,
        },
    )


def as_dict(scores, user="u1"):
    return dict(scores.filter(pl.col("user_id") == user).select("item_id", "score").iter_rows())


# A small shop: baskets {a, b, c} bought together often, {d, e} together; "fee" in every order.
SHOP = [
    *[(f"x{n}", item, "purchase", 10) for n in range(6) for item in ("a", "b", "c", "fee")],
    *[(f"y{n}", item, "purchase", 10) for n in range(6) for item in ("d", "e", "fee")],
    ("u1", "a", "purchase", 30),
    ("u1", "a", "purchase", 1),
    ("u1", "d", "view", 0.5),
    ("u1", "fee", "purchase", 1),
]
FUTURE = [("u1", "e", "purchase", -1), ("u1", "b", "purchase", -2), ("z", "a", "view", -1)]


def test_buy_again_recency_decays_with_a_30_day_half_life():
    scores = as_dict(bl.buy_again_recency_scores(users("u1"), events(SHOP), {"fee"}))
    assert scores["a"] == pytest.approx(0.5 + 2 ** (-1 / 30))
    assert scores["d"] == pytest.approx(0.1 * 2 ** (-0.5 / 30))
    assert "fee" not in scores


def test_every_strong_baseline_ignores_events_after_the_cutoff():
    before = bl.strong_baselines(users("u1"), events(SHOP), catalog(["fee"]), 10)
    after = bl.strong_baselines(users("u1"), events(SHOP + FUTURE), catalog(["fee"]), 10)
    assert set(before.ranked) == set(bl.STRONG_BASELINES) - {bl.BASKET}
    for name, ranked in before.ranked.items():
        assert ranked.equals(after.ranked[name]), name


def test_item_knn_is_cosine_on_the_binary_matrix():
    scores = as_dict(bl.item_knn_scores(users("u1"), events(SHOP), {"fee"}))
    # u1's items a, d and the fee (history, never recommended). Users of a: x0..5, u1 (7); b
    # and c: x0..5 (6); d: y0..5, u1 (7); e: y0..5 (6); fee: everyone but z (13).
    # cos(a, b) = 6 / sqrt(7 * 6), cos(fee, b) = 6 / sqrt(13 * 6); a-d share u1 only: 1 / 7.
    assert scores["b"] == pytest.approx(6 / math.sqrt(42) + 6 / math.sqrt(78), rel=1e-5)
    assert scores["e"] == pytest.approx(6 / math.sqrt(42) + 6 / math.sqrt(78), rel=1e-5)
    # An own item, scored by the user's other items only (d and the fee).
    assert scores["a"] == pytest.approx(1 / 7 + 7 / math.sqrt(91), rel=1e-5)
    assert "fee" not in scores


def test_ease_matches_the_closed_form():
    history = events(SHOP)
    scores = as_dict(bl.ease_scores(users("u1"), history, set(), regularisation=2.0))
    built = interaction_matrix(bl.history_before(history, AS_OF), 100)
    dense = built.matrix.toarray().astype(np.float64)
    precision = np.linalg.inv(dense.T @ dense + 2.0 * np.eye(dense.shape[1]))
    weights = np.eye(dense.shape[1]) - precision / np.diag(precision)
    expected = dense[built.users.index("u1")] @ weights
    for column, item in enumerate(built.items):
        if expected[column] > 0:
            assert scores[item] == pytest.approx(expected[column], rel=1e-4, abs=1e-6)
        else:
            assert item not in scores


def test_basket_cooccurrence_sums_the_mart_by_the_users_recency():
    together = pl.DataFrame(
        {
            "as_of": [AS_OF] * 3,
            "item_id": ["a", "a", "d"],
            "neighbour_item_id": ["b", "fee", "e"],
            "score": [2.0, 5.0, 4.0],
        },
        schema_overrides={"as_of": pl.Datetime("us", "UTC")},
    )
    scores = as_dict(
        bl.basket_cooccurrence_scores(users("u1"), events(SHOP + FUTURE), together, {"fee"})
    )
    recency = as_dict(bl.buy_again_recency_scores(users("u1"), events(SHOP), {"fee"}))
    assert scores == pytest.approx({"b": 2.0 * recency["a"], "e": 4.0 * recency["d"]})


def test_non_recommendable_items_never_appear():
    result = bl.strong_baselines(users("u1"), events(SHOP), catalog(["fee", "b"]), 10)
    for name, ranked in result.ranked.items():
        assert not set(ranked.get_column("item_id")) & {"fee", "b"}, name


def test_blend_normalises_per_user_and_checks_its_weight():
    first = pl.DataFrame(
        {"as_of": [AS_OF] * 2, "user_id": ["u1"] * 2, "item_id": ["a", "b"], "score": [4.0, 2.0]}
    )
    second = pl.DataFrame(
        {"as_of": [AS_OF] * 2, "user_id": ["u1"] * 2, "item_id": ["b", "c"], "score": [1.0, 10.0]}
    )
    mixed = as_dict(bl.blend_scores(first, second, 0.75))
    assert mixed == pytest.approx({"a": 0.75, "b": 0.75 * 0.5 + 0.25 * 0.1, "c": 0.25})
    with pytest.raises(ValueError, match="weight"):
        bl.blend_scores(first, second, 1.5)


def test_the_blend_is_chosen_on_validation_labels_only():
    # Validation: u1 at an earlier cutoff buys e (a neighbour of d): the partner that finds e
    # should win with the smallest buy-again weight that ranks e first.
    earlier = AS_OF - timedelta(days=5)
    labels = pl.DataFrame(
        {"as_of": [earlier], "user_id": ["u1"], "item_id": ["e"], "label": [3]},
        schema_overrides={"as_of": pl.Datetime("us", "UTC")},
    )
    history = events([*SHOP, ("u1", "d", "purchase", 20)])
    validation = bl.Validation(
        users=users("u1", as_of=earlier), labels=labels, bought_together=None
    )
    result = bl.strong_baselines(users("u1"), history, catalog(["fee"]), 10, validation=validation)
    assert "validation" in result.notes[bl.BLEND]
    fixed = bl.strong_baselines(users("u1"), history, catalog(["fee"]), 10)
    assert fixed.notes[bl.BLEND].startswith("0.5 x buy_again_recency + 0.5 x item_knn, fixed")
    partner, weight, value = bl.choose_blend(
        bl.buy_again_recency_scores(users("u1", as_of=earlier), history, {"fee"}),
        {
            bl.ITEM_KNN: bl.item_knn_scores(users("u1", as_of=earlier), history, {"fee"}),
            bl.EASE: bl.ease_scores(users("u1", as_of=earlier), history, {"fee"}),
        },
        labels,
    )
    assert partner in (bl.ITEM_KNN, bl.EASE) and weight in bl.BLEND_WEIGHTS and value > 0


def test_strong_baselines_join_the_evaluation_and_the_best_baseline():
    history = events(SHOP)
    evaluated = users("u1")
    labels = pl.DataFrame(
        {"as_of": [AS_OF] * 2, "user_id": ["u1"] * 2, "item_id": ["b", "e"], "label": [3, 3]},
        schema_overrides={"as_of": pl.Datetime("us", "UTC")},
    )
    # A ranker that only sees "c": worse than item-kNN (b and e first).
    assembled = pl.DataFrame(
        {
            "as_of": [AS_OF] * 2,
            "user_id": ["u1"] * 2,
            "item_id": ["c", "a"],
            "candidate_rank": [1, 2],
            "covisit_score": [1.0, 0.0],
        },
        schema_overrides={"as_of": pl.Datetime("us", "UTC")},
    )
    items = catalog(["fee"]).with_columns(
        pl.lit(1).alias("popularity_rank"), pl.lit(1.0).alias("trend"), pl.lit(1).alias("views_7d")
    )
    user_features = evaluated.with_columns(pl.lit(5).alias("events"))
    user_items = pl.DataFrame(
        {
            "as_of": [AS_OF],
            "user_id": ["u1"],
            "item_id": ["a"],
            "views": [0],
            "carts": [0],
            "purchases": [2],
            "days_since_last": [1.0],
        },
        schema_overrides={"as_of": pl.Datetime("us", "UTC")},
    )
    report = evaluate(
        assembled,
        np.array([1.0, 0.0]),
        labels,
        items,
        user_features,
        user_items,
        resamples=50,
        history=history,
    )
    for name in (bl.BUY_AGAIN_RECENCY, bl.ITEM_KNN, bl.EASE, bl.BLEND):
        assert name in report.metrics and name in report.paired
    assert bl.BASKET in report.not_applicable
    assert headline_ratios(report)["best_baseline"] in (bl.ITEM_KNN, bl.EASE, bl.BLEND)
    assert "blend" in render_markdown(report)


def test_the_asset_reads_only_the_events_before_the_cutoff(tmp_path):
    from orchestration.assets.evaluation import _history_before
    from shelfwise.lake import EVENTS, Lake, partition_file

    lake = Lake(str(tmp_path))
    rows = events(
        [("u1", "a", "purchase", 2), ("u1", "b", "view", 0.25), ("u1", "c", "view", -0.25)]
    )
    for day, part in rows.with_columns(day=pl.col("occurred_at").dt.date()).group_by("day"):
        lake.write_parquet(part.drop("day").to_arrow(), partition_file(EVENTS, day[0], "part"))
    history = _history_before(lake, AS_OF)
    assert sorted(history.get_column("item_id").to_list()) == ["a", "b"]
    assert history.columns == bl.HISTORY_COLUMNS
