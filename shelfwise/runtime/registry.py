"""The model registry: rankers and the production model in the BentoML model store.

The store is opened at an explicit path, `<bentoml_home>/models` (never a process-wide default), so
a pipeline run, a test and the service each know exactly which store they use.

Rankers. Every trained ranker is saved as a new version of `shelfwise_ranker` with its metadata:
what the caller passes (metrics, training window, feature list), the fingerprint of the data it was
trained on (`data_fingerprint`, see `fingerprint_files` and `lake_fingerprint`) and the code version
(`code_version`: `git rev-parse HEAD` of the project, suffixed `-dirty` when tracked files are
modified, else the installed package version).

Production. BentoML models are immutable once created (labels and metadata included), so being
"production" cannot be a flag on a ranker. Instead a promotion copies the chosen ranker's files
into a new version of a second model, `shelfwise_production`; its `latest` version *is* production.
That makes `bentoml.models.BentoModel("shelfwise_production:latest")` the production ranker for
the service, and `bentoml build` packs exactly that. Each production version's metadata holds a
copy of the ranker's metadata (metrics, window, fingerprint, code version) plus:

- `source_tag`: the ranker it serves (`shelfwise_ranker:<version>`);
- `previous_source_tag`, `previous_production`: the ranker and the `shelfwise_production` version
  that were production before it (absent for the first one);
- `action`: `promote` or `rollback`; a rollback also records `rolled_back_from`.

The production versions thus form a stack. `rollback` re-publishes the production version that was
live before the current one (its files and its own `previous_*` links), so repeated rollbacks walk
further back (C → B → A), and rolling back the first production is an error. Rolling back copies
the files of that earlier production version, so it works even if the ranker was deleted since.
The history stays in the store (`bentoml models list shelfwise_production`).

Extra files. `promote` takes an optional `add_files(model_text, folder)`, called on the new
production version's folder before it is sealed: the pipeline passes
`models.compiled_ranker.write_compiled`, so production carries the ranker compiled to machine code
and the bento ships it. The registry knows nothing of it (the core imports no `models`); a
failing hook is logged and the promotion goes on without its files. A rollback copies the earlier
production version's files, its compiled library included.

Registering a ranker never changes production: a ranker reaches production only through
`promote` (in the pipeline, the `production_model` asset, after the promotion gate).

Promotions are not guarded against concurrent writers: run one promotion at a time per store.
"""

import hashlib
import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from shelfwise.lake import EVENTS, Lake

RANKER_MODEL_NAME = "shelfwise_ranker"
PRODUCTION_MODEL_NAME = "shelfwise_production"
RANKER_FILE = "model.txt"
RANKER_INFO_FILE = "model.json"

# When the ranker's feature build read the lake (ISO time, in the ranker's metadata).
DATA_READ_AT = "data_read_at"

# Keys the registry writes into a production version's metadata (on top of the ranker's).
SOURCE_TAG = "source_tag"
PREVIOUS_SOURCE_TAG = "previous_source_tag"
PREVIOUS_PRODUCTION = "previous_production"
ACTION = "action"
ROLLED_BACK_FROM = "rolled_back_from"
PRODUCTION_KEYS = (SOURCE_TAG, PREVIOUS_SOURCE_TAG, PREVIOUS_PRODUCTION, ACTION, ROLLED_BACK_FROM)
# Keys the registry writes into a ranker's metadata.
DATA_FINGERPRINT = "data_fingerprint"
CODE_VERSION = "code_version"

# BentoML's own files in a model folder; everything else is the ranker's and gets copied.
_BENTOML_FILES = frozenset({"model.yaml", "custom_objects.pkl"})
_PROJECT_ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger(__name__)

