"""The ranker compiled to machine code with lleaves, and LightGBM whenever that is not possible.

lleaves turns a LightGBM model's text into LLVM IR and compiles it (through llvmlite's bundled
LLVM: no system compiler) into an object file that predicts the same scores as LightGBM, about
four times faster for one request's 200 candidates (docs/benchmarks.md).

- `compile_library` compiles a model's text into `LIBRARY_FILE` in a folder, beside
  `LIBRARY_INFO_FILE`: the model text's SHA-256, the object's SHA-256, the lleaves and llvmlite
  versions and the target it was compiled for; and `PROBE_FILE`, the probe rows with LightGBM's
  scores of them (their SHA-256 and the LightGBM version in the info). The pipeline does it when
  a ranker becomes production, so the production model's folder (and the bento) carries it.
- The target is portable, never the build machine's CPU (LLVM's default): the baseline of the
  architecture (`x86-64`, SSE2 only, on x86; `generic` elsewhere). On this machine that is as fast
  as code for its own CPU (docs/benchmarks.md), and it runs on any CPU of the architecture.
- `load_ranker_engine` is what the service calls: the shipped library when its info fits this
  process (same model, lleaves, llvmlite, target triple; object bytes unchanged), else a
  library compiled now in a child process (never in the serving process: LLVM holding the GIL
  for seconds, or crashing, must not touch requests) and cached by all of that, else LightGBM.
  A library is used only after it scored probe rows built from the model's own split
  thresholds (each side of every threshold, missing values) within `TOLERANCE` of LightGBM:
  of the scores LightGBM gave them when the library was compiled (`PROBE_FILE`, when the same
  LightGBM version is installed), else of LightGBM's scores now. So a worker serving the
  compiled ranker never imports LightGBM at start-up (about 0.5 s of its start on 2 cores); the
  booster is loaded when an explanation first needs it (`models.ranker.LazyBooster`).
  Any failure (import, compile, load, mismatch) is logged and serves LightGBM: compilation is an
  optimisation, never a reason not to serve.

Scores: lleaves is compiled with `raw_score=False`, as LightGBM's `predict` default, so both
apply the same objective transform; for LambdaRank that is none (the raw scores either way).
"""

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from models.ranker import LazyBooster, booster_from_text

if TYPE_CHECKING:  # LightGBM is imported where a booster is loaded (`models.ranker`)
    import lightgbm as lgb

logger = logging.getLogger(__name__)

LIBRARY_FILE = "ranker.lleaves.o"
LIBRARY_INFO_FILE = "ranker.lleaves.json"
# The probe rows (`probe_rows`) and LightGBM's scores of them, written with the library.
PROBE_FILE = "ranker.lleaves.probe.npz"

ENGINE_COMPILED = "compiled"
ENGINE_LIGHTGBM = "lightgbm"

# Largest difference allowed between the compiled ranker's scores and LightGBM's.
TOLERANCE = 1e-6
# A compilation in a child process that takes longer than this is given up (LightGBM serves).
COMPILE_TIMEOUT_S = 300.0
_PROBE_ROWS = 256
# LightGBM's kZeroThreshold (1e-35 as a float32): its predictor drops a dense row's values within
# it of 0, so they reach the trees as exactly 0 (a split at -kZeroThreshold tells them apart).
ZERO_THRESHOLD = float(np.float32(1e-35))


_LLEAVES_IMPORT = threading.Lock()


def import_lleaves() -> ModuleType:
    """lleaves, imported without pandas unless pandas is loaded already.

    lleaves imports pandas only to recognise DataFrames, and falls back to a stand-in class
    without it; this module hands it arrays only. In a serving worker nothing else needs pandas,
    which would be about 0.3 s and 32 MiB of its start-up (measured: docs/benchmarks.md). `None`
    in `sys.modules` makes `import pandas` raise ImportError, the import system's documented
    way to block a module, for the length of this import only.
    """
    with _LLEAVES_IMPORT:
        blocked = "pandas" not in sys.modules
        if blocked:
            sys.modules["pandas"] = None  # type: ignore[assignment]
        try:
            import lleaves
        finally:
            if blocked and sys.modules.get("pandas", False) is None:
                del sys.modules["pandas"]
    return lleaves


