"""The dbt project, in a module of its own so `dagster-dbt project prepare-and-package` can load it.

The manifest is prepared by `make setup` (and rebuilt under `dagster dev`), not at import time.
"""

from pathlib import Path

from dagster_dbt import DbtProject

DBT_PROJECT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"

# A full parse every time: partial parsing has kept stale model dependencies here.
dbt_project = DbtProject(
    project_dir=DBT_PROJECT_DIR,
    profiles_dir=DBT_PROJECT_DIR,
    prepare_project_cli_args=["parse", "--quiet", "--no-partial-parse"],
)
dbt_project.prepare_if_dev()
