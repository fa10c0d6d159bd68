"""Where a benchmark runs: the project's paths, the Makefile's environment for a state folder,
the commands that fill one, and its reuse (build record, `--rebuild`, throw-away copies)."""

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
SHOP_OPTIONS = ("users", "items", "days", "events", "seed")


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


def shop_arguments(
    parser: argparse.ArgumentParser, users: int, items: int, days: int, events: int, seed: int = 7
) -> None:
    """`--users --items --days --events --seed`: the shop a state is generated from."""
    for name, default in zip(SHOP_OPTIONS, (users, items, days, events, seed), strict=True):
        parser.add_argument(f"--{name}", type=int, default=default)


def shop_config(args: argparse.Namespace) -> dict[str, Any]:
    """The shop options of parsed arguments (`shop_arguments`), for `generate` and the record."""
    return {key: getattr(args, key) for key in SHOP_OPTIONS}


def shelfwise(*args: str) -> list[str]:
    """The `shelfwise` command of this interpreter's environment, with `args`."""
    return [str(BIN / "shelfwise"), *args]


def generate(config: Mapping[str, Any], *more: str) -> list[str]:
    """`shelfwise generate` with the shop options (`--users=…` …) of `config`, then `more`."""
    return shelfwise("generate", *(f"--{key}={config[key]}" for key in SHOP_OPTIONS), *more)


def materialize(selection: str, *more: str) -> list[str]:
    """`dagster asset materialize` of the project's definitions, `--select selection`."""
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "orchestration.definitions"]
    return [*command, "--select", selection, *more]


def state_record(home: Path, name: str, rebuild: bool = False) -> dict[str, Any] | None:
    """The build record `name` of the state folder `home`; None when it has none (yet).

    With `rebuild`, the folder is deleted first, provided a record shows the script built it.
    """
    path = home / name
    if rebuild and home.exists():
        if any(home.iterdir()) and not path.exists():
            raise SystemExit(f"--rebuild: {home} is not a state folder this script built")
        shutil.rmtree(home)
    return json.loads(path.read_text()) if path.exists() else None


@contextmanager
def state_copy(home: Path, scratch: Path, name: str, serving: bool = False) -> Iterator[Path]:
    """A fresh copy of the state (without its log), removed afterwards.

    With `serving`, a copy for the service alone: the lake's files are hard links and the
    warehouse is left out. The service never reads the warehouse, and only adds files to the
    lake (written under a temporary name and renamed in, `shelfwise.lake`), so no write goes
    through a link into `home`. Copying the 10M-event shop (9 GB) evicted the service's own
    code from the page cache just before it started: its start-up measured a cold disk (6.5 s
    against 4.4-5.0 s, measured once with the page cache dropped), not the service.
    """
    copy = scratch / name
    ignore = ["wal", "*.log", *(["warehouse", "lake"] if serving else [])]
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns(*ignore))
    if serving and (home / "lake").is_dir():
        shutil.copytree(home / "lake", copy / "lake", copy_function=_link)
    try:
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _link(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system: a copy
        shutil.copy2(source, destination)
