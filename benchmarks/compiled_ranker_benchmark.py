"""Benchmark of the compiled ranker: one request's prediction, LightGBM against lleaves.

Trains LambdaRank rankers of several sizes with the pipeline's hyper-parameters on synthetic rows
with every feature of `models.features.FEATURE_COLUMNS` (as `ranker_benchmark.py` builds them),
all rounds (no early stopping), then times, per model:

- one request's prediction: 200 candidate rows × the features, float32 as the recommender holds
  them, `num_threads=1` — LightGBM's `Booster.predict`, the compiled ranker for the portable
  target the project ships (`models.compiled_ranker`: x86-64 baseline), and lleaves' default
  (code for this machine's CPU), median and p99 over many calls cycling through 50 requests;
- compiling: `compile_library` in process, `compile_in_subprocess` as the service runs it (a
  child Python: start-up and imports included), and loading a shipped library with its
  agreement check (`load_library` + `check_agreement`);
- the largest score difference to LightGBM over all the requests.

With `--home DIR` the production ranker of that state folder's model store is measured too.

Usage:
    .venv/bin/python benchmarks/compiled_ranker_benchmark.py [--trees 100 300] [--calls N]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import RESULTS_DIR, format_table, percentile_ms, report_head, write_json
from ranker_benchmark import synthetic_rows

from models.compiled_ranker import (
    ZERO_THRESHOLD,
    check_agreement,
    compile_in_subprocess,
    compile_library,
    load_library,
)
from models.features import FEATURE_COLUMNS, feature_matrix
from models.ranker import RankerParams, booster_from_text, model_text, train_ranker

CANDIDATES = 200


def timed_calls(predict, requests: list[np.ndarray], calls: int) -> list[float]:
    """Seconds per call of `predict(request)`, cycling through the requests (after a warm-up)."""
    for request in requests:
        predict(request)
    seconds = []
    for n in range(calls):
        request = requests[n % len(requests)]
        started = time.perf_counter()
        predict(request)
        seconds.append(time.perf_counter() - started)
    return seconds


def compiled_for(text: str, folder: Path, cpu: str | None):
    """The model compiled for another target: `cpu` None is lleaves' default, code for this
    machine's CPU (what the project does not ship: it may not run on another machine)."""
    import lleaves

    model_file = folder / f"model-{cpu}.txt"
    model_file.write_text(text)
    model = lleaves.Model(model_file=str(model_file))
    model.compile(target_cpu=cpu, target_cpu_features=None if cpu is None else "")

    def predict(rows: np.ndarray) -> np.ndarray:
        rows = np.array(rows, dtype=np.float64, order="C")
        rows[np.abs(rows) <= ZERO_THRESHOLD] = 0.0
        return model.predict(rows, n_jobs=1)

    return predict


def measure(name: str, text: str, requests: list[np.ndarray], calls: int) -> dict[str, object]:
    booster = booster_from_text(text)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        info = compile_library(text, folder / "in-process")
        compile_s = time.perf_counter() - started
        started = time.perf_counter()
        compile_in_subprocess(text, folder / "child")
        child_s = time.perf_counter() - started
        started = time.perf_counter()
        compiled = load_library(text, folder / "in-process")
        check_agreement(compiled, booster)
        load_s = time.perf_counter() - started
        engines = {
            "lightgbm": lambda rows: booster.predict(rows, num_threads=1),
            "compiled (x86-64, shipped)": lambda rows: compiled.predict(rows, num_threads=1),
            "compiled (x86-64-v3)": compiled_for(text, folder, "x86-64-v3"),
            "compiled (host CPU)": compiled_for(text, folder, None),
        }
        timings = {engine: timed_calls(f, requests, calls) for engine, f in engines.items()}
        difference = max(
            float(np.max(np.abs(compiled.predict(r) - booster.predict(r, num_threads=1))))
            for r in requests
        )
    return {
        "model": name,
        "trees": booster.num_trees(),
        "features": booster.num_feature(),
        "library_bytes": info["library_bytes"],
        "compile_s": round(compile_s, 2),
        "compile_in_child_s": round(child_s, 2),
        "load_and_check_s": round(load_s, 3),
        "max_abs_difference": difference,
        "predict_us": {
            engine: {
                "median": round(statistics.median(seconds) * 1e6, 1),
                "p99": round(percentile_ms(seconds, 0.99) * 1000, 1),
            }
            for engine, seconds in timings.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--rows", type=int, default=200_000, help="training rows")
    parser.add_argument("--calls", type=int, default=3000, help="timed predictions per engine")
    parser.add_argument("--home", type=Path, help="also the production ranker of this state")
    args = parser.parse_args()

    requests = []
    rng = np.random.default_rng(0)
    for n in range(50):
        request = feature_matrix(synthetic_rows(CANDIDATES, CANDIDATES, seed=100 + n))
        request[:, ::5][rng.random(request[:, ::5].shape) < 0.2] = np.nan  # missing values
        requests.append(request)
    train = synthetic_rows(args.rows, CANDIDATES, seed=1)
    models = []
    for trees in args.trees:
        params = RankerParams(num_boost_round=trees)
        models.append((f"synthetic, {trees} rounds", model_text(train_ranker(train, None, params))))
    if args.home:
        from shelfwise.runtime.registry import production_path, read_ranker

        text, info = read_ranker(production_path(args.home / "bentoml"))
        if info["features"] != FEATURE_COLUMNS:
            raise SystemExit("the production ranker's features are not FEATURE_COLUMNS")
        models.append(("production model of --home", text))
    results = [measure(name, text, requests, args.calls) for name, text in models]

    rows = [["model", "trees", "engine", "p50 µs", "p99 µs", "× LightGBM"]]
    for result in results:
        base = result["predict_us"]["lightgbm"]["median"]
        for engine, figures in result["predict_us"].items():
            rows.append(
                [
                    result["model"],
                    str(result["trees"]),
                    engine,
                    f"{figures['median']:.0f}",
                    f"{figures['p99']:.0f}",
                    f"{base / figures['median']:.2f}",
                ]
            )
    print(f"one request: {CANDIDATES} rows × {len(FEATURE_COLUMNS)} features, num_threads=1")
    print(format_table(rows))
    print()
    rows = [["model", "compile s", "in a child s", "load + check s", "library KiB", "max |diff|"]]
    for result in results:
        rows.append(
            [
                result["model"],
                f"{result['compile_s']:.2f}",
                f"{result['compile_in_child_s']:.2f}",
                f"{result['load_and_check_s']:.3f}",
                f"{result['library_bytes'] / 1024:.0f}",
                f"{result['max_abs_difference']:.1e}",
            ]
        )
    print(format_table(rows))

    write_json(
        RESULTS_DIR / "compiled-ranker.json",
        {
            **report_head("compiled_ranker", ("lightgbm", "lleaves", "llvmlite", "numpy")),
            "config": {
                "candidates": CANDIDATES,
                "features": len(FEATURE_COLUMNS),
                "training_rows": train.height,
                "calls": args.calls,
                "requests": len(requests),
                "num_threads": 1,
                "params": RankerParams().lightgbm_params(),
            },
            "figures": results,
        },
    )


if __name__ == "__main__":
    main()
