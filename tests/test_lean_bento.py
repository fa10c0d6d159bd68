"""The bento holds what the service imports, not the pipeline (docs/bento.md).

The development environment cannot show that by serving the bento: its editable install finds
any first-party module the bento lacks in the project, and every pipeline package is installed.
So the bento is checked as its image would run it: a `sitecustomize` (on PYTHONPATH, so it runs
in BentoML's worker processes too) removes the editable install's finders and refuses to import
a module from site-packages that none of the bento's requirements installed, or a first-party
module from anywhere but the bento's src/.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from orchestration import serving_requirements
from tests.support import bentoml_server, copy_state

PIPELINE_DISTRIBUTIONS = re.compile(r"^(dagster|dbt|great-expectations|matplotlib|duckdb)\b")

# Reads LEAN_BENTO_SRC (the bento's src/) and LEAN_BENTO_REQUIREMENTS (its requirements.txt).
SITECUSTOMIZE = '''
import importlib.abc
import importlib.machinery
import os
import re
import sys
import sysconfig
from importlib import metadata

FIRST_PARTY = {"bentos", "models", "shelfwise", "orchestration"}
SRC = os.path.realpath(os.environ["LEAN_BENTO_SRC"])
SITE = tuple({os.path.realpath(sysconfig.get_path(key)) for key in ("purelib", "platlib")})


def _editable(finder):
    return getattr(finder, "__module__", "").startswith("__editable__") or type(
        finder
    ).__module__.startswith("__editable__")


def _installed_files(requirements):
    files = set()
    for line in open(requirements).read().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        dist = metadata.distribution(re.split(r"[=<>!~;\\[ ]", line, maxsplit=1)[0])
        files.update(os.path.realpath(dist.locate_file(file)) for file in dist.files or ())
    return files


class NotInTheImage(importlib.abc.MetaPathFinder):
    """Finds what the path finder finds, unless the bento's image would not hold it."""

    allowed = _installed_files(os.environ["LEAN_BENTO_REQUIREMENTS"])

    def find_spec(self, fullname, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        origin = spec and spec.has_location and os.path.realpath(spec.origin)
        if not origin:
            return spec
        if fullname.partition(".")[0] in FIRST_PARTY:
            if not origin.startswith(SRC + os.sep):
                raise ModuleNotFoundError(f"{fullname} is not in the bento ({origin})")
        elif origin.startswith(SITE) and origin not in self.allowed:
            raise ModuleNotFoundError(f"{fullname} is not in the bento's requirements ({origin})")
        return spec


sys.meta_path[:] = [NotInTheImage()] + [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if not _editable(hook)]
sys.path_importer_cache.clear()
'''

# Imports the service and what it imports lazily; prints the first-party modules' files.
IMPORT_SERVICE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bentos.service
import lightgbm, redis, s3fs  # the service imports them inside functions
first_party = ("bentos", "models", "shelfwise", "orchestration")
print(json.dumps({
    name: module.__file__ for name, module in sys.modules.items()
    if name.partition(".")[0] in first_party
}))
"""


@pytest.fixture(scope="module")
def bento_dir(pipeline_run) -> Path:
    """The bento the pipeline built (`shelfwise:latest` in the run's BentoML home)."""
    assert pipeline_run.result.success, pipeline_run.failures
    latest = pipeline_run.settings.bentoml_home / "bentos" / "shelfwise" / "latest"
    return latest.parent / latest.read_text().strip()


@pytest.fixture(scope="module")
def image_env(bento_dir, tmp_path_factory) -> dict[str, str]:
    """The environment variables that make a Python process see only what the image holds."""
    folder = tmp_path_factory.mktemp("image-site")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        "PYTHONPATH": str(folder),
        "PYTHONDONTWRITEBYTECODE": "1",  # leave the bento in the store as it was built
        "LEAN_BENTO_SRC": str(bento_dir / "src"),
        "LEAN_BENTO_REQUIREMENTS": str(bento_dir / "env" / "python" / "requirements.txt"),
    }


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(serving_requirements.canonical(re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0]))
    return names


def test_the_committed_requirements_are_current():
    assert serving_requirements.REQUIREMENTS.read_text() == serving_requirements.render(), (
        "bentos/requirements.txt is stale: run `python -m orchestration.serving_requirements`"
    )


def test_the_dependency_closure_follows_extras_and_markers():
    requires = {
        "top": ["dep[fast]", 'optional; extra == "plot"', 'old; python_version < "3"'],
        "dep": ['speedup; extra == "fast"', 'docs; extra == "doc"'],
        "speedup": None,
    }
    closure = serving_requirements.dependency_closure({"Top": ()}, requires.get)
    assert closure == {"top", "dep", "speedup"}


@pytest.mark.slow
def test_the_bento_requires_no_pipeline_package(bento_dir):
    names = requirement_names(bento_dir / "env" / "python" / "requirements.txt")
    assert {"bentoml", "lightgbm", "polars", "pyarrow", "redis", "s3fs", "uvloop"} <= names
    assert not sorted(name for name in names if PIPELINE_DISTRIBUTIONS.match(name))


@pytest.mark.slow
def test_the_bento_holds_no_pipeline_code(bento_dir):
    src = bento_dir / "src"
    files = {path.relative_to(src).as_posix() for path in src.rglob("*") if path.is_file()}
    assert {"bentos/service.py", "models/recommender.py", "shelfwise/runtime/feedback.py"} <= files
    pipeline = ("orchestration/", "shelfwise/intake/", "dbt_project/", "tests/", "data/")
    assert not sorted(name for name in files if name.startswith(pipeline))
    assert "models/evaluation.py" not in files and "shelfwise/cli.py" not in files


@pytest.mark.slow
def test_the_service_imports_from_the_bento_alone(bento_dir, image_env):
    src = bento_dir / "src"
    imported = subprocess.run(
        [sys.executable, "-c", IMPORT_SERVICE, str(src)],
        capture_output=True,
        text=True,
        env={**os.environ, **image_env},
        cwd=bento_dir,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    loaded = json.loads(imported.stdout.strip().splitlines()[-1])
    assert "bentos.service" in loaded and "orchestration" not in loaded
    assert all(src in Path(file).parents for file in loaded.values()), loaded


@pytest.mark.slow
def test_the_isolation_refuses_what_the_bento_lacks(bento_dir, image_env, tmp_path):
    """The check above would pass vacuously if the isolation let anything through."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "models").mkdir()
    (src / "models" / "__init__.py").write_text("")
    script = "import sys; sys.path.insert(0, sys.argv[1]); import {}"
    for module in ("models.session", "shelfwise.settings", "pandas", "dagster"):
        refused = subprocess.run(
            [sys.executable, "-c", script.format(module), str(src)],
            capture_output=True,
            text=True,
            env={**os.environ, **image_env, "LEAN_BENTO_SRC": str(src)},
            cwd=tmp_path,
            check=False,
        )
        assert refused.returncode != 0 and "ModuleNotFoundError" in refused.stderr, module


@pytest.mark.slow
def test_the_bento_serves_from_the_bento_alone(pipeline_run, bento_dir, image_env, tmp_path):
    """`bentoml serve` of the bento (its workers too) with nothing but its src/ and packages, on a
    copy of the pipeline's state (its impressions must not reach the shared lake)."""
    settings = copy_state(pipeline_run.settings, tmp_path)
    src = settings.bentoml_home / "bentos" / "shelfwise" / bento_dir.name / "src"
    env = {**image_env, "LEAN_BENTO_SRC": str(src)}
    tag = f"shelfwise:{bento_dir.name}"
    log = tmp_path / "bentoml.log"
    with bentoml_server(tag, settings, cwd=tmp_path, log_path=log, env=env) as url:
        answer = httpx.post(f"{url}/recommend", json={"user_id": "u1", "k": 5}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["items"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        # The inspector page is a file of the bento too (bentos/pages.py reads it at start).
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "<title>Shelfwise inspector</title>" in page.text
    assert "is not in the bento" not in log.read_text()
    # The ranker compiled at promotion travels in the bento and serves as it is: lleaves and
    # llvmlite come with the bento's requirements, and nothing was compiled at start.
    assert re.search(
        r'^shelfwise_ranker_engine\{[^}]*engine="compiled"[^}]*\} 1\.0$', metrics, re.M
    )
    assert not settings.compiled_ranker_dir.exists()
