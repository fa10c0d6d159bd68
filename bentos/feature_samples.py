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
have no rows and cost a comparison.
"""

import random
from datetime import datetime

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


class FeatureSampler:
    """Draws the requests whose feature rows are logged, and logs them in the background.

    Args:
        log: The feedback log to append to.
        rate: The share of personalised requests sampled (0 to 1).
        max_rows: The most candidate rows logged per sampled request (0: all).
        seed: Seed of the draws (None: from the system; tests fix it).
    """

    def __init__(
        self, log: FeedbackLog, rate: float, max_rows: int, seed: int | None = None
    ) -> None:
        self.rate = rate
        self.max_rows = max_rows
        self._random = random.Random(seed)
        self._rng = np.random.default_rng(seed)
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

    def maybe_add(
        self,
        rows: ScoredRows | None,
        *,
        rec_id: str,
        sampled_at: datetime,
        user_id: str,
        model_version: str | None,
        fallback_level: int,
    ) -> bool:
        """Logs a request's ranked rows if the draw picks it; never blocks, never raises.

        Args:
            rows: The rows the answer was ranked from (None on the ladder's other rungs).
            rec_id: The response's id (the impressions carry it too).
            sampled_at: When the request was answered.
            user_id: The user.
            model_version: The ranker that scored them.
            fallback_level: The answer's fallback level (1: the candidate order, no ranker).

        Returns:
            Whether the request was sampled and its rows queued.
        """
        if rows is None or self.rate <= 0.0 or self._random.random() >= self.rate:
            return False
        try:
            return self._writer.add(
                self._rows(rows, rec_id, sampled_at, user_id, model_version, fallback_level)
            )
        except Exception:  # a sample must never fail the request it was drawn from
            return False

    def _rows(
        self,
        rows: ScoredRows,
        rec_id: str,
        sampled_at: datetime,
        user_id: str,
        model_version: str | None,
        fallback_level: int,
    ) -> list[dict]:
        count = len(rows.item_ids)
        # The candidates' places in the ranked order (1: the best score), as the answer sorted.
        order = np.argsort(-rows.scores, kind="stable")
        ranks = np.empty(count, dtype=np.int64)
        ranks[order] = np.arange(1, count + 1)
        chosen = np.arange(count)
        if self.max_rows and count > self.max_rows:
            chosen = np.sort(self._rng.choice(count, self.max_rows, replace=False))
        # Copies: the rows are references into the serving state.
        vectors = rows.matrix[chosen].astype(np.float32).tolist()
        return [
            {
                "rec_id": rec_id,
                "sampled_at": sampled_at,
                "user_id": user_id,
                "model_version": model_version,
                "fallback_level": fallback_level,
                "item_id": str(rows.item_ids[index]),
                "score_rank": int(ranks[index]),
                "score": float(rows.scores[index]),
                "feature_set": self._feature_set,
                "features": vector,
            }
            for index, vector in zip(chosen.tolist(), vectors, strict=True)
        ]

    def close(self) -> None:
        """Writes what is queued and stops the writer."""
        self._writer.close()
