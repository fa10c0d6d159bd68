"""Answering a recommendation request from the serving snapshot, without any web framework.

The pipeline exports, as of the serving cutoff, every known user's candidates with their feature
vectors (assembled by `models.features.assemble_features`, exactly as for training) and the popular
items. A request slices the user's rows, scores them with the ranker and returns the top k; a user
without candidates gets popular items. The BentoML service is a thin shell around `Recommender`.
"""

import logging
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import polars as pl

from models.business_rules import BusinessRules, RequestFilters
from models.features import FEATURE_COLUMNS, FeatureTables, assemble_features
from shelfwise.lake import SERVING_CANDIDATES, SERVING_POPULAR, Lake

logger = logging.getLogger(__name__)

STRATEGY_PERSONALIZED = "personalized"
STRATEGY_POPULAR = "popular"

# How far a response fell back from what it should have been (ARCHITECTURE.md §6).
FALLBACK_NONE = 0  # as intended: the ranker for known users, popular items for unknown ones
FALLBACK_CANDIDATE_ORDER = 1  # the ranker is missing or failed: the generators' own order
FALLBACK_POPULAR = 2  # the candidates are missing: popular items for everyone


SNAPSHOT_KEY = ["user_id", "item_id", "candidate_rank"]


def serving_snapshot(candidates: pl.DataFrame, tables: FeatureTables) -> pl.DataFrame:
    """The rows the service ranks: candidates with their feature vectors, as for training.

    Args:
        candidates: Candidates at one cutoff (see `models.candidates.generate_candidates`).
        tables: Feature marts at the same cutoff.

    Returns:
        user_id, item_id, candidate_rank and `FEATURE_COLUMNS`, assembled by the very function
        that builds the training set.
    """
    return assemble_features(candidates, tables).select(*SNAPSHOT_KEY, *FEATURE_COLUMNS)


@dataclass(frozen=True)
class RankedItem:
    """One recommended item."""

    item_id: str
    score: float
    source: str


@dataclass(frozen=True)
class Recommendation:
    """The answer to one request."""

    items: list[RankedItem]
    strategy: str
    fallback_level: int = FALLBACK_NONE


class Recommender:
    """Ranks a user's precomputed candidates with the ranker; popular items for everyone else.

    Args:
        candidates: Serving snapshot rows: user_id, item_id, candidate_rank, `FEATURE_COLUMNS`.
        popular: Popular items, most popular first: item_id, popularity.
        booster: The ranker, or None to serve candidates in their generators' order.
        feature_names: The features the booster was trained on, in its order.
        rules: The business rules (already bought, stock, request filters, category cap).
    """

    def __init__(
        self,
        candidates: pl.DataFrame,
        popular: pl.DataFrame,
        booster: lgb.Booster | None,
        feature_names: list[str] | None = None,
        rules: BusinessRules | None = None,
    ) -> None:
        self.rules = rules or BusinessRules()
        features = feature_names or FEATURE_COLUMNS
        missing = [name for name in features if name not in candidates.columns]
        if missing:
            raise ValueError(f"serving snapshot lacks the ranker's features: {missing}")
        ordered = candidates.sort("user_id", "candidate_rank")
        self._matrix = ordered.select(features).to_numpy().astype(np.float32, copy=False)
        self._item_ids = ordered.get_column("item_id").to_numpy()
        self._candidate_rank = ordered.get_column("candidate_rank").to_numpy()
        sizes = ordered.group_by("user_id", maintain_order=True).agg(pl.len())
        ends = np.cumsum(sizes.get_column("len").to_numpy().astype(np.int64)).tolist()
        starts = [0, *ends[:-1]] if ends else []
        user_ids = sizes.get_column("user_id").to_list()
        self._rows = dict(zip(user_ids, zip(starts, ends, strict=True), strict=True))
        self._popular_ids = popular.get_column("item_id").to_list()
        self._popular_scores = popular.get_column("popularity").cast(pl.Float64).to_list()
        self._booster = booster

    @classmethod
    def from_lake(
        cls,
        lake: Lake,
        booster: lgb.Booster | None,
        feature_names: list[str] | None = None,
        max_per_category: int = 0,
    ) -> "Recommender":
        """Loads the serving snapshot the pipeline exported to the lake.

        A missing or unreadable snapshot is logged and leaves the recommender degraded (popular
        items, or nothing when those are missing too) instead of failing the service.
        """
        features = feature_names or FEATURE_COLUMNS
        frames = []
        for relpath, schema in (
            (
                SERVING_CANDIDATES,
                {
                    **{k: pl.String for k in SNAPSHOT_KEY[:2]},
                    "candidate_rank": pl.Int32,
                    **{name: pl.Float32 for name in features},
                },
            ),
            (SERVING_POPULAR, {"item_id": pl.String, "popularity": pl.Float64}),
        ):
            try:
                frames.append(lake.read_frame(relpath))
            except Exception:  # a missing or corrupt artifact must not take the service down
                logger.exception("serving snapshot %s unavailable: degrading", lake.uri(relpath))
                frames.append(pl.DataFrame(schema=schema))
        return cls(
            frames[0], frames[1], booster, features, BusinessRules.from_lake(lake, max_per_category)
        )

    @property
    def known_users(self) -> int:
        """How many users have precomputed candidates."""
        return len(self._rows)

    def recommend(
        self, user_id: str, k: int, filters: RequestFilters | None = None
    ) -> Recommendation:
        """The top-k distinct items for a user that the business rules allow.

        Args:
            user_id: Any user id; unknown users are normal traffic and get popular items.
            k: How many items (at least 1).
            filters: The request's filters; in-stock items only by default.

        Returns:
            Up to k items, best first: the user's candidates, topped up with popular items.
        """
        filters = filters or RequestFilters()
        span = self._rows.get(user_id)
        if span is None:
            level = FALLBACK_POPULAR if not self._rows else FALLBACK_NONE
            items = self._popular(user_id, k, filters, chosen=[])
            return Recommendation(items, STRATEGY_POPULAR, level)
        start, end = span
        scores, source, level = None, "ranker", FALLBACK_NONE
        if self._booster is not None:
            try:
                scores = self._booster.predict(self._matrix[start:end], num_threads=1)
            except Exception:  # degrade to the candidate order rather than fail the request
                logger.exception("ranker failed for user %s: serving the candidate order", user_id)
        if scores is None:
            scores = -self._candidate_rank[start:end].astype(np.float64)
            source, level = "candidates", FALLBACK_CANDIDATE_ORDER
        order = np.argsort(-scores, kind="stable")
        ranked = ((str(self._item_ids[start + i]), float(scores[i])) for i in order)
        items = [
            RankedItem(item_id, score, source)
            for item_id, score in self.rules.select(user_id, ranked, filters, k)
        ]
        if len(items) < k:
            items += self._popular(user_id, k - len(items), filters, chosen=items)
        return Recommendation(items, STRATEGY_PERSONALIZED, level)

    def _popular(
        self, user_id: str, k: int, filters: RequestFilters, chosen: list[RankedItem]
    ) -> list[RankedItem]:
        ranked = zip(self._popular_ids, self._popular_scores, strict=True)
        already = [item.item_id for item in chosen]
        return [
            RankedItem(item_id, float(score), "popular")
            for item_id, score in self.rules.select(user_id, ranked, filters, k, already)
        ]
