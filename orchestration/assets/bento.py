"""The deployable bento: the service, the packages it imports and the production ranker."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from orchestration import serving_requirements
from orchestration.resources import ShelfwiseResource

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENTOFILE = PROJECT_ROOT / "bentos" / "bentofile.yaml"
# The bentoml of this virtual environment, also when it is not activated.
BENTOML_EXECUTABLE = str(Path(sys.executable).with_name("bentoml"))


@dg.asset(deps=["production_model", "serving_features"], group_name="serving")
def bento(context: dg.AssetExecutionContext, shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """The deployable bento (`shelfwise:<version>`): the service and the modules it imports, the
    serving packages pinned from constraints.txt and the production ranker, built offline from
    bentos/bentofile.yaml (docs/bento.md)."""
    settings = shelfwise.settings()
    # The pins follow constraints.txt: bentos/requirements.txt is rewritten if it fell behind.
    if serving_requirements.write():
        context.log.warning(
            "bentos/requirements.txt was stale and has been regenerated from constraints.txt"
        )
    env = {**os.environ, "BENTOML_HOME": str(settings.bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    # A subprocess: BentoML binds its home when first used, and this run's home must win.
    result = subprocess.run(
        [BENTOML_EXECUTABLE, "build", "-f", str(BENTOFILE), "-o", "tag", str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        check=False,
    )
    if result.returncode != 0:
        raise dg.Failure(f"bentoml build failed:\n{result.stderr[-4000:]}")
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    requirements = serving_requirements.REQUIREMENTS.read_text().splitlines()
    packages = sum(1 for line in requirements if line and not line.startswith("#"))
    return dg.MaterializeResult(metadata={"tag": tag, "python_packages": packages})
