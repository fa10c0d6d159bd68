"""Preparing the local state folder: Dagster's home with telemetry off, BentoML's, the lake's."""

from pathlib import Path

from shelfwise.lake import FEATURES, Lake
from shelfwise.settings import Settings

DAGSTER_YAML = """\
# Written by `shelfwise init`. Dagster keeps run history, event logs and sensor cursors here.
telemetry:
  enabled: false
"""


def prepare_home(settings: Settings) -> list[Path]:
    """Creates the state folders and Dagster's `dagster.yaml` (idempotent).

    Args:
        settings: Where the state lives.

    Returns:
        The local folders that exist afterwards.
    """
    folders = [
        settings.home,
        settings.dagster_home,
        settings.bentoml_home,
        settings.warehouse_path.parent,
    ]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    dagster_yaml = settings.dagster_home / "dagster.yaml"
    if not dagster_yaml.exists():
        dagster_yaml.write_text(DAGSTER_YAML)
    lake = Lake(settings.lake_url)
    if lake.protocol == "file":
        # dbt-duckdb writes external models into this folder but does not create it.
        lake.fs.makedirs(lake.path(FEATURES), exist_ok=True)
    return folders