class CompilationError(RuntimeError):
    """The model could not be compiled, or a compiled library does not fit or disagrees."""


@dataclass
class CompiledRanker:
    """A LightGBM model compiled by lleaves, predicting like `lgb.Booster.predict`.

    Attributes:
        model: The compiled `lleaves.Model`.
        info: The library's info (see `library_info`).
    """

    model: Any
    info: dict[str, Any]

    def num_feature(self) -> int:
        """Features the model takes, in its order."""
        return int(self.model.num_feature())

    def predict(self, data: np.ndarray, num_threads: int = 1) -> np.ndarray:
        """Scores of the rows, as `lgb.Booster.predict(data, num_threads=...)` gives them.

        Args:
            data: Rows × the model's features (float32 or float64; NaN is missing).
            num_threads: Threads to split the rows over (1 for one request).

        Returns:
            One score per row, float64.
        """
        # A copy, C-contiguous as lleaves reads it: the caller's rows are never changed.
        rows = np.array(data, dtype=np.float64, order="C")
        if rows.ndim != 2 or rows.shape[1] != self.num_feature():
            raise ValueError(f"expected rows × {self.num_feature()} features, got {rows.shape}")
        # As LightGBM reads a dense row: values within ZERO_THRESHOLD of 0 are 0 (NaN stays NaN).
        rows[np.abs(rows) <= ZERO_THRESHOLD] = 0.0
        return self.model.predict(rows, n_jobs=max(1, int(num_threads)))


@dataclass(frozen=True)
class RankerEngine:
    """What predicts the ranker's scores in a process.

    Attributes:
        predictor: A `CompiledRanker` or the `lgb.Booster`; both `predict(rows, num_threads=1)`.
        booster: The LightGBM booster (what serves without compilation); a `LazyBooster`,
            loaded on first use, when the compiled ranker serves.
        engine: `ENGINE_COMPILED` or `ENGINE_LIGHTGBM`.
        source: Where the compiled library came from (`shipped`, `cache`, `compiled`), or why
            LightGBM serves.
    """

    predictor: Any
    booster: "lgb.Booster | LazyBooster"
    engine: str
    source: str


def compile_target() -> dict[str, str]:
    """The portable target of this process's architecture: its triple and baseline CPU."""
    import llvmlite.binding as llvm

    triple = llvm.get_process_triple()
    cpu = "x86-64" if triple.startswith(("x86_64", "amd64")) else "generic"
    return {"triple": triple, "cpu": cpu, "cpu_features": ""}


def text_sha256(model_text: str) -> str:
    """The SHA-256 of a model's text (what a library was compiled from)."""
    return hashlib.sha256(model_text.encode()).hexdigest()


def library_key(model_text: str) -> dict[str, str]:
    """What a library must have been compiled for to run in this process.

    Returns:
        The model text's SHA-256, the installed lleaves and llvmlite versions and the portable
        target (`compile_target`).
    """
    return {
        "model_sha256": text_sha256(model_text),
        "lleaves": metadata.version("lleaves"),
        "llvmlite": metadata.version("llvmlite"),
        **compile_target(),
    }


