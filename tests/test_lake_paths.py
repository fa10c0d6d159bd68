"""Every lake path is named once, in `shelfwise/lake.py`: no other module spells one.

Readers and writers of the pipeline's artifacts are in `models/artifacts.py`, built on those names.
A path spelled elsewhere (`f"{FEATURES}/x.parquet"`, `"serving/items.parquet"`) is how two
constants came to mean the same file, and one of them to go stale.
"""

import ast
import re
from pathlib import Path

from shelfwise import lake

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shelfwise", "models", "orchestration", "bentos", "tests", "benchmarks")
OWNER = ROOT / "shelfwise" / "lake.py"
# The dataset folders' constants, and the folders they name.
FOLDER_CONSTANTS = {
    name
    for name, value in vars(lake).items()
    if name.isupper()
    and isinstance(value, str)
    and "/" not in value.rstrip("/")
    and not value.endswith((".parquet", ".json", ".txt"))
} | {"LANDING_EVENTS", "LANDING_ITEMS", "LANDING_USERS", "ITEMS", "USERS"}
FOLDERS = sorted({getattr(lake, name).split("/")[0] for name in FOLDER_CONSTANTS})
NESTED_FOLDERS = sorted(value for name in FOLDER_CONSTANTS if "/" in (value := getattr(lake, name)))
# A folder, then a file of the lake's kinds or a date partition; or a nested folder's own name.
SPELLED = re.compile(
    rf"^({'|'.join(FOLDERS)})/[\w=./-]*?(\.(parquet|json|txt|png|md)$|date=)"
    rf"|^({'|'.join(re.escape(folder) for folder in NESTED_FOLDERS)})/?$"
)


FOLDER_PREFIX = re.compile(rf"^({'|'.join(FOLDERS)})/[\w=./-]*$")


def _spelled_paths(path: Path, label: str | None = None) -> list[str]:
    label = label or str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if SPELLED.match(node.value):
                found.append(f"{label}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.JoinedStr) and len(node.values) > 1:
            head, after = node.values[0], node.values[1]
            name = None
            if isinstance(head, ast.FormattedValue):
                value = head.value
                name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", None)
            starts_path = isinstance(after, ast.Constant) and str(after.value).startswith("/")
            if name in FOLDER_CONSTANTS and starts_path:
                found.append(f"{label}:{node.lineno}: f-string on {name}")
            # A folder spelled at the start, the rest filled in: f"features/{name}.parquet".
            if isinstance(head, ast.Constant) and FOLDER_PREFIX.match(str(head.value)):
                if isinstance(after, ast.FormattedValue):
                    found.append(f"{label}:{node.lineno}: {head.value!r}…")
    return found


def _modules() -> list[Path]:
    files = [file for package in PACKAGES for file in (ROOT / package).rglob("*.py")]
    return sorted(file for file in files if file != OWNER and file != Path(__file__))


def test_the_checker_finds_a_spelled_path(tmp_path):
    module = tmp_path / "spelled.py"
    module.write_text(
        'FEATURES = "features"\n'
        'a = f"{FEATURES}/item_features.parquet"\n'
        'b = "serving/items.parquet"\n'
        'c = f"{paths.EVENTS}/date={day}/x.parquet"\n'
        'd = "landing/events"\n'
        'e = f"features/{name}.parquet"\n'
        'fine = ["events/s", "features", f"{FEATURES}"]\n'
    )
    assert len(_spelled_paths(module, "spelled.py")) == 5


def test_no_module_but_the_owner_spells_a_lake_path():
    spelled = [line for file in _modules() for line in _spelled_paths(file)]
    assert not spelled, "lake paths spelled outside shelfwise/lake.py:\n" + "\n".join(spelled)
