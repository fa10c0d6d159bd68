"""Helpers shared by tests (plain functions; fixtures live in conftest.py)."""

import os
import sys
from pathlib import Path

from shelfwise.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The executables of the virtual environment running the tests (also when it is not activated).
VENV_BIN = Path(sys.executable).parent


def service_env(settings: Settings) -> dict[str, str]:
    """The environment a Shelfwise process needs to work on `settings`' state."""
    return {
        **os.environ,
        "SHELFWISE_HOME": str(settings.home),
        "SHELFWISE_LAKE": settings.lake_url,
        "BENTOML_HOME": str(settings.bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
    }
