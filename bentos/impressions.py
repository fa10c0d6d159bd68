"""Impression logging off the request path, in bounded memory.

Every response is logged as impressions (one row per item shown) for attribution and training.
A request only puts its rows on a queue, as one `ShownItems` (the response's fields once, its item
ids as a list: no dict per row); a background thread appends them to the write-ahead log as
columns, in batches every `FLUSH_INTERVAL_S`. This keeps an fsync out of every `/recommend`:
nobody waits for an impression's acknowledgement, so at most the last interval's impressions can
be lost when the process is killed, whereas `/events` acknowledges only what is durable.

Bounded, because impressions are worth less than serving: the queue holds at most
`MAX_QUEUED_ROWS` rows. When the writer falls behind (a slow disk, a flood of large responses) a
response's impressions are dropped whole instead of blocking the request or growing the worker,
and counted in `shelfwise_impressions_dropped_total{reason="queue_full"}`. Each `append` carries
at most `MAX_BATCH_ROWS` rows, and a batch the log refuses as too large
(`shelfwise.runtime.feedback.RecordTooLargeError`) is halved until it fits; a single row too
large on its own is dropped (`reason="too_large"`). Rows lost to a failed write count as
`reason="write_failed"`.

Why columns, and why small appends: the writer holds the GIL while it turns rows into Arrow, and
the event loop that answers requests waits meanwhile. From dicts, a flush of 2,600 impressions
(0.2 s of the busiest worker) took 4.8 ms, a stall every request in flight shared; from columns
about 2 ms, and each response saved building ten dicts (about 15 µs). Even so, one append per
flush was `/recommend`'s tail: a busy loop hands the GIL to the writer only every few
milliseconds, so a flush meant to run every 50 ms ran every ~120 ms over ~2,900 rows, several
milliseconds of stall each. Appends of about `APPEND_ROWS` rows hold the GIL a few hundred
microseconds each, and give it back to the loop while their write and fsync run (measured: see
`APPEND_ROWS`).

The same writer logs the sampled feature rows of `/recommend` requests (`bentos/feature_samples.py`)
to their own stream, with their own bound and counter.
"""

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import bentoml

from shelfwise.runtime.feedback import FeedbackLog, RecordTooLargeError, stream_schema

logger = logging.getLogger("bentoml.shelfwise")

# Every 50 ms: a flush holds the GIL while it builds Arrow, and the requests in flight wait; four
# small flushes a tick stall them less than one large one. Measured at c=8, one worker (demo shop,
# 2 x 10 s each, in turns): p99 12.8-14.7 ms against 14.4-16.3 ms every 0.2 s (11.1-12.3 ms with
# no impressions at all), the same req/s, for 25 us more of the writer's CPU per request. In the
# store benchmark (embedded, 1 worker, 4 x 2 runs in turns) both were within its noise: p99
# 12.1-16.0 against 13.4-15.6 ms, 0.55-0.60x the no-op against 0.58-0.63x.
FLUSH_INTERVAL_S = 0.05
IMPRESSIONS = "impressions"
# Rows per append while the writer keeps up. Measured at c=8, one worker (demo shop, 16 paired
# rounds of 5 s, `benchmarks/paired_serving_benchmark.py`): appends of ~300 rows against one per
# flush, p99 -1.8 ms [-3.0, -0.6] (10.6 -> 9.3 ms), the same req/s (1.01x [0.96, 1.06]); with no
# impressions at all the p99 was 3.4 ms lower. About 50 appends (fsyncs) a second at 1,500
# responses/s of 10 items.
APPEND_ROWS = 300
# Appends per flush at most: when the queue is long (a slow disk, large responses) the appends
# grow instead (up to `MAX_BATCH_ROWS`), so that the fsyncs a second stay bounded and the writer
# catches up rather than falling further behind.
MAX_APPENDS_PER_FLUSH = 8
# About 4 s of impressions at this machine's peak (~1,200 responses/s of 10 items), so a stall
# of the disk of a few seconds loses nothing; ~0.5 kB a row in memory (200-character ids at
# most), so the queue never holds more than a few tens of MB.
MAX_QUEUED_ROWS = 50_000
# Rows per `append` at most (one log record): a few MB with bounded identifiers, far below the
# log's record limit, and a short hold of the log's lock for the /events appends waiting behind it.
MAX_BATCH_ROWS = 10_000

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)