# Adds files to a new production version's folder: called with the ranker's text and the folder.
AddFiles = Callable[[str, Path], None]


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown tag, nothing to roll back to)."""


@dataclass(frozen=True)
class RankerRecord:
    """A registered ranker as listed by `describe_rankers`.

    Attributes:
        tag: `shelfwise_ranker:<version>`.
        created_at: When it was registered (UTC).
        metrics: Its evaluation metrics (see `metrics_of`).
        data_fingerprint: Fingerprint of the data it was trained on, when recorded.
        code_version: The code that trained it, when recorded.
        production: Whether it is the ranker production serves.
        metadata: Its full metadata.
    """

    tag: str
    created_at: datetime
    metrics: dict[str, float]
    data_fingerprint: str | None
    code_version: str | None
    production: bool
    metadata: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class ProductionModel:
    """The current production model.

    Attributes:
        tag: The `shelfwise_production:<version>` the service loads.
        source_tag: The ranker it serves, `shelfwise_ranker:<version>`.
        previous_source_tag: The ranker that was production before, if any.
        action: `promote` or `rollback`.
        promoted_at: When this production version was created (UTC).
        metrics: The source ranker's metrics (see `metrics_of`).
        metadata: The production version's full metadata.
    """

    tag: str
    source_tag: str
    previous_source_tag: str | None
    action: str
    promoted_at: datetime
    metrics: dict[str, float]
    metadata: dict[str, Any] = field(repr=False)


def _model_store(bentoml_home: Path):  # noqa: ANN202 - BentoML's private type
    from bentoml._internal.models import ModelStore

    return ModelStore(str(bentoml_home / "models"))


def metrics_of(metadata: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation metrics in a model's metadata: its numeric `<metric>@<k>` entries.

    Args:
        metadata: A ranker's (or production version's) metadata.

    Returns:
        For example `{"ndcg@10": 0.175, "recall@20": 0.239, "popularity_ndcg@10": 0.033}`.
    """
    return {
        key: float(value)
        for key, value in metadata.items()
        if "@" in key and isinstance(value, int | float) and not isinstance(value, bool)
    }


