"""Durable feedback: a write-ahead log of events, impressions, stock updates, feature samples.

The service appends each `/events` batch (and its stock updates) and each list of impressions to a
`FeedbackLog` and acknowledges only after `append` returns, that is after the bytes are on disk
(`fsync`); the feature rows of a sample of `/recommend` requests (drift checks) go to the same log.
A compactor (`compact_feedback`, `shelfwise compact`, or the pipeline) later publishes the log as
Parquet under `events/date=YYYY-MM-DD/`, `impressions/date=YYYY-MM-DD/`,
`stock_updates/date=YYYY-MM-DD/` and `feature_samples/date=YYYY-MM-DD/` and removes it.

Design:

- **Segments.** Each `FeedbackLog` (one per process: a BentoML worker) writes its own segment files
  in the log folder, the streams interleaved in one file, named
  `<UTC creation time>-<pid>-<random token>-<sequence>` so names sort by age and are unique across
  processes and hosts. A segment is created as `<name>.new`, locked, given its file header,
  fsync'ed, renamed to `<name>.open` and the folder fsync'ed; it is sealed (fsync, rename to
  `<name>.sealed`, folder fsync) when it reaches `max_segment_bytes` or `max_segment_seconds` (a
  background thread seals idle ones), on `rotate()` and on `close()`. Only sealed segments and
  orphaned open ones are compacted, so compaction runs while writers are live.
- **Liveness by lock, not by pid.** The writer holds an exclusive `flock` on its open segment
  for the segment's whole life. The kernel drops it when the process dies (also on `kill -9`), so
  an `.open` segment whose lock the compactor can take belongs to a dead writer and is compacted
  like a sealed one; a reused pid cannot fool it. Creating under `.new` and renaming after
  locking closes the race where a compactor could take a fresh, not yet locked segment. The log
  folder must be on a local filesystem (`$SHELFWISE_HOME/wal`), where `flock` is reliable.
- **Record format.** A segment starts with a 16-byte magic (`SHELFWISE-WAL/1`) and holds records
  `kind (u8) | stream (u8) | payload length (u32) | CRC-32 (u32) | payload`, little-endian, the CRC
  covering the first six header bytes and the payload. Each `append` is one Arrow IPC record
  batch (kind 2) of the stream's contract schema; the first batch of a stream in a segment is
  preceded by that schema (kind 1), so a segment is self-describing. Converting rows to Arrow at
  `append` time also validates them: a row that does not fit the contract is refused there (a
  `ContractError` naming the field), never stored, so no record can block compaction later.
  A reader stops at the first record that is incomplete or fails its CRC: that can only be the
  torn tail of a write that was never acknowledged (each acknowledged record was fsync'ed whole
  before the call returned, and a segment is never appended to after its writer died or failed).
- **Record size.** `append` refuses a record whose payload exceeds `max_record_bytes` (default
  `DEFAULT_MAX_RECORD_BYTES`, 64 MiB) with a `RecordTooLargeError` before writing a byte, so no
  oversized record is ever half-written, fsync'ed or later discarded by a reader as torn (readers
  give up on payloads over 1 GiB, `_MAX_PAYLOAD`). 64 MiB is the segment size too, and is far
  above what a caller sends: an `/events` request is at most 1 MiB of JSON (a few MiB of Arrow),
  and the impressions writer cuts its batches (`bentos/impressions.py`).
- **Group commit.** `append` is thread-safe. A thread writes its record under a lock, then waits
  until some fsync covers it; if no fsync is running it runs one itself, covering every record
  written so far, so concurrent threads share fsyncs. A failed write or fsync fails the calls it
  covered (they were not acknowledged), retires the segment, and the next call starts a new one.
- **Compaction.** One compactor at a time (an `flock` on `compact.lock`). Segments are compacted
  oldest first, one at a time: each stream's batches are concatenated, conformed to the contract
  (`shelfwise.contracts.conform`), deduplicated (events by `event_id`, impressions by
  `rec_id, item_id, position`, stock updates by `item_id, updated_at`, feature samples by
  `rec_id, item_id`; the first copy wins, also across the segments of one run), split by the UTC
  date of `occurred_at` / `shown_at` / `updated_at` / `sampled_at` and published with
  `Lake.write_parquet` (temporary name, then move; on a local lake the file and its folder are
  also fsync'ed) as `<stream>/date=YYYY-MM-DD/wal-<segment name>.parquet`. Only then is the
  segment removed. The output name derives from the segment, so a compaction interrupted between
  publishing and removing simply rewrites the same objects on the next run: no second copy, also
  on S3 (where the names are unique object keys). A duplicate sent by a client into two segments
  that end up in different runs can reach the lake twice; `stg_lake__events` dedupes by
  `event_id` downstream. A segment that no longer fits the contract (written by another version)
  is moved, untouched, to `failed/` in the log folder and reported, instead of blocking every
  later segment.
- **Implausible rows are quarantined, not published.** Rows dated before the earliest plausible
  time (`DEFAULT_EARLIEST_EVENT_AT`, 2000-01-01, or the caller's `earliest`), and events whose
  price is not finite, negative or above `MAX_PRICE`, go to
  `quarantine/<stream>/wal-<segment name>.parquet` with a `reason` (the landing validation's
  reasons), never to an absurd partition such as `events/date=0001-01-01/`. The API refuses such
  input; this is the backstop for a log written by an older or laxer service.
"""

