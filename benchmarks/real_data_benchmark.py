"""Benchmark of the ranking quality on real shops: The Complete Journey, YooChoose, the demo shop.

Each dataset runs in a fresh scratch SHELFWISE_HOME outside the repository, with the Makefile's
environment (`harness.state_env`; the dbt manifest must have been prepared), through exactly the
documented commands:

    shelfwise init
    shelfwise import …            (the dataset's files; the demo: shelfwise generate)
    dagster asset materialize -m orchestration.definitions --select '*' --config-json '…'

Datasets (`--dataset`, default all three, Complete Journey first):

- `completejourney`: `../shared/datasets/completejourney` (84.51°/dunnhumby, a grocer's year,
  1.47M receipt lines, 2,469 households; PROVENANCE.md). The receipt lines are purchase events
  (user = household_id, item = product_id, session = basket_id, occurred_at =
  transaction_timestamp read as America/New_York local time, quantity); `products.parquet` is the
  catalog (category_id = product_category, category_path = department > product_category >
  product_type, brand). No price: the file has sales_value per line, and the generic mapping
  reads columns, it does not compute sales_value / quantity. Run config: 14-day label windows (a
  household shops about once a week, median 43 baskets a year: a 7-day window would hold no
  basket for many regular customers, 14 days holds their next trip or two), 3 training cutoffs,
  and the data ends at midnight New York time on 2018-01-01 (the 534 lines of that night are left
  out, as a sliver; 256 lines whose made-up seconds fall in the hour skipped by daylight saving on
  2017-03-12 cannot be read as New York time and are quarantined). By default the full year, all
  2,469 households (579-654 s and a 12.0 GiB peak on a 2-core, 23 GB machine; README, "Real
  data"); `--households N` samples N of them (seeded) for a quicker run.
- `yoochoose`: the RecSys 2015 click sample, as the README documents it (one-day windows,
  data_end 2014-04-08).
- `demo`: `shelfwise generate` with its defaults and the default run config.

The promotion gate may refuse the ranker (an honest result): the run then fails at
`registered_model`, but the evaluation asset ran before it and `evaluation/metrics.json` is in the
lake, so the table is still read from there; the gate's verdict comes from its asset check.

Usage:
    PYTHONPATH=$PWD .venv/bin/python benchmarks/real_data_benchmark.py \\
        [--dataset completejourney|yoochoose|demo] [--households N|0] [--home-root DIR]

Prints, per dataset, NDCG@10 with its 95% bootstrap interval for every approach, the ranker's
paired difference against each (with its interval), the best baseline, the gate's verdict and the
run time; writes JSON (machine, versions, config, figures) to
`benchmarks/results/real_data.json` (one entry per dataset; a run of one dataset keeps the
others' entries).
"""

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import (
    RESULTS_DIR,
    ROOT,
    format_table,
    machine,
    materialize,
    now,
    run_logged,
    shelfwise,
    state_env,
    versions,
    write_json,
)
from pipeline_scale_benchmark import dagster_run_figures

RESULTS = RESULTS_DIR / "real_data.json"
SHARED = ROOT.parent / "shared" / "datasets"
COMPLETE_JOURNEY = SHARED / "completejourney"
YOOCHOOSE = SHARED / "yoochoose_rsc15_sample"
DATASETS = ("completejourney", "yoochoose", "demo")
METRIC = "ndcg@10"
SEED = 15

RUN_CONFIG: dict[str, dict[str, Any]] = {
    "completejourney": {
        "label_window_days": 14,
        "training_cutoffs": 3,
        "data_end": "2018-01-01T05:00:00+00:00",
    },
    "yoochoose": {
        "label_window_days": 1,
        "training_cutoffs": 3,
        "data_end": "2014-04-08T00:00:00+00:00",
    },
    "demo": {},
}