def fingerprint_files(files: Mapping[str, int] | Iterable[tuple[str, int]]) -> str:
    """A fingerprint of a file listing: SHA-256 over the sorted (path, size) pairs.

    Args:
        files: Paths (relative to a fixed root) and their sizes in bytes.

    Returns:
        `sha256:<hex>`; the same for the same listing in any order.
    """
    pairs = files.items() if isinstance(files, Mapping) else files
    digest = hashlib.sha256()
    for path, size in sorted((str(p), int(s)) for p, s in pairs):
        digest.update(f"{path}\t{size}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def lake_fingerprint(lake: Lake, relpath: str = EVENTS) -> str:
    """Fingerprints the lake's ingested event files (their lake-relative paths and sizes).

    Args:
        lake: The lake.
        relpath: The dataset folder to fingerprint; the ingested events by default.

    Returns:
        `fingerprint_files` of the folder's Parquet files.
    """
    return fingerprint_files(
        (path, int(lake.fs.size(lake.path(path)))) for path in lake.list_files(relpath)
    )


def code_version() -> str:
    """The version of the code running: the project's git commit, else the package version.

    Returns:
        `git rev-parse HEAD` of the project checkout (with `-dirty` when tracked files differ from
        it), else the installed `shelfwise` version, else `unknown`.
    """
    try:
        top = _git("rev-parse", "--show-toplevel")
        if Path(top).resolve() == _PROJECT_ROOT:
            commit = _git("rev-parse", "HEAD")
            dirty = _git("status", "--porcelain", "--untracked-files=no")
            return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return package_metadata.version("shelfwise")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(_PROJECT_ROOT), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return result.stdout.strip()


def register_ranker(
    bentoml_home: Path,
    model_text: str,
    info: dict[str, Any],
    metadata: dict[str, Any],
    *,
    data_fingerprint: str | None = None,
    code: str | None = None,
) -> str:
    """Saves a trained ranker into the model store (promotion is a separate, gated step).

    Args:
        bentoml_home: The BentoML home holding the store.
        model_text: The LightGBM booster as text (`Booster.model_to_string`).
        info: What the service needs besides the booster (feature list, cutoffs), saved as JSON.
        metadata: Plain values shown by `bentoml models get` (metrics, training window, features).
        data_fingerprint: Fingerprint of the training data (`lake_fingerprint`); recorded as
            `data_fingerprint` when given.
        code: The code version to record as `code_version`; `code_version()` when omitted.

    Returns:
        The model's tag, `shelfwise_ranker:<version>`.
    """
    import bentoml

    metadata = {**metadata, CODE_VERSION: code or code_version()}
    if data_fingerprint is not None:
        metadata[DATA_FINGERPRINT] = data_fingerprint
    with bentoml.models.create(
        RANKER_MODEL_NAME, metadata=metadata, _model_store=_model_store(bentoml_home)
    ) as model:
        Path(model.path, RANKER_FILE).write_text(model_text)
        Path(model.path, RANKER_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return str(model.tag)


def list_rankers(bentoml_home: Path) -> list[str]:
    """Tags of the rankers in the store, newest first (`describe_rankers` tells production)."""
    return [record.tag for record in describe_rankers(bentoml_home)]


def describe_rankers(bentoml_home: Path) -> list[RankerRecord]:
    """The rankers in the store with their metadata and which one is production, newest first.

    Args:
        bentoml_home: The BentoML home holding the store.

    Returns:
        One record per `shelfwise_ranker` version; at most one has `production` set.
    """
    current = production(bentoml_home)
    records = []
    for model in sorted(
        _versions(bentoml_home, RANKER_MODEL_NAME), key=lambda m: m.creation_time, reverse=True
    ):
        metadata = dict(model.info.metadata)
        records.append(
            RankerRecord(
                tag=str(model.tag),
                created_at=model.creation_time,
                metrics=metrics_of(metadata),
                data_fingerprint=metadata.get(DATA_FINGERPRINT),
                code_version=metadata.get(CODE_VERSION),
                production=current is not None and current.source_tag == str(model.tag),
                metadata=metadata,
            )
        )
    return records


def production(bentoml_home: Path) -> ProductionModel | None:
    """The current production model, or None before any ranker was registered.

    Args:
        bentoml_home: The BentoML home holding the store.

    Returns:
        `shelfwise_production:latest` described by its source ranker, or None.
    """
    model = _current_production(bentoml_home)
    if model is None:
        return None
    metadata = dict(model.info.metadata)
    return ProductionModel(
        tag=str(model.tag),
        source_tag=str(metadata.get(SOURCE_TAG, "")),
        previous_source_tag=metadata.get(PREVIOUS_SOURCE_TAG),
        action=str(metadata.get(ACTION, "promote")),
        promoted_at=model.creation_time,
        metrics=metrics_of(metadata),
        metadata=metadata,
    )


def promote(bentoml_home: Path, tag: str, add_files: AddFiles | None = None) -> str:
    """Makes a registered ranker production (a new `shelfwise_production` version).

    Promoting the ranker that is already production changes nothing.

    Args:
        bentoml_home: The BentoML home holding the store.
        tag: The ranker: `shelfwise_ranker:<version>` (a unique version prefix is enough),
            `shelfwise_ranker:latest`, or the bare version.
        add_files: Called with the ranker's text and the new version's folder before it is
            sealed, to add files beside the ranker's (the compiled ranker); an exception it
            raises is logged and the promotion goes on without them.

    Returns:
        The production version now live, `shelfwise_production:<version>`.

    Raises:
        RegistryError: The tag is not a ranker in this store.
    """
    ranker = _get_ranker(bentoml_home, tag)
    current = _current_production(bentoml_home)
    if current is not None and current.info.metadata.get(SOURCE_TAG) == str(ranker.tag):
        return str(current.tag)
    return _publish(bentoml_home, ranker, action="promote", previous=current, add_files=add_files)


def rollback(bentoml_home: Path) -> str:
    """Restores the production version that was live before the current one.

    Args:
        bentoml_home: The BentoML home holding the store.

    Returns:
        The production version now live, `shelfwise_production:<version>`, serving the previous
        production's ranker (`production(bentoml_home).source_tag`).

    Raises:
        RegistryError: There is no production model, the current one is the first production (so
            there is nothing to roll back to), or the earlier production version was deleted.
    """
    import bentoml

    current = _current_production(bentoml_home)
    if current is None:
        raise RegistryError(
            f"nothing to roll back to: no production model in {bentoml_home / 'models'}"
        )
    metadata = current.info.metadata
    source = metadata.get(SOURCE_TAG)
    earlier_tag = metadata.get(PREVIOUS_PRODUCTION)
    if not earlier_tag:
        raise RegistryError(
            f"nothing to roll back to: {source} is the first production ranker ({current.tag})"
        )
    try:
        earlier = _model_store(bentoml_home).get(earlier_tag)
    except bentoml.exceptions.BentoMLException:
        raise RegistryError(
            f"cannot roll back from {source}: the previous production version {earlier_tag} "
            f"(serving {metadata.get(PREVIOUS_SOURCE_TAG)}) is no longer in the store; "
            "promote a ranker explicitly"
        ) from None
    restored = {
        **earlier.info.metadata,
        ACTION: "rollback",
        ROLLED_BACK_FROM: str(source),
    }
    return _create_production(bentoml_home, Path(earlier.path), restored)


def _versions(bentoml_home: Path, name: str) -> list[Any]:
    import bentoml

    if not (bentoml_home / "models" / name).is_dir():
        return []
    try:
        return list(_model_store(bentoml_home).list(name))
    except bentoml.exceptions.NotFound:
        return []


def _current_production(bentoml_home: Path) -> Any | None:  # noqa: ANN401 - BentoML's Model
    import bentoml

    # Not `_versions`: listing reads every version's metadata (one per promotion or rollback),
    # and the service asks this every `model_poll_s` on a thread that shares the GIL with its
    # requests. `latest` reads one.
    if not (bentoml_home / "models" / PRODUCTION_MODEL_NAME).is_dir():
        return None
    try:
        return _model_store(bentoml_home).get(f"{PRODUCTION_MODEL_NAME}:latest")
    except bentoml.exceptions.NotFound:
        return None


def _get_ranker(bentoml_home: Path, tag: str) -> Any:  # noqa: ANN401 - BentoML's Model
    import bentoml

    text = tag.strip()
    if text and ":" not in text and text != RANKER_MODEL_NAME:
        text = f"{RANKER_MODEL_NAME}:{text}"  # a bare version
    try:
        parsed = bentoml.Tag.from_taglike(text)
    except (ValueError, bentoml.exceptions.BentoMLException) as error:
        raise RegistryError(f"{tag!r} is not a valid model tag: {error}") from None
    if parsed.name != RANKER_MODEL_NAME:
        raise RegistryError(
            f"{tag} is not a ranker: only {RANKER_MODEL_NAME} versions can be promoted"
        )
    try:
        return _model_store(bentoml_home).get(parsed)
    except bentoml.exceptions.NotFound:
        store = bentoml_home / "models"
        raise RegistryError(f"no ranker {tag} in the model store {store}") from None
    except bentoml.exceptions.BentoMLException as error:  # e.g. an ambiguous version prefix
        raise RegistryError(f"cannot resolve ranker {tag}: {error}") from None


def _publish(
    bentoml_home: Path,
    ranker: Any,  # noqa: ANN401
    *,
    action: str,
    previous: Any | None,  # noqa: ANN401
    add_files: AddFiles | None = None,
) -> str:
    metadata = {
        key: value for key, value in ranker.info.metadata.items() if key not in PRODUCTION_KEYS
    }
    metadata[SOURCE_TAG] = str(ranker.tag)
    metadata[ACTION] = action
    if previous is not None:
        metadata[PREVIOUS_SOURCE_TAG] = str(previous.info.metadata.get(SOURCE_TAG, ""))
        metadata[PREVIOUS_PRODUCTION] = str(previous.tag)
    return _create_production(bentoml_home, Path(ranker.path), metadata, add_files)


def _create_production(
    bentoml_home: Path,
    source_dir: Path,
    metadata: dict[str, Any],
    add_files: AddFiles | None = None,
) -> str:
    import bentoml

    with bentoml.models.create(
        PRODUCTION_MODEL_NAME, metadata=metadata, _model_store=_model_store(bentoml_home)
    ) as model:
        for entry in source_dir.iterdir():
            if entry.name in _BENTOML_FILES:
                continue
            target = Path(model.path, entry.name)
            if entry.is_dir():
                shutil.copytree(entry, target)
            else:
                shutil.copy2(entry, target)
        if add_files is not None:
            try:
                add_files(Path(model.path, RANKER_FILE).read_text(), Path(model.path))
            except Exception:  # the extra files are optional; the ranker is what production is
                logger.exception("Could not add files to %s: promoted without them", model.tag)
    return str(model.tag)


def production_ranker(bentoml_home: Path) -> tuple[str, dict[str, Any]] | None:
    """The production ranker's booster text and info (feature list, cutoffs).

    Args:
        bentoml_home: The BentoML home holding the store.

    Returns:
        `(model_text, info)`, or None when nothing is in production yet.
    """
    current = production(bentoml_home)
    if current is None:
        return None
    return read_ranker(Path(_model_store(bentoml_home).get(current.tag).path))


def read_ranker(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """A model folder's booster text and info (feature list, cutoffs).

    Args:
        model_dir: A ranker's folder in the model store (registered or production).

    Returns:
        `(model_text, info)`.
    """
    info = json.loads(Path(model_dir, RANKER_INFO_FILE).read_text())
    return Path(model_dir, RANKER_FILE).read_text(), info


def registered_ranker(bentoml_home: Path, tag: str) -> tuple[str, str, dict[str, Any]]:
    """A registered ranker's full tag, booster text and info (feature list, segment policy).

    Args:
        bentoml_home: The BentoML home holding the store.
        tag: `shelfwise_ranker:<version>` (a unique version prefix is enough),
            `shelfwise_ranker:latest`, or the bare version (as `promote` takes it).

    Returns:
        `(tag, model_text, info)`, the tag resolved to the full version.

    Raises:
        RegistryError: The tag is not a ranker in this store.
    """
    ranker = _get_ranker(bentoml_home, tag)
    text, info = read_ranker(Path(ranker.path))
    return str(ranker.tag), text, info


def production_path(bentoml_home: Path) -> Path:
    """The folder of the current production model in the store (booster and info files).

    Raises:
        RegistryError: Nothing is in production yet.
    """
    current = production(bentoml_home)
    if current is None:
        raise RegistryError("no model is in production yet")
    return Path(_model_store(bentoml_home).get(current.tag).path)
