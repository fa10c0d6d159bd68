"""Each user segment is served the better of the ranker and its fallback (chosen on validation);
the choice travels with the model and the service obeys it."""

from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from models.features import FEATURE_COLUMNS, USER_FEATURES
from models.recommender import FALLBACK_NONE, FALLBACK_SEGMENT, Recommender
from models.segments import (
    FALLBACK,
    RANKER,
    SegmentPolicy,
    choose_segment_policy,
    default_policy,
    segment_of,
)
from shelfwise.runtime.registry import production_path, promote, register_ranker

AS_OF = datetime(2026, 1, 8, tzinfo=UTC)
LIGHT_ONLY = SegmentPolicy(serves={"new": FALLBACK, "light": FALLBACK, "heavy": RANKER})


def test_segments_are_cut_as_in_the_evaluation():
    assert [segment_of(e, 20) for e in (None, float("nan"), 0, 1, 20, 21)] == [
        "new",
        "new",
        "new",
        "light",
        "light",
        "heavy",
    ]
    assert LIGHT_ONLY.fallback_for(3) and not LIGHT_ONLY.fallback_for(30)
    assert default_policy().serves == {"new": FALLBACK, "light": RANKER, "heavy": RANKER}


def test_the_policy_round_trips_through_plain_values():
    policy = SegmentPolicy(
        serves={"new": FALLBACK, "light": FALLBACK, "heavy": RANKER},
        heavy_threshold=12,
        validation={"light": {"users": 3.0, RANKER: 0.1, FALLBACK: 0.2}},
        chosen_on=AS_OF.isoformat(),
        reasons={"light": "popularity"},
    )
    assert SegmentPolicy.from_dict(policy.to_dict()) == policy
    assert SegmentPolicy.from_dict(None) is None
    with pytest.raises(ValueError, match="ranker or fallback"):
        SegmentPolicy.from_dict({"serves": {"light": "ease"}})


def rows(values, columns):
    return pl.DataFrame([(AS_OF, *row) for row in values], schema=["as_of", *columns], orient="row")


def test_the_segment_the_ranker_loses_on_validation_gets_popularity():
    # Light users l1, l2 want the popular item p; the ranker puts it last. Heavy h1 wants x,
    # which only the ranker ranks first.
    scores = rows(
        [
            ("l1", "x", 2.0),
            ("l1", "p", 1.0),
            ("l2", "y", 2.0),
            ("l2", "p", 1.0),
            ("h1", "x", 2.0),
            ("h1", "p", 1.0),
        ],
        ["user_id", "item_id", "score"],
    )
    popular = rows(
        [(user, "p", 1) for user in ("l1", "l2", "h1", "n1")], ["user_id", "item_id", "rank"]
    )
    labels = rows(
        [("l1", "p", 3), ("l2", "p", 1), ("h1", "x", 3), ("n1", "p", 3)],
        ["user_id", "item_id", "label"],
    )
    segments = rows(
        [("l1", "light"), ("l2", "light"), ("h1", "heavy"), ("n1", "new")],
        ["user_id", "segment"],
    )
    policy = choose_segment_policy(scores, popular, labels, segments, heavy_threshold=20)
    assert policy.serves == {"new": FALLBACK, "light": FALLBACK, "heavy": RANKER}
    assert policy.validation["light"][FALLBACK] == pytest.approx(1.0)
    assert policy.validation["light"][RANKER] < 1.0
    # n1 has no ranker scores: left out of the comparison, and new is never the ranker's.
    assert policy.validation["new"]["users"] == 0
    assert policy.chosen_on == AS_OF.isoformat()


def snapshot(events: dict[str, float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    frames = []
    for user, count in events.items():
        frame = pl.DataFrame(
            {
                "user_id": [user] * 4,
                "item_id": [f"i{n}" for n in range(4)],
                "candidate_rank": list(range(1, 5)),
                **{
                    name: np.linspace(0, 1, 4).astype(np.float32)
                    for name in FEATURE_COLUMNS
                    if name not in USER_FEATURES.values()
                },
                # The user's own features are the same in each of the user's rows.
                **{name: np.full(4, 0.5, np.float32) for name in USER_FEATURES.values()},
                USER_FEATURES["events"]: np.full(4, count, dtype=np.float32),
            }
        ).select("user_id", "item_id", "candidate_rank", *FEATURE_COLUMNS)
        frames.append(frame)
    popular = pl.DataFrame({"item_id": ["p1", "p2", "p3"], "popularity": [9.0, 8.0, 7.0]})
    return pl.concat(frames), popular


def booster(candidates: pl.DataFrame) -> lgb.Booster:
    matrix = candidates.select(FEATURE_COLUMNS).to_numpy()
    data = lgb.Dataset(
        matrix, label=[0, 1, 2, 3] * (len(matrix) // 4), group=[4] * (len(matrix) // 4)
    )
    params = {"objective": "lambdarank", "min_data_in_leaf": 1, "verbosity": -1, "num_threads": 1}
    return lgb.train(params, data, num_boost_round=3)


def test_a_light_user_gets_the_fallback_when_the_model_says_so():
    candidates, popular = snapshot({"light": 3, "heavy": 40})
    ranker = booster(candidates)
    served = Recommender(candidates, popular, ranker, segment_policy=LIGHT_ONLY)
    light = served.recommend("light", 2)
    assert [item.item_id for item in light.items] == ["p1", "p2"]
    assert {item.source for item in light.items} == {"popular"}
    assert (light.strategy, light.fallback_level) == ("popular", FALLBACK_SEGMENT)
    heavy = served.recommend("heavy", 2)
    assert (heavy.strategy, heavy.fallback_level) == ("personalized", FALLBACK_NONE)
    assert {item.item_id for item in heavy.items} <= {"i0", "i1", "i2", "i3"}
    # Without a policy (a model registered before them) the ranker serves every known user.
    plain = Recommender(candidates, popular, ranker).recommend("light", 2)
    assert (plain.strategy, plain.fallback_level) == ("personalized", FALLBACK_NONE)
    # An unknown user is served as ever.
    unknown = served.recommend("someone-new", 2)
    assert (unknown.strategy, unknown.fallback_level) == ("popular", FALLBACK_NONE)


def test_the_policy_travels_with_the_model_into_the_service(tmp_path):
    from bentos.service import load_segment_policy

    home = tmp_path / "bentoml"
    info = {"features": FEATURE_COLUMNS, "segment_policy": LIGHT_ONLY.to_dict()}
    tag = register_ranker(home, "booster", info, {"ndcg@10": 0.1}, code="test")
    promote(home, tag)
    assert load_segment_policy(production_path(home)) == LIGHT_ONLY
    plain = register_ranker(home, "booster", {"features": FEATURE_COLUMNS}, {}, code="test")
    promote(home, plain)
    assert load_segment_policy(production_path(home)) is None
