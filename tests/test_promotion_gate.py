"""A crippled ranker (trained on shuffled labels) is registered but stopped by the promotion gate:
production and the bento stay as they were."""

import json
import shutil
import subprocess

import dagster as dg
import numpy as np
import polars as pl

from models.artifacts import read_evaluation_report, read_training_set
from models.ranker import RankerParams, train_ranker
from orchestration.assets.bento import bento
from orchestration.assets.evaluation import evaluation
from orchestration.assets.promotion import GATE_CHECK, production_model, registered_model
from orchestration.definitions import defs
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import RANKER_MODEL, Lake
from shelfwise.runtime.registry import list_rankers, production
from shelfwise.settings import Settings
from tests.support import VENV_BIN, service_env


def bentos(settings: Settings) -> list[str]:
    listed = subprocess.run(
        [str(VENV_BIN / "bentoml"), "list", "-o", "json"],
        capture_output=True,
        text=True,
        env=service_env(settings),
        check=True,
    )
    return [entry["tag"] for entry in json.loads(listed.stdout)]


def test_a_crippled_ranker_is_stopped_by_the_gate(pipeline_run, tmp_path):
    assert pipeline_run.result.success, pipeline_run.failures
    home = tmp_path / "home"
    shutil.copytree(pipeline_run.settings.home, home)
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    lake = Lake(settings.lake_url)
    before = production(settings.bentoml_home)
    bentos_before = bentos(settings)

    rows = read_training_set(lake)
    shuffled = rows.with_columns(
        pl.Series("label", np.random.default_rng(0).permutation(rows["label"].to_numpy()))
    )
    crippled = train_ranker(shuffled, None, RankerParams(num_boost_round=50))
    lake.write_text(crippled.model_to_string(), RANKER_MODEL)

    resources = {
        **defs.resources,
        "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url),
    }
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [evaluation, registered_model, production_model, bento],
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    [gate] = [e for e in result.get_asset_check_evaluations() if e.check_name == GATE_CHECK]
    assert not gate.passed
    message = gate.metadata["decision"].value
    assert "best baseline" in message and "ndcg@10" in message
    # Refused on the confidence rule: the paired interval's lower bound is not above 0.
    assert "paired_lower_bound" in gate.metadata["decided_by"].value
    assert gate.metadata["paired_lower_bound"].value <= 0
    # Registered for the record, never promoted, no bento built.
    assert len(list_rankers(settings.bentoml_home)) == 2
    assert production(settings.bentoml_home).tag == before.tag
    assert bentos(settings) == bentos_before
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"evaluation", "registered_model"}
    # The evaluation compared it with the model in production on the same candidates.
    metrics = read_evaluation_report(lake)["metrics"]
    assert metrics["production"]["ndcg@10"] > metrics["ranker"]["ndcg@10"]
    # ... paired on the same users: the crippled ranker is worse with 95% confidence.
    paired = read_evaluation_report(lake)["paired"]["production"]
    assert paired["ndcg@10_diff_ci95"][1] < 0

    # Materialized on its own, outside the run that evaluated the gate, production_model still
    # refuses the ranker that failed it.
    alone = dg.materialize(
        [production_model], resources=resources, instance=instance, raise_on_error=False
    )
    assert not alone.success
    [failure] = [e for e in alone.all_events if e.is_step_failure]
    assert "failed the promotion gate" in failure.step_failure_data.error.message
    assert production(settings.bentoml_home).tag == before.tag
    # Nor does it promote on an instance that never saw a verdict on the newest ranker.
    unjudged = dg.materialize([production_model], resources=resources, raise_on_error=False)
    assert not unjudged.success
    [failure] = [e for e in unjudged.all_events if e.is_step_failure]
    assert "No promotion_gate verdict" in failure.step_failure_data.error.message
