"""The whole lineage, materialized once on a tiny generated shop (see conftest.py)."""

import json
import subprocess
from datetime import datetime

import polars as pl
import pytest

from models.artifacts import read_evaluation_report, read_mart, read_training_set
from models.features import FEATURE_COLUMNS
from orchestration.assets.drift import FEATURE_DRIFT_CHECK
from orchestration.assets.promotion import GATE_CHECK
from shelfwise.home import prepare_home
from shelfwise.lake import EVENTS, FEATURE_CUTOFFS, FEATURES, partition_day
from shelfwise.runtime.registry import list_rankers, production
from shelfwise.settings import Settings
from tests.dbt_support import dbt
from tests.support import PROJECT_ROOT, VENV_BIN, service_env

EXPECTED_ASSETS = {
    "raw_events",
    "live_feature_samples",
    "fallback_levels",
    "catalog_items",
    "catalog_users",
    "stg_lake__events",
    "stg_lake__items",
    "stg_lake__users",
    "user_features",
    "item_features",
    "user_item_features",
    "user_category_features",
    "user_brand_features",
    "item_bought_together",
    "category_repurchase_rates",
    "item_covisitation",
    "interaction_labels",
    "feature_cutoffs",
    "candidates",
    "training_set",
    "ranker",
    "evaluation",
    "serving_features",
    "online_store",
    "registered_model",
    "production_model",
    "bento",
}


def materializations(result):
    return [event.materialization for event in result.get_asset_materialization_events()]


def metadata_of(result, key: str):
    [materialization] = [m for m in materializations(result) if m.asset_key.to_user_string() == key]
    return {
        name: getattr(value, "value", value) for name, value in materialization.metadata.items()
    }


def test_every_asset_materializes_and_every_dbt_test_passes(pipeline_run):
    result = pipeline_run.result
    assert result.success, pipeline_run.failures
    materialized = {m.asset_key.to_user_string() for m in materializations(result)}
    assert EXPECTED_ASSETS <= materialized
    checks = result.get_asset_check_evaluations()
    assert checks, "dbt tests should run as asset checks"
    # The drift check among them: no live samples yet, and the snapshot is reported, not judged.
    assert FEATURE_DRIFT_CHECK in {c.check_name for c in checks}
    failed = [c.check_name for c in checks if not c.passed]
    assert failed == []


def test_raw_events_are_partitioned_by_date_with_the_contract(pipeline_run):
    lake = pipeline_run.lake
    files = lake.list_files(EVENTS)
    assert files and all(partition_day(f) is not None for f in files)
    assert lake.list_files("landing") == []
    events = lake.read_frame(EVENTS)
    assert events.get_column("event_id").is_unique().all()


def test_features_are_exported_as_parquet_for_every_cutoff(pipeline_run):
    lake = pipeline_run.lake
    cutoffs = lake.read_frame(FEATURE_CUTOFFS).get_column("as_of")
    assert cutoffs.len() == 5
    for mart in ("user_features", "item_features", "item_covisitation", "user_item_features"):
        frame = read_mart(lake, mart)
        assert set(frame.get_column("as_of").unique().to_list()) <= set(cutoffs.to_list())
        assert frame.height > 0


def test_features_never_see_events_at_or_after_their_cutoff(pipeline_run):
    lake = pipeline_run.lake
    events = lake.read_frame(EVENTS)
    users = read_mart(lake, "user_features")
    first_cutoff = users.get_column("as_of").min()
    expected = (
        events.filter(pl.col("occurred_at") < first_cutoff)
        .group_by("user_id")
        .agg(pl.len().alias("expected"))
    )
    actual = users.filter(pl.col("as_of") == first_cutoff).select("user_id", "events")
    joined = expected.join(actual, on="user_id", how="full", coalesce=True)
    assert joined.filter(pl.col("expected") != pl.col("events")).height == 0
    assert joined.filter(pl.col("expected").is_null() | pl.col("events").is_null()).height == 0


def test_training_set_has_graded_labels_and_every_feature(pipeline_run):
    rows = read_training_set(pipeline_run.lake)
    assert set(FEATURE_COLUMNS) <= set(rows.columns)
    assert set(rows.get_column("label").unique().to_list()) <= {0, 1, 2, 3}
    # Every query holds at least one positive.
    per_query = rows.group_by("as_of", "user_id").agg((pl.col("label") > 0).any().alias("pos"))
    assert per_query.get_column("pos").all()


def test_ranker_beats_popularity_on_the_held_out_window(pipeline_run):
    report = read_evaluation_report(pipeline_run.lake)
    metrics = report["metrics"]
    assert metrics["ranker"]["users"] > 50
    assert metrics["ranker"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]
    assert metrics["ranker"]["recall@20"] > metrics["popularity"]["recall@20"]
    evaluation = metadata_of(pipeline_run.result, "evaluation")
    assert evaluation["ranker_ndcg@10"] == metrics["ranker"]["ndcg@10"]


