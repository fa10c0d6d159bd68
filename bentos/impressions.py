"""Impression logging off the request path, in bounded memory.

Every response is logged as impressions (one row per item shown) for attribution and training.
A request only puts its rows on a queue; a background thread appends them to the write-ahead log
in batches every `FLUSH_INTERVAL_S`. This keeps an fsync out of every `/recommend`: nobody waits
for an impression's acknowledgement, so at most the last interval's impressions can be lost when
the process is killed, whereas `/events` acknowledges only what is durable.

Bounded, because impressions are worth less than serving: the queue holds at most
`MAX_QUEUED_ROWS` rows. When the writer falls behind (a slow disk, a flood of large responses) a
response's impressions are dropped whole instead of blocking the request or growing the worker,
and counted in `shelfwise_impressions_dropped_total{reason="queue_full"}`. Each `append` carries
at most `MAX_BATCH_ROWS` rows, and a batch the log refuses as too large
(`shelfwise.runtime.feedback.RecordTooLargeError`) is halved until it fits; a single row too
large on its own is dropped (`reason="too_large"`). Rows lost to a failed write count as
`reason="write_failed"`.

The same writer logs the sampled feature rows of `/recommend` requests (`bentos/feature_samples.py`)
to their own stream, with their own bound and counter.
"""

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

import bentoml

from shelfwise.runtime.feedback import FeedbackLog, RecordTooLargeError

logger = logging.getLogger("bentoml.shelfwise")

FLUSH_INTERVAL_S = 0.2
IMPRESSIONS = "impressions"
# About 4 s of impressions at this machine's peak (~1,200 responses/s of 10 items), so a stall
# of the disk of a few seconds loses nothing; ~0.5 kB a row in memory (200-character ids at
# most), so the queue never holds more than a few tens of MB.
MAX_QUEUED_ROWS = 50_000
# Rows per `append` (one log record): a few MB with bounded identifiers, far below the log's
# record limit, and a short hold of the log's lock for the /events appends waiting behind it.
MAX_BATCH_ROWS = 10_000

DROPPED = bentoml.metrics.Counter(
    name="shelfwise_impressions_dropped",
    documentation="Impression rows not logged, by reason: queue_full (the writer fell behind), "
    "too_large (a row over the log's record limit) or write_failed (the log refused the write).",
    labelnames=["reason"],
)


class ImpressionLog:
    """Buffers impression rows in a bounded queue and appends them to the feedback log.

    Args:
        log: The feedback log to append to.
        max_queued_rows: Rows the queue may hold; a response that does not fit is dropped.
        max_batch_rows: Rows per `append`.
        stream: The log's stream the rows go to (impressions by default).
        dropped_counter: The Prometheus counter of dropped rows (by `reason`).
    """

    def __init__(
        self,
        log: FeedbackLog,
        max_queued_rows: int = MAX_QUEUED_ROWS,
        max_batch_rows: int = MAX_BATCH_ROWS,
        stream: str = IMPRESSIONS,
        dropped_counter: bentoml.metrics.Counter = DROPPED,
    ) -> None:
        self._log = log
        self._stream = stream
        self._dropped_counter = dropped_counter
        self._max_queued_rows = max_queued_rows
        self._max_batch_rows = max_batch_rows
        self._queue: queue.SimpleQueue[Sequence[dict[str, Any]]] = queue.SimpleQueue()
        # Rows queued or being written; guarded by a lock held for an addition only.
        self._queued_rows = 0
        self._count_lock = threading.Lock()
        self.dropped = 0  # rows dropped by this log (also in the Prometheus counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=stream, daemon=True)
        self._thread.start()

    def add(self, rows: Sequence[dict[str, Any]]) -> bool:
        """Queues one response's impressions; never blocks (beyond a counter's lock), never raises.

        Args:
            rows: The response's impression rows: a list, or a sequence that builds them when the
                writer thread iterates it (`bentos.feature_samples.SampledRows`).

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
        """Appends what is queued, `max_batch_rows` at a time.

        Rows count against the queue's bound until they are appended, so the rows held in memory
        (queued or being written) never exceed it.
        """
        batch: list[dict[str, Any]] = []
        while True:
            try:
                queued = self._queue.get_nowait()
            except queue.Empty:
                break
            try:
                batch.extend(queued)  # a lazy sequence builds its rows here, off the request path
            except Exception:  # the writer must outlive a response it cannot turn into rows
                logger.exception("could not build %d rows of %s", len(queued), self._stream)
                self._drop("write_failed", len(queued))
                with self._count_lock:
                    self._queued_rows -= len(queued)
                continue
            while len(batch) >= self._max_batch_rows:
                self._append_and_release(batch[: self._max_batch_rows])
                del batch[: self._max_batch_rows]
        if batch:
            self._append_and_release(batch)

    def _append_and_release(self, rows: list[dict[str, Any]]) -> None:
        self._append(rows)
        with self._count_lock:
            self._queued_rows -= len(rows)

    def _append(self, rows: list[dict[str, Any]]) -> None:
        """Appends rows, halving a batch the log refuses as too large; never raises."""
        try:
            self._log.append(self._stream, rows)
        except RecordTooLargeError:
            if len(rows) == 1:
                logger.warning("dropped a row of %s over the log's record limit", self._stream)
                self._drop("too_large", 1)
                return
            middle = len(rows) // 2
            self._append(rows[:middle])
            self._append(rows[middle:])
        except Exception:  # logging impressions must never take serving down
            logger.exception("could not log %d rows of %s", len(rows), self._stream)
            self._drop("write_failed", len(rows))
