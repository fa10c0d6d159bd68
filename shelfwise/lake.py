"""The lake: one root (a local folder or `s3://bucket/prefix`) and the datasets under it.

Every read and write of lake data goes through `Lake`, so the same code serves a local folder and an
S3 bucket (through s3fs). Files are published atomically: written under a temporary name, then
renamed, so a reader never sees half a file.
"""

import io
import json
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

# Every path in the lake is named here, once; nothing else spells one. Typed readers and writers
# of the pipeline's artifacts (the cutoff plan, candidates by role, the ranker, the evaluation
# report, ...) are in `models.artifacts`, which uses these names.

# Dataset folders, relative to the lake root.
LANDING_EVENTS = "landing/events"
LANDING_ITEMS = "landing/items"
LANDING_USERS = "landing/users"
EVENTS = "events"
IMPRESSIONS = "impressions"
STOCK_UPDATES = "stock_updates"
# The feature rows of a sample of live /recommend requests (drift), date-partitioned like the
# impressions.
FEATURE_SAMPLES = "feature_samples"
ITEMS = "catalog/items"
USERS = "catalog/users"
QUARANTINE = "quarantine"
FEATURES = "features"
CANDIDATES = "candidates"
TRAINING = "training"
EVALUATION = "evaluation"
MODELS = "models"
GROUND_TRUTH = "ground_truth"
SERVING = "serving"
EXPERIMENTS_DIR = "experiments"

# Written just before dbt reads the events: its modification time (on the lake's clock) is when
# the feature build read them.
FEATURE_BUILD_MARKER = f"{FEATURES}/feature_build.json"
# The cutoffs of the last feature build (as_of, role); `models.artifacts.load_plan` reads them.
FEATURE_CUTOFFS = f"{FEATURES}/feature_cutoffs.parquet"
# The training and evaluation queries the `candidates` asset drew (role, as_of, user_id): the
# evaluation scores the ranker and every baseline on exactly these users.
SAMPLED_QUERIES = f"{CANDIDATES}/queries.parquet"
# The generator sizes the candidates were made with: the serving snapshot's re-buy rule uses the
# same repeat-rate threshold as the run's buy-again generator.
CANDIDATE_CONFIG = f"{CANDIDATES}/config.json"
# Each cutoff's collaborative model as a neighbour table (as_of, item_id, neighbour_item_id,
# score): its strongest weights per item, which the serving snapshot exports.
ITEM_COLLABORATIVE = f"{CANDIDATES}/item_collaborative.parquet"
TRAINING_SET = f"{TRAINING}/training_set.parquet"
RANKER_MODEL = f"{MODELS}/ranker/model.txt"
RANKER_INFO = f"{MODELS}/ranker/model.json"
# The early-stopped ranker that never saw the validation window, kept when the ranker was refit
# on it (`refit_with_validation`): the segment policy is chosen with it on that window.
VALIDATION_RANKER_MODEL = f"{MODELS}/ranker/validation_model.txt"
EVALUATION_REPORT = f"{EVALUATION}/metrics.json"
EVALUATION_MARKDOWN = f"{EVALUATION}/report.md"
EVALUATION_CHART = f"{EVALUATION}/report.png"
# The serving snapshot, as of the end of the data.
SERVING_CANDIDATES = f"{SERVING}/candidate_features.parquet"
SERVING_POPULAR = f"{SERVING}/popular_items.parquet"
SERVING_NEIGHBOURS = f"{SERVING}/neighbours.parquet"
SERVING_ITEMS = f"{SERVING}/items.parquet"
SERVING_PURCHASES = f"{SERVING}/purchases.parquet"
# The compact serving state the service holds (`models.user_state`): one value per user and the
# item table those values refer to.
SERVING_USER_STATES = f"{SERVING}/user_states.parquet"
SERVING_STATE_ITEMS = f"{SERVING}/state_items.parquet"
# The zstd dictionary the values are compressed with, trained for the snapshot (empty: none).
SERVING_STATE_DICTIONARY = f"{SERVING}/state_dictionary.zstd"
# The neighbours indexed by those items' codes (`models.neighbour_arrays`), so a worker loads
# arrays instead of sorting and grouping the neighbour rows.
SERVING_NEIGHBOUR_ARRAYS = f"{SERVING}/neighbour_arrays.npz"
# Each known user's candidates as the production ranker ranks them (`models.ranked_lists`),
# row-aligned with the user states.
SERVING_RANKED_LISTS = f"{SERVING}/ranked_lists.parquet"
# Online experiments (`shelfwise.experiments`): the book the CLI writes and every replica polls,
# the rankers of its arms copied at start (so a replica needs no model store of its own), and
# the latest results the pipeline computed (which the service shows on its inspector page).
EXPERIMENTS = f"{EXPERIMENTS_DIR}/experiments.json"
EXPERIMENT_ARMS = f"{EXPERIMENTS_DIR}/arms"
EXPERIMENT_RESULTS = f"{EXPERIMENTS_DIR}/results.json"


