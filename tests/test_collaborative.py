"""The collaborative model (EASE) and the candidate generator built on it."""

import dataclasses
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from models.candidates import CandidateConfig, generate_candidates
from models.collaborative import collaborative_scores, fit_item_models, item_neighbours
from models.features import FEATURE_COLUMNS
from models.recommender import Recommender
from models.session import NeighbourIndex, Session
from tests.test_candidates import SOURCES

EARLY = datetime(2026, 1, 1, tzinfo=UTC)
LATE = datetime(2026, 1, 8, tzinfo=UTC)

# Everyone who took bread also took butter; jam goes with tea. u_new took bread only.
BASKETS = {
    "u1": ["bread", "butter", "milk"],
    "u2": ["bread", "butter"],
    "u3": ["bread", "butter", "eggs"],
    "u4": ["tea", "jam"],
    "u5": ["tea", "jam", "milk"],
    "u_new": ["bread"],
}


def user_items(as_of: datetime, baskets: dict[str, list[str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(as_of, user, item) for user, items in baskets.items() for item in items],
        schema={"as_of": pl.Datetime("us", "UTC"), "user_id": pl.String, "item_id": pl.String},
        orient="row",
    )


def queries(as_of: datetime, *users: str) -> pl.DataFrame:
    return pl.DataFrame(
        {"as_of": [as_of] * len(users), "user_id": list(users)},
        schema={"as_of": pl.Datetime("us", "UTC"), "user_id": pl.String},
    )


def test_the_generator_proposes_what_similar_users_took_never_the_users_own_items():
    rows = user_items(EARLY, BASKETS)
    models = fit_item_models(rows, max_items=100, regularisation=1.0)
    scores = collaborative_scores(queries(EARLY, "u_new", "u4"), rows, models, per_user=2)
    top = {
        user: frame.sort("collaborative_score", descending=True).get_column("item_id").to_list()
        for (user,), frame in scores.group_by("user_id")
    }
    assert top["u_new"][0] == "butter"
    assert "bread" not in top["u_new"]
    assert not {"tea", "jam"} & set(top["u4"])
    assert (scores.get_column("collaborative_score") > 0).all()


def test_items_not_recommendable_are_never_proposed():
    rows = user_items(EARLY, BASKETS)
    models = fit_item_models(rows, max_items=100, regularisation=1.0)
    blocked = pl.DataFrame(
        {"as_of": [EARLY], "item_id": ["butter"]},
        schema={"as_of": pl.Datetime("us", "UTC"), "item_id": pl.String},
    )
    scores = collaborative_scores(queries(EARLY, "u_new"), rows, models, 5, blocked)
    assert "butter" not in scores.get_column("item_id").to_list()


def test_each_cutoffs_model_sees_only_its_own_rows():
    # At LATE u_new also took tea, and many more people took bread with jam.
    later = {**BASKETS, "u6": ["bread", "jam"], "u7": ["bread", "jam"], "u_new": ["bread", "tea"]}
    both = pl.concat([user_items(EARLY, BASKETS), user_items(LATE, later)])
    alone = fit_item_models(user_items(EARLY, BASKETS), 100, 1.0)[EARLY]
    together = fit_item_models(both, 100, 1.0)
    np.testing.assert_array_equal(together[EARLY].items, alone.items)
    np.testing.assert_array_equal(together[EARLY].weights, alone.weights)
    early_scores = collaborative_scores(queries(EARLY, "u_new"), both, together, 5)
    only_early = collaborative_scores(
        queries(EARLY, "u_new"), user_items(EARLY, BASKETS), {EARLY: alone}, 5
    )
    assert early_scores.equals(only_early)
    late_scores = collaborative_scores(queries(LATE, "u_new"), both, together, 5)
    assert not late_scores.drop("as_of").equals(early_scores.drop("as_of"))


def test_the_model_keeps_the_items_with_the_most_users():
    models = fit_item_models(user_items(EARLY, BASKETS), max_items=3, regularisation=1.0)
    # bread 4 users, butter 3, then jam, milk and tea with 2 each: ties go by item id.
    assert models[EARLY].items.tolist() == ["bread", "butter", "jam"]


def test_item_neighbours_are_the_strongest_positive_weights():
    models = fit_item_models(user_items(EARLY, BASKETS), 100, 1.0)
    table = item_neighbours(models, 1, pl.Datetime("us", "UTC"))
    best = dict(zip(table["item_id"], table["neighbour_item_id"], strict=True))
    assert best["bread"] == "butter" and best["tea"] == "jam"
    assert (table.get_column("score") > 0).all()
    assert table.group_by("item_id").len().get_column("len").max() == 1


def test_candidates_carry_the_collaborative_score_as_a_feature():
    # The hand-made shop of test_candidates: u1 took a and b; u3 took a, b and d.
    extra = pl.DataFrame(
        [(SOURCES.user_items["as_of"][0], "u3", item) for item in ("a", "b", "d")],
        schema=["as_of", "user_id", "item_id"],
        orient="row",
    )
    rows = pl.concat([SOURCES.user_items, extra], how="diagonal_relaxed")
    sources = dataclasses.replace(
        SOURCES, user_items=rows, item_models=fit_item_models(rows, 100, 1.0)
    )
    users = queries(SOURCES.user_items["as_of"][0], "u1")
    result = generate_candidates(users, sources, CandidateConfig(max_candidates=50))
    by_item = {r["item_id"]: r for r in result.iter_rows(named=True)}
    assert by_item["d"]["collaborative_score"] > 0
    assert by_item["a"]["collaborative_score"] == 0.0  # u1's own item
    without = generate_candidates(users, SOURCES, CandidateConfig(max_candidates=50))
    assert without.get_column("collaborative_score").sum() == pytest.approx(0.0)


def _recommender_with(neighbours: list[tuple[str, str, str, float]]) -> Recommender:
    frame = pl.DataFrame(
        neighbours, schema=["kind", "item_id", "neighbour_item_id", "score"], orient="row"
    )
    snapshot = pl.DataFrame(
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "candidate_rank": pl.Int32,
            **{name: pl.Float32 for name in FEATURE_COLUMNS},
        }
    )
    popular = pl.DataFrame({"item_id": ["pop"], "popularity": [1.0]})
    return Recommender(snapshot, popular, None, neighbours=NeighbourIndex.from_frame(frame))


def test_similar_and_sessions_of_unknown_users_read_the_collaborative_neighbours():
    recommender = _recommender_with(
        [
            ("collaborative", "bread", "butter", 0.4),
            ("collaborative", "bread", "jam", 0.1),
            ("covisit", "bread", "jam", 7.0),
            ("covisit", "bread", "toast", 3.0),
        ]
    )
    similar = recommender.similar("bread", 3)
    by_item = {item.item_id: item for item in similar.items}
    # jam: top of co-visitation (share 1) and a quarter of butter's weight: 1.25, first.
    assert [item.item_id for item in similar.items] == ["jam", "butter", "toast"]
    assert by_item["butter"].source == "collaborative" and by_item["jam"].source == "covisit"

    answer = recommender.recommend(
        "stranger", 3, context_item_id="bread", session=Session(("bread",))
    )
    assert answer.strategy == "session"
    assert [item.item_id for item in answer.items] == ["jam", "butter", "toast"]


def test_an_item_known_only_to_the_collaborative_model_has_neighbours():
    recommender = _recommender_with([("collaborative", "bread", "butter", 0.4)])
    similar = recommender.similar("bread", 1)
    assert similar.strategy == "neighbours"
    assert [(item.item_id, item.source) for item in similar.items] == [("butter", "collaborative")]