DROPPED = bentoml.metrics.Counter(
    name="shelfwise_impressions_dropped",
    documentation="Impression rows not logged, by reason: queue_full (the writer fell behind), "
    "too_large (a row over the log's record limit) or write_failed (the log refused the write).",
    labelnames=["reason"],
)


@dataclass(frozen=True, slots=True)
class ShownItems:
    """One response's impressions: a row per item shown, the response's fields given once.

    Attributes:
        rec_id, shown_at, user_id, strategy, fallback_level, experiment, arm: The response's.
        item_ids: The items shown, in order (position 1 first).
        model_versions: Per item, the model version that ranked it.
        drafted_by: Per item, the experiment arm that drafted it (None outside interleaving).
    """

    rec_id: str
    shown_at: datetime
    user_id: str
    item_ids: list[str]
    model_versions: list[str | None]
    strategy: str
    fallback_level: int
    experiment: str | None
    arm: str | None
    drafted_by: list[str | None]

    def __len__(self) -> int:
        return len(self.item_ids)

    def columns(self) -> dict[str, list[Any]]:
        """The rows as columns of the impressions contract."""
        shown = len(self.item_ids)
        # As microseconds since the epoch: Arrow reads integers into the timestamp column five
        # times faster than tz-aware datetimes.
        shown_at_us = (self.shown_at - EPOCH) // MICROSECOND
        return {
            "rec_id": [self.rec_id] * shown,
            "shown_at": [shown_at_us] * shown,
            "user_id": [self.user_id] * shown,
            "item_id": self.item_ids,
            "position": list(range(1, shown + 1)),
            "model_version": self.model_versions,
            "strategy": [self.strategy] * shown,
            "fallback_level": [self.fallback_level] * shown,
            "experiment": [self.experiment] * shown,
            "arm": [self.arm] * shown,
            "drafted_by": self.drafted_by,
        }


