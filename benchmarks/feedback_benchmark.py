"""Benchmark of the durable feedback log: sustained append throughput with fsync on, and compaction.

Each configuration appends batches of 100 contract events (`FeedbackLog.append`, which returns only
after fsync) as fast as it can for `--seconds`, `--runs` times; the table shows the median
events/s and the per-append latency percentiles of the median run. Configurations: 1, 2 and 4
threads sharing one log (group commit), and 2 processes with a log each on the same folder (like
two BentoML workers). For reference, the raw cost of one write + fsync of a batch-sized record on
the same disk is measured first, and the compaction of one run's log into a local lake is timed.

Usage:
    PYTHONPATH=. python benchmarks/feedback_benchmark.py [--seconds S] [--runs N] [--dir PATH]
        [--output PATH]

Prints a table and writes JSON (machine, config, figures) to
`benchmarks/results/feedback_benchmark.json`.
"""

import argparse
import datetime
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR, format_table, percentile_ms, report_head, write_json

from shelfwise.lake import EVENTS, Lake
from shelfwise.runtime.feedback import FeedbackLog, compact_feedback

RESULTS = RESULTS_DIR / "feedback_benchmark.json"
BATCH = 100
TARGET_EVENTS_PER_SECOND = 20_000.0
START = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)


def _batches(prefix: str, count: int) -> list[list[dict[str, Any]]]:
    """Distinct batches, built before timing (the service has them parsed already)."""
    return [
        [
            {
                "event_id": f"{prefix}-{number}-{index}",
                "occurred_at": START + datetime.timedelta(seconds=number * BATCH + index),
                "user_id": f"u{(number * 31 + index) % 20_000}",
                "session_id": f"s{number % 997}",
                "item_id": f"i{(number * 17 + index) % 5_000}",
                "event_type": ("view", "view", "view", "add_to_cart", "purchase")[index % 5],
                "quantity": 1,
                "price": 19.99,
                "rec_id": f"r{number}" if index % 3 == 0 else None,
                "source": "web",
            }
            for index in range(BATCH)
        ]
        for number in range(count)
    ]


def _percentiles(latencies: list[float]) -> dict[str, float]:
    return {f"p{p}_ms": percentile_ms(latencies, p / 100) for p in (50, 95, 99)}


def _drive(log: FeedbackLog, batches: list[list[dict[str, Any]]], seconds: float) -> list[float]:
    """Appends batches until the time is up; returns each append's latency in seconds."""
    latencies = []
    deadline = time.perf_counter() + seconds
    number = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        log.append(EVENTS, batches[number % len(batches)])
        latencies.append(time.perf_counter() - started)
        number += 1
    return latencies


def _threads(directory: Path, threads: int, seconds: float) -> tuple[list[float], float]:
    pools = [_batches(f"t{n}", 200) for n in range(threads)]
    results: list[list[float]] = [[] for _ in range(threads)]
    log = FeedbackLog(directory)
    gate = threading.Barrier(threads + 1)

    def run(index: int) -> None:
        gate.wait()
        results[index] = _drive(log, pools[index], seconds)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    gate.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    log.close()
    return [latency for result in results for latency in result], elapsed


def _process(directory: str, seconds: float, gate: Any, sender: Any) -> None:
    """A child: its own log on the shared folder, like a BentoML worker."""
    batches = _batches(f"p{os.getpid()}", 200)
    log = FeedbackLog(Path(directory))
    gate.wait()
    latencies = _drive(log, batches, seconds)
    log.close()
    sender.send(latencies)
    sender.close()


def _processes(directory: Path, processes: int, seconds: float) -> tuple[list[float], float]:
    context = multiprocessing.get_context("spawn")
    gate = context.Barrier(processes + 1)
    pipes = [context.Pipe(duplex=False) for _ in range(processes)]
    children = [
        context.Process(target=_process, args=(str(directory), seconds, gate, sender))
        for _, sender in pipes
    ]
    for child in children:
        child.start()
    gate.wait()
    started = time.perf_counter()
    latencies = [latency for receiver, _ in pipes for latency in receiver.recv()]
    elapsed = time.perf_counter() - started
    for child in children:
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"benchmark child failed with exit code {child.exitcode}")
    return latencies, elapsed