def compile_library(model_text: str, folder: Path) -> dict[str, Any]:
    """Compiles a model into `folder / LIBRARY_FILE`, with its info in `LIBRARY_INFO_FILE`.

    Both files are written under temporary names and renamed into place, so a reader never sees
    half a library (processes compiling the same model at once write the same bytes).

    Args:
        model_text: The model in LightGBM's text format.
        folder: Where to write the two files (created when missing).

    Returns:
        The library's info: `library_key`, the object's `library_sha256`, its size, the
        seconds the compilation took, and the probe's `probe_sha256` and `probe_lightgbm`.
    """
    lleaves = import_lleaves()

    folder.mkdir(parents=True, exist_ok=True)
    key = library_key(model_text)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".compile-") as scratch:
        model_file = Path(scratch, "model.txt")
        model_file.write_text(model_text)
        library = Path(scratch, LIBRARY_FILE)
        model = lleaves.Model(model_file=str(model_file))
        model.compile(
            cache=str(library),
            raw_score=False,
            target_cpu=key["cpu"],
            target_cpu_features=key["cpu_features"],
        )
        data = library.read_bytes()
        compile_seconds = time.perf_counter() - started
        probe = Path(scratch, PROBE_FILE)
        booster = booster_from_text(model_text)
        rows = probe_rows(booster)
        np.savez(probe, rows=rows, scores=booster.predict(rows, num_threads=1))
        info = {
            **key,
            "library_sha256": hashlib.sha256(data).hexdigest(),
            "library_bytes": len(data),
            "compile_seconds": round(compile_seconds, 3),
            "probe_sha256": hashlib.sha256(probe.read_bytes()).hexdigest(),
            "probe_lightgbm": metadata.version("lightgbm"),
        }
        info_file = Path(scratch, LIBRARY_INFO_FILE)
        info_file.write_text(json.dumps(info, indent=2))
        os.replace(library, folder / LIBRARY_FILE)
        os.replace(probe, folder / PROBE_FILE)  # the info last: it names both
        os.replace(info_file, folder / LIBRARY_INFO_FILE)
    return info


def load_library(model_text: str, folder: Path) -> CompiledRanker:
    """Loads the library compiled from `model_text` in `folder`, if it fits this process.

    Raises:
        CompilationError: No library there, or its info names another model, lleaves, llvmlite
            or target, or its bytes are not those it was compiled to (a corrupt object file is
            never handed to LLVM's loader).
    """
    lleaves = import_lleaves()

    library, info_file = folder / LIBRARY_FILE, folder / LIBRARY_INFO_FILE
    if not library.is_file() or not info_file.is_file():
        raise CompilationError(f"no compiled library in {folder}")
    info = json.loads(info_file.read_text())
    expected = library_key(model_text)
    differing = {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}
    if differing:
        raise CompilationError(f"library in {folder} was compiled for another {differing}")
    data = library.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.get("library_sha256"):
        raise CompilationError(f"library in {folder} is corrupt (SHA-256 differs)")
    with tempfile.TemporaryDirectory(prefix="shelfwise-ranker-") as scratch:
        model_file = Path(scratch, "model.txt")
        model_file.write_text(model_text)
        cached = Path(scratch, LIBRARY_FILE)
        cached.write_bytes(data)  # the bytes just checked, not the file that might change since
        model = lleaves.Model(model_file=str(model_file))
        model.compile(cache=str(cached), target_cpu=expected["cpu"], target_cpu_features="")
    if not model._execution_engine.get_function_address("forest_root"):
        raise CompilationError(f"library in {folder} has no forest_root")
    return CompiledRanker(model, info)


