"""The service degrades instead of failing: ranker → candidate order → popular items."""

import shutil

import httpx
import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from models.artifacts import read_serving_candidates
from models.candidates import GENERATORS
from models.features import FEATURE_COLUMNS, USER_FEATURES
from models.recommender import (
    FALLBACK_CANDIDATE_ORDER,
    FALLBACK_NONE,
    FALLBACK_POPULAR,
    Recommender,
)
from shelfwise.lake import SERVING_POPULAR, Lake
from shelfwise.settings import Settings
from tests.support import PROJECT_ROOT, bentoml_server


def snapshot() -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = 6
    candidates = pl.DataFrame(
        {
            "user_id": ["u1"] * rows,
            "item_id": [f"i{n}" for n in range(rows)],
            "candidate_rank": list(range(1, rows + 1)),
            **{name: np.linspace(0, 1, rows).astype(np.float32) for name in FEATURE_COLUMNS},
        }
    ).with_columns(pl.lit(0.5, pl.Float32).alias(name) for name in USER_FEATURES.values())
    popular = pl.DataFrame({"item_id": ["p1", "p2", "i0"], "popularity": [9.0, 8.0, 7.0]})
    return candidates, popular


class BrokenBooster:
    """Stands in for a ranker whose prediction fails (a corrupt or incompatible model)."""

    def predict(self, *args, **kwargs):
        raise lgb.basic.LightGBMError("corrupt model")


def trained_booster(candidates: pl.DataFrame) -> lgb.Booster:
    matrix = candidates.select(FEATURE_COLUMNS).to_numpy()
    data = lgb.Dataset(matrix, label=[0, 0, 1, 1, 2, 3], group=[len(matrix)])
    params = {"objective": "lambdarank", "min_data_in_leaf": 1, "verbosity": -1, "num_threads": 1}
    return lgb.train(params, data, num_boost_round=5)


def test_a_working_ranker_answers_without_fallback():
    candidates, popular = snapshot()
    answer = Recommender(candidates, popular, trained_booster(candidates)).recommend("u1", 3)
    assert answer.fallback_level == FALLBACK_NONE
    # Each item names the generator that proposed it.
    assert {item.source for item in answer.items} <= set(GENERATORS)


def test_a_failing_ranker_falls_back_to_the_candidate_order():
    candidates, popular = snapshot()
    answer = Recommender(candidates, popular, BrokenBooster()).recommend("u1", 3)
    assert answer.fallback_level == FALLBACK_CANDIDATE_ORDER
    assert [item.item_id for item in answer.items] == ["i0", "i1", "i2"]


def test_missing_candidates_fall_back_to_popular_and_unknown_users_are_normal(tmp_path):
    candidates, popular = snapshot()
    lake = Lake(str(tmp_path / "lake"))
    lake.write_parquet(popular.to_arrow(), SERVING_POPULAR)
    degraded = Recommender.from_lake(lake, None)
    answer = degraded.recommend("u1", 2)
    assert answer.fallback_level == FALLBACK_POPULAR
    assert [item.item_id for item in answer.items] == ["p1", "p2"]
    unknown = Recommender(candidates, popular, None).recommend("someone-new", 2)
    assert unknown.fallback_level == FALLBACK_NONE and unknown.strategy == "popular"
    # Nothing at all: an empty answer, not an exception.
    assert Recommender.from_lake(Lake(str(tmp_path / "empty")), None).recommend("u1", 5).items == []


@pytest.fixture
def server_without_model(pipeline_run, tmp_path):
    """The pipeline's state with the production model's booster corrupted, served from source."""
    assert pipeline_run.result.success, pipeline_run.failures
    home = tmp_path / "home"
    shutil.copytree(pipeline_run.settings.home, home)
    for booster_file in (home / "bentoml" / "models" / "shelfwise_production").glob("*/model.txt"):
        booster_file.write_text("not a LightGBM model")
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    with bentoml_server(
        "bentos/service.py:RecommendationService",
        settings,
        cwd=PROJECT_ROOT,
        log_path=tmp_path / "bentoml.log",
    ) as url:
        yield url, settings


def test_a_service_with_a_corrupt_model_still_serves_the_candidate_order(server_without_model):
    url, settings = server_without_model
    user_id = read_serving_candidates(Lake(settings.lake_url), ["user_id"])["user_id"][0]
    response = httpx.post(f"{url}/recommend", json={"user_id": user_id, "k": 5}, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["fallback_level"] == FALLBACK_CANDIDATE_ORDER
    assert body["model_version"] is None
    assert len(body["items"]) == 5


def test_a_ranker_over_its_time_budget_falls_back_to_the_candidate_order():
    candidates, popular = snapshot()
    booster = trained_booster(candidates)
    late = Recommender(candidates, popular, booster, ranker_budget_s=1e-9).recommend("u1", 3)
    assert late.fallback_level == FALLBACK_CANDIDATE_ORDER
    assert [item.item_id for item in late.items] == ["i0", "i1", "i2"]
    in_time = Recommender(candidates, popular, booster, ranker_budget_s=10.0).recommend("u1", 3)
    assert in_time.fallback_level == FALLBACK_NONE