class ImpressionLog:
    """Buffers impression rows in a bounded queue and appends them to the feedback log.

    Args:
        log: The feedback log to append to.
        max_queued_rows: Rows the queue may hold; a response that does not fit is dropped.
        max_batch_rows: Rows per `append` at most.
        stream: The log's stream the rows go to (impressions by default).
        dropped_counter: The Prometheus counter of dropped rows (by `reason`).
        append_rows: Rows per `append` while the queue is short (each append holds the GIL
            while its rows become Arrow).
        max_appends_per_flush: Appends per flush at most; a longer queue makes larger appends.
    """

    def __init__(
        self,
        log: FeedbackLog,
        max_queued_rows: int = MAX_QUEUED_ROWS,
        max_batch_rows: int = MAX_BATCH_ROWS,
        stream: str = IMPRESSIONS,
        dropped_counter: bentoml.metrics.Counter = DROPPED,
        append_rows: int = APPEND_ROWS,
        max_appends_per_flush: int = MAX_APPENDS_PER_FLUSH,
    ) -> None:
        self._log = log
        self._append_rows = min(append_rows, max_batch_rows)
        self._max_appends_per_flush = max_appends_per_flush
        self._stream = stream
        self._dropped_counter = dropped_counter
        self._max_queued_rows = max_queued_rows
        self._max_batch_rows = max_batch_rows
        self._names = stream_schema(stream).names
        self._queue: queue.SimpleQueue[ShownItems | Sequence[dict[str, Any]]] = queue.SimpleQueue()
        # Rows queued or being written; guarded by a lock held for an addition only.
        self._queued_rows = 0
        self._count_lock = threading.Lock()
        self.dropped = 0  # rows dropped by this log (also in the Prometheus counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=stream, daemon=True)
        self._thread.start()

    def add(self, rows: ShownItems | Sequence[dict[str, Any]]) -> bool:
        """Queues one response's impressions; never blocks (beyond a counter's lock), never raises.

        Args:
            rows: The response's rows: `ShownItems`, or dicts (a list, or a sequence that builds
                them when the writer thread iterates it: `bentos.feature_samples.SampledRows`).

        Returns:
            Whether they were queued; False when the queue was full and they were dropped.
        """
        with self._count_lock:
            admitted = self._queued_rows + len(rows) <= self._max_queued_rows
            if admitted:
                self._queued_rows += len(rows)
        if not admitted:
            self._drop("queue_full", len(rows))
            return False
        self._queue.put(rows)
        return True

    def close(self) -> None:
        """Writes what is queued and stops the thread."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _drop(self, reason: str, rows: int) -> None:
        with self._count_lock:
            self.dropped += rows
        self._dropped_counter.labels(reason=reason).inc(rows)

    def _run(self) -> None:
        # Wakes on a clock, not on each response: woken per response, the thread encoded and
        # appended one response at a time and took the GIL from the request threads as often
        # (half of /recommend's time in the service, measured in process).
        stopping = False
        while not stopping:
            stopping = self._stop.wait(FLUSH_INTERVAL_S)
            self._flush()

    def _flush(self) -> None:
        """Appends what was queued when it started (everything once the log is closing),
        `append_rows` at a time, or in `max_appends_per_flush` appends of at most
        `max_batch_rows` when the queue is longer.

        What arrives meanwhile waits for the next flush, which sizes its appends by the queue it
        finds: a writer falling behind makes fewer, larger appends instead of one small append
        (and fsync) after another.

        Rows count against the queue's bound until they are appended, so the rows held in memory
        (queued or being written) never exceed it.
        """
        with self._count_lock:
            backlog = self._queued_rows  # all queued: nothing is being written between flushes
        per_append = -(-backlog // self._max_appends_per_flush)  # rounded up
        cut = min(self._max_batch_rows, max(self._append_rows, per_append))
        batch: dict[str, list[Any]] = {name: [] for name in self._names}
        rows = taken = 0
        while taken < backlog or self._stop.is_set():
            try:
                queued = self._queue.get_nowait()
            except queue.Empty:
                break
            taken += len(queued)
            try:
                columns = self._columns(queued)  # a lazy sequence builds its rows here
            except Exception:  # the writer must outlive a response it cannot turn into rows
                logger.exception("could not build %d rows of %s", len(queued), self._stream)
                self._drop("write_failed", len(queued))
                with self._count_lock:
                    self._queued_rows -= len(queued)
                continue
            for name, values in batch.items():
                values.extend(columns[name])
            rows += len(queued)
            while rows >= cut:
                head = {name: values[:cut] for name, values in batch.items()}
                self._append_and_release(head, cut)
                for values in batch.values():
                    del values[:cut]
                rows -= cut
        if rows:
            self._append_and_release(batch, rows)

    def _columns(self, queued: ShownItems | Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        if isinstance(queued, ShownItems):
            return queued.columns()
        built = list(queued)
        return {name: [row.get(name) for row in built] for name in self._names}

    def _append_and_release(self, columns: dict[str, list[Any]], rows: int) -> None:
        self._append(columns, rows)
        with self._count_lock:
            self._queued_rows -= rows

    def _append(self, columns: dict[str, list[Any]], rows: int) -> None:
        """Appends rows, halving a batch the log refuses as too large; never raises."""
        try:
            self._log.append_columns(self._stream, columns, rows)
        except RecordTooLargeError:
            if rows == 1:
                logger.warning("dropped a row of %s over the log's record limit", self._stream)
                self._drop("too_large", 1)
                return
            middle = rows // 2
            self._append({name: values[:middle] for name, values in columns.items()}, middle)
            self._append({name: values[middle:] for name, values in columns.items()}, rows - middle)
        except Exception:  # logging impressions must never take serving down
            logger.exception("could not log %d rows of %s", rows, self._stream)
            self._drop("write_failed", rows)
