"""Writing landing files: names per source file, contract-conformed tables, event batches.

The event sink derives sessions by a 30-minute inactivity gap through DuckDB when a source has
none (see the package docstring).
"""

import hashlib
import posixpath
import re
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa

from shelfwise import lake as paths
from shelfwise.contracts import EVENTS_SCHEMA, conform
from shelfwise.intake.importers.columns import _EVENT_COLUMNS, _ORDINAL
from shelfwise.intake.importers.reading import _rebatch
from shelfwise.lake import Lake

SESSION_GAP = timedelta(minutes=30)

# Helper column of the staged events: the event time as epoch microseconds.
_TS = "_ts"


class _EventSink:
    """Writes canonical event batches to landing, deriving sessions through DuckDB if asked."""

    def __init__(self, lake: Lake, prefix: str, batch_rows: int, derive_sessions: bool) -> None:
        self.lake = lake
        self.prefix = prefix
        self.batch_rows = batch_rows
        self.derive_sessions = derive_sessions
        self.written: list[tuple[str, int]] = []
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        self._parts = 0

    def add(self, frame: pl.DataFrame) -> None:
        if not self.derive_sessions:
            self._write(frame)
            return
        if self._staging is None:
            self._staging = tempfile.TemporaryDirectory(prefix="shelfwise-import-")
        staged = frame.select(
            *[c for c in _EVENT_COLUMNS if c not in ("occurred_at", "session_id")],
            pl.col("occurred_at").dt.epoch("us").alias(_TS),
            pl.col(_ORDINAL),
        )
        staged.write_parquet(posixpath.join(self._staging.name, f"part-{self._parts:06d}.parquet"))
        self._parts += 1

    def close(self) -> list[tuple[str, int]]:
        if self.derive_sessions and self._staging is not None:
            for table in _rebatch(self._sessions(self._staging.name), self.batch_rows):
                frame = pl.from_arrow(table)
                assert isinstance(frame, pl.DataFrame)
                start = pl.from_epoch(pl.col("_start"), time_unit="us").dt.strftime("%Y%m%dT%H%M%S")
                session = (
                    pl.when(pl.col("user_id").is_not_null() & pl.col(_TS).is_not_null())
                    .then(pl.col("user_id") + "@" + start)
                    .otherwise(None)
                )
                occurred = pl.from_epoch(pl.col(_TS), time_unit="us").dt.replace_time_zone("UTC")
                self._write(
                    frame.with_columns(session.alias("session_id"), occurred.alias("occurred_at"))
                )
        stale = [
            relpath
            for relpath in self.lake.list_files(paths.LANDING_EVENTS)
            if (match := re.fullmatch(re.escape(self.prefix) + r"-b(\d+)\.parquet", _name(relpath)))
            and int(match.group(1)) >= len(self.written)
        ]
        self.lake.remove(stale)
        return self.written

    def cleanup(self) -> None:
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None

    def _sessions(self, folder: str) -> Iterator[pa.RecordBatch]:
        import duckdb

        gap = int(SESSION_GAP.total_seconds() * 1_000_000)
        files = posixpath.join(folder, "*.parquet").replace("'", "''")
        # DuckDB spills the sort and the windows to `temp_directory` beyond its memory limit.
        connection = duckdb.connect(config={"temp_directory": posixpath.join(folder, "spill")})
        try:
            connection.execute("SET enable_progress_bar = false")
            query = f"""
                SELECT * EXCLUDE (_prev, _mark), max(_mark) OVER running AS _start
                FROM (
                    SELECT *, CASE WHEN _prev IS NULL OR {_TS} - _prev > {gap}
                                   THEN {_TS} END AS _mark
                    FROM (
                        SELECT *, lag({_TS}) OVER (
                            PARTITION BY user_id ORDER BY {_TS}, {_ORDINAL}
                        ) AS _prev
                        FROM read_parquet('{files}')
                    )
                )
                WINDOW running AS (
                    PARTITION BY user_id ORDER BY {_TS}, {_ORDINAL}
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
                )
                ORDER BY {_ORDINAL}
            """
            yield from connection.sql(query).to_arrow_reader(min(self.batch_rows, 1 << 17))
        finally:
            connection.close()

    def _write(self, frame: pl.DataFrame) -> None:
        relpath = paths.dataset_file(
            paths.LANDING_EVENTS, f"{self.prefix}-b{len(self.written):05d}"
        )
        table = _landing_table(frame, EVENTS_SCHEMA, relpath)
        self.lake.write_parquet(table, relpath)
        self.written.append((relpath, table.num_rows))


def _landing_table(frame: pl.DataFrame, schema: pa.Schema, source: str) -> pa.Table:
    """Conforms rows to a contract for a landing file.

    Required columns are declared nullable only when they hold nulls (rows ingestion will
    quarantine), since Parquet refuses nulls in a non-nullable column.
    """
    table = conform(frame.to_arrow(), schema, source=source)
    if any(table.column(f.name).null_count for f in schema if not f.nullable):
        relaxed = pa.schema([f.with_nullable(True) for f in schema])
        table = pa.Table.from_arrays(table.columns, schema=relaxed)
    return table


def _landing_prefix(fmt: str, path: str) -> str:
    """`import-<format>-<file stem>-<8 hex of the absolute path>`: stable per source file."""
    name = Path(path).name
    for suffix in (".gz", ".bz2", ".zst", ".csv", ".tsv", ".txt", ".parquet", ".pq"):
        name = name.removesuffix(suffix) if name.lower().endswith(suffix) else name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "file"
    tag = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"import-{fmt}-{stem}-{tag}"


def _name(relpath: str) -> str:
    return posixpath.basename(relpath)
