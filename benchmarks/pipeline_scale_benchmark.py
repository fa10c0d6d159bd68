"""Benchmark of the whole pipeline at the 10M-event demo scale: per-asset time and peak memory.

Runs exactly what a user runs, in a scratch SHELFWISE_HOME outside the repository, with the
Makefile's environment (DAGSTER_HOME, BENTOML_HOME, telemetry off, OMP_WAIT_POLICY=PASSIVE, the
virtual environment first on PATH; the dbt manifest must have been prepared by `make setup`):

    shelfwise init
    shelfwise generate --users 400000 --items 50000 --days 60 --events 10000000 --seed 1 \
        --end-date 2026-11-01
    dagster asset materialize -m orchestration.definitions --select '*'

Measured:

- each step's wall time, from Dagster's own step statistics (the run in DAGSTER_HOME);
- each step's peak memory: a sampler reads /proc every 0.5 s and keeps, for every process of the
  command's tree, the largest resident set of it and its descendants together (dbt runs in a child
  of its step); steps are matched to their processes by the pid of Dagster's STEP_START events;
- the command's wall time and the peak resident set of the whole process tree;
- the evaluation (evaluation/metrics.json): ranker and popularity NDCG@10, the best baseline, the
  sample of evaluated users; the promotion gate's verdict (its asset check);
- the serving process's own load: `Recommender.from_lake` on the snapshot, in a fresh process
  (peak resident set, seconds), unless --no-serving-probe.

Other benchmarks on this machine (serving, feedback loop, wrk) would spoil each other's figures
and share its memory: the script first waits until none runs, checking every 60 s for at most
--wait-minutes, then runs anyway and records that it did.

Usage:
    .venv/bin/python benchmarks/pipeline_scale_benchmark.py [--home DIR] [--users N] [--items N]
        [--days N] [--events N] [--seed N] [--fresh] [--wait-minutes M] [--no-serving-probe]

An existing home is reused: the shop is generated only when its lake holds no events (--fresh
deletes the home first), and the pipeline runs on what the lake holds.

Prints a table and writes JSON (machine, versions, config, figures) to
`benchmarks/results/pipeline_scale.json`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    RESULTS_DIR,
    ROOT,
    TreeMemory,
    generate,
    materialize,
    memory_kib,
    report_head,
    run_logged,
    shelfwise,
    shop_arguments,
    shop_config,
    state_env,
    write_json,
)

RESULTS = RESULTS_DIR / "pipeline_scale.json"
OTHER_BENCHMARKS = "serving_benchmark|feedback_loop_benchmark|wrk "


def wait_for_other_benchmarks(max_minutes: float) -> dict[str, Any]:
    """Waits until no other benchmark runs (checked every 60 s), for at most `max_minutes`."""
    started = time.monotonic()
    while True:
        running = subprocess.run(
            ["pgrep", "-af", OTHER_BENCHMARKS], capture_output=True, text=True, check=False
        ).stdout.strip()
        waited = time.monotonic() - started
        if not running:
            return {"waited_seconds": round(waited), "others_running_at_start": []}
        if waited >= max_minutes * 60:
            print(f"other benchmarks still run after {max_minutes} min; running anyway:")
            print(running)
            return {"waited_seconds": round(waited), "others_running_at_start": running.split("\n")}
        print(f"waiting for other benchmarks to finish ({waited / 60:.0f} min):\n{running}")
        time.sleep(60)


def dagster_run_figures(env: dict[str, str], subtree_peak_kib: dict[int, int]) -> dict[str, Any]:
    """Per-step seconds and peak memory, the gate's verdict and metadata of the latest run.

    A step's peak memory is that of its process and its children together (dbt runs in a child
    of its step), from `run_logged`'s samples: steps are matched to their processes by the pid
    of Dagster's STEP_START events.
    """
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    import dagster as dg

    instance = dg.DagsterInstance.get()
    [run] = instance.get_runs(limit=1)
    pids = {
        record.dagster_event.step_key: record.dagster_event.pid
        for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
    }
    steps = {
        stat.step_key: {
            "status": stat.status.value if stat.status else None,
            "seconds": round((stat.end_time or 0) - (stat.start_time or 0), 1),
            "peak_mib": round(subtree_peak_kib.get(pids.get(stat.step_key, -1), 0) / 1024),
        }
        for stat in instance.get_run_step_stats(run.run_id)
    }
    gate = None
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        data = record.dagster_event.event_specific_data
        if data.check_name == "promotion_gate":
            gate = {"passed": bool(data.passed), "message": data.description}
    metadata = {}
    for key in ("candidates", "training_set", "ranker", "evaluation", "serving_features"):
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        if event is None or event.run_id != run.run_id:
            continue
        metadata[key] = {
            name: value.value
            for name, value in event.asset_materialization.metadata.items()
            if isinstance(getattr(value, "value", None), int | float | str | bool)
            and name not in ("report",)
        }
    return {
        "run_id": run.run_id,
        "status": run.status.value,
        "steps": steps,
        "gate": gate,
        "metadata": metadata,
    }


def probe_serving() -> None:
    """In a fresh process: load the service's recommender from the lake; print JSON figures."""
    import resource

    from models.artifacts import load_ranker
    from models.recommender import Recommender
    from shelfwise.lake import RANKER_MODEL, Lake
    from shelfwise.settings import Settings

    lake = Lake(Settings.from_env().lake_url)
    started = time.perf_counter()
    booster = load_ranker(lake) if lake.exists(RANKER_MODEL) else None
    recommender = Recommender.from_lake(lake, booster)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures = {
        "known_users": recommender.known_users,
        "load_seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024),
        "rss_mib_after_load": round(memory_kib(os.getpid())[0] / 1024),
    }
    print(json.dumps(figures))