def import_commands(dataset: str, home: Path, households: int | None) -> list[list[str]]:
    """The documented commands that put `dataset` into the lake's landing area."""
    if dataset == "demo":
        return [shelfwise("generate")]
    if dataset == "yoochoose":
        return [
            shelfwise(
                "import",
                "--format",
                "yoochoose",
                str(YOOCHOOSE / "yoochoose-clicks-100k_train_full.txt"),
                str(YOOCHOOSE / "yoochoose-clicks-100k_test.txt"),
            )
        ]
    transactions = COMPLETE_JOURNEY / "transactions.parquet"
    if households:
        transactions = sample_households(transactions, home / "sample", households)
    return [
        shelfwise(
            "import",
            "--format",
            "generic",
            str(transactions),
            "--event-type",
            "purchase",
            *("--map", "user_id=household_id", "--map", "item_id=product_id"),
            *("--map", "session_id=basket_id", "--map", "occurred_at=transaction_timestamp"),
            *("--map", "quantity=quantity"),
            *("--timezone", "America/New_York"),
            *("--catalog", str(COMPLETE_JOURNEY / "products.parquet")),
            *("--catalog-map", "item_id=product_id"),
            *("--catalog-map", "category_id=product_category"),
            *("--catalog-map", "category_path=department,product_category,product_type"),
            *("--catalog-map", "brand=brand"),
        )
    ]


def sample_households(transactions: Path, folder: Path, households: int) -> Path:
    """A seeded sample of `households` households' lines, as a Parquet file in `folder`."""
    import polars as pl

    lines = pl.read_parquet(transactions)
    chosen = lines.select(pl.col("household_id").unique().sort()).sample(households, seed=SEED)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "transactions.parquet"
    lines.join(chosen, on="household_id", how="semi").write_parquet(path)
    return path


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The approaches' NDCG@10 with intervals, the ranker's paired differences, the best one."""
    from models.evaluation import NOT_BASELINES

    metrics = report["metrics"]
    paired = report.get("paired", {})
    approaches = {
        name: {
            METRIC: values.get(METRIC),
            "ci95": values.get(f"{METRIC}_ci95"),
            "recall@20": values.get("recall@20"),
            "users": values.get("users"),
            "ranker_minus": paired.get(name, {}).get(f"{METRIC}_diff"),
            "ranker_minus_ci95": paired.get(name, {}).get(f"{METRIC}_diff_ci95"),
        }
        for name, values in metrics.items()
    }
    baselines = {
        name: values[METRIC] for name, values in approaches.items() if name not in NOT_BASELINES
    }
    best = max(baselines, key=lambda name: baselines[name]) if baselines else None
    ranker = approaches.get("ranker", {}).get(METRIC)
    return {
        "approaches": approaches,
        "best_baseline": best,
        "ratio_to_best_baseline": ranker / baselines[best] if best and baselines[best] else None,
        "not_applicable": report.get("not_applicable", {}),
        "evaluation_cutoffs": report.get("evaluation_cutoffs"),
    }


def print_table(dataset: str, result: dict[str, Any]) -> None:
    """The dataset's table: NDCG@10 [95%], recall@20, ranker minus approach [95%]."""

    def interval(pair: list[float] | None) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else ""

    def number(value: float | None, sign: bool = False) -> str:
        return "" if value is None else (f"{value:+.3f}" if sign else f"{value:.3f}")

    summary = result.get("evaluation")
    print(
        f"\n== {dataset}: pipeline {result['pipeline']['seconds']:.0f} s, "
        f"run {result['run_status']}, import {result['import_seconds']:.0f} s"
    )
    if not summary:
        print("no evaluation/metrics.json: the run stopped before the evaluation")
        return
    header = ["approach", "users", "NDCG@10", "95% interval", "recall@20", "ranker −", "95% int."]
    rows = [header]
    for name, values in summary["approaches"].items():
        rows.append(
            [
                name,
                str(values["users"]),
                number(values[METRIC]),
                interval(values["ci95"]),
                number(values["recall@20"]),
                number(values["ranker_minus"], sign=True),
                interval(values["ranker_minus_ci95"]),
            ]
        )
    print(format_table(rows))
    for name, reason in summary["not_applicable"].items():
        print(f"not applicable: {name}: {reason}")
    ratio = summary["ratio_to_best_baseline"]
    print(
        f"best baseline: {summary['best_baseline']}; ranker / best = "
        f"{'n/a' if ratio is None else f'{ratio:.2f}'}"
    )
    print(f"promotion gate: {json.dumps(result['gate'])}")


