"""One set of defaults: the Dagster run configs are derived from the `models` dataclasses, and the
assets downstream of a run use that run's values, not the defaults."""

import dataclasses
import shutil

import dagster as dg
import polars as pl
import pytest

from models import artifacts
from models.candidates import CandidateConfig
from models.ranker import RankerParams
from orchestration.assets.ranking import CandidatesConfig, RankerConfig, candidates
from orchestration.assets.snapshot import serving_features
from orchestration.configs import to_params
from orchestration.definitions import defs
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import SERVING_ITEMS, Lake
from shelfwise.settings import Settings

PAIRS = [(CandidatesConfig, CandidateConfig), (RankerConfig, RankerParams)]


@pytest.mark.parametrize(("config", "params"), PAIRS)
def test_a_run_config_has_every_field_and_default_of_its_dataclass(config, params):
    for field in dataclasses.fields(params):
        assert config.model_fields[field.name].default == field.default, field.name
        assert config.model_fields[field.name].description, f"{field.name} has no description"
    assert to_params(config(), params) == params()


@pytest.mark.parametrize(("config", "params"), PAIRS)
def test_a_run_value_reaches_the_dataclass(config, params):
    field = next(f for f in dataclasses.fields(params) if f.type in (int, "int"))
    changed = to_params(config(**{field.name: field.default + 1}), params)
    assert getattr(changed, field.name) == field.default + 1


def test_the_candidates_config_keeps_its_own_fields():
    config = CandidatesConfig(chunk_queries=123, max_evaluation_queries=None)
    assert (config.chunk_queries, config.max_evaluation_queries) == (123, None)
    assert to_params(config, CandidateConfig) == CandidateConfig()


@pytest.mark.slow
def test_the_serving_snapshot_uses_the_runs_repeat_threshold(pipeline_run, tmp_path):
    """`serving_features` marks categories repeatable (the already-bought rule lets their items
    be recommended again) with the `min_repeat_rate` the `candidates` run used."""
    assert pipeline_run.result.success, pipeline_run.failures
    home = tmp_path / "home"
    shutil.copytree(pipeline_run.settings.home, home)
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    lake = Lake(settings.lake_url)
    default_items = lake.read_frame(SERVING_ITEMS)
    assert default_items.get_column("is_repeatable").any(), "the test shop re-buys something"

    resources = {
        **defs.resources,
        "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url),
    }
    # Above every category's repeat rate: nothing may be bought again.
    run_config = {"ops": {"candidates": {"config": {"min_repeat_rate": 1.01}}}}
    result = dg.materialize(
        [candidates, serving_features],
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        run_config=run_config,
    )
    assert result.success
    assert artifacts.read_candidate_config(lake).min_repeat_rate == 1.01
    items = lake.read_frame(SERVING_ITEMS)
    assert items.height == default_items.height
    assert not items.get_column("is_repeatable").any()
    assert items.filter(pl.col("is_repeatable")).is_empty()
