"""Answering a recommendation request from the serving snapshot, without any web framework.

The pipeline exports, as of the serving cutoff, every known user's candidates with their feature
vectors (assembled by `models.features.assemble_features`, exactly as for training), the item
neighbours, the catalog facts and the popular items. A request walks the cold-start ladder:

1. a known user: their candidates, updated with the session (`models.session`), re-ranked;
2. an unknown user with a session or a context item: the session items' neighbours
   (co-visitation, bought together, collaborative);
3. a new item without neighbours yet: what trends in its category (the context item's, else the
   latest session item's);
4. nothing known: the shop's popular items.

Every list is topped up with popular items when the rules leave fewer than k.

A known user whose segment the model's segment policy (`models.segments`, chosen on validation)
serves its fallback starts at rung 2, as an unknown user would, and the response says so
(`fallback_level` `FALLBACK_SEGMENT`).

The business rules filter every list; items the catalog marks as not recommendable (fees,
postage, gift cards) never reach any rung's answer nor `similar`'s, and they seed no session
neighbours (as in training, where they are not among the recent items). The BentoML service is a
thin shell around `Recommender`.
"""

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from models.business_rules import BusinessRules, OnlineFacts, RequestFilters
from models.candidates import GENERATORS, SCORE_COLUMNS, CandidateConfig, recommendable
from models.features import (
    FEATURE_COLUMNS,
    ITEM_FEATURES,
    USER_BRAND_FEATURES,
    USER_CATEGORY_FEATURES,
    USER_FEATURES,
    assemble_features,
)
from models.history import UserHistory, user_history
from models.marts import Marts
from models.online_store import OnlineVersion
from models.ranked_lists import encode_ranked
from models.segments import SegmentPolicy
from models.session import (
    BOUGHT_TOGETHER,
    COLLABORATIVE,
    COVISIT,
    NEIGHBOUR_KINDS,
    ContentIndex,
    NeighbourIndex,
    RecencySignals,
    Session,
    neighbour_scores,
    recency_signals,
)
from models.snapshot import (
    NEIGHBOUR_ROWS,
    SNAPSHOT_KEY,
    SNAPSHOT_ORDER,
    CandidateSnapshot,
    CandidateStore,
    SnapshotFeaturesError,
    load_snapshot,
    require_features,
)
from models.tracing import (
    ATTR_CANDIDATES,
    ATTR_PICKED,
    ATTR_RANKED,
    ATTR_ROWS,
    ATTR_SESSION_ITEMS,
    ATTR_SOURCE,
    ATTR_USER_KNOWN,
    STAGE_CANDIDATES,
    STAGE_FEATURES,
    STAGE_NEIGHBOURS,
    STAGE_RANK,
    STAGE_RULES,
    stage,
)
from models.user_state import UserCandidates
from shelfwise.lake import (
    SERVING_CANDIDATES,
    SERVING_ITEMS,
    SERVING_NEIGHBOURS,
    SERVING_POPULAR,
    Lake,
)
from shelfwise.runtime.online_state import StockChange

if TYPE_CHECKING:  # LightGBM is imported where a booster is loaded (`models.ranker`)
    import lightgbm as lgb
    from opentelemetry.trace import Tracer

logger = logging.getLogger(__name__)

# The rungs of the cold-start ladder (the response's `strategy`).
STRATEGY_PERSONALIZED = "personalized"
STRATEGY_SESSION = "session"
STRATEGY_CATEGORY_TRENDING = "category_trending"
STRATEGY_POPULAR = "popular"

# How far a response fell back from what it should have been (ARCHITECTURE.md §6).
FALLBACK_NONE = 0  # as intended: the ranker for known users, popular items for unknown ones
FALLBACK_CANDIDATE_ORDER = 1  # the ranker is missing or failed: the generators' own order
FALLBACK_POPULAR = 2  # the candidates are missing: popular items for everyone
# A known user whose segment the model's segment policy serves its fallback (`models.segments`):
# answered like an unknown user (session neighbours, else popular items), on purpose.
FALLBACK_SEGMENT = 3

# The (user, item) purchase counts a purchase in the session adds one to (`_apply_signals`).
REPEAT_COUNTS = (
    "user_item_purchases",
    "user_item_purchases_decayed_7d",
    "user_item_purchases_decayed_30d",
    "user_item_purchases_decayed_90d",
    "user_item_purchase_occasions",
)


def serving_snapshot(candidates: pl.DataFrame, tables: Marts) -> pl.DataFrame:
    """The rows the service ranks: candidates with their feature vectors, as for training.

    Args:
        candidates: Candidates at one cutoff (see `models.candidates.generate_candidates`).
        tables: Feature marts at the same cutoff.

    Returns:
        user_id, item_id, candidate_rank and `FEATURE_COLUMNS`, assembled by the very function
        that builds the training set; each user's rows together, best candidate first (the
        users' states are encoded from it batch by batch, see `models.snapshot`).
    """
    return (
        assemble_features(candidates, tables)
        .select(*SNAPSHOT_KEY, *FEATURE_COLUMNS)
        .sort(SNAPSHOT_ORDER)
    )


def serving_popular(item_features: pl.DataFrame, n: int) -> pl.DataFrame:
    """The popular list the service tops every answer up with.

    Args:
        item_features: `item_features` at the serving cutoff.
        n: How many items.

    Returns:
        item_id, popularity of the `n` most popular items in stock that may be recommended,
        most popular first.
    """
    return (
        recommendable(item_features)
        .filter(pl.col("is_in_stock"))
        .sort("popularity_rank")
        .head(n)
        .select("item_id", "popularity")
    )


