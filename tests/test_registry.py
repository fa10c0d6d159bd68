"""The model registry on a real BentoML model store in a temporary BENTOML_HOME, and its CLI."""

import json
from pathlib import Path

import pytest

from shelfwise.cli import main
from shelfwise.lake import EVENTS, Lake, partition_file
from shelfwise.runtime import registry
from shelfwise.runtime.registry import (
    PRODUCTION_MODEL_NAME,
    RANKER_FILE,
    RANKER_INFO_FILE,
    RegistryError,
    describe_rankers,
    list_rankers,
    production,
    promote,
    register_ranker,
    rollback,
)
from shelfwise.settings import Settings


def register(home: Path, name: str, ndcg: float, fingerprint: str | None = None) -> str:
    return register_ranker(
        home,
        f"booster {name}",
        {"features": ["a", "b"], "name": name},
        {"ndcg@10": ndcg, "recall@20": ndcg * 2, "features": ["a", "b"], "best_iteration": 7},
        data_fingerprint=fingerprint,
        code="test-code",
    )


def production_booster(home: Path) -> str:
    """The booster text that `shelfwise_production:latest` (what the service loads) holds."""
    current = production(home)
    assert current is not None
    return (home / "models" / current.tag.replace(":", "/") / RANKER_FILE).read_text()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "bentoml"


@pytest.fixture
def three(home: Path) -> tuple[str, str, str]:
    """Three rankers; the first was promoted, as the pipeline does after its gate."""
    first = register(home, "A", 0.10, "sha256:a")
    promote(home, first)
    return first, register(home, "B", 0.20), register(home, "C", 0.30)


def test_an_empty_store_has_no_rankers_and_no_production(home):
    assert list_rankers(home) == []
    assert describe_rankers(home) == []
    assert production(home) is None


def test_rankers_carry_metrics_fingerprint_and_code_version(home):
    tag = register(home, "A", 0.1, "sha256:abc")
    [record] = describe_rankers(home)
    assert record.tag == tag and tag.startswith("shelfwise_ranker:")
    assert record.metrics == {"ndcg@10": 0.1, "recall@20": 0.2}
    assert record.data_fingerprint == "sha256:abc"
    assert record.code_version == "test-code"
    assert record.metadata["features"] == ["a", "b"]


def test_the_code_version_defaults_to_the_git_commit_or_package_version(home):
    tag = register_ranker(home, "booster", {"features": []}, {"ndcg@10": 0.1})
    [record] = describe_rankers(home)
    assert record.tag == tag
    assert record.code_version == registry.code_version()
    assert record.code_version and record.code_version != "unknown"


def test_registering_never_changes_production(home):
    first = register(home, "A", 0.1)
    assert production(home) is None
    promote(home, first)
    current = production(home)
    assert current is not None
    assert current.source_tag == first
    assert current.tag.startswith(f"{PRODUCTION_MODEL_NAME}:")
    assert current.action == "promote" and current.previous_source_tag is None
    assert current.metrics["ndcg@10"] == 0.1
    # Later rankers do not replace it by themselves.
    register(home, "B", 0.2)
    assert production(home).source_tag == first
    assert production_booster(home) == "booster A"


def test_promote_lists_production_and_copies_the_rankers_files(home, three):
    a, b, c = three
    assert list_rankers(home) == [c, b, a]
    new = promote(home, b)
    current = production(home)
    assert current.tag == new
    assert (current.source_tag, current.previous_source_tag, current.action) == (b, a, "promote")
    assert current.metrics["ndcg@10"] == 0.2
    assert [(r.tag, r.production) for r in describe_rankers(home)] == [
        (c, False),
        (b, True),
        (a, False),
    ]
    folder = home / "models" / new.replace(":", "/")
    assert (folder / RANKER_FILE).read_text() == "booster B"
    assert json.loads((folder / RANKER_INFO_FILE).read_text())["name"] == "B"


def test_production_reads_the_current_version_only(home, three):
    """The service asks for production every few seconds: it must not read every promotion's
    metadata (a store's history grows with each retraining), so a damaged old one is not read."""
    a, b, c = three
    oldest = production(home).tag
    promote(home, b)
    newest = promote(home, c)
    (home / "models" / oldest.replace(":", "/") / "model.yaml").unlink()

    current = production(home)
    assert (current.tag, current.source_tag) == (newest, c)


def test_promote_accepts_a_version_prefix_and_is_idempotent(home, three):
    versions = [tag.split(":")[1] for tag in three]
    c = three[2]
    # The shortest prefix of c's version that no other version shares.
    prefix = next(
        versions[2][:n]
        for n in range(1, len(versions[2]) + 1)
        if not any(v.startswith(versions[2][:n]) for v in versions[:2])
    )
    first = promote(home, prefix)
    assert production(home).source_tag == c
    assert promote(home, c) == first  # already production: no new version
    assert production(home).tag == first


