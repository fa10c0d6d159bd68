import dataclasses
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from models.candidates import (
    GENERATORS,
    SCORE_COLUMNS,
    CandidateConfig,
    CandidateSources,
    generate_candidates,
    generator_recall,
)
from models.features import FEATURE_COLUMNS
from models.recommender import _generators_order

AS_OF = datetime(2026, 1, 8, tzinfo=UTC)


def make(rows, columns):
    return pl.DataFrame([(AS_OF, *r) for r in rows], schema=["as_of", *columns], orient="row")


# u1 viewed a yesterday and bought b three days ago; u2 touched z. Categories: c1 repeatable.
USER_ITEMS = make(
    [("u1", "a", 0, 0, 0.5, 1.0), ("u1", "b", 1, 1, 3.0, 2.0), ("u2", "z", 0, 0, 1.0, 1.0)],
    ["user_id", "item_id", "carts", "purchases", "days_since_last", "interest"],
)
ITEM_FEATURES = make(
    [
        ("a", "c1", 10.0, 1.0, 3, 50.0, 40.0),
        ("b", "c1", 12.0, 1.0, 2, 30.0, 40.0),
        ("c", "c2", 20.0, 1.0, 1, 60.0, 40.0),
        ("d", "c2", 1.0, 5.0, 6, 5.0, 40.0),
        ("e", "c1", 2.0, 1.0, 5, 2.0, 10.0),
        ("new", "c1", 0.0, 1.0, 7, 1.0, 12.0),
        ("p1", "c3", 30.0, 1.0, 0, 80.0, 40.0),
        ("z", "c3", 0.5, 1.0, 8, 9.0, 40.0),
    ],
    ["item_id", "category_id", "popularity", "trend", "popularity_rank", "age_days", "price"],
).with_columns(pl.col("popularity_rank") + 1)
COVISITATION = make(
    [("a", "c", 5.0), ("a", "d", 1.0), ("b", "c", 2.0)], ["item_id", "neighbour_item_id", "score"]
)
BOUGHT_TOGETHER = make([("b", "e", 3.0)], ["item_id", "neighbour_item_id", "score"])
USER_CATEGORIES = make(
    [("u1", "c1", 0.9), ("u1", "c2", 0.1)], ["user_id", "category_id", "affinity"]
)
USER_FEATURES = make([("u1", 12.0), ("u2", 40.0)], ["user_id", "mean_price"])
REPURCHASE = make([("c1", 0.3), ("c2", 0.0)], ["category_id", "repeat_rate"])
SOURCES = CandidateSources(
    user_items=USER_ITEMS,
    items=ITEM_FEATURES,
    covisitation=COVISITATION,
    bought_together=BOUGHT_TOGETHER,
    user_categories=USER_CATEGORIES,
    users=USER_FEATURES,
    repurchase_rates=REPURCHASE,
)
CONFIG = CandidateConfig(
    recent_items=10,
    top_categories=1,
    per_category=2,
    new_item_days=14,
    trending_items=1,
    popular_items=2,
    max_candidates=50,
)


def generate(users, config=CONFIG):
    return generate_candidates(make([(u,) for u in users], ["user_id"]), SOURCES, config)


def rows_of(frame):
    return {r["item_id"]: r for r in frame.iter_rows(named=True)}


def test_every_generator_contributes_its_own_signal():
    rows = rows_of(generate(["u1"]))
    assert rows["a"]["history_score"] == 1.0 and rows["b"]["history_score"] == 0.5
    # b was bought in a repeatable category; a was only viewed.
    assert rows["b"]["buy_again_score"] == 0.3 and rows["a"]["buy_again_score"] == 0.0
    # c neighbours a (rank 1, score 5) and b (rank 2, score 2 / 2).
    assert rows["c"]["covisit_score"] == pytest.approx(6.0) and rows["c"]["covisit_hits"] == 2
    # e was bought together with b (carted by u1, recency rank 2).
    assert rows["e"]["bought_together_score"] == pytest.approx(1.5)
    # c1 is u1's favourite category: its two most popular items, and its newest items.
    assert rows["b"]["category_popular_score"] == pytest.approx(0.9)
    assert rows["a"]["category_popular_score"] == pytest.approx(0.45)
    assert rows["new"]["content_score"] > 0 and rows["new"]["sources"] == 1
    # Popularity x trend is largest for p1 (30 x 1 beats d's 1 x 5); p1 and c are the top two.
    assert rows["p1"]["trending_score"] == 30.0 and rows["p1"]["popular_score"] == 1.0
    assert rows["c"]["popular_score"] == 0.5
    assert {r["sources"] for r in rows.values()} <= set(range(1, len(GENERATORS) + 1))


def test_the_generators_own_order_puts_the_users_items_first():
    ordered = generate(["u1"]).sort("candidate_rank")
    assert ordered.get_column("item_id").to_list()[:2] == ["a", "b"]
    assert ordered.get_column("candidate_rank").to_list() == list(range(1, ordered.height + 1))


def test_unknown_user_gets_trending_and_popular_items_only():
    result = generate(["stranger"])
    assert set(result.get_column("item_id")) == {"p1", "c"}
    assert result.get_column("history_score").sum() == 0