@dataclass(frozen=True)
class RankedItem:
    """One recommended item."""

    item_id: str
    score: float
    source: str


@dataclass(frozen=True)
class ScoredRows:
    """The feature rows a personalised answer was ranked from (references, not copies).

    For what looks at a request after it was answered (explanations, sampled drift rows):
    `matrix[n]` holds `FEATURE_COLUMNS` of candidate `item_ids[n]`, `scores[n]` its score (the
    ranker's, or the negated candidate order at fallback level 1).
    """

    matrix: np.ndarray
    item_ids: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Recommendation:
    """The answer to one request."""

    items: list[RankedItem]
    strategy: str
    fallback_level: int = FALLBACK_NONE
    # The personalised rows behind the answer; None on the other rungs of the ladder.
    rows: ScoredRows | None = field(default=None, compare=False, repr=False)


class Recommender:
    """Walks the cold-start ladder for one request; see the module docstring.

    Args:
        candidates: The serving snapshot: rows of user_id, item_id, candidate_rank and
            `FEATURE_COLUMNS` in any order, or a candidate store (`CandidateSnapshot` loaded in
            process, or `models.online_store.RedisCandidateStore`).
        popular: Popular items, most popular first: item_id, popularity.
        booster: The ranker (a LightGBM booster, or anything predicting like one: the compiled
            ranker of `models.compiled_ranker`), or None to serve candidates in their
            generators' order.
        feature_names: The features the booster was trained on, in its order.
        rules: The business rules (already bought, stock, request filters, category cap).
        neighbours: Item neighbours (co-visitation, bought together, collaborative) as of the
            snapshot.
        item_vectors: item_id and the `ITEM_FEATURES` columns, for items a session adds.
        ranker_budget_s: Seconds the ranker may take per request before the candidate order is
            served instead (None: no limit).
        recent_items: Recent items that seed the neighbour generators (as in training).
        segment_policy: The model's segment policy (`models.segments`): a known user whose
            segment (by `user_events` in the snapshot) it serves the fallback is answered like
            an unknown user, with `FALLBACK_SEGMENT`; None serves every known user the ranker.
    """

    # Candidates a session may add to a known user's list (its strongest neighbours).
    MAX_SESSION_CANDIDATES = 100
    # The fallback level of the candidate order without a ranker score: a degradation, unless
    # the candidate order is what was asked for (`without_ranker`).
    _unranked_level = FALLBACK_CANDIDATE_ORDER
    # The tracer of the request's stages (`models.tracing`); None, tracing off: no spans at all.
    _tracer: "Tracer | None" = None
    # Whether the store's ranked lists are this recommender's ranking (`with_ranked_lists`).
    _precomputed = False

    def __init__(
        self,
        candidates: pl.DataFrame | CandidateStore,
        popular: pl.DataFrame,
        booster: "lgb.Booster | None",
        feature_names: list[str] | None = None,
        rules: BusinessRules | None = None,
        neighbours: NeighbourIndex | None = None,
        item_vectors: pl.DataFrame | None = None,
        ranker_budget_s: float | None = None,
        recent_items: int = CandidateConfig().recent_items,
        segment_policy: SegmentPolicy | None = None,
    ) -> None:
        self.rules = rules or BusinessRules()
        self._segment_policy = segment_policy
        self.neighbours = neighbours or NeighbourIndex.empty()
        self.content = ContentIndex(self.rules.items)
        features = feature_names or FEATURE_COLUMNS
        if isinstance(candidates, pl.DataFrame):
            require_features(features, candidates.columns, "serving snapshot")
            candidates = CandidateSnapshot.from_frame(candidates)
        self._store: CandidateStore = candidates
        self._features = list(features)
        self._column = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
        # The booster's columns; None when they are FEATURE_COLUMNS as they are (no copy needed).
        ranker_columns = [self._column[name] for name in features]
        self._ranker_columns = None if features == FEATURE_COLUMNS else ranker_columns
        self._score_columns = np.array([self._column[c] for c in SCORE_COLUMNS])
        # The rules would skip items never to recommend on every request: leave them out once.
        self._popular_ids, self._popular_scores = [], []
        popularity = popular.get_column("popularity").cast(pl.Float64).to_list()
        for item_id, score in zip(popular.get_column("item_id").to_list(), popularity, strict=True):
            if self._proposable(item_id):
                self._popular_ids.append(item_id)
                self._popular_scores.append(score)
        self._booster = booster
        self._budget = ranker_budget_s
        self._recent_items = recent_items
        vectors = item_vectors if item_vectors is not None else pl.DataFrame({"item_id": []})
        item_columns = list(ITEM_FEATURES.values())
        vectors = vectors.with_columns(
            [pl.lit(None, pl.Float32).alias(c) for c in item_columns if c not in vectors.columns]
        )
        self._item_vector_rows = {
            item: n for n, item in enumerate(vectors.get_column("item_id").cast(pl.String))
        }
        self._item_vectors = (
            vectors.select(item_columns).to_numpy().astype(np.float32, copy=False)
            if vectors.height
            else np.zeros((0, len(item_columns)), np.float32)
        )

    @classmethod
    def from_lake(
        cls,
        lake: Lake,
        booster: "lgb.Booster | None",
        feature_names: list[str] | None = None,
        max_per_category: int = 0,
        ranker_budget_s: float | None = None,
        segment_policy: SegmentPolicy | None = None,
    ) -> "Recommender":
        """Loads the serving snapshot the pipeline exported to the lake.

        A missing or unreadable part is logged and leaves the recommender degraded (the
        candidate order, popular items, or nothing when those are missing too) instead of
        failing the service.

        Raises:
            SnapshotFeaturesError: The snapshot lacks features the ranker needs (built for
                another ranker); load it without the ranker instead.
        """
        features = feature_names or FEATURE_COLUMNS
        try:
            candidates = load_snapshot(lake, features)
        except SnapshotFeaturesError:  # a snapshot for another ranker: the caller decides
            raise
        except Exception:  # a missing or corrupt artifact must not take the service down
            snapshot = lake.uri(SERVING_CANDIDATES)
            logger.exception("serving snapshot %s unavailable: degrading", snapshot)
            # The candidate order, then popular items.
            candidates = pl.DataFrame(
                schema={
                    **{k: pl.String for k in SNAPSHOT_KEY[:2]},
                    "candidate_rank": pl.Int32,
                    **{name: pl.Float32 for name in features},
                }
            )
        # The stored states come with the neighbours indexed as the online store keeps them;
        # only without them are the neighbour rows read and indexed here.
        stored = isinstance(candidates, CandidateSnapshot)
        indexed = stored and candidates.neighbours is not None
        parts = {
            SERVING_POPULAR: {"item_id": pl.String, "popularity": pl.Float64},
            **({} if indexed else {SERVING_NEIGHBOURS: NEIGHBOUR_ROWS.schema}),
            SERVING_ITEMS: {"item_id": pl.String},
        }
        frames = {}
        for relpath, schema in parts.items():
            try:
                frames[relpath] = lake.read_frame(relpath)
            except Exception:  # as above: degrade
                logger.exception("serving snapshot %s unavailable: degrading", lake.uri(relpath))
                frames[relpath] = pl.DataFrame(schema=schema)
        if indexed:
            neighbours = candidates.neighbours
        else:
            neighbours = NeighbourIndex.from_frame(frames[SERVING_NEIGHBOURS])
        return cls(
            candidates,
            frames[SERVING_POPULAR],
            booster,
            features,
            # The users' values hold their purchases; without them (degraded) the rules do.
            BusinessRules.from_lake(lake, max_per_category, purchases=not stored),
            neighbours,
            frames[SERVING_ITEMS],
            ranker_budget_s,
            segment_policy=segment_policy,
        )

    @classmethod
    def from_online_store(
        cls,
        version: OnlineVersion,
        booster: "lgb.Booster | None",
        feature_names: list[str] | None = None,
        max_per_category: int = 0,
        ranker_budget_s: float | None = None,
        segment_policy: SegmentPolicy | None = None,
    ) -> "Recommender":
        """A recommender on one version of the online store in Redis (`models.online_store`).

        Only the version's shared parts are in memory; each request reads its user's candidates
        and purchases from this version, never another.

        Raises:
            SnapshotFeaturesError: The version lacks features the ranker needs.
        """
        features = feature_names or FEATURE_COLUMNS
        require_features(features, version.columns, "online store")
        return cls(
            version.store,
            version.popular,
            booster,
            features,
            BusinessRules.from_frames(version.facts, None, max_per_category),
            version.neighbours,
            version.facts,
            ranker_budget_s,
            segment_policy=segment_policy,
        )

    def with_booster(self, booster: object) -> "Recommender":
        """This recommender with another ranker that scores like its own.

        For the same model compiled (`models.compiled_ranker`): everything else is shared, the
        snapshot is not loaded again.
        """
        other = copy.copy(self)
        other._booster = booster
        return other

    def with_ranker(
        self, booster: object, segment_policy: SegmentPolicy | None = None
    ) -> "Recommender":
        """This recommender with another ranker (a model of its own, on the same features).

        For an experiment's ranker arm: the snapshot, neighbours and rules are shared, the
        ranker and its segment policy are the other model's. The other model must score the
        same `feature_names` (the snapshot holds those); the caller checks.
        """
        other = copy.copy(self)
        other._booster = booster
        other._segment_policy = segment_policy
        other._unranked_level = FALLBACK_CANDIDATE_ORDER
        other._precomputed = False  # the lists are production's ranking, not this model's
        return other

    def with_ranked_lists(self, model_version: str | None) -> "Recommender":
        """This recommender answering from the store's ranked lists where they are exact.

        Only when the lists were ranked for the store's snapshot by `model_version`, the model
        this recommender's ranker is (`models.ranked_lists`); otherwise every request re-ranks.

        Args:
            model_version: The ranker's model version (the production model's source tag).

        Returns:
            A copy sharing everything else.
        """
        info = getattr(self._store, "ranked_lists", None)
        other = copy.copy(self)
        other._precomputed = (
            self._booster is not None
            and info is not None
            and info.serves(getattr(self._store, "snapshot_id", None), model_version)
        )
        return other

    def with_store(self, store: CandidateStore) -> "Recommender":
        """This recommender on another store of the same snapshot (e.g. with new ranked lists).

        Whether it answers from ranked lists is decided again (`with_ranked_lists`).
        """
        other = copy.copy(self)
        other._store = store
        other._precomputed = False
        return other

    @property
    def store(self) -> CandidateStore:
        """The candidate store (the snapshot's users)."""
        return self._store

    def ranked_list_key(self, user_id: str) -> str | None:
        """The Redis key of the user's ranked list, when requests answer from lists in Redis.

        The caller may read it with the online state, in one round trip (None: no such key).
        """
        if not self._precomputed:
            return None
        key_of = getattr(self._store, "ranked_key_of", None)
        return None if key_of is None else key_of(user_id)

    def candidates_key(self, user_id: str) -> str | None:
        """The Redis key of the user's candidates, when the candidate store is in Redis.

        The caller may read it with the online state, in one round trip (None: no such key).
        """
        key_of = getattr(self._store, "user_key_of", None)
        return None if key_of is None else key_of(user_id)

    @property
    def answers_from_ranked_lists(self) -> bool:
        """Whether requests without a session may be answered from the ranked lists."""
        return self._precomputed

    def without_ranker(self) -> "Recommender":
        """This recommender serving the candidate order on purpose (fallback level 0).

        For an experiment's `candidates` arm: every known user gets their candidates in the
        generators' own order (no segment policy: it chose between the ranker and the fallback),
        and since that order is what the arm asks for, it is no degradation.
        """
        other = self.with_ranker(None, None)
        other._unranked_level = FALLBACK_NONE
        return other

    @property
    def feature_names(self) -> list[str]:
        """The features the ranker scores, in its order (those the snapshot was loaded for)."""
        return list(self._features)

    def with_tracer(self, tracer: "Tracer | None") -> "Recommender":
        """This recommender tracing each request's stages with `tracer` (`models.tracing`).

        Args:
            tracer: An OpenTelemetry tracer, or None for no spans at all (the default).

        Returns:
            A copy sharing everything else (`with_booster` keeps the tracer).
        """
        other = copy.copy(self)
        other._tracer = tracer
        return other

    @property
    def known_users(self) -> int:
        """How many users have precomputed candidates."""
        return self._store.known_users

    def history(self, user_id: str, session: Session, limit: int) -> UserHistory:
        """A user's recent history, most recent first (`models.history.user_history`).

        Args:
            user_id: Any user id (an unknown user has only the live session).
            session: The user's live session from the online state.
            limit: At most this many entries.

        Raises:
            Exception: The candidate store is unreachable (Redis); the caller decides.
        """
        found = self._store.candidates_of(user_id)
        return user_history(found, session, self.rules.items, limit)

    def history_of_session(self, session: Session, limit: int) -> UserHistory:
        """The live session's part of a history alone (the candidate store is unreachable)."""
        return user_history(None, session, self.rules.items, limit)

    def recommend(
        self,
        user_id: str,
        k: int,
        filters: RequestFilters | None = None,
        session: Session | None = None,
        context_item_id: str | None = None,
        stock: Mapping[str, StockChange] | None = None,
        need_rows: bool = False,
        ranked_value: bytes | None = None,
        ranked_fetched: bool = False,
        candidates_value: bytes | None = None,
        candidates_fetched: bool = False,
    ) -> Recommendation:
        """The top-k distinct items for a user that the business rules allow.

        Args:
            user_id: Any user id; unknown users are normal traffic.
            k: How many items (at least 1).
            filters: The request's filters; in-stock items only by default.
            session: What the user did since the snapshot (and the request's context items).
            context_item_id: The item on the page, if any (its category guides cold start).
            stock: Stock updates posted to the service (the online state's).
            need_rows: Re-rank even when the ranked list would answer, for the ranked rows
                (`Recommendation.rows`: explanations, drift samples).
            ranked_value: The user's ranked list as read by the caller together with the online
                state (`ranked_list_key`), when `ranked_fetched`; else the store reads it.
            ranked_fetched: Whether the caller read it (None then: the user has none).
            candidates_value: The user's candidates as read by the caller together with the
                online state (`candidates_key`), when `candidates_fetched`; else the store
                reads them if it needs them.
            candidates_fetched: Whether the caller read them (None then: an unknown user).

        Returns:
            Up to k items, best first, topped up with popular items.
        """
        filters = filters or RequestFilters()
        session = session or Session()
        if self._precomputed and not need_rows and _no_activity(session):
            answer = self._from_ranked_list(
                user_id, k, filters, stock, ranked_value, ranked_fetched
            )
            if answer is not None:
                return answer
        try:
            with stage(self._tracer, STAGE_CANDIDATES) as span:
                if candidates_fetched:  # a Redis store's value, read with the online state
                    found = self._store.candidates_of(user_id, candidates_value, True)
                else:
                    found = self._store.candidates_of(user_id)
                if span is not None:
                    count = 0 if found is None else len(found.item_ids)
                    span.set_attributes(
                        {ATTR_USER_KNOWN: found is not None, ATTR_CANDIDATES: count}
                    )
            missing = self._store.known_users == 0
        except Exception as error:  # the store is unreachable: as if the candidates were missing
            logger.warning("candidates of user %s unavailable (%r): degrading", user_id, error)
            found, missing = None, True
        online = _online_facts(found, session, stock)
        if found is not None and not len(found.item_ids):
            found = None  # a user with purchases but no candidates
        segment_fallback = found is not None and self._segment_fallback(found)
        rows = None
        if found is not None and not segment_fallback:
            items, level, rows = self._personalized(user_id, found, session, filters, online, k)
            strategy = STRATEGY_PERSONALIZED
        else:
            level = FALLBACK_POPULAR if missing else FALLBACK_NONE
            level = FALLBACK_SEGMENT if segment_fallback else level
            with stage(self._tracer, STAGE_NEIGHBOURS):
                items = self._session_based(user_id, session, filters, online, k)
            strategy = STRATEGY_SESSION if items else STRATEGY_POPULAR
            if not items:  # a new item without neighbours yet: what trends in its category
                facts = self.rules.items.get(context_item_id or next(iter(session.item_ids), ""))
                trending = self.content.trending_in(facts.category_id if facts else None)
                items = self._select(user_id, trending, "trending", filters, online, k, items)
                strategy = STRATEGY_CATEGORY_TRENDING if items else strategy
        if len(items) < k:
            items += self._popular_for(user_id, filters, online, k, items)
        return Recommendation(items, strategy, level, rows)

    def _from_ranked_list(
        self,
        user_id: str,
        k: int,
        filters: RequestFilters,
        stock: Mapping[str, StockChange] | None,
        value: bytes | None = None,
        fetched: bool = False,
    ) -> Recommendation | None:
        """The answer from the user's ranked list, or None when only re-ranking can give it.

        The rules walk the list as `_personalized` walks the full ranking; only if k items pass
        before it ends is the answer certainly the same (`models.ranked_lists`). The user's own
        purchases are left out of the rules' facts: those the rules reject are not in the list,
        those in repeatable categories the rules allow.
        """
        try:
            with stage(self._tracer, STAGE_CANDIDATES) as span:
                ranked = (
                    self._store.ranked_of(user_id, value, fetched)
                    if fetched
                    else self._store.ranked_of(user_id)
                )
                if span is not None:
                    span.set_attributes({ATTR_RANKED: ranked is not None})
        except Exception as error:  # the store is unreachable: the full path degrades
            logger.warning("ranked list of user %s unavailable (%r)", user_id, error)
            return None
        if ranked is None or len(ranked) < k:
            return None
        with stage(self._tracer, STAGE_RULES) as span:
            online = OnlineFacts(frozenset(), stock or {})
            chosen = self.rules.select(user_id, ranked, filters, k, online=online)
            if span is not None:
                span.set_attributes({ATTR_SOURCE: STRATEGY_PERSONALIZED, ATTR_PICKED: len(chosen)})
        if len(chosen) < k:
            return None
        items = [RankedItem(item, score, source) for item, (score, source) in chosen]
        return Recommendation(items, STRATEGY_PERSONALIZED, FALLBACK_NONE)

    def ranked_list(self, user_id: str, depth: int) -> bytes:
        """The user's ranked list (`models.ranked_lists`): what `recommend` would rank.

        The best `depth` items of the ranker's order that the rules may ever show this user
        (not those never to recommend, nor those bought before the snapshot in a category not
        bought again), with their scores and proposing generators.

        Args:
            user_id: A user of the store.
            depth: Items kept at most.

        Returns:
            The value; b"" when a request of the user is not answered by the ranker from
            the snapshot's candidates (unknown, no candidates, the segment's fallback, no
            ranker), so re-ranking answers it.
        """
        found = self._store.candidates_of(user_id)
        if found is None or not len(found.item_ids) or self._segment_fallback(found):
            return b""
        scores = self._rank(user_id, found.matrix)
        if scores is None:
            return b""
        sources = self._proposing_generators(found.matrix)
        kept = []
        for row in np.argsort(-scores, kind="stable").tolist():
            if not self.rules.rejects_always(found.bought, str(found.item_ids[row])):
                kept.append(row)
                if len(kept) == depth:
                    break
        table = self._store.table
        return encode_ranked(
            table.codes_of(found.item_ids[kept].tolist()).tolist(),
            scores[kept].tolist(),
            sources[kept].tolist(),
            table.wide_codes,
        )

    def popular(
        self,
        user_id: str,
        k: int,
        filters: RequestFilters | None = None,
        session: Session | None = None,
        stock: Mapping[str, StockChange] | None = None,
    ) -> Recommendation:
        """The shop's popular items for anyone, through the business rules, as intended.

        The rules as for every list: what the user already bought, stock, the request's filters,
        the category cap; fallback level 0. For an experiment's `popular` arm; arguments as for
        `recommend`.
        """
        filters = filters or RequestFilters()
        session = session or Session()
        try:
            found = self._store.candidates_of(user_id)
        except Exception as error:  # the store is unreachable: the session's purchases only
            logger.warning("purchases of user %s unavailable (%r)", user_id, error)
            found = None
        online = _online_facts(found, session, stock)
        items = self._popular_for(user_id, filters, online, k, [])
        return Recommendation(items, STRATEGY_POPULAR, FALLBACK_NONE)

    def similar(
        self, item_id: str, k: int, filters: RequestFilters | None = None
    ) -> Recommendation:
        """Items viewed or bought together with an item; content-based neighbours for new items.

        Args:
            item_id: Any item id; unknown items get popular items.
            k: How many items.
            filters: Request filters (in-stock items only by default).

        Returns:
            Up to k items other than `item_id`, strongest first; strategy `neighbours`,
            `content` (the item has no co-visitation yet) or `popular`.
        """
        filters = filters or RequestFilters(exclude_item_ids=frozenset([item_id]))
        filters = RequestFilters(
            filters.category_ids,
            filters.exclude_item_ids | {item_id},
            filters.price_max,
            filters.in_stock_only,
        )
        merged = _merged_neighbours(
            {kind: dict(self.neighbours.of(kind, item_id)) for kind in NEIGHBOUR_KINDS}
        )
        online = OnlineFacts()
        items = self._select_merged("", merged, filters, online, k)
        strategy = "neighbours" if items else "content"
        if len(items) < k:
            content = self.content.similar(item_id, k * 3)
            items += self._select("", content, "content", filters, online, k, items)
        if not items:
            strategy = STRATEGY_POPULAR
        if len(items) < k:
            items += self._popular_for("", filters, online, k, items)
        return Recommendation(items, strategy, FALLBACK_NONE)

    def _personalized(
        self,
        user_id: str,
        found: UserCandidates,
        session: Session,
        filters: RequestFilters,
        online: OnlineFacts,
        k: int,
    ) -> tuple[list[RankedItem], int, ScoredRows]:
        matrix, item_ids = found.matrix, found.item_ids
        fallback_order = found.ranks.astype(np.float64)
        with stage(self._tracer, STAGE_FEATURES) as span:
            if session.item_ids:
                matrix, item_ids = self._with_session(matrix, item_ids, session)
                fallback_order = _generators_order(matrix, item_ids, self._column)
            if span is not None:
                span.set_attributes(
                    {ATTR_SESSION_ITEMS: len(session.item_ids), ATTR_ROWS: len(matrix)}
                )
        sources = self._proposing_generators(matrix)
        level = FALLBACK_NONE
        with stage(self._tracer, STAGE_RANK):
            scores = self._rank(user_id, matrix)
        if scores is None:
            scores, level = -fallback_order, self._unranked_level
        order = np.argsort(-scores, kind="stable")
        ranked = ((str(item_ids[i]), (float(scores[i]), GENERATORS[sources[i]])) for i in order)
        with stage(self._tracer, STAGE_RULES) as span:
            chosen = self.rules.select(user_id, ranked, filters, k, online=online)
            if span is not None:
                span.set_attributes({ATTR_SOURCE: STRATEGY_PERSONALIZED, ATTR_PICKED: len(chosen)})
        items = [RankedItem(item, score, source) for item, (score, source) in chosen]
        return items, level, ScoredRows(matrix, item_ids, scores)

    def _segment_fallback(self, found: UserCandidates) -> bool:
        """Whether the segment policy serves this known user's segment its fallback."""
        if self._segment_policy is None:
            return False
        return self._segment_policy.fallback_for(found.events)

    def _rank(self, user_id: str, matrix: np.ndarray) -> np.ndarray | None:
        """The ranker's scores, or None when it is missing, fails or overruns its budget."""
        if self._booster is None:
            return None
        rows = matrix if self._ranker_columns is None else matrix[:, self._ranker_columns]
        # Predicted inline and judged afterwards: a hand-off to a thread that could be abandoned
        # cost more per request than the whole prediction (serving benchmark); a late answer is
        # still discarded, so the budget bounds what is served. What bounds a prediction that
        # never returns is BentoML's request timeout.
        started = time.perf_counter()
        try:
            scores = self._booster.predict(rows, num_threads=1)
        except Exception:  # degrade to the candidate order rather than fail the request
            logger.exception("ranker failed for user %s: serving the candidate order", user_id)
            return None
        if self._budget is not None and time.perf_counter() - started > self._budget:
            logger.warning(
                "ranker over its %.3f s budget: serving the candidate order", self._budget
            )
            return None
        return scores

    def _with_session(
        self, matrix: np.ndarray, item_ids: np.ndarray, session: Session
    ) -> tuple[np.ndarray, np.ndarray]:
        """The user's rows with the session applied.

        Recency features are recomputed and the session's strongest neighbours are added.
        """
        col = self._column
        history = matrix[:, col["history_score"]]
        recent_rows = np.flatnonzero(history > 0)
        recent_rows = recent_rows[np.argsort(-history[recent_rows], kind="stable")]
        carts = np.nan_to_num(matrix[:, col["user_item_carts"]]) + np.nan_to_num(
            matrix[:, col["user_item_purchases"]]
        )
        signals = recency_signals(
            self._seeds(session),
            [str(item_ids[n]) for n in recent_rows],
            {str(item_ids[n]) for n in recent_rows if carts[n] > 0},
            self.neighbours,
            self._recent_items,
        )
        known = set(item_ids.tolist())
        new = sorted(signals.proposed() - known, key=lambda i: -_signal_strength(signals, i))
        new = new[: self.MAX_SESSION_CANDIDATES]
        rows = np.vstack([matrix, self._new_rows(matrix, item_ids, new)])
        ids = np.concatenate([item_ids, np.array(new, dtype=object)])
        _apply_signals(rows, ids, signals, session, col)
        return rows, ids

    def _new_rows(self, matrix: np.ndarray, item_ids: np.ndarray, new: list[str]) -> np.ndarray:
        """Feature rows for items the session proposes that the snapshot did not.

        The user's own features, the item's, and the user's category and brand features where
        another candidate shares the category or brand; the rest is unknown (NaN), as in training.
        """
        col = self._column
        rows = np.full((len(new), len(FEATURE_COLUMNS)), np.nan, dtype=np.float32)
        if not new:
            return rows
        rows[:, [col[c] for c in SCORE_COLUMNS]] = 0.0
        user_columns = [col[c] for c in USER_FEATURES.values()]
        rows[:, user_columns] = matrix[0, user_columns]
        by_category: dict[str | None, int] = {}
        by_brand: dict[str | None, int] = {}
        for n, item in enumerate(item_ids.tolist()):
            facts = self.rules.items.get(item)
            if facts is not None:
                by_category.setdefault(facts.category_id, n)
                by_brand.setdefault(facts.brand, n)
        item_columns = [col[c] for c in ITEM_FEATURES.values()]
        category_columns = [col[c] for c in USER_CATEGORY_FEATURES.values()]
        brand_columns = [col[c] for c in USER_BRAND_FEATURES.values()]
        # price_to_user_mean = item price / the user's mean price, recovered from a known row.
        with np.errstate(divide="ignore", invalid="ignore"):
            means = matrix[:, col["item_price"]] / matrix[:, col["price_to_user_mean"]]
        means = means[np.isfinite(means)]
        for n, item in enumerate(new):
            vector = self._item_vector_rows.get(item)
            if vector is not None:
                rows[n, item_columns] = self._item_vectors[vector]
            facts = self.rules.items.get(item)
            if facts is None:
                continue
            if facts.category_id in by_category:
                rows[n, category_columns] = matrix[by_category[facts.category_id], category_columns]
            if facts.brand is not None and facts.brand in by_brand:
                rows[n, brand_columns] = matrix[by_brand[facts.brand], brand_columns]
        if means.size:
            rows[:, col["price_to_user_mean"]] = rows[:, col["item_price"]] / means[0]
        return rows

    def _session_based(
        self,
        user_id: str,
        session: Session,
        filters: RequestFilters,
        online: OnlineFacts,
        k: int,
    ) -> list[RankedItem]:
        """Neighbours of the session's items for a user the snapshot does not know."""
        if not session.item_ids:
            return []
        seeds = self._seeds(session)
        signals = recency_signals(seeds, [], set(), self.neighbours, self._recent_items)
        ranked = [
            (item, rank) for rank, item in enumerate(seeds.item_ids[: self._recent_items], start=1)
        ]
        collaborative = neighbour_scores(ranked, self.neighbours.tables[COLLABORATIVE])
        seen = set(session.item_ids)
        merged = _merged_neighbours(
            {
                kind: {item: score for item, (score, _) in scores.items() if item not in seen}
                for kind, scores in (
                    (COVISIT, signals.covisit),
                    (BOUGHT_TOGETHER, signals.bought_together),
                    (COLLABORATIVE, collaborative),
                )
            }
        )
        return self._select_merged(user_id, merged, filters, online, k)

    def _select_merged(
        self,
        user_id: str,
        merged: dict[str, tuple[float, str]],
        filters: RequestFilters,
        online: OnlineFacts,
        k: int,
    ) -> list[RankedItem]:
        """Up to k of the merged neighbours the rules allow, strongest first.

        Each item's source is its strongest kind.
        """
        ranked = sorted(((item, score) for item, (score, _) in merged.items()), key=lambda p: -p[1])
        with stage(self._tracer, STAGE_RULES) as span:
            picked = self.rules.select(user_id, ranked, filters, k, [], online)
            if span is not None:
                span.set_attributes({ATTR_SOURCE: "neighbours", ATTR_PICKED: len(picked)})
        return [RankedItem(item, float(score), merged[item][1]) for item, score in picked]

    def _popular_for(
        self,
        user_id: str,
        filters: RequestFilters,
        online: OnlineFacts,
        k: int,
        chosen: list[RankedItem],
    ) -> list[RankedItem]:
        """The shop's popular items the rules allow, topping `chosen` up to k."""
        popular = zip(self._popular_ids, self._popular_scores, strict=True)
        return self._select(user_id, popular, "popular", filters, online, k, chosen)

    def _select(
        self,
        user_id: str,
        ranked,
        source: str,
        filters: RequestFilters,
        online: OnlineFacts,
        k: int,
        chosen: list[RankedItem],
    ) -> list[RankedItem]:
        """Up to k - len(chosen) more items of one source that the business rules allow."""
        if len(chosen) >= k:
            return []
        already = [item.item_id for item in chosen]
        with stage(self._tracer, STAGE_RULES) as span:
            picked = self.rules.select(user_id, ranked, filters, k - len(chosen), already, online)
            if span is not None:
                span.set_attributes({ATTR_SOURCE: source, ATTR_PICKED: len(picked)})
        return [RankedItem(item_id, float(score), source) for item_id, score in picked]

    def _proposable(self, item_id: str) -> bool:
        """Whether the item may be recommended (an item without facts may)."""
        facts = self.rules.items.get(item_id)
        return facts is None or facts.is_recommendable

    def _seeds(self, session: Session) -> Session:
        """The session without the items never to recommend.

        As in training, they are not among the recent items that are candidates and seed the
        neighbours.
        """
        kept = tuple(item for item in session.item_ids if self._proposable(item))
        if len(kept) == len(session.item_ids):
            return session
        return Session(kept, session.carted_ids, session.purchased_ids)

    def _proposing_generators(self, matrix: np.ndarray) -> np.ndarray:
        """Per row, the index in `GENERATORS` of the first generator that proposed the item."""
        # A missing score (NaN) compares False, as a zero would.
        return np.argmax(matrix[:, self._score_columns] > 0, axis=1)