def test_evaluation_reports_intervals_and_the_gate_reads_the_paired_lower_bound(pipeline_run):
    report = read_evaluation_report(pipeline_run.lake)
    ranker = report["metrics"]["ranker"]
    lower, upper = ranker["ndcg@10_ci95"]
    assert lower < ranker["ndcg@10"] < upper
    baselines = {
        name: values["ndcg@10"]
        for name, values in report["metrics"].items()
        if name not in ("ranker", "production", "oracle")
    }
    best = max(baselines, key=baselines.get)
    paired = report["paired"][best]
    assert paired["ndcg@10_diff"] == pytest.approx(ranker["ndcg@10"] - baselines[best])
    [gate] = [
        c for c in pipeline_run.result.get_asset_check_evaluations() if c.check_name == GATE_CHECK
    ]
    assert gate.passed
    metadata = {name: getattr(value, "value", value) for name, value in gate.metadata.items()}
    assert metadata["decided_by"] == "paired_lower_bound"
    assert metadata["best_baseline"] == best
    assert metadata["paired_lower_bound"] == pytest.approx(paired["ndcg@10_diff_ci95"][0])
    assert metadata["paired_lower_bound"] > 0
    evaluation = metadata_of(pipeline_run.result, "evaluation")
    assert evaluation[f"paired_{best}_ndcg@10_diff_lower"] == metadata["paired_lower_bound"]
    assert "[" in evaluation["report"] and "paired, 95% interval" in evaluation["report"]


def test_registered_model_carries_metrics_features_and_training_window(pipeline_run):
    settings = pipeline_run.settings
    [tag] = list_rankers(settings.bentoml_home)
    shown = subprocess.run(
        [str(VENV_BIN / "bentoml"), "models", "get", tag, "-o", "json"],
        capture_output=True,
        text=True,
        env=service_env(settings),
        check=True,
    )
    metadata = json.loads(shown.stdout)["metadata"]
    assert metadata["features"] == FEATURE_COLUMNS
    assert metadata["ndcg@10"] > metadata["popularity_ndcg@10"]
    # Refit on the validation window (`refit_with_validation`, on by default): the registered
    # window holds every training cutoff, the validation one last.
    assert len(metadata["training_cutoffs"]) == 3
    assert metadata["validation_cutoff"] == metadata["training_cutoffs"][-1]
    # The segment policy ships with the model, chosen on that validation cutoff.
    assert metadata["segment_new_served_by"] == "fallback"
    assert metadata_of(pipeline_run.result, "registered_model")["tag"] == tag
    # The sensor counts feedback published after the feature build started reading the events:
    # before dbt wrote any mart (on the lake's clock).
    marts = pipeline_run.lake.list_modified(FEATURES)
    assert marts and datetime.fromisoformat(metadata["data_read_at"]) <= min(marts.values())


def test_bento_is_in_the_store_with_the_model(pipeline_run):
    settings = pipeline_run.settings
    tag = metadata_of(pipeline_run.result, "bento")["tag"]
    assert tag.startswith("shelfwise:")
    shown = subprocess.run(
        [str(VENV_BIN / "bentoml"), "get", tag, "-o", "json"],
        capture_output=True,
        text=True,
        env=service_env(settings),
        check=True,
    )
    bento = json.loads(shown.stdout)
    [service] = bento["services"]
    current = production(settings.bentoml_home)
    assert [m["tag"] for m in service["models"]] == [current.tag]
    assert current.source_tag == list_rankers(settings.bentoml_home)[0]


def test_code_location_loads_with_every_asset():
    from orchestration.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert EXPECTED_ASSETS <= keys


def test_workspace_loads_in_dagster_as_the_ui_would(tmp_path):
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path / "home")})
    prepare_home(settings)
    env = {**service_env(settings), "DAGSTER_HOME": str(settings.dagster_home)}
    validated = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        check=False,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_dbt_docs_generate_documents_every_mart(pipeline_run, tmp_path):
    cutoffs = pipeline_run.lake.read_frame(FEATURE_CUTOFFS)["as_of"].to_list()
    dbt(pipeline_run.settings, ["docs", "generate"], cutoffs, tmp_path / "docs")
    catalog = json.loads((tmp_path / "docs" / "catalog.json").read_text())
    manifest = json.loads((tmp_path / "docs" / "manifest.json").read_text())
    item_features = catalog["nodes"]["model.shelfwise.item_features"]
    assert {"as_of", "item_id", "popularity", "trend"} <= set(item_features["columns"])
    described = manifest["nodes"]["model.shelfwise.item_features"]["description"]
    assert "Grain: (as_of, item_id)" in described
