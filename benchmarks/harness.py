"""What the benchmark scripts share: the Makefile's environment for a state folder, the process
tree of a server, wrk runs, the printed tables, and the machine and versions a result records.

The scripts run as `.venv/bin/python benchmarks/<name>.py`, so this module is imported by name
from their folder.
"""

import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


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


def state_env(
    home: Path, lake: Path | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment the Makefile exports, for the state folder `home`.

    The caller's own `SHELFWISE_*` settings and BentoML config overrides are left out, so a
    benchmark measures the defaults whatever the shell it runs in holds.

    Args:
        home: The state folder (`SHELFWISE_HOME`).
        lake: Another lake than `home`'s (`SHELFWISE_LAKE`).
        extra: More variables, set last.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SHELFWISE_") and key != "BENTOML_CONFIG_OPTIONS"
    }
    if lake is not None:
        env["SHELFWISE_LAKE"] = str(lake)
    env.update(
        SHELFWISE_HOME=str(home),
        DAGSTER_HOME=str(home / "dagster"),
        BENTOML_HOME=str(home / "bentoml"),
        BENTOML_DO_NOT_TRACK="true",
        DO_NOT_TRACK="1",
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        OMP_WAIT_POLICY="PASSIVE",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra or {})
    return env


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the parent follows the last ')'.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def wrk_json(
    url: str,
    script: Path,
    concurrency: int,
    seconds: float,
    script_args: list[str] | None = None,
    latency: bool = False,
) -> dict[str, Any]:
    """One wrk run (one client thread, keep-alive, 10 s timeout) with a Lua script that prints
    `WRK_JSON {…}` when done; returns that JSON plus `errors` (every kind summed)."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s"]
    command += ["--latency"] if latency else []
    command += ["-s", str(script), url]
    command += ["--", *script_args] if script_args else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"^WRK_JSON (.*)$", done.stdout, re.MULTILINE)
    if not found:
        raise RuntimeError(f"wrk said:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(found.group(1))
    raw["errors"] = sum(raw[kind] for kind in ("connect", "read", "write", "status", "timeout"))
    return raw


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