def _merged_neighbours(by_kind: dict[str, dict[str, float]]) -> dict[str, tuple[float, str]]:
    """Neighbour scores of several kinds on one scale.

    Each kind's scores are divided by that kind's largest (co-visitation counts and EASE
    weights have nothing in common but their order), then summed per item: an item several
    kinds agree on comes first. Its source is the kind with the largest share.

    Args:
        by_kind: kind → item_id → score (> 0).

    Returns:
        item_id → (summed share, strongest kind).
    """
    merged: dict[str, list] = {}
    for kind, scores in by_kind.items():
        top = max(scores.values(), default=0.0)
        if top <= 0:
            continue
        for item, score in scores.items():
            share = score / top
            entry = merged.setdefault(item, [0.0, kind, 0.0])
            entry[0] += share
            if share > entry[2]:
                entry[1], entry[2] = kind, share
    return {item: (total, kind) for item, (total, kind, _) in merged.items()}


def _signal_strength(signals: RecencySignals, item: str) -> float:
    return (
        signals.history.get(item, 0.0)
        + signals.covisit.get(item, (0.0, 0.0))[0]
        + signals.bought_together.get(item, (0.0, 0.0))[0]
    )


def _apply_signals(
    rows: np.ndarray,
    item_ids: np.ndarray,
    signals: RecencySignals,
    session: Session,
    col: dict[str, int],
) -> None:
    """Writes the recomputed recency features into the rows (in place)."""
    for n, item in enumerate(item_ids.tolist()):
        covisit = signals.covisit.get(item, (0.0, 0.0))
        together = signals.bought_together.get(item, (0.0, 0.0))
        rows[n, col["history_score"]] = signals.history.get(item, 0.0)
        rows[n, col["covisit_score"]], rows[n, col["covisit_hits"]] = covisit
        rows[n, col["bought_together_score"]], rows[n, col["bought_together_hits"]] = together
    in_session = np.isin(item_ids, np.array(session.item_ids, dtype=object))
    rows[in_session, col["user_item_days_since_last"]] = 0.0
    rows[:, col["user_days_since_last_event"]] = 0.0
    _apply_session_purchases(rows, item_ids, session, col)
    scores = rows[:, [col[c] for c in SCORE_COLUMNS]]
    rows[:, col["sources"]] = (scores > 0).sum(axis=1)


