"""Impression logging off the request path.

Every response is logged as impressions (one row per item shown) for attribution and training.
A request only puts its rows on a queue; a background thread appends them to the write-ahead log
in batches every `FLUSH_INTERVAL_S`. This keeps an fsync out of every `/recommend`: nobody waits
for an impression's acknowledgement, so at most the last interval's impressions can be lost when
the process is killed, whereas `/events` acknowledges only what is durable.
"""

import logging
import queue
import threading
from typing import Any

from shelfwise.feedback import FeedbackLog

logger = logging.getLogger("bentoml.shelfwise")

FLUSH_INTERVAL_S = 0.2
IMPRESSIONS = "impressions"


class ImpressionLog:
    """Buffers impression rows and appends them to the feedback log in the background."""

    def __init__(self, log: FeedbackLog) -> None:
        self._log = log
        self._queue: queue.SimpleQueue[list[dict[str, Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self._thread.start()

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Queues one response's impressions (never blocks, never raises)."""
        self._queue.put(rows)

    def close(self) -> None:
        """Writes what is queued and stops the thread."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        # Wakes on a clock, not on each response: woken per response, the thread encoded and
        # appended one response at a time and took the GIL from the request threads as often
        # (half of /recommend's time in the service, measured in process).
        stopping = False
        while not stopping:
            stopping = self._stop.wait(FLUSH_INTERVAL_S)
            batch: list[dict[str, Any]] = []
            while True:
                try:
                    batch.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch:
                try:
                    self._log.append(IMPRESSIONS, batch)
                except Exception:  # logging impressions must never take serving down
                    logger.exception("could not log %d impressions", len(batch))