def probe_rows(booster: "lgb.Booster", rows: int = _PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """Rows that reach many leaves, drawn at random.

    Each feature is just below, at or just above one of its split thresholds, or missing (NaN),
    or 0.
    """
    rng = np.random.default_rng(seed)
    thresholds: dict[int, set[float]] = {}
    stack = [tree["tree_structure"] for tree in booster.dump_model()["tree_info"]]
    while stack:
        node = stack.pop()
        if "split_feature" not in node:
            continue
        if isinstance(node.get("threshold"), int | float):
            thresholds.setdefault(node["split_feature"], set()).add(float(node["threshold"]))
        stack += [node["left_child"], node["right_child"]]
    matrix = np.zeros((rows, booster.num_feature()), np.float64)
    for feature in range(booster.num_feature()):
        values = sorted(thresholds.get(feature, {0.0}))
        picks = np.array(values)[rng.integers(len(values), size=rows)]
        nudge = rng.choice([-1.0, 0.0, 1.0], size=rows) * np.maximum(np.abs(picks), 1.0) * 1e-6
        column = picks + nudge
        tiny = rng.random(rows) < 0.05  # LightGBM reads these as 0 (see ZERO_THRESHOLD)
        column[tiny] = rng.choice([-1.0, 1.0], size=int(tiny.sum())) * ZERO_THRESHOLD
        column[rng.random(rows) < 0.1] = np.nan
        column[rng.random(rows) < 0.05] = 0.0
        matrix[:, feature] = column
    return matrix


def check_agreement(compiled: CompiledRanker, booster: "lgb.Booster") -> float:
    """The largest score difference to LightGBM on `probe_rows`; raises beyond `TOLERANCE`.

    Raises:
        CompilationError: The compiled ranker disagrees with LightGBM.
    """
    rows = probe_rows(booster)
    return check_scores(compiled, rows, booster.predict(rows, num_threads=1))


def check_scores(compiled: CompiledRanker, rows: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference to LightGBM's scores of `rows`; raises beyond `TOLERANCE`.

    Raises:
        CompilationError: The compiled ranker disagrees with LightGBM, or takes other features.
    """
    if rows.ndim != 2 or compiled.num_feature() != rows.shape[1]:
        raise CompilationError(
            f"compiled ranker takes {compiled.num_feature()} features, LightGBM's {rows.shape}"
        )
    difference = float(np.max(np.abs(compiled.predict(rows) - expected)))
    if not difference <= TOLERANCE:  # NaN counts as a disagreement
        raise CompilationError(f"compiled ranker differs from LightGBM by {difference}")
    return difference


def stored_probe(folder: Path, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The probe rows and LightGBM's scores of them written with a library (`PROBE_FILE`).

    None when they cannot stand in for LightGBM's scores now: no probe (a library compiled
    before probes were stored), its bytes not those the info names, or scored by another
    LightGBM version than the one installed (which would serve in the library's stead).
    """
    probe = folder / PROBE_FILE
    if not probe.is_file() or info.get("probe_lightgbm") != metadata.version("lightgbm"):
        return None
    data = probe.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.get("probe_sha256"):
        logger.warning("Probe in %s is corrupt (SHA-256 differs): LightGBM scores it", folder)
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        return stored["rows"], stored["scores"]


def compile_in_subprocess(model_text: str, folder: Path) -> dict[str, Any]:
    """`compile_library` in a child Python (`python -m models.compiled_ranker`).

    A crash or a hang of LLVM ends the child, never the caller, and the caller's GIL stays free.

    Raises:
        CompilationError: The child failed or ran out of `COMPILE_TIMEOUT_S`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=folder, prefix=".model-") as file:
        file.write(model_text)
        file.flush()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "models.compiled_ranker", file.name, str(folder)],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
                env=env,
                cwd=root,
            )
        except subprocess.TimeoutExpired:
            raise CompilationError(f"compilation took over {COMPILE_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise CompilationError(
            f"compilation failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return json.loads(done.stdout)


def cache_folder(cache_dir: Path, model_text: str) -> Path:
    """The cache's folder for a model's library: named by everything the library depends on."""
    key = library_key(model_text)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / digest


def load_ranker_engine(
    model_text: str,
    shipped: Path | None,
    cache_dir: Path | None,
    compiler=compile_in_subprocess,  # noqa: ANN001 - a function like compile_library
) -> RankerEngine:
    """The fastest engine that scores like LightGBM for a model; LightGBM when nothing else can.

    Tries, in order: the library shipped in `shipped` (the production model's folder), one in
    `cache_dir` from an earlier start, one compiled now into `cache_dir`. Every library must
    score the probe rows as LightGBM does before it is used: `check_scores` against the stored
    probe (`stored_probe`), else `check_agreement` (LightGBM loaded now).

    Args:
        model_text: The model in LightGBM's text format.
        shipped: The folder that may hold a library compiled with the model, or None.
        cache_dir: Where libraries compiled here are kept, or None not to compile.
        compiler: Compiles a model's text into a folder (`compile_in_subprocess`); None looks
            for a library only (the service, which then compiles in the background).

    Returns:
        The engine; `engine` says which one predicts.
    """
    booster = LazyBooster(model_text)
    attempts: list[tuple[str, Path]] = []
    if shipped is not None:
        attempts.append(("shipped", shipped))
    cached = None
    if cache_dir is not None:
        try:
            cached = cache_folder(cache_dir, model_text)
            attempts.append(("cache", cached))
        except Exception as error:  # e.g. lleaves or llvmlite not installed
            logger.warning("Ranker not compiled (%s): LightGBM serves", error)
            loaded = booster.get()
            return RankerEngine(loaded, loaded, ENGINE_LIGHTGBM, f"unavailable: {error}")
    reasons = []
    for source, folder in attempts:
        try:
            return _checked(model_text, folder, booster, source)
        except Exception as error:
            reasons.append(f"{source}: {error}")
    if cached is not None and compiler is not None:
        logger.info("Compiling the ranker into %s (%s)", cached, "; ".join(reasons))
        try:
            compiler(model_text, cached)
            return _checked(model_text, cached, booster, "compiled")
        except Exception as error:
            reasons.append(f"compiled: {error}")
    reason = "; ".join(reasons) or "no library and nowhere to compile one"
    if compiler is None:
        logger.info("No compiled ranker fits (%s): LightGBM serves", reason)
    else:
        logger.warning("Compiled ranker unavailable (%s): LightGBM serves", reason)
    loaded = booster.get()
    return RankerEngine(loaded, loaded, ENGINE_LIGHTGBM, reason)


def _agreement(compiled: CompiledRanker, folder: Path, booster: LazyBooster) -> tuple[float, str]:
    """The compiled ranker's largest difference to LightGBM, and what it was checked against.

    The probe stored in `folder` when it can stand in for LightGBM, else LightGBM's scores now
    (the booster loaded).
    """
    probe = stored_probe(folder, compiled.info)
    if probe is not None:
        return check_scores(compiled, *probe), "its stored probe"
    return check_agreement(compiled, booster.get()), "LightGBM now"


def _checked(model_text: str, folder: Path, booster: LazyBooster, source: str) -> RankerEngine:
    compiled = load_library(model_text, folder)
    difference, against = _agreement(compiled, folder, booster)
    logger.info(
        "Compiled ranker (%s, %s) serves: %s, max difference to LightGBM %.1e (%s)",
        source,
        compiled.info.get("cpu"),
        folder,
        difference,
        against,
    )
    return RankerEngine(compiled, booster, ENGINE_COMPILED, source)


def write_compiled(model_text: str, folder: Path) -> None:
    """Adds the compiled library to a model's folder, if compilation works here (else logs).

    The hook the pipeline passes to `shelfwise.runtime.registry.promote`: the production model,
    and so the bento, carries its compiled form.
    """
    try:
        info = compile_library(model_text, folder)
        # Against the probe `compile_library` just scored with LightGBM, not a second booster.
        _agreement(load_library(model_text, folder), folder, LazyBooster(model_text))
        logger.info("Compiled the ranker in %.1f s into %s", info["compile_seconds"], folder)
    except Exception:  # the model stays usable through LightGBM; the service may compile later
        logger.exception("Could not compile the ranker into %s: it ships without", folder)
        for name in (LIBRARY_FILE, LIBRARY_INFO_FILE, PROBE_FILE):
            (folder / name).unlink(missing_ok=True)


def _main(argv: list[str]) -> None:
    """`python -m models.compiled_ranker MODEL_TEXT_FILE FOLDER`: compiles, prints the info."""
    model_file, folder = argv
    info = compile_library(Path(model_file).read_text(), Path(folder))
    sys.stdout.write(json.dumps(info) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1:])