def experiment_arm_ranker(experiment: str, arm: str) -> tuple[str, str]:
    """The ranker of an experiment's arm as copied at start: its model text and its info JSON.

    `experiments/arms/<experiment>/<arm>/model.txt` and `.../model.json` (the files of a model
    store folder, see `shelfwise.runtime.registry`); names never hold a `/`
    (`shelfwise.experiments.Name`).
    """
    folder = f"{EXPERIMENT_ARMS}/{experiment}/{arm}"
    return f"{folder}/model.txt", f"{folder}/model.json"


def feature_table(name: str) -> str:
    """The file of a dbt mart (`features/<name>.parquet`)."""
    return f"{FEATURES}/{name}.parquet"


def candidates_file(role: str) -> str:
    """The candidates of a role: training, evaluation or serving."""
    return f"{CANDIDATES}/{role}.parquet"


def ground_truth_table(name: str) -> str:
    """A table of the demo generator's hidden ground truth (never present for real data)."""
    return f"{GROUND_TRUTH}/{name}.parquet"


def dataset_file(dataset: str, name: str) -> str:
    """A file directly in a dataset folder (a landing batch, a catalog file)."""
    return f"{dataset}/{name}.parquet"


def catalog_file(dataset: str) -> str:
    """The current catalog of a catalog dataset (`ITEMS` or `USERS`): one file, replaced whole."""
    return dataset_file(dataset, "catalog")


# A zero-row file keeps the impressions dataset readable before the service logged anything; its
# date is far outside any real data.
EMPTY_IMPRESSIONS = f"{IMPRESSIONS}/date=1970-01-01/empty.parquet"


def partition_file(dataset: str, day: object, name: str) -> str:
    """A file of a date-partitioned dataset (`<dataset>/date=<day>/<name>.parquet`)."""
    return f"{dataset}/date={day}/{name}.parquet"


def partition_day(relpath: str) -> str | None:
    """The `date=` partition of a lake path, as written by `partition_file`; None outside one."""
    for part in relpath.split("/"):
        if part.startswith("date="):
            return part.removeprefix("date=")
    return None


def quarantine_file(dataset: str, name: str) -> str:
    """Rows set aside from a dataset (`quarantine/<dataset>/<name>.parquet`), with a reason each."""
    return f"{quarantine_folder(dataset)}/{name}.parquet"


def quarantine_folder(dataset: str) -> str:
    """Every `quarantine_file` of a dataset (`quarantine/<dataset>`), read together."""
    return f"{QUARANTINE}/{dataset}"


