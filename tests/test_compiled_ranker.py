"""The ranker compiled by lleaves scores like LightGBM (within 1e-6), on a LambdaRank model trained
here and on the pipeline's production model; LightGBM serves whenever compiling or loading fails;
the service says which engine serves."""

import hashlib
import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from models.compiled_ranker import (
    ENGINE_COMPILED,
    ENGINE_LIGHTGBM,
    LIBRARY_FILE,
    LIBRARY_INFO_FILE,
    PROBE_FILE,
    TOLERANCE,
    CompilationError,
    check_agreement,
    compile_library,
    load_library,
    load_ranker_engine,
)
from models.features import FEATURE_COLUMNS, feature_matrix
from models.ranker import RankerParams, booster_from_text, model_text, train_ranker
from shelfwise.lake import SERVING_CANDIDATES
from shelfwise.runtime.registry import (
    production_path,
    promote,
    read_ranker,
    register_ranker,
    rollback,
)


def synthetic_rows(queries: int, per_query: int, seed: int) -> pl.DataFrame:
    """Queries with graded labels that follow a few features, with missing values and zeros."""
    rng = np.random.default_rng(seed)
    n = queries * per_query
    data = {name: rng.normal(size=n).astype(np.float32) for name in FEATURE_COLUMNS}
    signal = data["user_item_interest"] + 0.6 * data["covisit_score"] + data["item_popularity"]
    label = np.digitize(signal + rng.normal(size=n), [1.5, 2.3, 3.0]).astype(np.int32)
    for column in list(data)[::5]:
        data[column][rng.random(n) < 0.2] = np.nan
        data[column][rng.random(n) < 0.1] = 0.0
    return pl.DataFrame(
        {
            "as_of": [datetime(2026, 1, 1, tzinfo=UTC)] * n,
            "user_id": np.repeat(np.arange(queries), per_query).astype(str),
            "label": label,
            **data,
        }
    )


@pytest.fixture(scope="module")
def trained_text() -> str:
    """A small LambdaRank ranker trained with the project's own functions."""
    params = RankerParams(num_boost_round=40, num_threads=1, min_data_in_leaf=20)
    return model_text(train_ranker(synthetic_rows(60, 100, seed=1), None, params))


