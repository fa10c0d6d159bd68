"""The pipeline's runs never run two memory-heavy steps at once (orchestration/concurrency.py):
the heaviest assets carry the tag, every job of the code location runs on the executor that
limits it, and that executor, in a real multiprocess run, keeps tagged steps apart while steps
still run side by side."""

import time
from pathlib import Path

import dagster as dg

from orchestration.concurrency import MEMORY_HEAVY, pipeline_executor
from orchestration.definitions import defs

HEAVY_ASSETS = ("candidates", "evaluation", "serving_features")
STEP_SECONDS = 2.0


def test_the_heaviest_assets_are_tagged_and_every_job_limits_them():
    for name in HEAVY_ASSETS:
        assert defs.resolve_assets_def(name).op.tags.items() >= MEMORY_HEAVY.items(), name
    # `make demo`'s `dagster asset materialize --select '*'` runs the implicit asset job.
    jobs = [defs.resolve_implicit_global_asset_job_def(), defs.resolve_job_def("retraining")]
    for job in jobs:
        assert job.executor_def is pipeline_executor, job.name


class StepLog(dg.Config):
    folder: str


def _timed(name: str, tags: dict[str, str]) -> dg.AssetsDefinition:
    """An asset that sleeps and records when it ran (its own process: wall-clock times)."""

    @dg.asset(name=name, op_tags=tags)
    def _asset(config: StepLog) -> None:
        started = time.time()
        time.sleep(STEP_SECONDS)
        Path(config.folder, name).write_text(f"{started} {time.time()}")

    return _asset


def concurrency_job() -> dg.JobDefinition:
    """Two heavy and two light steps, none depending on another, on the pipeline's executor."""
    assets = [
        _timed("heavy_a", MEMORY_HEAVY),
        _timed("heavy_b", MEMORY_HEAVY),
        _timed("light_a", {}),
        _timed("light_b", {}),
    ]
    job = dg.define_asset_job("concurrency", executor_def=pipeline_executor)
    return dg.Definitions(assets=assets, jobs=[job]).resolve_job_def("concurrency")


def _ran_together(folder: Path, first: str, second: str) -> bool:
    a_start, a_end = map(float, (folder / first).read_text().split())
    b_start, b_end = map(float, (folder / second).read_text().split())
    return a_start < b_end and b_start < a_end


def test_the_executor_runs_heavy_steps_one_at_a_time_and_others_together(tmp_path):
    config = {"folder": str(tmp_path)}
    run_config = {
        "ops": {name: {"config": config} for name in ("heavy_a", "heavy_b", "light_a", "light_b")}
    }
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        # As `dagster asset materialize` runs it: each step in its own process.
        result = dg.execute_job(
            dg.reconstructable(concurrency_job), instance=instance, run_config=run_config
        )
        assert result.success
    assert not _ran_together(tmp_path, "heavy_a", "heavy_b")
    # The other steps still run beside them (two at a time on 2 cores).
    steps = ("heavy_a", "heavy_b", "light_a", "light_b")
    pairs = [(a, b) for i, a in enumerate(steps) for b in steps[i + 1 :]]
    assert any(_ran_together(tmp_path, a, b) for a, b in pairs)
