"""Print the package-to-package import graph of Shelfwise as a mermaid diagram.

Walks every module of the four packages with `ast` (nothing is imported or run), keeps the imports
from one package of the project into another, and prints a `flowchart` for docs/architecture.md
(edges only, so the page does not go stale as modules move). The layering rule itself is checked
by import-linter's contracts in pyproject.toml (tests/test_layers.py).

    python docs/gen_import_graph.py [--root PATH]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

# The project's packages, lowest layer first.
LAYERS = ("shelfwise", "models", "orchestration", "bentos")


def imported_packages(path: Path) -> set[str]:
    """Return the top-level names that the module at `path` imports absolutely."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph(root: Path) -> dict[tuple[str, str], list[str]]:
    """Map each (importer, imported) package pair to the modules that make that import."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            module = path.relative_to(root).as_posix()
            for name in imported_packages(path):
                if name in LAYERS and name != package:
                    edges[(package, name)].append(module)
    return dict(edges)


def mermaid(edges: dict[tuple[str, str], list[str]]) -> str:
    """Render the graph as a mermaid flowchart: an arrow from each importer to what it imports."""
    lines = ["flowchart BT"]
    lines += [f"    {package}[{package}]" for package in LAYERS]
    lines += [f"    {source} --> {target}" for source, target in sorted(edges)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the diagram."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    sys.stdout.write(mermaid(import_graph(args.root)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