@pytest.fixture(scope="module")
def compiled_folder(trained_text, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compiled")
    compile_library(trained_text, folder)
    return folder


def test_the_compiled_ranker_scores_like_lightgbm(trained_text, compiled_folder):
    booster = booster_from_text(trained_text)
    compiled = load_library(trained_text, compiled_folder)
    # One request's shape: 200 candidates × the feature vector, float32 as the recommender has it.
    rows = feature_matrix(synthetic_rows(1, 200, seed=2))
    assert rows.shape == (200, len(FEATURE_COLUMNS)) and np.isnan(rows).any()
    expected = booster.predict(rows, num_threads=1)
    # LambdaRank: LightGBM's predictions are the raw scores, and so are the compiled ones.
    assert np.array_equal(expected, booster.predict(rows, num_threads=1, raw_score=True))
    assert np.abs(compiled.predict(rows, num_threads=1) - expected).max() <= TOLERANCE
    assert np.ptp(expected) > 0.1  # a model that learned something, not constant scores
    # The probe rows (each side of every split threshold) agree too.
    assert check_agreement(compiled, booster) <= TOLERANCE
    info = json.loads((compiled_folder / LIBRARY_INFO_FILE).read_text())
    assert info["cpu"] in {"x86-64", "generic"}  # portable, never the build machine's CPU
    assert {"lleaves", "llvmlite", "triple", "model_sha256", "library_sha256"} <= set(info)


def test_the_service_path_compiles_once_then_loads_from_its_cache(trained_text, tmp_path):
    rows = feature_matrix(synthetic_rows(1, 200, seed=3))
    expected = booster_from_text(trained_text).predict(rows, num_threads=1)
    first = load_ranker_engine(trained_text, tmp_path / "shipped", tmp_path / "cache")
    assert (first.engine, first.source) == (ENGINE_COMPILED, "compiled")  # in a child process
    again = load_ranker_engine(trained_text, tmp_path / "shipped", tmp_path / "cache")
    assert (again.engine, again.source) == (ENGINE_COMPILED, "cache")
    for engine in (first, again):
        assert np.abs(engine.predictor.predict(rows, num_threads=1) - expected).max() <= TOLERANCE


def test_a_shipped_library_is_used_without_compiling(trained_text, compiled_folder, tmp_path):
    def refuse(text, folder):
        raise AssertionError("compiled although a library was shipped")

    engine = load_ranker_engine(trained_text, compiled_folder, tmp_path, compiler=refuse)
    assert (engine.engine, engine.source) == (ENGINE_COMPILED, "shipped")


def test_lightgbm_serves_when_compilation_fails(trained_text, tmp_path):
    def broken(text, folder):
        raise CompilationError("no compiler here")

    rows = feature_matrix(synthetic_rows(1, 200, seed=4))
    engine = load_ranker_engine(trained_text, tmp_path / "none", tmp_path, compiler=broken)
    assert engine.engine == ENGINE_LIGHTGBM and "no compiler here" in engine.source
    assert engine.predictor is engine.booster
    expected = booster_from_text(trained_text).predict(rows, num_threads=1)
    assert np.array_equal(engine.predictor.predict(rows, num_threads=1), expected)


def test_a_corrupt_or_foreign_library_is_never_loaded(trained_text, compiled_folder, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in (LIBRARY_FILE, LIBRARY_INFO_FILE):
        (corrupt / name).write_bytes((compiled_folder / name).read_bytes())
    data = bytearray((corrupt / LIBRARY_FILE).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    (corrupt / LIBRARY_FILE).write_bytes(bytes(data))
    with pytest.raises(CompilationError, match="corrupt"):
        load_library(trained_text, corrupt)
    engine = load_ranker_engine(trained_text, corrupt, None)
    assert engine.engine == ENGINE_LIGHTGBM and "corrupt" in engine.source

    # A library compiled from another model is refused by its info, before LLVM sees it.
    other = trained_text.replace("learning_rate: 0.05", "learning_rate: 0.0501")
    assert other != trained_text
    with pytest.raises(CompilationError, match="model_sha256"):
        load_library(other, compiled_folder)
    # ...and with a cache, the service compiles the right one instead.
    recompiled = load_ranker_engine(other, compiled_folder, tmp_path / "cache")
    assert (recompiled.engine, recompiled.source) == (ENGINE_COMPILED, "compiled")


def test_a_library_with_its_probe_serves_without_lightgbm_until_an_explanation(
    trained_text, compiled_folder, tmp_path
):
    # A fresh interpreter, as a worker starting: nothing has imported LightGBM (nor pandas,
    # which lleaves is imported without) before.
    (tmp_path / "model.txt").write_text(trained_text)
    script = f"""
import json, sys
import numpy as np
from models.compiled_ranker import load_ranker_engine
engine = load_ranker_engine(open({str(tmp_path / "model.txt")!r}).read(), \
    __import__("pathlib").Path({str(compiled_folder)!r}), None, compiler=None)
before = "lightgbm" in sys.modules or "pandas" in sys.modules
rows = np.random.default_rng(7).normal(size=(3, engine.predictor.num_feature()))
contributions = engine.booster.predict(rows, pred_contrib=True, num_threads=1)
print(json.dumps({{"engine": engine.engine, "source": engine.source, "before": before,
    "after": "lightgbm" in sys.modules, "contributions": contributions.tolist(),
    "scores": engine.predictor.predict(rows).tolist(), "rows": rows.tolist()}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (seen["engine"], seen["source"]) == (ENGINE_COMPILED, "shipped")
    assert seen["before"] is False and seen["after"] is True
    # The contributions come from the booster loaded on demand: they sum to LightGBM's score.
    booster = booster_from_text(trained_text)
    rows = np.array(seen["rows"])
    expected = booster.predict(rows, pred_contrib=True, num_threads=1)
    assert np.allclose(seen["contributions"], expected)
    assert np.allclose(np.sum(seen["contributions"], axis=1), seen["scores"], atol=1e-6)


def copied(folder: Path, to: Path) -> Path:
    to.mkdir()
    for name in (LIBRARY_FILE, LIBRARY_INFO_FILE, PROBE_FILE):
        (to / name).write_bytes((folder / name).read_bytes())
    return to


def test_the_stored_probe_decides_and_lightgbm_checks_when_it_cannot(
    trained_text, compiled_folder, tmp_path
):
    # A probe whose scores are not the library's: the library is refused, LightGBM serves.
    wrong = copied(compiled_folder, tmp_path / "wrong")
    with np.load(wrong / PROBE_FILE) as probe:
        rows, scores = probe["rows"], probe["scores"]
    np.savez(wrong / PROBE_FILE, rows=rows, scores=scores + 1e-3)
    info = json.loads((wrong / LIBRARY_INFO_FILE).read_text())
    info["probe_sha256"] = hashlib.sha256((wrong / PROBE_FILE).read_bytes()).hexdigest()
    (wrong / LIBRARY_INFO_FILE).write_text(json.dumps(info))
    engine = load_ranker_engine(trained_text, wrong, None, compiler=None)
    assert engine.engine == ENGINE_LIGHTGBM and "differs from LightGBM" in engine.source

    # The stored probe serves: the booster is not loaded.
    engine = load_ranker_engine(trained_text, compiled_folder, None, compiler=None)
    assert engine.engine == ENGINE_COMPILED and not engine.booster.loaded
    # A corrupt probe, or one scored by another LightGBM version, cannot stand in for LightGBM:
    # LightGBM scores the probe rows now, and the (sound) library serves.
    corrupt = copied(compiled_folder, tmp_path / "corrupt")
    (corrupt / PROBE_FILE).write_bytes((corrupt / PROBE_FILE).read_bytes()[:-8] + b"\0" * 8)
    foreign = copied(compiled_folder, tmp_path / "foreign")
    info = json.loads((foreign / LIBRARY_INFO_FILE).read_text())
    (foreign / LIBRARY_INFO_FILE).write_text(json.dumps({**info, "probe_lightgbm": "0.1"}))
    missing = copied(compiled_folder, tmp_path / "missing")
    (missing / PROBE_FILE).unlink()
    for folder in (corrupt, foreign, missing):
        engine = load_ranker_engine(trained_text, folder, None, compiler=None)
        assert engine.engine == ENGINE_COMPILED and engine.booster.loaded, folder.name


def test_promotion_ships_the_compiled_ranker_and_survives_a_failing_hook(trained_text, tmp_path):
    from models.compiled_ranker import write_compiled

    home = tmp_path / "bentoml"
    info = {"features": FEATURE_COLUMNS}
    first = register_ranker(home, trained_text, info, {}, code="test")
    second = register_ranker(home, trained_text, info, {}, code="test")

    def failing(text, folder):
        raise RuntimeError("hook failed")

    promote(home, first, add_files=failing)  # promoted all the same, without extra files
    assert not (production_path(home) / LIBRARY_FILE).exists()
    promote(home, second, add_files=write_compiled)
    folder = production_path(home)
    assert (folder / LIBRARY_FILE).is_file() and (folder / PROBE_FILE).is_file()
    assert read_ranker(folder)[0] == trained_text
    assert load_library(trained_text, folder).predict(feature_matrix(synthetic_rows(1, 5, 5))).size
    rollback(home)  # back to the first production version, which had none
    assert not (production_path(home) / LIBRARY_FILE).exists()


def test_the_pipeline_production_model_ships_compiled_and_scores_like_lightgbm(pipeline_run):
    assert pipeline_run.result.success, pipeline_run.failures
    folder = production_path(pipeline_run.settings.bentoml_home)
    assert (folder / LIBRARY_FILE).is_file(), "production_model did not compile the ranker"
    text, info = read_ranker(folder)
    booster = booster_from_text(text)
    compiled = load_library(text, folder)
    snapshot = pipeline_run.lake.read_frame(SERVING_CANDIDATES)
    rows = snapshot.select(info["features"]).to_numpy().astype(np.float32)
    expected = booster.predict(rows, num_threads=1)
    assert np.abs(compiled.predict(rows, num_threads=1) - expected).max() <= TOLERANCE


def test_the_service_reports_its_ranker_engine(bento_server):
    metrics = httpx.get(f"{bento_server.url}/metrics", timeout=10).text
    engines = {
        engine: float(value)
        for engine, value in re.findall(
            r'^shelfwise_ranker_engine\{[^}]*engine="(\w+)"[^}]*\} ([0-9.]+)$', metrics, re.M
        )
    }
    assert engines.get(ENGINE_COMPILED) == 1.0, metrics[-3000:]
    assert engines.get(ENGINE_LIGHTGBM) == 0.0
