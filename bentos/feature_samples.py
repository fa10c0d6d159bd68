"""The feature rows of a sample of `/recommend` requests, logged off the request path (drift).

The drift check (`orchestration/assets/drift.py`) compares what the ranker sees live with what it
was trained on. A personalised answer carries the rows it was ranked from
(`models.recommender.ScoredRows`); for a share `SHELFWISE_FEATURE_SAMPLE_RATE` of the requests,
decided by one random draw, up to `SHELFWISE_FEATURE_SAMPLE_ROWS` of those rows (a uniform draw
among all the ranked candidates, not only the shown ones: drift is about the ranker's input) are
copied and queued. A background writer appends them to the feedback log's `feature_samples`
stream, bounded as the impressions are (`bentos/impressions.py`: a full queue drops a request's
rows whole, counted in `shelfwise_feature_samples_dropped_total`); the compactor publishes them
to `feature_samples/date=YYYY-MM-DD/`.

A request that is not sampled costs one random draw (none at rate 0); other rungs of the ladder
have no rows and cost a comparison. A sampled one draws and copies its chosen rows (about 45 µs
for 20 of 240 candidates, measured); turning them into log rows (their places in the ranked
order, Python lists of floats) is left to the writer thread, which iterates them
(`SampledRows`).
"""

import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import bentoml
import numpy as np

from bentos.impressions import ImpressionLog
from models.features import feature_set_id
from models.recommender import ScoredRows
from shelfwise.lake import FEATURE_SAMPLES
from shelfwise.runtime.feedback import FeedbackLog

# About 2 kB per row in memory (57 floats as Python objects): at most ~20 MB queued.
MAX_QUEUED_ROWS = 10_000
# Rows per `append`: ~0.5 MB of Arrow per record.
MAX_BATCH_ROWS = 2_000

DROPPED = bentoml.metrics.Counter(
    name="shelfwise_feature_samples_dropped",
    documentation="Sampled feature rows not logged, by reason: queue_full (the writer fell "
    "behind), too_large or write_failed.",
    labelnames=["reason"],
)


class SampledRows(Sequence[dict[str, Any]]):
    """One sampled request's log rows, built only when iterated (by the writer thread).

    Holds copies (the answer's rows are references into the serving state): the chosen rows'
    vectors and item ids, and every candidate's score (for the chosen ones' places in the order).
    """

    def __init__(
        self,
        rows: ScoredRows,
        chosen: np.ndarray,
        fields: dict[str, Any],
    ) -> None:
        self._chosen = chosen
        self._matrix = rows.matrix[chosen]  # fancy indexing: a copy
        self._item_ids = rows.item_ids[chosen]
        self._scores = rows.scores.copy()
        self._fields = fields

    def __len__(self) -> int:
        return len(self._chosen)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return self._rows()[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows())

    def _rows(self) -> list[dict[str, Any]]:
        # The candidates' places in the ranked order (1: the best score), as the answer sorted.
        order = np.argsort(-self._scores, kind="stable")
        places = np.empty(len(order), dtype=np.int64)
        places[order] = np.arange(1, len(order) + 1)
        vectors = self._matrix.astype(np.float32, copy=False).tolist()
        return [
            {
                **self._fields,
                "item_id": str(item_id),
                "score_rank": int(places[index]),
                "score": float(self._scores[index]),
                "features": vector,
            }
            for index, item_id, vector in zip(
                self._chosen.tolist(), self._item_ids, vectors, strict=True
            )
        ]


class FeatureSampler:
    """Draws the requests whose feature rows are logged, and logs them in the background.

    Args:
        log: The feedback log to append to.
        rate: The share of personalised requests sampled (0 to 1).
        max_rows: The most candidate rows logged per sampled request (0: all).
        seed: Seed of the draws (None: from the system; tests fix it).
        max_per_s: The most requests sampled per second, on average (0: no bound); a draw
            beyond it is not sampled. Bursts of up to a second's worth pass.
        clock: Seconds of a monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        log: FeedbackLog,
        rate: float,
        max_rows: int,
        seed: int | None = None,
        max_per_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.max_rows = max_rows
        self.max_per_s = max_per_s
        self._random = random.Random(seed)
        # A token bucket: `max_per_s` tokens a second, at most a second's worth (at least one).
        self._clock = clock
        self._capacity = max(1.0, max_per_s)
        self._tokens = self._capacity
        self._filled_at = clock()
        self._feature_set = feature_set_id()
        self._writer = ImpressionLog(
            log,
            max_queued_rows=MAX_QUEUED_ROWS,
            max_batch_rows=MAX_BATCH_ROWS,
            stream=FEATURE_SAMPLES,
            dropped_counter=DROPPED,
        )

    @property
    def dropped(self) -> int:
        """Rows dropped by the writer (also in the Prometheus counter)."""
        return self._writer.dropped

    def draw(self) -> bool:
        """Whether the next request is sampled (decided before it is answered: a sampled
        request is re-ranked, not answered from its ranked list, so that it has rows).

        Drawn with probability `rate`, within `max_per_s`. Called from the event loop, and from
        the thread pool for some requests: two draws racing can at worst take one token too many.
        """
        if self.rate <= 0.0 or self._random.random() >= self.rate:
            return False
        if not self.max_per_s:
            return True
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._filled_at) * self.max_per_s)
        self._filled_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def maybe_add(
        self,
        rows: ScoredRows | None,
        *,
        rec_id: str,
        sampled_at: datetime,
        user_id: str,
        model_version: str | None,
        fallback_level: int,
        drawn: bool | None = None,
    ) -> bool:
        """Logs a request's ranked rows if the draw picks it; never blocks, never raises.

        Args:
            rows: The rows the answer was ranked from (None on the ladder's other rungs).
            rec_id: The response's id (the impressions carry it too).
            sampled_at: When the request was answered.
            user_id: The user.
            model_version: The ranker that scored them.
            fallback_level: The answer's fallback level (1: the candidate order, no ranker).
            drawn: The request's draw (`draw`), when made before it was answered; None draws
                now.

        Returns:
            Whether the request was sampled and its rows queued.
        """
        if drawn is None:
            drawn = self.draw()
        if rows is None or not drawn:
            return False
        try:
            count = len(rows.item_ids)
            if self.max_rows and count > self.max_rows:
                chosen = np.array(sorted(self._random.sample(range(count), self.max_rows)))
            else:
                chosen = np.arange(count)
            fields = {
                "rec_id": rec_id,
                "sampled_at": sampled_at,
                "user_id": user_id,
                "model_version": model_version,
                "fallback_level": fallback_level,
                "feature_set": self._feature_set,
            }
            return self._writer.add(SampledRows(rows, chosen, fields))
        except Exception:  # a sample must never fail the request it was drawn from
            return False

    def close(self) -> None:
        """Writes what is queued and stops the writer."""
        self._writer.close()
