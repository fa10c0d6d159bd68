"""Benchmark of ranker training: LambdaRank on 1 million rows with the real feature vector.

Builds a synthetic training set with the shape of the pipeline's (queries of 200 candidates with
graded labels, every column of `models.features.FEATURE_COLUMNS` — 46 features — some of them
carrying signal), a later validation set for early stopping, and times `models.ranker.train_ranker`
with the pipeline's default hyper-parameters on 2 threads, several times.

Target (issue 5): 1 million training rows with 40 features in under 2 minutes on 2 cores.

Usage:
    .venv/bin/python benchmarks/ranker_benchmark.py [--rows N] [--per-query N] [--repeats N]
"""

import argparse
import statistics
import time
from datetime import UTC, datetime

import numpy as np
import polars as pl
from harness import RESULTS_DIR, format_pairs, report_head, write_json

from models.features import FEATURE_COLUMNS
from models.ranker import RankerParams, train_ranker

TARGET_SECONDS = 120.0


def synthetic_rows(rows: int, per_query: int, seed: int) -> pl.DataFrame:
    """Queries of `per_query` candidates whose graded labels follow a few features noisily."""
    rng = np.random.default_rng(seed)
    queries = rows // per_query
    n = queries * per_query
    data = {name: rng.normal(size=n).astype(np.float32) for name in FEATURE_COLUMNS}
    signal = (
        1.0 * data["user_item_interest"]
        + 0.6 * data["covisit_score"]
        + 0.4 * data["user_category_affinity"]
        + 0.2 * data["item_popularity"]
    )
    noisy = signal + rng.normal(scale=1.0, size=n)
    label = np.digitize(noisy, [2.0, 2.8, 3.4]).astype(np.int32)
    return pl.DataFrame(
        {
            "as_of": [datetime(2026, 1, 1, tzinfo=UTC)] * n,
            "user_id": np.repeat(np.arange(queries), per_query).astype(str),
            "label": label,
            **data,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--per-query", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--full-rounds",
        action="store_true",
        help="no validation set: all num_boost_round rounds (the worst case)",
    )
    args = parser.parse_args()

    train = synthetic_rows(args.rows, args.per_query, seed=1)
    validation = None if args.full_rounds else synthetic_rows(args.rows // 5, args.per_query, 2)
    params = RankerParams()
    seconds, iterations = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        booster = train_ranker(train, validation, params)
        seconds.append(time.perf_counter() - started)
        iterations.append(int(booster.best_iteration or booster.current_iteration()))
    median = statistics.median(seconds)
    passed = median < TARGET_SECONDS

    rows = [
        ("training rows", f"{train.height:,}"),
        ("features", str(len(FEATURE_COLUMNS))),
        ("queries", f"{train.height // args.per_query:,}"),
        ("threads", str(params.num_threads)),
        ("boosting rounds (best)", ", ".join(map(str, iterations))),
        ("seconds per run", ", ".join(f"{s:.1f}" for s in seconds)),
        ("median seconds", f"{median:.1f}"),
        ("rows x rounds / s", f"{train.height * statistics.median(iterations) / median:,.0f}"),
        ("target, s", f"< {TARGET_SECONDS:.0f}"),
        ("result", "PASS" if passed else "MISS"),
    ]
    print(format_pairs(rows))

    name = "ranker-full-rounds.json" if args.full_rounds else "ranker.json"
    write_json(
        RESULTS_DIR / name,
        {
            **report_head("ranker", ("lightgbm", "polars")),
            "config": {
                "rows": train.height,
                "features": len(FEATURE_COLUMNS),
                "per_query": args.per_query,
                "params": params.lightgbm_params(),
                "num_boost_round": params.num_boost_round,
                "early_stopping": not args.full_rounds,
                "early_stopping_rounds": params.early_stopping_rounds,
            },
            "figures": {
                "seconds": [round(s, 2) for s in seconds],
                "median_seconds": round(median, 2),
                "best_iterations": iterations,
            },
            "target_seconds": TARGET_SECONDS,
            "passed": passed,
        },
    )


if __name__ == "__main__":
    main()