class Lake:
    """A lake root with atomic Parquet and JSON I/O.

    Args:
        url: A local path or an `s3://bucket/prefix` URL.
        storage_options: Extra options for the fsspec filesystem (for example an S3 endpoint).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.protocol = "s3" if self.url.startswith("s3://") else "file"
        self.storage_options = storage_options or {}
        self.fs: fsspec.AbstractFileSystem = fsspec.filesystem(
            self.protocol, **self.storage_options
        )
        self._root = self.url.removeprefix("s3://") if self.protocol == "s3" else self.url

    def uri(self, relpath: str = "") -> str:
        """The full URL of a path in the lake (what DuckDB and users see)."""
        return posixpath.join(self.url, relpath) if relpath else self.url

    def path(self, relpath: str = "") -> str:
        """The filesystem path of a path in the lake (what `self.fs` takes)."""
        return posixpath.join(self._root, relpath) if relpath else self._root

    def exists(self, relpath: str) -> bool:
        """Whether a file or folder exists in the lake."""
        return self.fs.exists(self.path(relpath))

    def list_files(self, relpath: str, suffix: str = ".parquet") -> list[str]:
        """Files under a folder (recursively), as lake-relative paths, sorted.

        Args:
            relpath: The folder, relative to the lake root.
            suffix: Only files whose name ends with this.

        Returns:
            Sorted lake-relative paths; empty when the folder does not exist.
        """
        base = self.path(relpath)
        if not self.fs.exists(base):
            return []
        root = self.path().rstrip("/") + "/"
        found = [p for p in self.fs.find(base) if p.endswith(suffix)]
        return sorted(p.removeprefix(root) for p in found)

    def list_modified(self, relpath: str, suffix: str = ".parquet") -> dict[str, datetime]:
        """Files under a folder (recursively) with their modification times (UTC).

        Args:
            relpath: The folder, relative to the lake root.
            suffix: Only files whose name ends with this.

        Returns:
            Lake-relative path → last modified; empty when the folder does not exist.
        """
        base = self.path(relpath)
        if not self.fs.exists(base):
            return {}
        root = self.path().rstrip("/") + "/"
        found = {}
        for path, info in self.fs.find(base, detail=True).items():
            if path.endswith(suffix):
                found[path.removeprefix(root)] = _modified_at(info)
        return found

    def write_parquet(self, table: pa.Table, relpath: str) -> str:
        """Writes a Parquet file atomically (temporary name, then rename).

        Args:
            table: The rows to write.
            relpath: Target file, relative to the lake root.

        Returns:
            The lake-relative path written.
        """
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self._publish(buffer.getvalue(), relpath)
        return relpath

    def write_parquet_tables(
        self, tables: Iterable[pa.Table], relpath: str, schema: pa.Schema | None = None
    ) -> int:
        """Streams tables into one Parquet file, published atomically when all are written.

        For outputs too large to hold at once: each table becomes row groups of the file as it
        arrives, so memory holds one table, never the file. The file is written under a
        temporary name and renamed when complete (on S3: a multipart upload, then a move), as
        `write_parquet` does, so a reader never sees half a file and a failure leaves the
        previous file in place.

        Args:
            tables: The rows, in order. Each must have the schema (or be castable to it).
            relpath: Target file, relative to the lake root.
            schema: The file's schema; by default the first table's. Needed when there may be
                no table at all (the file is then empty, with this schema).

        Returns:
            The number of rows written.

        Raises:
            ValueError: No table and no schema were given.
        """
        target = self.path(relpath)
        folder = posixpath.dirname(target)
        temporary = posixpath.join(folder, f"_tmp-{uuid.uuid4().hex}")
        if self.protocol == "file":
            self.fs.makedirs(folder, exist_ok=True)
        rows = 0
        try:
            with self.fs.open(temporary, "wb") as handle:
                writer: pq.ParquetWriter | None = None
                try:
                    for table in tables:
                        if writer is None:
                            schema = schema or table.schema
                            writer = pq.ParquetWriter(handle, schema, compression="zstd")
                        if not table.schema.equals(schema):
                            table = table.cast(schema)
                        writer.write_table(table)
                        rows += table.num_rows
                    if writer is None:
                        if schema is None:
                            raise ValueError(f"no table and no schema for {self.uri(relpath)}")
                        writer = pq.ParquetWriter(handle, schema, compression="zstd")
                finally:
                    if writer is not None:
                        writer.close()
            self.fs.mv(temporary, target)
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise
        return rows

    def iter_parquet(
        self, relpath: str, batch_rows: int, columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """Reads a Parquet file in batches of rows, in file order, without loading it whole.

        Args:
            relpath: A Parquet file, relative to the lake root.
            batch_rows: The most rows per batch (batches do not cross row groups, so some are
                smaller).
            columns: Only these columns, when given.

        Yields:
            Consecutive tables of the file's rows; one empty table (with the file's schema) when
            the file has no rows, so that a consumer still sees the columns.
        """
        with self.fs.open(self.path(relpath), "rb") as handle:
            # Single-threaded decoding, as in `_read_file`.
            parquet = pq.ParquetFile(handle)
            empty = True
            for batch in parquet.iter_batches(
                batch_size=batch_rows, columns=columns, use_threads=False
            ):
                empty = False
                yield pa.Table.from_batches([batch])
            if empty:
                schema = parquet.schema_arrow
                if columns is not None:
                    schema = pa.schema([schema.field(name) for name in columns])
                yield pa.Table.from_batches([], schema=schema)  # empty_table imports pandas

    def write_text(self, text: str, relpath: str) -> str:
        """Writes a text file atomically."""
        self._publish(text.encode(), relpath)
        return relpath

    def read_text(self, relpath: str) -> str:
        """Reads a text file."""
        with self.fs.open(self.path(relpath), "rb") as handle:
            return handle.read().decode()

    def write_bytes(self, data: bytes, relpath: str) -> str:
        """Writes a binary file atomically."""
        self._publish(data, relpath)
        return relpath

    def read_bytes(self, relpath: str) -> bytes:
        """Reads a binary file."""
        with self.fs.open(self.path(relpath), "rb") as handle:
            return handle.read()

    def write_json(self, payload: Any, relpath: str) -> str:
        """Writes a JSON document atomically."""
        self._publish(json.dumps(payload, indent=2, default=str).encode(), relpath)
        return relpath

    def read_json(self, relpath: str) -> Any:
        """Reads a JSON document."""
        with self.fs.open(self.path(relpath), "rb") as handle:
            return json.loads(handle.read())

    def read_table(self, relpath: str, columns: list[str] | None = None) -> pa.Table:
        """Reads a Parquet file or a (hive-partitioned) folder of them.

        Args:
            relpath: A file or folder, relative to the lake root.
            columns: Only these columns, when given.

        Returns:
            The rows; a partition folder `key=value` becomes a column `key`.

        Raises:
            FileNotFoundError: Nothing is stored at that path.
        """
        target = self.path(relpath)
        if not self.fs.exists(target):
            raise FileNotFoundError(f"nothing in the lake at {self.uri(relpath)}")
        if relpath.endswith(".parquet"):
            return self._read_file(target, columns)
        files = self.list_files(relpath)
        if not files:
            raise FileNotFoundError(f"no Parquet files in the lake under {self.uri(relpath)}")
        tables = []
        for file in files:
            partitions = dict(
                part.split("=", 1)
                for part in posixpath.dirname(file.removeprefix(relpath)).split("/")
                if "=" in part
            )
            file_columns = None if columns is None else [c for c in columns if c not in partitions]
            table = self._read_file(self.path(file), file_columns)
            for key, value in partitions.items():
                if columns is None or key in columns:
                    table = table.append_column(
                        key, pa.array([value] * table.num_rows, pa.string())
                    )
            tables.append(table)
        return pa.concat_tables(tables, promote_options="default")

    def parquet_schema(self, relpath: str) -> pa.Schema:
        """The Arrow schema of a Parquet file (with its metadata), from its footer."""
        with self.fs.open(self.path(relpath), "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow

    def parquet_rows(self, relpath: str) -> int:
        """The row count of a Parquet file, from its footer."""
        with self.fs.open(self.path(relpath), "rb") as handle:
            handle.seek(-8, 2)
            footer_length = int.from_bytes(handle.read(4), "little")
            handle.seek(-(footer_length + 8), 2)
            footer = handle.read(footer_length + 8)
        return pq.read_metadata(pa.BufferReader(footer)).num_rows

    def _read_file(self, path: str, columns: list[str] | None) -> pa.Table:
        # Single-threaded: Arrow's decoding threads next to polars' can abort the interpreter at
        # exit ("terminate called without an active exception"), seen with pyarrow 26 + polars 2.1.
        return pq.read_table(
            pa.BufferReader(self.fs.cat_file(path)), columns=columns, use_threads=False
        )

    def read_frame(self, relpath: str, columns: list[str] | None = None) -> pl.DataFrame:
        """Reads a Parquet file or folder as a polars DataFrame (see `read_table`)."""
        return pl.from_arrow(self.read_table(relpath, columns=columns))

    def remove(self, relpaths: Iterable[str]) -> None:
        """Deletes files from the lake (missing ones are ignored)."""
        for relpath in relpaths:
            if self.fs.exists(self.path(relpath)):
                self.fs.rm(self.path(relpath))

    def _publish(self, data: bytes, relpath: str) -> None:
        target = self.path(relpath)
        folder = posixpath.dirname(target)
        temporary = posixpath.join(folder, f"_tmp-{uuid.uuid4().hex}")
        if self.protocol == "file":
            self.fs.makedirs(folder, exist_ok=True)
        with self.fs.open(temporary, "wb") as handle:
            handle.write(data)
        self.fs.mv(temporary, target)


def _modified_at(info: dict) -> datetime:
    """A file's modification time from an fsspec listing (local: mtime; S3: LastModified)."""
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if isinstance(modified, datetime):
        return modified if modified.tzinfo else modified.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(modified), tz=UTC)
