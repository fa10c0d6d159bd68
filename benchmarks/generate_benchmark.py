"""Benchmark of the synthetic shop generator: wall time and peak memory at the 10M-event scale.

The generation runs in a fresh child process (spawned, not forked), so its peak resident set size
(`resource.getrusage`) is the generator's own, interpreter and imports included. Optionally the
shop is also written to a temporary lake, timed separately.

Usage:
    PYTHONPATH=. python benchmarks/generate_benchmark.py [--events N] [--users N] [--items N]
        [--days N] [--seed N] [--write] [--output PATH]

Prints a table and writes JSON (machine, config, figures) to `benchmarks/results/generate.json`.
"""

import argparse
import datetime
import multiprocessing
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from harness import RESULTS_DIR, format_pairs, report_head, write_json

from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.lake import Lake

RESULTS = RESULTS_DIR / "generate.json"
TARGET_SECONDS = 60.0
TARGET_PEAK_MIB = 4096.0


def _peak_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _run(config: ShopConfig, write: bool, results: Any) -> None:
    """The child: generates (and optionally writes) the shop and sends back the figures."""
    started = time.perf_counter()
    shop = generate_shop(config)
    figures: dict[str, Any] = {
        "events": shop.events.num_rows,
        "items": shop.items.num_rows,
        "users": shop.users.num_rows,
        "sessions": pc.count_distinct(shop.events.column("session_id")).as_py(),
        "generate_seconds": time.perf_counter() - started,
        "generate_peak_mib": _peak_mib(),
    }
    if write:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            counts = write_shop(shop, Lake(folder), seed=config.seed)
            figures["write_seconds"] = time.perf_counter() - started
            figures["files"] = counts["files"]
        figures["write_peak_mib"] = _peak_mib()
    results.send(figures)
    results.close()


def measure(config: ShopConfig, write: bool) -> dict[str, Any]:
    """Runs the generator in a fresh process and returns its figures."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_run, args=(config, write, sender))
    child.start()
    sender.close()
    figures = receiver.recv()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"benchmark child failed with exit code {child.exitcode}")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns 0 when the targets are met, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=400_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--end-date", type=datetime.date.fromisoformat, default=None)
    parser.add_argument("--write", action="store_true", help="also time write_shop to a temp lake")
    parser.add_argument("--max-seconds", type=float, default=TARGET_SECONDS)
    parser.add_argument("--max-peak-mib", type=float, default=TARGET_PEAK_MIB)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    config = ShopConfig(
        users=args.users,
        items=args.items,
        days=args.days,
        events=args.events,
        seed=args.seed,
        end_date=args.end_date,
    )
    figures = measure(config, args.write)
    seconds, peak = figures["generate_seconds"], figures["generate_peak_mib"]
    time_ok, memory_ok = seconds <= args.max_seconds, peak <= args.max_peak_mib
    events_ok = abs(figures["events"] / config.events - 1) <= 0.10
    passed = time_ok and memory_ok and events_ok

    rows = [
        ("events", f"{figures['events']:,} (target {config.events:,} ±10%: "
         f"{'pass' if events_ok else 'FAIL'})"),
        ("users / items / days", f"{config.users:,} / {config.items:,} / {config.days}"),
        ("sessions", f"{figures['sessions']:,}"),
        ("seconds", f"{seconds:.1f} (target <= {args.max_seconds:g}: "
         f"{'pass' if time_ok else 'FAIL'})"),
        ("events/s", f"{figures['events'] / seconds:,.0f}"),
        ("peak MiB", f"{peak:,.0f} (target <= {args.max_peak_mib:g}: "
         f"{'pass' if memory_ok else 'FAIL'})"),
    ]  # fmt: skip
    if args.write:
        rows.append(("write seconds", f"{figures['write_seconds']:.1f} ({figures['files']} files)"))
        rows.append(("peak MiB with write", f"{figures['write_peak_mib']:,.0f}"))
    rows.append(("result", "PASS" if passed else "FAIL"))
    print(format_pairs(rows))

    report = {
        **report_head("generate", ("numpy", "polars", "pyarrow"), stamp="run_at"),
        "config": {**asdict(config), "end_date": config.end_date and config.end_date.isoformat()},
        "targets": {"seconds": args.max_seconds, "peak_mib": args.max_peak_mib, "events": 0.10},
        "figures": {**figures, "events_per_second": figures["events"] / seconds},
        "passed": {"seconds": time_ok, "peak_mib": memory_ok, "events": events_ok},
    }
    write_json(args.output, report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
