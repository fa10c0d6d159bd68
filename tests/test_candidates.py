from datetime import UTC, datetime

import polars as pl

from models.candidates import CandidateConfig, generate_candidates

AS_OF = datetime(2026, 1, 8, tzinfo=UTC)


def make(rows, columns):
    return pl.DataFrame([(AS_OF, *r) for r in rows], schema=["as_of", *columns], orient="row")


USER_ITEMS = make(
    [("u1", "a", 0.5, 1.0), ("u1", "b", 3.0, 1.0), ("u2", "z", 1.0, 1.0)],
    ["user_id", "item_id", "days_since_last", "interest"],
)
COVISITATION = make(
    [("a", "c", 5.0), ("a", "d", 1.0), ("b", "c", 2.0), ("b", "e", 4.0)],
    ["item_id", "neighbour_item_id", "score"],
)
ITEM_FEATURES = make([("p1", 1), ("p2", 2), ("c", 3), ("p3", 4)], ["item_id", "popularity_rank"])


DEFAULT = CandidateConfig(recent_items=10, popular_items=3, max_candidates=50)


def generate(users, config=DEFAULT):
    queries = make([(u,) for u in users], ["user_id"])
    return generate_candidates(queries, USER_ITEMS, COVISITATION, ITEM_FEATURES, config)


def test_history_covisitation_and_popular_merge_with_their_signals():
    result = generate(["u1"])
    rows = {r["item_id"]: r for r in result.iter_rows(named=True)}
    assert set(rows) == {"a", "b", "c", "d", "e", "p1", "p2"}
    # c is a neighbour of a (rank 1, score 5) and b (rank 2, score 2 / 2) and popular.
    assert rows["c"]["covisit_score"] == 5.0 + 2.0 / 2
    assert rows["c"]["covisit_hits"] == 2
    assert rows["c"]["from_popular"] == 1.0
    assert rows["a"]["from_history"] == 1.0 and rows["p1"]["from_history"] == 0.0
    # Generators' own order: most recent history first, then co-visitation, then popularity.
    ordered = result.sort("candidate_rank").get_column("item_id").to_list()
    assert ordered[:2] == ["a", "b"]
    assert ordered[2:5] == ["c", "e", "d"]
    assert ordered[5:] == ["p1", "p2"]
    assert result.get_column("candidate_rank").to_list() == list(range(1, 8))


def test_unknown_user_gets_popular_items_only():
    result = generate(["stranger"])
    assert result.get_column("item_id").to_list() == ["p1", "p2", "c"]
    assert result.get_column("from_popular").to_list() == [1.0, 1.0, 1.0]


def test_candidates_are_capped_per_user():
    config = CandidateConfig(recent_items=10, popular_items=3, max_candidates=4)
    result = generate(["u1", "u2"], config)
    assert result.group_by("user_id").len().get_column("len").max() == 4
    assert result.select("as_of", "user_id", "item_id").is_unique().all()
