"""The docs site builds strictly (a broken link or anchor fails it); the README stays short."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"
README_LIMIT = 12_000


def build(site_dir: Path, config: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [MKDOCS, "build", "--strict", "--config-file", config, "--site-dir", site_dir],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = build(site_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def test_site_builds_strict_with_the_pages(site):
    for page in [
        "index.html",
        "getting-started/index.html",
        "serving-api/index.html",
        "evaluation/index.html",
        "operations/index.html",
        "architecture/index.html",
    ]:
        assert (site / page).is_file(), page
    assert "/recommend" in (site / "serving-api" / "index.html").read_text(encoding="utf-8")


def test_a_broken_link_fails_the_build(tmp_path):
    # A copy of the docs with one page linking to a missing page and to a missing anchor.
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in (ROOT / "docs").glob("*.md"):
        (docs / page.name).write_text(page.read_text(encoding="utf-8"), encoding="utf-8")
    for broken in ["[gone](no-such-page.md)", "[gone](operations.md#no-such-anchor)"]:
        (docs / "index.md").write_text(f"# Shelfwise\n\n{broken}\n", encoding="utf-8")
        config = tmp_path / "mkdocs.yml"
        text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
        config.write_text(text.replace("docs_dir: docs", f"docs_dir: {docs}"), encoding="utf-8")
        result = build(tmp_path / "site", config)
        assert result.returncode != 0, broken
        assert "no-such" in result.stdout + result.stderr


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())  # as `wc -c` counts
    assert size <= README_LIMIT, f"README.md has {size} bytes; move detail into docs/"