def _apply_session_purchases(
    rows: np.ndarray, item_ids: np.ndarray, session: Session, col: dict[str, int]
) -> None:
    """Updates the repeat-purchase features of the items bought since the snapshot (in place).

    A purchase in the session is one more purchase occasion at age 0, as dbt would count it at a
    cutoff just after it: the counts and decayed counts (a weight of 1 at age 0) grow by one, the
    days since the last purchase become 0, the user's own interval takes in the gap that just
    closed, the due ratio is 0 wherever an interval is known, and the basket share counts one more
    basket holding the item (1 for a first purchase). So an item the shopper has just bought
    never looks due. The user's own totals (`user_purchases`, the repeat share) and every
    other age stay as of the snapshot, as they do for views.
    """
    if not session.purchased_ids:
        return
    bought = np.flatnonzero(np.isin(item_ids, np.array(list(session.purchased_ids), dtype=object)))
    if not bought.size:
        return
    for name in REPEAT_COUNTS:
        rows[bought, col[name]] = np.nan_to_num(rows[bought, col[name]]) + 1.0
    occasions = rows[bought, col["user_item_purchase_occasions"]] - 1.0  # before this one
    last = rows[bought, col["user_item_days_since_last_purchase"]]
    own = rows[bought, col["user_item_own_repurchase_interval_days"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        updated = (np.nan_to_num(own) * (occasions - 1.0) + last) / occasions
    own = np.where((occasions >= 1.0) & np.isfinite(last), updated, own)
    rows[bought, col["user_item_own_repurchase_interval_days"]] = own
    # One more basket holding the item, and one more basket since its first purchase.
    share = rows[bought, col["user_item_purchase_basket_share"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        since_first = occasions / share
        updated_share = (occasions + 1.0) / (since_first + 1.0)
    rows[bought, col["user_item_purchase_basket_share"]] = np.where(
        (occasions >= 1.0) & np.isfinite(since_first), updated_share, 1.0
    )
    known = np.isfinite(own) | np.isfinite(rows[bought, col["item_repurchase_interval_days"]])
    rows[bought, col["user_item_repurchase_due_ratio"]] = np.where(known, 0.0, np.nan)
    rows[bought, col["user_item_days_since_last_purchase"]] = 0.0
    rows[bought, col["user_item_days_since_last"]] = 0.0


def _no_activity(session: Session) -> bool:
    """Whether a request brings nothing beyond the snapshot (no session, no page item)."""
    return not (session.item_ids or session.carted_ids or session.purchased_ids)


def _online_facts(
    found: UserCandidates | None, session: Session, stock: Mapping[str, StockChange] | None
) -> OnlineFacts:
    """What the rules know of a request beyond the snapshot.

    The user's purchases (those kept with the user's candidates and the session's) and the
    posted stock updates.
    """
    bought = session.purchased_ids
    if found is not None and found.bought:
        bought = found.bought | session.purchased_ids
    return OnlineFacts(bought, stock or {})


def _generators_order(matrix: np.ndarray, item_ids: np.ndarray, col: dict[str, int]) -> np.ndarray:
    """Each row's position in the generators' own order, as `generate_candidates` sorts.

    By the score columns (the first generator first, highest score first; a missing score as
    0, as the generators fill it), then by item id.
    """
    keys = [-np.nan_to_num(matrix[:, col[c]]) for c in reversed(SCORE_COLUMNS)]
    order = np.lexsort([np.asarray(item_ids, dtype=str), *keys])
    position = np.empty(len(order), dtype=np.float64)
    position[order] = np.arange(1, len(order) + 1)
    return position