def test_candidates_are_capped_per_user_and_unique():
    config = CandidateConfig(max_candidates=3, popular_items=2, discovery_slots=0)
    result = generate(["u1", "u2"], config)
    assert result.group_by("user_id").len().get_column("len").max() == 3
    # Discovery slots add at most their number, of items new to the user.
    wider = generate(["u1", "u2"], dataclasses.replace(config, discovery_slots=2))
    assert wider.group_by("user_id").len().get_column("len").max() == 5
    assert result.select("as_of", "user_id", "item_id").is_unique().all()


def test_generator_recall_counts_positives_each_generator_proposed():
    candidates = generate(["u1"])
    labels = make(
        [("u1", "e", 3), ("u1", "c", 1), ("u1", "unseen", 1)], ["user_id", "item_id", "label"]
    )
    recall = generator_recall(candidates, labels)
    assert recall["merged"] == pytest.approx(2 / 3)
    assert recall["bought_together"] == pytest.approx(1 / 3)
    assert recall["covisit"] == pytest.approx(1 / 3)
    assert recall["history"] == 0.0


def test_items_not_recommendable_are_never_proposed_and_lists_keep_their_length():
    # b (bought by u1), c (a's co-visitation neighbour), p1 (most popular) and new: fees, say.
    flagged = {"b", "c", "p1", "new"}
    items = ITEM_FEATURES.with_columns(
        (~pl.col("item_id").is_in(list(flagged))).alias("is_recommendable")
    )
    sources = dataclasses.replace(SOURCES, items=items)
    users = make([("u1",), ("stranger",)], ["user_id"])
    result = generate_candidates(users, sources, CONFIG)
    rows = rows_of(result.filter(pl.col("user_id") == "u1"))
    assert set(rows) == {"a", "d", "e"}
    # b is no longer a recent item: it neither seeds bought-together nor counts as history.
    assert rows["a"]["history_score"] == 1.0 and result["bought_together_score"].sum() == 0
    # Each generator's next items take the freed places: c1's two most popular are now a and e,
    # its newest e, the top trending a, the two most popular a and e.
    assert rows["e"]["category_popular_score"] > 0 and rows["e"]["content_score"] > 0
    assert rows["a"]["trending_score"] == 10.0
    stranger = result.filter(pl.col("user_id") == "stranger")
    assert set(stranger["item_id"]) == {"a", "e"} and (stranger["popular_score"] > 0).all()


def test_a_list_cut_short_keeps_room_for_items_new_to_the_user():
    # u1's own items (a, b) and what the generators propose beyond them (c, d, e, new, p1).
    everything = generate(["u1"]).sort("candidate_rank")
    own = (pl.col("history_score") > 0) | (pl.col("buy_again_score") > 0)
    assert everything.filter(own).get_column("item_id").to_list() == ["a", "b"]
    new_items = everything.filter(~own).get_column("item_id").to_list()
    # Cut at two: the user's own items fill it, and two of the cut new items come on top.
    kept = generate(["u1"], dataclasses.replace(CONFIG, max_candidates=2, discovery_slots=2))
    assert kept.get_column("item_id").to_list() == ["a", "b", *new_items[:2]]
    assert kept.get_column("candidate_rank").to_list() == [1, 2, 3, 4]
    # Without discovery slots the cut is the generators' order alone.
    plain = generate(["u1"], dataclasses.replace(CONFIG, max_candidates=2, discovery_slots=0))
    assert plain.get_column("item_id").to_list() == ["a", "b"]
    # A list the cut does not reach is unchanged.
    uncut = generate(["u1"], dataclasses.replace(CONFIG, discovery_slots=2))
    assert uncut.equals(everything.sort("as_of", "user_id", "candidate_rank"))


def test_the_service_reorders_session_rows_as_the_generators_sort_them():
    """After a session adds rows the service re-derives the generators' order (the fallback when
    there is no ranker): as `generate_candidates` sorts, missing scores as 0, ties by item id."""
    rng = np.random.default_rng(5)
    rows = 60
    column = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
    matrix = np.full((rows, len(FEATURE_COLUMNS)), np.nan, np.float32)
    for name in SCORE_COLUMNS:  # few distinct values: many ties, some missing
        matrix[:, column[name]] = rng.choice([np.nan, 0.0, 0.5, 1.0], rows)
    item_ids = np.array([f"i{n:03d}" for n in rng.permutation(rows)], dtype=object)
    frame = pl.DataFrame(
        {"item_id": item_ids.tolist()} | {name: matrix[:, column[name]] for name in SCORE_COLUMNS},
        nan_to_null=True,
    ).with_columns([pl.col(name).fill_null(0.0) for name in SCORE_COLUMNS])
    expected = frame.sort(
        [*SCORE_COLUMNS, "item_id"], descending=[*[True] * len(SCORE_COLUMNS), False]
    )["item_id"].to_list()
    positions = _generators_order(matrix, item_ids, column)
    assert item_ids[np.argsort(positions)].tolist() == expected