import contextlib
import fcntl
import logging
import os
import posixpath
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from shelfwise.contracts import (
    DEFAULT_EARLIEST_EVENT_AT,
    EVENT_TYPES,
    EVENTS_SCHEMA,
    FEATURE_SAMPLES_SCHEMA,
    IMPRESSIONS_SCHEMA,
    MAX_PRICE,
    NEGATIVE_PRICE_REASON,
    PRICE_REASON,
    ROW_REASON,
    STOCK_UPDATES_SCHEMA,
    ContractError,
    conform,
    earliest_reason,
)
from shelfwise.lake import (
    EVENTS,
    FEATURE_SAMPLES,
    IMPRESSIONS,
    STOCK_UPDATES,
    Lake,
    partition_file,
    quarantine_file,
)
from shelfwise.runtime.online_state import SEEN_TTL_S, OnlineState, StockChange

logger = logging.getLogger(__name__)

FILE_MAGIC = b"SHELFWISE-WAL/1\n"
NEW_SUFFIX = ".new"
OPEN_SUFFIX = ".open"
SEALED_SUFFIX = ".sealed"
COMPACT_LOCK = "compact.lock"
FAILED_FOLDER = "failed"
OUTPUT_PREFIX = "wal-"
DEFAULT_MAX_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SEGMENT_SECONDS = 60.0
# The largest record payload `append` writes: far below the 1 GiB a reader accepts (_MAX_PAYLOAD),
# so a record the writer accepted is always readable, and equal to the segment size.
DEFAULT_MAX_RECORD_BYTES = 64 * 1024 * 1024
# A `.new` segment older than this belongs to a writer that died while creating it.
STALE_NEW_SECONDS = 60.0

_HEADER = struct.Struct("<BBII")  # kind, stream, payload length, CRC-32
_KIND_SCHEMA = 1
_KIND_BATCH = 2
_MAX_PAYLOAD = 1 << 30
# Restoring seen ids: parallel reads of the window's small feedback files, and how far before the
# last restore's start files are read again (the lake's clock, S3's, may differ from ours).
_READ_THREADS = 8
_RESTORE_MARGIN = timedelta(minutes=10)
assert DEFAULT_MAX_RECORD_BYTES < _MAX_PAYLOAD


class RecordTooLargeError(ValueError):
    """Rows whose record would exceed the log's record limit; nothing was written.

    Attributes:
        size: The record's payload size in bytes.
        limit: The log's `max_record_bytes`.
    """

    def __init__(self, stream: str, rows: int, size: int, limit: int) -> None:
        super().__init__(
            f"{stream}: a record of {rows:,} rows is {size:,} bytes, over the log's limit of "
            f"{limit:,} bytes; append fewer rows at a time"
        )
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class _Stream:
    name: str
    code: int
    schema: pa.Schema
    time_column: str
    key: tuple[str, ...]


_STREAMS = {
    EVENTS: _Stream(EVENTS, 1, EVENTS_SCHEMA, "occurred_at", ("event_id",)),
    IMPRESSIONS: _Stream(
        IMPRESSIONS, 2, IMPRESSIONS_SCHEMA, "shown_at", ("rec_id", "item_id", "position")
    ),
    STOCK_UPDATES: _Stream(
        STOCK_UPDATES, 3, STOCK_UPDATES_SCHEMA, "updated_at", ("item_id", "updated_at")
    ),
    FEATURE_SAMPLES: _Stream(
        FEATURE_SAMPLES, 4, FEATURE_SAMPLES_SCHEMA, "sampled_at", ("rec_id", "item_id")
    ),
}
_BY_CODE = {stream.code: stream for stream in _STREAMS.values()}