def test_rollback_walks_back_through_the_promotions(home, three):
    a, b, c = three
    promote(home, b)
    promote(home, c)
    assert production_booster(home) == "booster C"

    rollback(home)
    current = production(home)
    assert (current.source_tag, current.previous_source_tag, current.action) == (b, a, "rollback")
    assert current.metadata["rolled_back_from"] == c
    assert production_booster(home) == "booster B"
    assert [r.tag for r in describe_rankers(home) if r.production] == [b]

    rollback(home)
    assert production(home).source_tag == a
    assert production_booster(home) == "booster A"
    with pytest.raises(RegistryError, match=f"nothing to roll back to: {a} is the first"):
        rollback(home)


def test_rollback_works_after_the_ranker_was_deleted(home, three):
    a, b, _ = three
    promote(home, b)
    registry._model_store(home).delete(a)
    rollback(home)
    assert production(home).source_tag == a
    assert production_booster(home) == "booster A"


def test_errors_name_the_tag(home, three):
    with pytest.raises(RegistryError, match="no ranker shelfwise_ranker:nope in the model store"):
        promote(home, "shelfwise_ranker:nope")
    with pytest.raises(RegistryError, match="shelfwise_production:latest is not a ranker"):
        promote(home, "shelfwise_production:latest")
    with pytest.raises(RegistryError, match="not a valid model tag"):
        promote(home, "Not A Tag!")


def test_rollback_without_production_is_an_error(home):
    with pytest.raises(RegistryError, match="nothing to roll back to: no production model"):
        rollback(home)


def test_data_fingerprints_follow_the_file_listing(tmp_path):
    assert registry.fingerprint_files({"a": 1, "b": 2}) == registry.fingerprint_files(
        [("b", 2), ("a", 1)]
    )
    assert registry.fingerprint_files({"a": 1}) != registry.fingerprint_files({"a": 2})
    lake = Lake(str(tmp_path / "lake"))
    empty = registry.lake_fingerprint(lake)
    part = partition_file(EVENTS, "2026-01-01", "part-0")
    Path(lake.path(part)).parent.mkdir(parents=True)
    Path(lake.path(part)).write_bytes(b"12345")
    first = registry.lake_fingerprint(lake)
    assert first != empty and first == registry.fingerprint_files({part: 5})
    Path(lake.path(partition_file(EVENTS, "2026-01-01", "part-1"))).write_bytes(b"1")
    assert registry.lake_fingerprint(lake) != first


# The command line.


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SHELFWISE_HOME (hence BENTOML_HOME) in tmp_path; returns the BentoML home."""
    monkeypatch.setenv("SHELFWISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHELFWISE_LAKE", raising=False)
    home = Settings.from_env().bentoml_home
    assert home == tmp_path / "home" / "bentoml"
    return home


def test_cli_lists_promotes_and_rolls_back(cli_home, capsys):
    assert main(["models", "list"]) == 0
    assert "No rankers" in capsys.readouterr().out

    a, b = register(cli_home, "A", 0.1, "sha256:aaaa"), register(cli_home, "B", 0.2)
    assert main(["models", "promote", a]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [marked] = [line for line in lines if line.startswith("* shelfwise_ranker:")]
    assert a in marked and "0.1000" in marked and "sha256:aaaa" in marked
    assert f"production: {a}" in lines[-1]

    assert main(["models", "promote", b]) == 0
    out = capsys.readouterr().out
    assert f"Promoted {b} to production" in out and f"previous: {a}" in out
    assert main(["models", "promote", b]) == 0
    assert "already production" in capsys.readouterr().out

    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["production"]["source_tag"] == b
    assert listed["production"]["previous_source_tag"] == a
    assert [(r["tag"], r["production"]) for r in listed["rankers"]] == [(b, True), (a, False)]
    assert listed["rankers"][1]["data_fingerprint"] == "sha256:aaaa"
    assert listed["rankers"][0]["metrics"]["ndcg@10"] == 0.2

    assert main(["models", "rollback"]) == 0
    assert f"Rolled production back from {b} to {a}" in capsys.readouterr().out
    assert production(cli_home).source_tag == a


def test_cli_errors_exit_2_with_the_tag_on_stderr(cli_home, capsys):
    assert main(["models", "rollback"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "shelfwise models rollback: nothing to roll back to" in captured.err

    a = register(cli_home, "A", 0.1)
    assert main(["models", "promote", a]) == 0
    capsys.readouterr()
    assert main(["models", "rollback"]) == 2
    err = capsys.readouterr().err
    assert "nothing to roll back to" in err and a in err

    assert main(["models", "promote", "shelfwise_ranker:missing"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "shelfwise models promote: no ranker shelfwise_ranker:missing" in captured.err
    assert production(cli_home).source_tag == a


def test_cli_models_needs_a_subcommand(cli_home, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["models"])
    assert exited.value.code == 2
    # promote takes a tag or --winner-of, exactly one of them
    assert main(["models", "promote"]) == 2
    assert "give either a TAG or --winner-of EXPERIMENT" in capsys.readouterr().err
