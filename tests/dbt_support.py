"""Running the real dbt project on a test lake, outside Dagster."""

import json
import subprocess
from datetime import datetime
from pathlib import Path

from shelfwise.settings import Settings
from tests.support import PROJECT_ROOT, VENV_BIN, service_env

DBT_PROJECT = PROJECT_ROOT / "dbt_project"


def dbt(settings: Settings, command: list[str], as_of: list[datetime], target: Path) -> None:
    """Runs a dbt command on the settings' lake with the given cutoffs; raises on failure."""
    dbt_vars = {
        "lake": settings.lake_url,
        "warehouse_path": str(settings.warehouse_path),
        "as_of": [cutoff.isoformat() for cutoff in as_of],
    }
    completed = subprocess.run(
        [
            str(VENV_BIN / "dbt"),
            *command,
            "--vars",
            json.dumps(dbt_vars),
            "--project-dir",
            str(DBT_PROJECT),
            "--profiles-dir",
            str(DBT_PROJECT),
            "--target-path",
            str(target),
        ],
        capture_output=True,
        text=True,
        env={**service_env(settings), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"},
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