def run_dataset(dataset: str, home_root: Path, households: int | None) -> dict[str, Any]:
    """Runs one dataset from a fresh state folder; returns its figures."""
    if not (ROOT / "dbt_project" / "target" / "manifest.json").exists():
        raise SystemExit(
            "prepare the dbt manifest first: dagster-dbt project prepare-and-package "
            "--file orchestration/dbt_project.py (make setup does it)"
        )
    home = (home_root / dataset).resolve()
    if ROOT in home.parents or home == ROOT:
        raise SystemExit("use a scratch home outside the repository")
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    env = state_env(home)
    subprocess.run(shelfwise("init"), env=env, check=True, cwd=ROOT)
    started = time.perf_counter()
    commands = import_commands(dataset, home, households)
    with (home / "import.log").open("w") as log:
        for command in commands:
            subprocess.run(command, env=env, check=True, cwd=ROOT, stdout=log, stderr=log)
    import_seconds = time.perf_counter() - started

    config = RUN_CONFIG[dataset]
    pipeline = materialize("*")
    if config:
        pipeline += [
            "--config-json",
            json.dumps({"ops": {"dbt_feature_tables": {"config": config}}}),
        ]
    measured = run_logged(pipeline, env, home / "pipeline.log", append=False)
    run = dagster_run_figures(env, measured.subtree_peak_kib)

    from models.artifacts import read_evaluation_report
    from shelfwise.lake import EVALUATION_REPORT, Lake
    from shelfwise.settings import Settings

    lake = Lake(Settings.from_env(env).lake_url)
    has_report = lake.exists(EVALUATION_REPORT)
    evaluation = summarize(read_evaluation_report(lake)) if has_report else None
    failed = [step for step, values in run["steps"].items() if values["status"] != "SUCCESS"]
    return {
        "home": str(home),
        "households_sampled": (households or None) if dataset == "completejourney" else None,
        "commands": [" ".join(command) for command in [*commands, pipeline]],
        "run_config": config,
        "import_seconds": round(import_seconds, 1),
        "pipeline": {
            "returncode": measured.returncode,
            "seconds": round(measured.seconds, 1),
            "tree_peak_mib": round(measured.peak_rss_kib / 1024),
        },
        "run_status": run["status"],
        "steps_not_succeeded": failed,
        "steps": run["steps"],
        "gate": run["gate"],
        "evaluation": evaluation,
        "metadata": run["metadata"],
    }


def main() -> None:
    """Runs the chosen datasets, prints their tables and writes the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=DATASETS, action="append", default=None)
    parser.add_argument(
        "--households",
        type=int,
        default=0,
        help="completejourney: sample this many households (seeded); 0 (default): all 2,469",
    )
    parser.add_argument("--home-root", type=Path, default=Path("/tmp/shelfwise-realdata"))
    args = parser.parse_args()
    for dataset in args.dataset or DATASETS:
        figures = run_dataset(dataset, args.home_root, args.households)
        print_table(dataset, figures)
        figures["measured_at"] = now()
        # Read just before writing: another run may have written another dataset meanwhile.
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.setdefault("datasets", {})[dataset] = figures
        results.update(
            benchmark="real_data",
            machine=machine(),
            versions=versions("dagster", "dbt-core", "polars", "lightgbm", "duckdb"),
            config={"home_root": str(args.home_root), "seed": SEED},
        )
        write_json(RESULTS, results)


if __name__ == "__main__":
    main()
