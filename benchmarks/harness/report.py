"""What a benchmark reports: medians and percentiles of its runs, printed tables, and the result
JSON with the machine and versions it was measured on."""

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a result was measured on: cores, memory, Python, platform (and `extra`)."""
    memory_kib = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(int(memory_kib) / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
    }


def versions(*distributions: str, wrk: bool = False) -> dict[str, str]:
    """The installed versions of `distributions` (and of `wrk`, when the benchmark uses it)."""
    found = {name: metadata.version(name) for name in distributions}
    if wrk:
        words = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()
        found["wrk"] = words[1] if len(words) > 1 else "unknown"
    return found


def now() -> str:
    """The time, UTC, to the second (a result's `measured_at`)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def report_head(
    benchmark: str,
    distributions: Sequence[str],
    wrk: bool = False,
    machine_facts: dict[str, Any] | None = None,
    stamp: str = "measured_at",
) -> dict[str, Any]:
    """The first keys of a result: `benchmark`, when (`stamp`), `machine` and `versions`."""
    return {
        "benchmark": benchmark,
        stamp: now(),
        "machine": machine() if machine_facts is None else machine_facts,
        "versions": versions(*distributions, wrk=wrk),
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Writes a result (indented; anything JSON cannot hold as its `str`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def format_table(rows: list[list[str]]) -> str:
    """Rows as aligned text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if n else cell.ljust(width)
            for n, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def format_pairs(rows: Sequence[tuple[str, str]]) -> str:
    """(name, value) rows as two columns, both left-aligned."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def percentile_ms(values_s: Sequence[float], share: float) -> float:
    """The value at rank `int(share * n)` (the largest for `share` 1) of durations in seconds,
    in milliseconds; 0 when there are none."""
    if not values_s:
        return 0.0
    ordered = sorted(values_s)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


def median_figures(runs: list[dict[str, float]], digits: int) -> dict[str, Any]:
    """The median of every figure over `runs`, and each run's p99 (`p99_ms_runs`, to `digits`)."""
    figures: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    figures["p99_ms_runs"] = [round(run["p99_ms"], digits) for run in runs]
    return figures