def _fsync_cost(directory: Path, repeats: int = 500) -> dict[str, float]:
    """The raw cost of appending one batch-sized record and fsyncing it."""
    path = directory / "fsync-probe"
    record = os.urandom(8_500)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    timings = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            os.write(fd, record)
            os.fsync(fd)
            timings.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return {**_percentiles(timings), "per_second": repeats / sum(timings)}


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns 0 when the throughput target is met, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--runs", type=int, default=3, help="per configuration (median)")
    parser.add_argument("--dir", type=Path, default=None, help="where the log goes; default: tmp")
    parser.add_argument("--target", type=float, default=TARGET_EVENTS_PER_SECOND)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="feedback-bench-", dir=args.dir))
    try:
        fsync = _fsync_cost(root)
        configurations = [
            ("1 thread", lambda d: _threads(d, 1, args.seconds)),
            ("2 threads, one log", lambda d: _threads(d, 2, args.seconds)),
            ("4 threads, one log", lambda d: _threads(d, 4, args.seconds)),
            ("2 processes, a log each", lambda d: _processes(d, 2, args.seconds)),
        ]
        figures: dict[str, Any] = {}
        compaction: dict[str, float] = {}
        for name, measure in configurations:
            runs = []
            for run in range(args.runs):
                wal = root / f"wal-{len(figures)}-{run}"
                latencies, elapsed = measure(wal)
                runs.append(
                    {
                        "events_per_second": len(latencies) * BATCH / elapsed,
                        "appends": len(latencies),
                        **_percentiles(latencies),
                    }
                )
                if not compaction and run == 0:
                    lake = Lake(str(root / "lake"))
                    started = time.perf_counter()
                    result = compact_feedback(wal, lake)
                    seconds = time.perf_counter() - started
                    rows = result.events + result.duplicates[EVENTS]
                    compaction = {
                        "events_read": rows,
                        "segments": result.segments,
                        "files": len(result.files),
                        "seconds": seconds,
                        "events_per_second": rows / seconds,
                    }
                shutil.rmtree(wal, ignore_errors=True)
            runs.sort(key=lambda figure: figure["events_per_second"])
            median = runs[len(runs) // 2]
            figures[name] = {
                **median,
                "runs_events_per_second": [r["events_per_second"] for r in runs],
                "median_events_per_second": statistics.median(r["events_per_second"] for r in runs),
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    passed = all(f["median_events_per_second"] >= args.target for f in figures.values())
    rows = [["configuration", "events/s", "appends/s", "p50 ms", "p95 ms", "p99 ms"]]
    for name, figure in figures.items():
        rows.append(
            [
                name,
                f"{figure['median_events_per_second']:,.0f}",
                f"{figure['median_events_per_second'] / BATCH:,.0f}",
                f"{figure['p50_ms']:.2f}",
                f"{figure['p95_ms']:.2f}",
                f"{figure['p99_ms']:.2f}",
            ]
        )
    rows.append(
        [
            "raw write+fsync (8.5 KB)",
            "",
            f"{fsync['per_second']:,.0f}",
            f"{fsync['p50_ms']:.2f}",
            f"{fsync['p95_ms']:.2f}",
            f"{fsync['p99_ms']:.2f}",
        ]
    )
    print(format_table(rows))
    print(
        f"compaction: {compaction['events_read']:,} events from {compaction['segments']} "
        f"segment(s) in {compaction['seconds']:.2f} s "
        f"({compaction['events_per_second']:,.0f} events/s, {compaction['files']} file(s))"
    )
    print(f"target >= {args.target:,.0f} events/s in batches of {BATCH}: "
          f"{'PASS' if passed else 'FAIL'}")  # fmt: skip

    report = {
        **report_head("feedback", ("polars", "pyarrow"), stamp="run_at"),
        "config": {
            "batch": BATCH,
            "seconds": args.seconds,
            "runs": args.runs,
            "durability": "fsync before append returns",
            "directory": str(args.dir or tempfile.gettempdir()),
        },
        "targets": {"events_per_second": args.target},
        "figures": {"append": figures, "raw_fsync": fsync, "compaction": compaction},
        "passed": passed,
    }
    write_json(args.output, report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