def available_mib() -> float:
    """MemAvailable of /proc/meminfo, in MiB."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def serving_probe(env: dict[str, str], lake: Any) -> dict[str, Any]:
    """Runs `probe_serving` in a fresh process, stopped before it exhausts the machine.

    The machine is shared: rather than let the kernel's OOM killer pick a process, a sampler
    kills the probe when its resident set passes 90% of the memory available when it started,
    and records how far it got.
    """
    import pyarrow.parquet as pq

    from shelfwise.lake import SERVING_CANDIDATES

    with lake.fs.open(lake.path(SERVING_CANDIDATES), "rb") as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    limit = 0.9 * available_mib()
    figures: dict[str, Any] = {"snapshot_rows": rows, "limit_mib": round(limit)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--probe-serving"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stopped = False
    with TreeMemory(process.pid, interval=0.2) as sampler:
        while process.poll() is None:
            if sampler.peak_rss_kib / 1024 > limit:
                process.kill()
                stopped = True
                break
            time.sleep(0.2)
        stdout, stderr = process.communicate()
    if stopped:
        seconds = time.perf_counter() - started
        return {
            **figures,
            "stopped": f"resident set passed {limit:.0f} MiB after {seconds:.0f} s",
            "peak_rss_mib": round(sampler.peak_rss_kib / 1024),
        }
    lines = stdout.strip().splitlines()
    if process.returncode == 0 and lines:
        return {**figures, **json.loads(lines[-1])}
    return {**figures, "error": f"exit {process.returncode}: {stderr[-2000:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/sw10m"))
    shop_arguments(parser, users=400_000, items=50_000, days=60, events=10_000_000, seed=1)
    parser.add_argument("--end-date", default="2026-11-01")
    parser.add_argument("--fresh", action="store_true", help="start from an empty home")
    parser.add_argument("--wait-minutes", type=float, default=40.0)
    parser.add_argument("--no-serving-probe", action="store_true")
    parser.add_argument(
        "--serving-probe-only",
        action="store_true",
        help="only (re)measure the serving process on the home's snapshot; update the JSON",
    )
    parser.add_argument("--probe-serving", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_serving:
        probe_serving()
        return
    if args.serving_probe_only:
        from shelfwise.lake import Lake
        from shelfwise.settings import Settings

        env = state_env(args.home.resolve())
        serving = serving_probe(env, Lake(Settings.from_env(env).lake_url))
        print("serving process:", json.dumps(serving))
        if RESULTS.exists():
            results = json.loads(RESULTS.read_text())
            if results.get("config", {}).get("home") == str(args.home.resolve()):
                results["serving_process"] = serving
                write_json(RESULTS, results)
        return

    home = args.home.resolve()
    if ROOT in home.parents or home == ROOT:
        raise SystemExit("use a scratch home outside the repository")
    if args.fresh and home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    env = state_env(home)
    waited = wait_for_other_benchmarks(args.wait_minutes)
    subprocess.run(shelfwise("init"), env=env, check=True, cwd=ROOT)

    from shelfwise.intake.ingest import lake_has_events
    from shelfwise.lake import EVALUATION_REPORT, LANDING_EVENTS, Lake
    from shelfwise.settings import Settings

    lake = Lake(Settings.from_env(env).lake_url)
    figures: dict[str, Any] = {}
    if not (lake_has_events(lake) or lake.list_files(LANDING_EVENTS)):
        shop = generate(shop_config(args), f"--end-date={args.end_date}")
        measured = run_logged(shop, env, home / "generate.log", append=False)
        if measured.returncode:
            raise SystemExit(f"shelfwise generate failed: see {home / 'generate.log'}")
        figures["generate"] = {
            "seconds": round(measured.seconds, 1),
            "peak_mib": round(measured.peak_rss_kib / 1024),
        }

    pipeline = materialize("*")
    measured = run_logged(pipeline, env, home / "pipeline.log", append=False)
    run = dagster_run_figures(env, measured.subtree_peak_kib)
    figures["pipeline"] = {
        "returncode": measured.returncode,
        "seconds": round(measured.seconds, 1),
        "tree_peak_mib": round(measured.peak_rss_kib / 1024),
    }
    evaluation: dict[str, Any] = {}
    if lake.exists(EVALUATION_REPORT):
        report = lake.read_json(EVALUATION_REPORT)
        metrics = report["metrics"]
        baselines = {
            name: values["ndcg@10"]
            for name, values in metrics.items()
            if name not in ("ranker", "production", "oracle")
        }
        best = max(baselines, key=baselines.get)
        evaluation = {
            "ranker_ndcg@10": round(metrics["ranker"]["ndcg@10"], 4),
            "popularity_ndcg@10": round(metrics["popularity"]["ndcg@10"], 4),
            "best_baseline": best,
            "best_baseline_ndcg@10": round(baselines[best], 4),
            "oracle_ndcg@10": round(metrics["oracle"]["ndcg@10"], 4)
            if "oracle" in metrics
            else None,
            "ranker_beats_popularity": metrics["ranker"]["ndcg@10"]
            > metrics["popularity"]["ndcg@10"],
            "evaluated_users": int(metrics["ranker"]["users"]),
            "sample": report.get("sample"),
        }
    serving: dict[str, Any] | None = None
    if not args.no_serving_probe and measured.returncode == 0:
        serving = serving_probe(env, lake)

    print(f"pipeline: {figures['pipeline']['seconds']:.0f} s, status {run['status']}")
    print(f"{'step':<22} {'status':<8} {'seconds':>8} {'peak MiB':>9}")
    for step, values in run["steps"].items():
        print(f"{step:<22} {values['status']:<8} {values['seconds']:>8.1f} {values['peak_mib']:>9}")
    print(f"whole process tree peak: {figures['pipeline']['tree_peak_mib']} MiB")
    print("evaluation:", json.dumps(evaluation))
    print("promotion gate:", json.dumps(run["gate"]))
    print("serving process:", json.dumps(serving))

    write_json(
        RESULTS,
        {
            **report_head("pipeline_scale", ("dagster", "polars", "lightgbm")),
            "config": {
                "home": str(home),
                **shop_config(args),
                "end_date": args.end_date,
                "command": " ".join(pipeline),
                **waited,
            },
            "figures": figures,
            "steps": run["steps"],
            "evaluation": evaluation,
            "gate": run["gate"],
            "serving_process": serving,
            "metadata": run["metadata"],
        },
    )


if __name__ == "__main__":
    main()
