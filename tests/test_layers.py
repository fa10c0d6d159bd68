"""The import layers hold: `lint-imports` checks the contracts in pyproject.toml.

Never upward: `orchestration` and `bentos` on `models`, `models` on the core `shelfwise`; inside
the core, the CLI on intake, intake on the runtime, the runtime on the core modules; and the
service reaches no pipeline package (Dagster, dbt, Great Expectations), so the bento can ship
without them.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_every_import_contract_is_kept():
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "4 kept" in result.stdout