def _fsync_dir(directory: Path | str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _record(kind: int, stream: _Stream, payload: bytes) -> bytes:
    head = struct.pack("<BBI", kind, stream.code, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return _HEADER.pack(kind, stream.code, len(payload), crc) + payload


def _encode_rows(stream: _Stream, rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Rows as a record batch of the stream's contract, or a `ContractError` naming the field."""
    try:
        batch = pa.RecordBatch.from_pylist(rows, schema=stream.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        columns = {item.name: [row.get(item.name) for row in rows] for item in stream.schema}
        raise _contract_error(stream, columns, error) from error
    return _checked(stream, batch)


def _encode_columns(
    stream: _Stream, columns: Mapping[str, Sequence[Any]], rows: int
) -> pa.RecordBatch:
    """Columns (name → values) as a record batch of the stream's contract, or a ContractError.

    A column of the contract that is missing is null; the error names the field.
    """
    given = {item.name: columns.get(item.name, [None] * rows) for item in stream.schema}
    for name, values in given.items():
        if len(values) != rows:
            message = f"field '{name}' has {len(values)} values, not {rows}"
            raise ContractError(f"{stream.name}: {message}")
    try:
        batch = pa.RecordBatch.from_pydict(given, schema=stream.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise _contract_error(stream, given, error) from error
    return _checked(stream, batch)


def _contract_error(
    stream: _Stream, columns: Mapping[str, Sequence[Any]], error: Exception
) -> ContractError:
    """The error of rows that do not convert, naming the first field that does not.

    The error path only: each column is converted again on its own.
    """
    for item in stream.schema:
        try:
            pa.array(columns[item.name], type=item.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as field_error:
            return ContractError(
                f"{stream.name}: field '{item.name}' cannot be read as {item.type}: {field_error}"
            )
    return ContractError(f"{stream.name}: rows do not fit the contract: {error}")


def _checked(stream: _Stream, batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch, once its required fields have no null and its event types are known."""
    schema = stream.schema
    for index, item in enumerate(schema):
        if not item.nullable and batch.column(index).null_count:
            raise ContractError(f"{stream.name}: required field '{item.name}' is missing or null")
    if stream.name == EVENTS:
        event_types = batch.column(schema.get_field_index("event_type"))
        # Made here, not at import: pyarrow's first array imports pandas (~0.2 s), which the
        # service's `bentoml serve` process, importing this module, would pay for nothing.
        known = pa.array(EVENT_TYPES, pa.string())
        if not pc.all(pc.is_in(event_types, value_set=known)).as_py():
            raise ContractError(
                f"{stream.name}: field 'event_type' must be one of {', '.join(EVENT_TYPES)}"
            )
    return batch


def stream_schema(name: str) -> pa.Schema:
    """The contract schema of a stream of the log (`"events"`, `"impressions"`, …)."""
    return _stream(name).schema


def _stream(name: str) -> _Stream:
    spec = _STREAMS.get(name)
    if spec is None:
        raise ValueError(f"unknown feedback stream {name!r}; expected {' or '.join(_STREAMS)}")
    return spec


@dataclass
class _Segment:
    fd: int
    stem: str
    path: Path
    created: float
    size: int
    records: int = 0
    schemas: set[str] = field(default_factory=set)
    broken: bool = False


class FeedbackLog:
    """Write-ahead log of one process; thread-safe (BentoML may call from several threads).

    Several processes (BentoML workers) may each open one on the same folder: each writes its own
    segment files. See the module docstring for the format and the guarantees.

    Args:
        directory: The log folder (`Settings.wal_dir`); created when missing.
        max_segment_bytes: A segment is sealed (and becomes compactable) once it reaches this size.
        max_segment_seconds: ... or once it is this old; a background thread seals idle segments.
        max_record_bytes: `append` refuses rows whose record payload would be larger (at most
            the 1 GiB a reader accepts).
    """

    def __init__(
        self,
        directory: Path,
        max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES,
        max_segment_seconds: float = DEFAULT_MAX_SEGMENT_SECONDS,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        if not 0 < max_record_bytes <= _MAX_PAYLOAD:
            raise ValueError(f"max_record_bytes must be in (0, {_MAX_PAYLOAD}]")
        self.directory = Path(directory)
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.directory.parent)  # the folder itself survives a power cut
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_seconds = max_segment_seconds
        self.max_record_bytes = max_record_bytes
        self._writer = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._sequence = 0
        self._cond = threading.Condition(threading.Lock())
        self._segment: _Segment | None = None
        self._written = 0  # tickets: one per record written
        self._synced = 0  # every ticket up to this one is on disk
        self._syncing = False
        self._failures: list[tuple[int, int]] = []  # ticket ranges whose write or fsync failed
        self._closed = False
        self._stop = threading.Event()
        self._sealer = threading.Thread(
            target=self._seal_idle, name="shelfwise-wal-sealer", daemon=True
        )
        self._sealer.start()

    def __enter__(self) -> "FeedbackLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def append(self, stream: str, rows: list[dict[str, Any]]) -> None:
        """Appends rows to the log; returns only once they are on disk (fsync'ed).

        Args:
            stream: `"events"`, `"impressions"`, `"stock_updates"` or `"feature_samples"`.
            rows: Dicts with the contract's column names (`shelfwise.contracts`); missing optional
                columns are null, extra keys are ignored. Timestamps are datetimes, tz-aware (a
                naive one is taken as UTC, as `conform` does).

        Raises:
            ContractError: A row does not fit the contract (the message names the field); nothing
                was written.
            RecordTooLargeError: The rows' record is larger than `max_record_bytes`; nothing was
                written (split the rows).
            ValueError: An unknown stream.
            RuntimeError: The log is closed.
            OSError: Writing or syncing failed; the rows are not acknowledged.
        """
        spec = _stream(stream)
        if not rows:
            return
        self._append_batch(spec, _encode_rows(spec, rows))

    def append_columns(self, stream: str, columns: Mapping[str, Sequence[Any]], rows: int) -> None:
        """`append` for rows given as columns, without a dict per row.

        The same contract, checks and guarantee (on disk when it returns).

        Args:
            stream: As for `append`.
            columns: Column name → one value per row, in the row order; a missing optional
                column is null, extra columns are ignored. Timestamps are tz-aware datetimes or
                integers (microseconds since the epoch, UTC: faster to convert).
            rows: The number of rows (every column given has as many values).

        Raises:
            ContractError, RecordTooLargeError, ValueError, RuntimeError, OSError: As `append`;
                also a column with another number of values (ContractError).
        """
        spec = _stream(stream)
        if not rows:
            return
        self._append_batch(spec, _encode_columns(spec, columns, rows))

    def _append_batch(self, spec: _Stream, batch: pa.RecordBatch) -> None:
        stream, rows = spec.name, batch.num_rows
        # The IPC payload holds every buffer (padded): a batch already over the limit is refused
        # before serializing copies it.
        if batch.nbytes > self.max_record_bytes:
            raise RecordTooLargeError(stream, rows, batch.nbytes, self.max_record_bytes)
        payload = batch.serialize().to_pybytes()
        if len(payload) > self.max_record_bytes:  # refused before a byte reaches the segment
            raise RecordTooLargeError(stream, rows, len(payload), self.max_record_bytes)
        record = _record(_KIND_BATCH, spec, payload)
        with self._cond:
            segment = self._writable_segment(len(record))
            data = record
            if stream not in segment.schemas:
                data = _record(_KIND_SCHEMA, spec, spec.schema.serialize().to_pybytes()) + record
            try:
                _write_all(segment.fd, data)
            except OSError:
                segment.broken = True
                with contextlib.suppress(OSError):
                    os.ftruncate(segment.fd, segment.size)
                raise
            segment.size += len(data)
            segment.records += 1
            segment.schemas.add(stream)
            self._written += 1
            self._wait_durable(self._written)

    def rotate(self) -> None:
        """Seals the open segment now, so that the next compaction picks it up."""
        with self._cond:
            self._seal_locked(None)

    def close(self) -> None:
        """Seals the open segment and stops the log (idempotent)."""
        self._stop.set()
        if self._sealer is not threading.current_thread():
            self._sealer.join()
        with self._cond:
            if not self._closed:
                self._seal_locked(None)
                self._closed = True

    # Everything below runs under self._cond. Invariant: the records with tickets in
    # (self._synced, self._written] are all in the open segment, and sealing settles them.

    def _writable_segment(self, incoming: int) -> _Segment:
        while True:
            if self._closed:
                raise RuntimeError("the feedback log is closed")
            segment = self._segment
            if segment is None:
                self._segment = self._create_segment()
                return self._segment
            if (
                segment.broken
                or (segment.records and segment.size + incoming > self.max_segment_bytes)
                or time.monotonic() - segment.created >= self.max_segment_seconds
            ):
                self._seal_locked(segment)  # may wait: look again afterwards
                continue
            return segment

    def _create_segment(self) -> _Segment:
        for _attempt in range(5):
            self._sequence += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            stem = f"{stamp}-{self._writer}-{self._sequence:06d}"
            new = self.directory / f"{stem}{NEW_SUFFIX}"
            path = self.directory / f"{stem}{OPEN_SUFFIX}"
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _write_all(fd, FILE_MAGIC)
                os.fsync(fd)
                os.rename(new, path)
            except (BlockingIOError, FileNotFoundError):
                # A compactor took this `.new` file for a dead writer's: start another one.
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(new)
                raise
            _fsync_dir(self.directory)
            return _Segment(fd, stem, path, time.monotonic(), size=len(FILE_MAGIC))
        raise OSError(f"could not create a log segment in {self.directory}")

    def _wait_durable(self, ticket: int) -> None:
        while True:
            if any(low <= ticket <= high for low, high in self._failures):
                raise OSError(f"the feedback log could not make its record {ticket} durable")
            if self._synced >= ticket:
                return
            if self._syncing:
                self._cond.wait()
                continue
            segment = self._segment
            assert segment is not None  # by the invariant
            self._syncing = True
            target = self._written
            self._cond.release()
            try:
                os.fsync(segment.fd)
                error = None
            except OSError as raised:
                error = raised
            finally:
                self._cond.acquire()
                self._syncing = False
            if error is None:
                self._synced = max(self._synced, target)
            else:
                self._fail_unsynced(segment, error)
            self._cond.notify_all()

    def _fail_unsynced(self, segment: _Segment, error: OSError) -> None:
        """After a failed fsync nothing unsynced in the segment can be trusted: fail it all."""
        logger.error("fsync of %s failed: %s", segment.path, error)
        segment.broken = True  # no further writes go to it
        self._failures.append((self._synced + 1, self._written))
        self._synced = self._written

    def _seal_locked(self, expected: _Segment | None) -> None:
        """Seals the open segment (only if it is still `expected`, when given)."""
        while self._syncing:
            self._cond.wait()
        segment = self._segment
        if segment is None or (expected is not None and segment is not expected):
            return
        self._segment = None
        if self._synced < self._written:
            try:
                os.fsync(segment.fd)
                self._synced = self._written
            except OSError as error:
                self._fail_unsynced(segment, error)
            self._cond.notify_all()
        try:
            if segment.records == 0:
                os.unlink(segment.path)
            else:
                os.rename(segment.path, segment.path.with_suffix(SEALED_SUFFIX))
            _fsync_dir(self.directory)
        except OSError as error:
            # Left `.open`: once this process closes it, the compactor takes it as orphaned.
            logger.error("could not seal %s: %s", segment.path, error)
        finally:
            os.close(segment.fd)

    def _seal_idle(self) -> None:
        interval = max(0.05, min(1.0, self.max_segment_seconds / 4))
        while not self._stop.wait(interval):
            with self._cond:
                segment = self._segment
                if (
                    not self._closed
                    and segment is not None
                    and time.monotonic() - segment.created >= self.max_segment_seconds
                ):
                    self._seal_locked(segment)


@dataclass
class CompactionResult:
    """What one compaction published.

    Attributes:
        rows: Rows published per stream (`events`, `impressions`, `stock_updates`,
            `feature_samples`).
        duplicates: Rows dropped per stream as duplicates of a row compacted before them.
        quarantined: Rows per stream written to `quarantine/<stream>/` instead: dated before
            the earliest plausible time, or an event's price not finite, negative or too large.
        files: Lake-relative paths of the Parquet files written.
        segments: Log segments compacted and removed.
        orphaned: Of those, open segments of writers that died.
        live: Open segments of live writers, left for a later run.
        torn_bytes: Bytes after the last valid record of the compacted segments (writes that were
            never acknowledged, cut short by a crash).
        failed: Segments whose records do not fit the current contract (written by another
            version): moved, untouched, to the `failed/` folder of the log for inspection, so they
            do not hold up the others.
    """

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STREAMS, 0))
    duplicates: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STREAMS, 0))
    quarantined: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STREAMS, 0))
    files: list[str] = field(default_factory=list)
    segments: int = 0
    orphaned: int = 0
    live: int = 0
    torn_bytes: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def events(self) -> int:
        """Events published."""
        return self.rows[EVENTS]

    @property
    def impressions(self) -> int:
        """Impressions published."""
        return self.rows[IMPRESSIONS]

    @property
    def feature_samples(self) -> int:
        """Sampled feature rows of live requests published."""
        return self.rows[FEATURE_SAMPLES]


@dataclass
class SegmentContents:
    """The valid records of one segment file.

    Attributes:
        batches: Record batches per stream, in the order they were appended.
        valid_bytes: Length of the valid prefix of the file.
        torn_bytes: Bytes after it (a torn, never acknowledged tail).
    """

    batches: dict[str, list[pa.RecordBatch]]
    valid_bytes: int
    torn_bytes: int


def read_segment(data: bytes) -> SegmentContents:
    """Decodes a segment, stopping at the first incomplete or corrupt record.

    Args:
        data: The whole segment file.

    Returns:
        Its valid records and how many bytes after them were skipped.
    """
    batches: dict[str, list[pa.RecordBatch]] = {name: [] for name in _STREAMS}
    if not data.startswith(FILE_MAGIC):
        return SegmentContents(batches, 0, len(data))
    schemas: dict[str, pa.Schema] = {}
    offset = len(FILE_MAGIC)
    view = memoryview(data)
    while offset + _HEADER.size <= len(data):
        kind, code, length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        stream = _BY_CODE.get(code)
        if (
            kind not in (_KIND_SCHEMA, _KIND_BATCH)
            or stream is None
            or length > _MAX_PAYLOAD
            or end > len(data)
        ):
            break
        payload = view[start:end]
        if zlib.crc32(payload, zlib.crc32(view[offset : offset + 6])) != crc:
            break
        try:
            if kind == _KIND_SCHEMA:
                schemas[stream.name] = pa.ipc.read_schema(pa.py_buffer(payload))
            else:
                batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schemas[stream.name])
                batches[stream.name].append(batch)
        except (KeyError, pa.ArrowException):
            break
        offset = end
    return SegmentContents(batches, offset, len(data) - offset)


def compact_feedback(
    directory: Path, lake: Lake, earliest: datetime = DEFAULT_EARLIEST_EVENT_AT
) -> CompactionResult:
    """Publishes every sealed segment (and every orphaned one of a dead writer) and removes it.

    Safe to run while writers are live (their open segments are left alone) and to run again
    after a crash at any point: output names derive from the segment, so a segment published but
    not yet removed is published again under the same names, not twice.

    Args:
        directory: The log folder (`Settings.wal_dir`).
        lake: The lake to publish to (local or `s3://`).
        earliest: Rows dated before it are quarantined, not published (time-zone aware).

    Returns:
        Counts per stream and the files written.
    """
    directory = Path(directory)
    result = CompactionResult()
    if not directory.is_dir():
        return result
    with _compactor_lock(directory):
        _remove_stale_new(directory)
        seen: dict[str, list[pl.DataFrame]] = {name: [] for name in _STREAMS}
        for path in sorted(directory.iterdir(), key=lambda p: p.name):
            if path.suffix == SEALED_SUFFIX:
                fd = _open_if_present(path)
                if fd is None:
                    continue
            elif path.suffix == OPEN_SUFFIX:
                fd = _take_orphan(path)
                if fd is None:
                    result.live += 1
                    continue
                result.orphaned += 1
            else:
                continue
            try:
                _compact_segment(path, fd, lake, seen, result, earliest)
            finally:
                os.close(fd)
    return result


def latest_stock_updates(lake: Lake, log_dir: Path | None = None) -> dict[str, StockChange]:
    """Per item, the latest stock update published to the lake or still in the log.

    What a restarted service restores into its online state. With `log_dir`, the updates not yet
    compacted count too (compaction may be off, or a sibling worker's segment still open): an
    acknowledged update is in force from its `fsync`, not from its compaction.

    Args:
        lake: The lake the log is compacted into.
        log_dir: The log folder (`Settings.wal_dir`); None reads the lake only.

    Returns:
        item_id → the item's newest update (`updated_at`); empty when none arrived.
    """
    columns = ["item_id", "is_in_stock", "updated_at"]
    frames = [_logged(Path(log_dir), STOCK_UPDATES).select(columns)] if log_dir else []
    if lake.list_files(STOCK_UPDATES):
        frames.append(lake.read_frame(STOCK_UPDATES, columns=columns))
    updates = pl.concat(frames) if frames else pl.DataFrame()
    if updates.is_empty():
        return {}
    latest = updates.sort("updated_at").unique("item_id", keep="last", maintain_order=True)
    changes = latest.select(
        "item_id", "is_in_stock", pl.col("updated_at").dt.epoch("us").alias("updated_at_us")
    )
    return {item: StockChange(in_stock, at) for item, in_stock, at in changes.iter_rows()}


def feedback_event_files(lake: Lake, since: datetime) -> dict[str, datetime]:
    """The event files compacted from the log (`wal-…`) and published to the lake after `since`.

    One listing with modification times; no file is read.

    Args:
        lake: The lake.
        since: Only files published after this time.

    Returns:
        Lake-relative path → when it was published, oldest first.
    """
    published = {
        relpath: at
        for relpath, at in lake.list_modified(EVENTS).items()
        if posixpath.basename(relpath).startswith(OUTPUT_PREFIX) and at > since
    }
    return dict(sorted(published.items(), key=lambda item: item[1]))


def recent_event_ids(lake: Lake, log_dir: Path | None, since: datetime) -> pl.DataFrame:
    """The ids of the events the service received since about `since`: in the lake and the log.

    The lake part reads the `event_id` column of the feedback files published after `since`
    (`feedback_event_files`; a file is published after its events arrived, so no event received
    after `since` is missed); the log part reads every sealed and open segment, a killed
    writer's too, as `latest_stock_updates` does.

    Args:
        lake: The lake the log is compacted into.
        log_dir: The log folder (`Settings.wal_dir`); None reads the lake only.
        since: The start of the window.

    Returns:
        Columns `event_id` and `seen_at` (when its file was published; now for the log, whose
        events are the newest), each id once with its first time, oldest first.
    """
    now = datetime.now(UTC)
    files = feedback_event_files(lake, since)
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:  # many small files; S3 latency
        tables = pool.map(lambda relpath: lake.read_table(relpath, columns=["event_id"]), files)
        frames = [
            pl.from_arrow(table).with_columns(pl.lit(at).alias("seen_at"))
            for table, at in zip(tables, files.values(), strict=True)
        ]
    if log_dir:
        logged = _logged(Path(log_dir), EVENTS).select("event_id")
        frames.append(logged.with_columns(pl.lit(now).alias("seen_at")))
    empty = pl.DataFrame(schema={"event_id": pl.String, "seen_at": pl.Datetime("us", "UTC")})
    recent = pl.concat([empty, *(frame.cast(empty.schema) for frame in frames)], how="vertical")
    return recent.sort("seen_at").unique("event_id", keep="first", maintain_order=True)


def restore_seen_events(
    state: OnlineState, lake: Lake, log_dir: Path | None, now: datetime | None = None
) -> int:
    """Gives the online state the event ids of its idempotency window, at start-up.

    So an acknowledged event re-sent after a restart (also after a `kill -9`) is a duplicate:
    its id is in the log (not yet compacted) or in a feedback file of the lake. The window is
    `SEEN_TTL_S` back from now. A state that kept ids across the restart (Redis) and says up to
    when (`seen_restored_through`) gets only the files published since then (less a margin for
    clock skew): ids it recorded itself are there already, and the ones it cannot hold are those
    of events logged by a process killed before recording them, published after that.

    Args:
        state: The online state (before it serves).
        lake: The lake the log is compacted into.
        log_dir: The log folder (`Settings.wal_dir`).
        now: The time of the restore (default: now).

    Returns:
        How many ids were new to the state.
    """
    started = now or datetime.now(UTC)
    since = started - timedelta(seconds=SEEN_TTL_S)
    through = state.seen_restored_through()
    if through is not None:
        since = max(since, datetime.fromtimestamp(through, UTC) - _RESTORE_MARGIN)
    recent = recent_event_ids(lake, log_dir, since)
    seen_at = pl.col("seen_at").dt.epoch("us") / 1e6
    added = state.remember_seen(recent.select("event_id", seen_at).iter_rows())
    state.mark_seen_restored(started.timestamp())
    logger.info("restored %d of %d recent event ids since %s", added, recent.height, since)
    return added


def _logged(directory: Path, stream_name: str) -> pl.DataFrame:
    """A stream's rows in every sealed or open segment of the log (torn tails skipped)."""
    schema = _STREAMS[stream_name].schema
    # Not `schema.empty_table()`: it imports pandas (0.4 s of a serving worker's start-up).
    tables = [pa.Table.from_batches([], schema=schema)]
    names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    for name in names:
        stem, suffix = os.path.splitext(name)
        if suffix not in (SEALED_SUFFIX, OPEN_SUFFIX):
            continue
        # An open segment may be sealed (renamed) meanwhile; a sealed one gone is compacted, and
        # the lake, read after the log, has it.
        data = _read_if_present(directory / name)
        if data is None and suffix == OPEN_SUFFIX:
            data = _read_if_present(directory / f"{stem}{SEALED_SUFFIX}")
        batches = read_segment(data).batches[stream_name] if data else []
        if not batches:
            continue
        try:
            tables.append(conform(pa.Table.from_batches(batches), schema, source=name))
        except (ContractError, pa.ArrowException) as error:  # compaction moves it to failed/
            logger.warning("%s: %s not restored: %s", name, stream_name, error)
    return pl.from_arrow(pa.concat_tables(tables))


def _read_if_present(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _compactor_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory / COMPACT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_if_present(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _take_orphan(path: Path) -> int | None:
    """Locks an open segment whose writer is gone; None when it is live (or was just sealed)."""
    fd = _open_if_present(path)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The writer may have sealed (renamed) it between our open and our lock.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


def _remove_stale_new(directory: Path) -> None:
    """Removes `.new` files of writers that died while creating a segment (they hold no data)."""
    for path in directory.glob(f"*{NEW_SUFFIX}"):
        fd = _open_if_present(path)
        if fd is None:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < STALE_NEW_SECONDS:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)


def _compact_segment(
    path: Path,
    fd: int,
    lake: Lake,
    seen: dict[str, list[pl.DataFrame]],
    result: CompactionResult,
    earliest: datetime,
) -> None:
    with os.fdopen(os.dup(fd), "rb") as handle:
        contents = read_segment(handle.read())
    if contents.torn_bytes:
        logger.warning(
            "%s: skipped %d torn bytes after the last valid record (never acknowledged)",
            path.name,
            contents.torn_bytes,
        )
    tables: dict[str, pa.Table] = {}
    try:
        for name, batches in contents.batches.items():
            if batches:
                schema = _STREAMS[name].schema
                tables[name] = conform(pa.Table.from_batches(batches), schema, source=str(path))
    except (ContractError, pa.ArrowException) as error:
        logger.error("%s does not fit the contract, moved to %s/: %s", path, FAILED_FOLDER, error)
        failed = path.parent / FAILED_FOLDER
        failed.mkdir(exist_ok=True)
        os.rename(path, failed / path.name)
        _fsync_dir(failed)
        _fsync_dir(path.parent)
        result.failed.append(path.name)
        return
    written: list[str] = []
    for name, table in tables.items():
        stream = _STREAMS[name]
        table, implausible = _split_implausible(table, stream, earliest)
        if implausible.num_rows:
            relpath = quarantine_file(name, f"{OUTPUT_PREFIX}{path.stem}")
            written.append(lake.write_parquet(implausible, relpath))
            result.quarantined[name] += implausible.num_rows
            logger.warning(
                "%s: %d implausible %s quarantined", path.name, implausible.num_rows, name
            )
        unique = _first_copies(table, stream, seen[name])
        result.duplicates[name] += table.num_rows - unique.num_rows
        result.rows[name] += unique.num_rows
        written += _publish_by_date(unique, stream, path.stem, lake)
    _make_durable(lake, written)
    os.unlink(path)
    _fsync_dir(path.parent)
    result.files += written
    result.segments += 1
    result.torn_bytes += contents.torn_bytes


def _split_implausible(
    table: pa.Table, stream: _Stream, earliest: datetime
) -> tuple[pa.Table, pa.Table]:
    """`(plausible rows, implausible rows with a reason)`: see the module docstring."""
    at = pl.col(stream.time_column)
    reason = pl.when(at < earliest).then(pl.lit(earliest_reason(stream.time_column, earliest)))
    columns = [stream.time_column]
    if stream.name == EVENTS:
        price = pl.col("price")
        columns.append("price")
        reason = (
            reason.when(price.is_nan() | price.is_infinite() | (price > MAX_PRICE))
            .then(pl.lit(PRICE_REASON))
            .when(price < 0)
            .then(pl.lit(NEGATIVE_PRICE_REASON))
        )
    frame = pl.from_arrow(table.select(columns))
    assert isinstance(frame, pl.DataFrame)
    reasons = frame.select(reason.alias(ROW_REASON)).to_series()
    if reasons.null_count() == len(reasons):
        return table, table.slice(0, 0)  # not `empty_table()`, which imports pandas
    plausible = reasons.is_null().to_arrow()
    implausible = table.filter(pc.invert(plausible))
    quarantined = implausible.append_column(
        ROW_REASON, reasons.drop_nulls().to_arrow().cast(pa.string())
    )
    return table.filter(plausible), quarantined


def _first_copies(table: pa.Table, stream: _Stream, seen: list[pl.DataFrame]) -> pa.Table:
    """The rows whose key was not seen before (in this table or in `seen`); updates `seen`."""
    keys = pl.from_arrow(table.select(list(stream.key)))
    assert isinstance(keys, pl.DataFrame)
    keys = keys.with_row_index("_row").unique(
        subset=list(stream.key), keep="first", maintain_order=True
    )
    if seen:
        keys = keys.join(pl.concat(seen), on=list(stream.key), how="anti")
    rows = keys.get_column("_row").sort()
    seen.append(keys.drop("_row"))
    if len(rows) == table.num_rows:
        return table
    return table.take(pa.array(rows.to_numpy()))


def _publish_by_date(table: pa.Table, stream: _Stream, stem: str, lake: Lake) -> list[str]:
    if not table.num_rows:
        return []
    # The UTC day of each row (the contract's times are UTC). A cast, not `pc.strftime`: that
    # formats row by row, 1.1 s for the 400,000 impressions a busy worker logs between two
    # compactions, much of it holding the GIL that the worker's event loop needs.
    days = pc.cast(table.column(stream.time_column), pa.date32())
    written = []
    for day in sorted(pc.unique(days).to_pylist()):
        part = table.filter(pc.equal(days, pa.scalar(day, pa.date32())))
        name = partition_file(stream.name, day.isoformat(), f"{OUTPUT_PREFIX}{stem}")
        written.append(lake.write_parquet(part, name))
    return written


def _make_durable(lake: Lake, relpaths: list[str]) -> None:
    """On a local lake, fsyncs published files and their folders before the log is removed.

    S3 acknowledges a PUT only once the object is stored, so there is nothing to do there.
    """
    if lake.protocol != "file":
        return
    for relpath in relpaths:
        fd = os.open(lake.path(relpath), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in sorted({os.path.dirname(lake.path(relpath)) for relpath in relpaths}):
        _fsync_dir(folder)
