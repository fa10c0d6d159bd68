"""Offline / online parity: what the service ranks for a user as of a cutoff is exactly what the
ranker was trained on for that user and cutoff."""

import lightgbm as lgb
import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from models.artifacts import load_plan, read_candidates, read_ranker_text, read_training_set
from models.features import FEATURE_COLUMNS, feature_matrix
from models.marts import Marts
from models.recommender import Recommender, serving_snapshot


def test_service_vectors_and_scores_equal_the_training_rows(pipeline_run):
    lake = pipeline_run.lake
    plan = load_plan(lake)
    cutoff = plan.training[0]
    training = read_training_set(lake).filter(pl.col("as_of") == cutoff)
    candidates = read_candidates(lake, "training").filter(pl.col("as_of") == cutoff)

    # The serving path, run as of a training cutoff.
    snapshot = serving_snapshot(candidates, Marts.load(lake, [cutoff]))
    key = ["user_id", "item_id"]
    served = snapshot.join(training.select(key), on=key, how="semi").sort(key)
    trained = training.select(*key, "candidate_rank", *FEATURE_COLUMNS).sort(key)
    assert served.height == trained.height > 100
    assert_frame_equal(served, trained, check_exact=True)

    # The service core scores a user's rows exactly as the booster scores the training rows.
    booster = lgb.Booster(model_str=read_ranker_text(lake))
    recommender = Recommender(
        served,
        popular=pl.DataFrame(
            {"item_id": [], "popularity": []},
            schema={"item_id": pl.String, "popularity": pl.Float64},
        ),
        booster=booster,
    )
    user_id = (
        trained.group_by("user_id")
        .len()
        .sort("len", "user_id", descending=[True, False])["user_id"][0]
    )
    rows = trained.filter(pl.col("user_id") == user_id)
    expected = booster.predict(feature_matrix(rows))
    answer = recommender.recommend(user_id, k=rows.height)
    got = dict((item.item_id, item.score) for item in answer.items)
    np.testing.assert_allclose([got[item_id] for item_id in rows["item_id"]], expected, rtol=1e-12)
