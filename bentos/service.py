"""The Shelfwise recommendation service (BentoML).

`POST /recommend` walks the cold-start ladder (`models.recommender`): a known user's precomputed
candidates, updated with their live session and re-ranked by the packaged ranker; session
neighbours for unknown users; trending or popular items when nothing is known. `POST /similar`
gives an item's neighbours; `POST /events` takes feedback, durable before it is acknowledged.
The ranker is the production model of the BentoML model store (`shelfwise_production:latest`, a
copy of the promoted ranker; see `shelfwise.runtime.registry`), declared below so `bentoml build`
packs it into the bento; the serving snapshot comes from the lake.
"""

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
import bentoml
from opentelemetry import trace
from pydantic import TypeAdapter, ValidationError

from bentos.api_models import (
    EventIn,
    EventsRequest,
    EventsResponse,
    ExperimentArmOut,
    ExperimentOut,
    ExperimentsRequest,
    ExperimentsResponse,
    HistoryItem,
    HistoryRequest,
    HistoryResponse,
    ItemExplanation,
    RecommendContext,
    RecommendedItem,
    RecommendFilters,
    RecommendRequest,
    RecommendResponse,
    RejectedEvent,
    ReloadRequest,
    ReloadResponse,
    SimilarRequest,
    SimilarResponse,
    StockUpdate,
)
from bentos.compat import (
    SERVICE_CONFIG,
    install_api_method_cache,
    install_http_protocol,
    install_timeout_timer_fix,
    settle_heap,
)
from bentos.contract import RequestContract, first_error
from bentos.feature_samples import FeatureSampler
from bentos.guard import PROTECTED_PREFIXES, RequestGuard
from bentos.ids import new_id
from bentos.impressions import ImpressionLog, ShownItems
from bentos.pages import ServicePages
from bentos.tracing import request_tracing, stop_tracing, tracer
from models.business_rules import RequestFilters
from models.compiled_ranker import (
    ENGINE_COMPILED,
    ENGINE_LIGHTGBM,
    RankerEngine,
    load_ranker_engine,
)
from models.experiments import (
    ExperimentAnswer,
    ExperimentRefused,
    LiveExperiment,
    load_arm_models,
)
from models.explanations import ItemExplanation as Explanation
from models.explanations import explain_answer
from models.online_store import (
    OnlineStoreError,
    OnlineVersion,
    RedisCandidateStore,
    current_version,
    load_version,
    open_client,
    ranked_info,
)
from models.ranked_lists import read_ranked_info, read_ranked_lists
from models.ranker import booster_from_text
from models.recommender import Recommendation, Recommender
from models.segments import SegmentPolicy
from models.session import Session
from models.snapshot import CandidateSnapshot, CandidateStore, SnapshotFeaturesError
from models.tracing import STAGE_STATE, stage
from shelfwise.experiments import (
    Experiment,
    read_experiments,
    read_results,
    running_experiment,
    status_of,
)
from shelfwise.lake import STOCK_UPDATES, Lake
from shelfwise.runtime.feedback import (
    FeedbackLog,
    compact_feedback,
    latest_stock_updates,
    restore_seen_events,
)
from shelfwise.runtime.online_state import (
    RedisState,
    StateRead,
    StockChange,
    UserActivity,
    open_state,
)
from shelfwise.runtime.read_batcher import ReadBatcher
from shelfwise.runtime.registry import (
    PRODUCTION_MODEL_NAME,
    SOURCE_TAG,
    production,
    production_path,
    read_ranker,
)
from shelfwise.settings import Settings

logger = logging.getLogger("bentoml.shelfwise")

# BentoML's per-request timer leak (ARCHITECTURE.md §7): patched once per process, at import,
# before the worker builds its app; refuses to patch a BentoML it does not know.
install_timeout_timer_fix()
# BentoML's per-request rebuild of the endpoint's caller (bentos/compat.py), cached.
install_api_method_cache()
# Load shedding and a header-read timeout in uvicorn's protocol (bentos/protocol.py).
install_http_protocol()

RESPONSES = bentoml.metrics.Counter(
    name="shelfwise_responses",
    documentation="Responses by endpoint, strategy (cold-start rung) and fallback level.",
    labelnames=["endpoint", "strategy", "fallback_level"],
)
EVENTS = bentoml.metrics.Counter(
    name="shelfwise_events",
    documentation="Events posted to /events by outcome: accepted, duplicate or rejected.",
    labelnames=["outcome"],
)
MODEL = bentoml.metrics.Gauge(
    name="shelfwise_model_info",
    documentation="1 for the ranker version this worker serves ('none' without a ranker).",
    labelnames=["model_version"],
)

RANKER_ENGINE = bentoml.metrics.Gauge(
    name="shelfwise_ranker_engine",
    documentation="1 for what predicts the ranker's scores in this worker: 'compiled' (lleaves), "
    "'lightgbm', or 'none' without a ranker.",
    labelnames=["engine"],
)

STATE_ROUND_TRIPS = bentoml.metrics.Counter(
    name="shelfwise_state_round_trips",
    documentation="Round trips to Redis that read the online state for /recommend requests.",
)
STATE_READS = bentoml.metrics.Counter(
    name="shelfwise_state_reads",
    documentation="/recommend requests whose online state was read in those round trips "
    "(reads / round trips: requests per round trip).",
)


def _count_state_reads(requests: int) -> None:
    STATE_ROUND_TRIPS.inc()
    STATE_READS.inc(requests)


def _store_keys(serving: "Serving", user_id: str) -> tuple[str | None, str | None]:
    """The user's keys in the Redis candidate store that the online state's round trip reads
    too, so that no request needs a second one: the ranked list's (None without ranked lists)
    and the candidates' (None: the store is in process)."""
    recommender = serving.recommender
    return recommender.ranked_list_key(user_id), recommender.candidates_key(user_id)


@functools.cache
def _responses(endpoint: str, strategy: str, fallback_level: int) -> Any:
    """`RESPONSES`' counter of these labels, looked up once (a lookup takes its lock)."""
    return RESPONSES.labels(
        endpoint=endpoint, strategy=strategy, fallback_level=str(fallback_level)
    )


def _present(keys: tuple[str | None, ...]) -> tuple[str, ...]:
    return tuple(key for key in keys if key is not None)


def show_ranker_engine(engine: str) -> None:
    """Sets `shelfwise_ranker_engine` to the engine of the recommender now serving."""
    for name in (ENGINE_COMPILED, ENGINE_LIGHTGBM, "none"):
        RANKER_ENGINE.labels(engine=name).set(1 if name == engine else 0)


EVENT_VALIDATOR = TypeAdapter(EventIn)
# A request without context or filters: these, shared (never modified), instead of new ones.
_NO_CONTEXT = RecommendContext()
_NO_FILTERS = RecommendFilters()
_NO_FILTERS_RULES = _NO_FILTERS.to_rules()
# Seconds between looks at the online store's pointer (and the upkeep's other timers).
STORE_POLL_S = 0.5
# Seconds between attempts to restore the online state into a Redis that lost it, while they fail.
RESTORE_RETRY_S = 30.0


@bentoml.service(name="shelfwise", **SERVICE_CONFIG)
class RecommendationService:
    # Declared as a dependency: `bentoml build` packs the production model into the bento.
    production_model = bentoml.models.BentoModel(f"{PRODUCTION_MODEL_NAME}:latest")

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        # The stages' tracer when SHELFWISE_OTLP_ENDPOINT is set; None: no spans at all.
        self._tracer = tracer(self.settings)
        self._reload_lock = threading.Lock()
        # The online store in Redis (`models.online_store`), when configured: the serving state
        # of the version its pointer names, else the lake's snapshot in process.
        self._store_client = (
            open_client(self.settings.redis_url, cluster=self.settings.redis_cluster)
            if self.settings.redis_url
            else None
        )
        self._store_down = False
        self._store_refusal: str | None = None  # why the current version is refused, if it is
        self._version_lost = False  # Redis holds no version any more (logged once)
        self._next_restore = 0.0  # when the upkeep may try again to restore a lost state
        self._restored_mark: str | None = None  # the online state's mark of this worker's restore
        ranker, features, version, tag, policy, model_dir = None, None, None, None, None, None
        try:
            model = self.production_model
            model_dir = Path(model.path)
            ranker, features = load_ranker(model_dir, self.settings)
            policy = load_segment_policy(model_dir)
            # The promoted ranker's tag, not the production copy's: what training knows.
            version = str(model.info.metadata.get(SOURCE_TAG) or model.tag)
            tag = str(model.tag)
        except Exception:  # a missing or corrupt model degrades the service, never kills it
            logger.exception("No usable production ranker: serving the candidate order")
        self._ranker = (ranker, features, version, tag, policy)
        # The running experiment, ready to answer (None: production alone, as without
        # experiments); swapped by one reference assignment (`refresh_experiment`).
        self._experiment: LiveExperiment | None = None
        # The book as last read, and the refused experiment not to log again (name, production).
        self._book: list[Experiment] = []
        self._experiment_refusal: tuple[str, str | None] | None = None
        self._experiment_lock = threading.Lock()  # the upkeep's poll against /admin/reload's
        self.serving = self._serving(*self._ranker, online=self._online_version(strict=False))
        show_ranker_engine(self.serving.ranker_engine)
        self.state = open_state(self.settings.redis_url, cluster=self.settings.redis_cluster)
        # With Redis, the requests waiting on the event loop read it in one round trip.
        self._state_reads: ReadBatcher[tuple[str, tuple[str, ...]], StateRead] | None = (
            ReadBatcher(self.state.read_requests, on_batch=_count_state_reads)
            if isinstance(self.state, RedisState)
            else None
        )
        # Segments are sealed (compactable) as often as they are compacted.
        self.feedback = FeedbackLog(
            self.settings.wal_dir, max_segment_seconds=self.settings.compact_every_s or 60.0
        )
        self.impressions = ImpressionLog(self.feedback)
        self.feature_samples = FeatureSampler(
            self.feedback,
            self.settings.feature_sample_rate,
            self.settings.feature_sample_rows,
            max_per_s=self.settings.feature_samples_per_s,
        )
        self._restore()
        self._refresh_experiment_safely()
        self._stop = threading.Event()
        threading.Thread(
            target=self._background, args=(model_dir,), name="shelfwise-upkeep", daemon=True
        ).start()
        logger.info(
            "Serving %s (ranker engine %s) for %d known users from %s, online state %s",
            self.serving.model_version,
            self.serving.ranker_engine,
            self.serving.recommender.known_users,
            "the lake"
            if self.serving.store_version is None
            else f"online store version {self.serving.store_version}",
            "in Redis" if self.settings.redis_url else "in process",
        )
        settle_heap()

    def _restore(self) -> bool:
        """Restores the stock updates and seen event ids into the online state, and notes it
        there once both are in, so that the upkeep sees when Redis loses them (`_poll_store`).
        Returns whether both were restored and noted."""
        stock, seen = self._restore_stock(), self._restore_seen()
        if not (stock and seen):
            return False
        try:
            self._restored_mark = self.state.mark_restored()
        except Exception:  # the upkeep restores again
            logger.exception("Could not note the restore in the online state")
            return False
        return True

    def _restore_stock(self) -> bool:
        """Acknowledged stock updates outlive the process: those in the lake and those still in
        the log (a killed predecessor's, or all of them with compaction off) are restored into
        the online state. Returns whether they were."""
        lake = Lake(self.settings.lake_url)
        try:
            if self.settings.compact_every_s:
                compact_feedback(self.settings.wal_dir, lake, self.settings.earliest_event_at)
            self.state.update_stock(latest_stock_updates(lake, self.settings.wal_dir))
        except Exception:  # serve without them rather than not at all; the log keeps them
            logger.exception("Could not restore the stock updates from %s", lake.url)
            return False
        return True

    def _restore_seen(self) -> bool:
        """Idempotency outlives the process: the event ids of the window in the log and the lake
        (after `_restore_stock` compacted a killed predecessor's log) are seen again. Returns
        whether they were."""
        lake = Lake(self.settings.lake_url)
        try:
            restore_seen_events(self.state, lake, self.settings.wal_dir)
        except Exception:  # serve without them rather than not at all; dbt dedupes downstream
            logger.exception("Could not restore the seen event ids from %s", lake.url)
            return False
        return True

    def _restore_if_lost(self) -> None:
        """Redis lost the online state (restarted without persistence, flushed): the stock
        updates and seen event ids are restored again from the lake and this worker's log, as
        at start-up, without a restart. Every worker does it, each with its own log: one that
        finds another worker's mark restores too. Both restores are idempotent. Sessions and
        carts since the snapshot are gone with Redis."""
        now = time.monotonic()
        if now < self._next_restore:
            return
        mark = self.state.restored_mark()
        if mark is not None and mark == self._restored_mark:
            self._next_restore = 0.0
            return
        if not self._next_restore:  # once per loss, not per retry
            logger.warning(
                "The online state lost its data (Redis restarted empty or was flushed): "
                "restoring the stock updates and seen event ids; sessions and carts since the "
                "snapshot are lost"
            )
        self._next_restore = now + RESTORE_RETRY_S
        if self._restore():
            self._next_restore = 0.0
            logger.info("Online state restored")

    def _serving(
        self,
        ranker: RankerEngine | None,
        features,
        version: str | None,
        tag: str | None,
        policy: SegmentPolicy | None = None,
        online: OnlineVersion | None = None,
    ) -> "Serving":
        """The recommender for a ranker (`RankerEngine`, and its segment policy) and the current
        serving state: the online store's version its pointer names when Redis holds one, else
        the lake's serving snapshot (`online` None)."""
        engine = ranker.engine if ranker is not None else "none"
        predictor = ranker.predictor if ranker is not None else None
        budget = self.settings.ranker_budget_ms / 1000 or None
        cap = self.settings.max_per_category

        def recommender_for(predictor, names, policy=None) -> Recommender:
            if online is not None:
                return Recommender.from_online_store(online, predictor, names, cap, budget, policy)
            lake = Lake(self.settings.lake_url)
            return Recommender.from_lake(lake, predictor, names, cap, budget, policy)

        try:
            recommender = recommender_for(predictor, features, policy)
        except SnapshotFeaturesError:  # the snapshot was built for another ranker's features
            logger.exception("Serving snapshot does not fit the ranker: serving without it")
            recommender = recommender_for(None, None)
            version, engine = None, "none"
        if self._tracer is not None:
            recommender = recommender.with_tracer(self._tracer)
        # Requests without a session are answered from the ranked lists ranked by this model.
        recommender = recommender.with_ranked_lists(version)
        MODEL.labels(model_version=version or "none").set(1)
        store_version = online.version if online else None
        # The booster explains (`explain`) whatever engine predicts: lleaves has no contributions.
        booster = ranker.booster if ranker is not None and engine != "none" else None
        return Serving(
            recommender,
            version,
            tag,
            engine,
            store_version=store_version,
            booster=booster,
            feature_names=features if booster is not None else None,
        )

    def refresh_store(self) -> bool:
        """Switches to the online store's current version if its pointer moved.

        The new version's shared parts are loaded aside; requests keep the old recommender (and
        read the old version's users) until one reference assignment switches them over.

        Returns:
            Whether a new version was swapped in.
        """
        if self._store_client is None:
            return False
        with self._reload_lock:
            stored = current_version(self._store_client)
            was_lost = self._version_lost
            self._version_lost = stored is None and self.serving.store_version is not None
            if self._version_lost and not was_lost:
                self._serve_lost_version()
                logger.error(
                    "The online store holds no version any more (Redis restarted empty or was "
                    "flushed): known users are answered as new ones, with fallback level 2, "
                    "until the pipeline writes a version again (materialize `online_store`)"
                )
            # After a loss, Redis numbers versions from 1 again: one with the number held is new.
            if stored is None or (stored == self.serving.store_version and not was_lost):
                return False
            serving = self._serving(*self._ranker, online=load_version(self._store_client, stored))
            previous, self.serving = self.serving, serving
            show_ranker_engine(serving.ranker_engine)
            logger.info(
                "Online store version %s replaces %s", serving.store_version, previous.store_version
            )
            return True

    def _serve_lost_version(self) -> None:
        """Serves the version Redis lost as a missing snapshot: its users' keys are gone, and a
        known user answered like a new one must say so (`FALLBACK_POPULAR`), not look intended."""
        serving = self.serving
        store = serving.recommender.store
        if isinstance(store, RedisCandidateStore):
            self.serving = _on_store(serving, store.lost())

    def reload(self) -> bool:
        """Swaps in the production model of the store if it changed since it was loaded.

        The new recommender (ranker and serving snapshot) is built aside; requests keep using
        the old one until a single reference assignment switches them over.

        Returns:
            Whether a new model was swapped in.
        """
        with self._reload_lock:
            current = production(self.settings.bentoml_home)
            if current is None or current.tag == self.serving.tag:
                return False
            model_dir = production_path(self.settings.bentoml_home)
            ranker, features = load_ranker(model_dir, self.settings)
            policy = load_segment_policy(model_dir)
            spec = (ranker, features, current.source_tag, current.tag, policy)
            serving = self._serving(*spec, online=self._online_version(strict=False))
            if serving.model_version is None:  # the snapshot does not fit: keep what works
                return False
            previous, self.serving, self._ranker = self.serving, serving, spec
            show_ranker_engine(serving.ranker_engine)
            if previous.model_version != serving.model_version:
                MODEL.labels(model_version=previous.model_version or "none").set(0)
            logger.info(
                "Swapped %s for %s (ranker engine %s)",
                previous.model_version,
                serving.model_version,
                serving.ranker_engine,
            )
        self._compile_later(model_dir)
        return True

    def refresh_ranked_lists(self) -> bool:
        """Answers from ranked lists written since the snapshot was loaded (`ranked_lists`).

        The pipeline ranks a snapshot's users after promoting the model, so lists usually
        arrive after the snapshot and the model they were ranked for. The new lists are read
        aside (in process: the lake's file; with Redis: only their description) and switched in
        with one reference assignment; they answer only if they are this snapshot's ranking by
        the model serving (`Recommender.with_ranked_lists`).

        Returns:
            Whether other lists were switched in.
        """
        with self._reload_lock:
            serving = self.serving
            store = serving.recommender.store
            if isinstance(store, RedisCandidateStore):
                found = ranked_info(store.client, store.version)
                if found == store.ranked_lists:
                    return False
                updated: RedisCandidateStore | CandidateSnapshot = store.with_ranked(found)
            elif isinstance(store, CandidateSnapshot):
                lake = Lake(self.settings.lake_url)
                found = read_ranked_info(lake)
                if found is None or found == store.ranked_lists:
                    return False
                ranked = read_ranked_lists(lake, store.snapshot_id, len(store.states))
                if ranked is None:  # another snapshot's: the next model swap loads both
                    return False
                updated = store.with_ranked(ranked)
            else:
                return False
            self.serving = _on_store(serving, updated)
        logger.info(
            "Ranked lists of %s by %s switched in (answering from them: %s)",
            found.snapshot_id if found else None,
            found.model_version if found else None,
            self.serving.recommender.answers_from_ranked_lists,
        )
        return True

    def _refresh_ranked_lists_safely(self) -> None:
        try:
            self.refresh_ranked_lists()
        except Exception:  # requests keep re-ranking, or answering from the lists held
            logger.exception("Could not read new ranked lists")

    def _compile_later(self, model_dir: Path | None) -> None:
        """Compiles the ranker now serving through LightGBM in the background, when it should be
        compiled and no library fitted (e.g. a model promoted by `shelfwise models promote`)."""
        serving = self.serving
        if (
            model_dir is None
            or serving.ranker_engine != ENGINE_LIGHTGBM
            or self.settings.ranker_engine == ENGINE_LIGHTGBM
        ):
            return
        threading.Thread(
            target=self._compile_ranker,
            args=(model_dir, serving.tag),
            name="shelfwise-compile",
            daemon=True,
        ).start()

    def _compile_ranker(self, model_dir: Path, tag: str | None) -> None:
        """Compiles the model of `model_dir` (in a child process) and, if it is still the one
        served, swaps its compiled form in: the same model, so the same scores."""
        try:
            text, _ = read_ranker(model_dir)
            ranker = load_ranker_engine(text, model_dir, self.settings.compiled_ranker_dir)
            if ranker.engine != ENGINE_COMPILED:
                return
            with self._reload_lock:
                serving = self.serving
                if serving.tag != tag or serving.ranker_engine != ENGINE_LIGHTGBM:
                    return  # another model was swapped in meanwhile
                self.serving = replace(
                    serving,
                    recommender=serving.recommender.with_booster(ranker.predictor),
                    ranker_engine=ENGINE_COMPILED,
                )
                # A later switch of the online store's version keeps the compiled ranker.
                self._ranker = (ranker, *self._ranker[1:])
                show_ranker_engine(ENGINE_COMPILED)
            logger.info("Serving %s compiled from now on", serving.model_version)
        except Exception:  # LightGBM keeps serving
            logger.exception("Could not compile the ranker of %s", model_dir)

    def _online_version(self, strict: bool = True) -> OnlineVersion | None:
        """The online store's current version with its shared parts, or None (no Redis, no
        version written yet; or, unless strict, Redis unreachable or the version unreadable)."""
        if self._store_client is None:
            return None
        try:
            stored = current_version(self._store_client)
            return None if stored is None else load_version(self._store_client, stored)
        except Exception:
            if strict:
                raise
            logger.exception("Online store unreadable: serving the lake's snapshot")
            return None

    def _background(self, model_dir: Path | None = None) -> None:
        """Upkeep off the request path: the ranker's compilation once the worker is up (the
        model of `model_dir`, loaded by `__init__`), a newly promoted model, log compaction."""
        poll, compact = self.settings.model_poll_s, self.settings.compact_every_s
        experiment_poll = self.settings.experiment_poll_s
        # `__init__` compacted just now (`_restore_stock`): the next round is a period away.
        next_poll = time.monotonic()
        next_compaction = next_poll + compact
        next_experiment_poll = next_poll + experiment_poll  # `__init__` read the book
        first_round = True
        while not self._stop.wait(STORE_POLL_S):
            if first_round:
                # A poll period after `__init__`, when BentoML has the worker serving: the
                # compiler (a child process busy for seconds) started during start-up delayed
                # `/readyz` by about 0.5 s on 2 cores. LightGBM serves until then, same scores.
                first_round = False
                self._compile_later(model_dir)
                # pyarrow imports pandas when the impression writer first converts a batch (any
                # `pa.array` does), and BentoML's check of a model's metadata looks pandas up in
                # `sys.modules` without importing it: a model poll during that import met a
                # half-initialized module and failed. Imported here first, the import lock makes
                # the writer wait for it (or this thread for the writer) before any poll.
                with contextlib.suppress(ImportError):  # no pandas, no pyarrow import of it
                    import pandas  # noqa: F401
            self._poll_store()
            now = time.monotonic()
            if poll and now >= next_poll:
                next_poll = now + poll
                try:
                    self.reload()
                except Exception:  # a broken new model must not stop the old one serving
                    logger.exception("Could not load the newly promoted model")
                if self._store_client is None:  # with Redis, every store poll looks
                    self._refresh_ranked_lists_safely()
            if experiment_poll and now >= next_experiment_poll:
                next_experiment_poll = now + experiment_poll
                self._refresh_experiment_safely()
            if compact and now >= next_compaction:
                next_compaction = now + compact
                try:
                    compact_feedback(
                        self.settings.wal_dir,
                        Lake(self.settings.lake_url),
                        self.settings.earliest_event_at,
                    )
                except Exception:  # the log keeps everything; the next round retries
                    logger.exception("Feedback compaction failed")

    def refresh_experiment(self) -> bool:
        """Follows the book of experiments in the lake: swaps the running one in or out.

        A newly running experiment is built aside (its ranker arms loaded from their copies in
        the lake, its arms bound to the production recommender, which checks their features)
        and swapped in by one reference assignment; a stopped one is swapped out the same way,
        and production serves alone again. An experiment this worker cannot serve is refused
        with one log line (per experiment and production model) and production serves.

        Returns:
            Whether the experiment served changed.
        """
        lake = Lake(self.settings.lake_url)
        self._book = book = read_experiments(lake)
        running = running_experiment(book)
        current = self._experiment
        serving = self.serving
        if running is None:
            if current is None:
                return False
            self._experiment = None
            logger.info("Experiment %s is over: production serves everyone", current.name)
            return True
        if current is not None and current.experiment == running:
            try:  # production may have been swapped since: its arms must still fit it
                current.bind(serving.recommender, serving.model_version)
                return False
            except ExperimentRefused as error:
                self._refuse(running, serving, error)
                return True
        if self._experiment_refusal == (running.name, serving.model_version):
            self._experiment = None  # refused already (and logged)
            return current is not None
        try:
            live = LiveExperiment(running, load_arm_models(lake, running))
            live.bind(serving.recommender, serving.model_version)
        except ExperimentRefused as error:
            self._refuse(running, serving, error)
            return True
        self._experiment, self._experiment_refusal = live, None
        arms = ", ".join(f"{arm.name} ({arm.model or arm.kind})" for arm in running.arms)
        logger.info("Experiment %s (%s) serving: %s", running.name, running.mode, arms)
        return True

    def _refuse(self, running: Experiment, serving: "Serving", error: Exception) -> None:
        """Serves production instead of an experiment this worker cannot serve; logs it once."""
        self._experiment = None
        refusal = (running.name, serving.model_version)
        if self._experiment_refusal != refusal:
            logger.error(
                "Experiment %s refused: %s; production serves everyone", running.name, error
            )
        self._experiment_refusal = refusal

    def _refresh_experiment_safely(self) -> None:
        """`refresh_experiment`, keeping what serves when the book cannot be read."""
        try:
            with self._experiment_lock:
                self.refresh_experiment()
        except Exception:  # the lake away or a broken book: keep serving what serves
            logger.exception("Could not read the book of experiments: serving as before")

    def _poll_store(self) -> None:
        """Follows the online store's pointer; Redis being away, or a version this worker
        cannot serve, is logged once, not per poll."""
        try:
            self.refresh_store()
            if self._store_client is not None:  # in process: at the model poll (the lake)
                self.refresh_ranked_lists()
                self._restore_if_lost()
            if self._store_down:
                logger.info("Online store reachable again")
            self._store_down, self._store_refusal = False, None
        except OnlineStoreError as error:  # Redis answers: the version is another release's
            self._store_down = False
            if str(error) != self._store_refusal:
                logger.error("Online store version refused: %s; keeping the version held", error)
            self._store_refusal = str(error)
        except Exception:  # keep serving the version held (its users degrade if Redis is away)
            if not self._store_down:
                logger.exception("Online store unreachable: keeping the version held")
            self._store_down = True

    @bentoml.on_shutdown
    def close(self) -> None:
        self._stop.set()
        self.impressions.close()
        self.feature_samples.close()
        self.feedback.close()
        stop_tracing()  # exports the spans still queued

    async def _run(self, work: Callable[[], Any], offload: bool = False) -> Any:
        """Runs a request's work on the event loop; in the thread pool while Redis is failing,
        or when the caller asks (`offload`: an explained request).

        A request is mostly CPU under the GIL (about 0.3 ms with the online state in process,
        plus a round trip with Redis), and handing it to BentoML's thread pool costs more than
        the work: GIL hand-offs between the loop and the worker threads. Measured at c=8, one
        worker: 1,280 req/s inline against 980 through the pool on the 152,064-user shop; with
        Redis on this machine (demo shop) 581 req/s inline, p99 22.9 ms, against 334 req/s,
        p99 47 ms through the pool. With Redis, `/recommend` reads the online state through
        `_state_reads` (`shelfwise.runtime.read_batcher`): the requests waiting on the loop share
        one round trip. While Redis is failing (`_store_down`), a request could wait
        on it for the client's timeout: then requests go to the pool, so that health probes and
        other requests keep being answered. An explained `/recommend` (`explain`) goes to the
        pool too: LightGBM's contributions take milliseconds (0.6 ms per item on the demo ranker),
        in C with the GIL released, during which the loop keeps answering other requests.
        """
        if self._store_down or offload:
            return await anyio.to_thread.run_sync(work)
        return work()

    # Requests are validated by their `input_spec` model (bentos/api_models.py), first by
    # `RequestContract` (one error shape, no traceback), then by BentoML with the same model.
    @bentoml.api(route="/recommend", input_spec=RecommendRequest)
    async def recommend(
        self,
        user_id: str,
        k: int = 10,
        context: RecommendContext | None = None,
        filters: RecommendFilters | None = None,
        explain: bool = False,
    ) -> RecommendResponse:
        """Top-k items for a user: their candidates updated with the live session and re-ranked
        by the ranker; session neighbours, trending or popular items when the user is new;
        filtered by the business rules (already bought, out of stock, the request's filters).
        With `explain`, each item says which generators proposed it and why the ranker put it
        there (its largest feature contributions)."""
        batcher = self._state_reads
        if batcher is None or self._store_down or explain:
            return await self._run(
                functools.partial(self.recommend_now, user_id, k, context, filters, explain),
                offload=explain,
            )
        serving = self.serving
        keys = _store_keys(serving, user_id)
        try:
            with stage(self._tracer, STAGE_STATE):  # a failure is recorded on the span
                read = await batcher.read((user_id, _present(keys)))
        except Exception as error:
            read = self._without_state(error)
        return self._recommend_read(serving, read, keys, user_id, k, context, filters)

    def recommend_now(
        self,
        user_id: str,
        k: int = 10,
        context: RecommendContext | None = None,
        filters: RecommendFilters | None = None,
        explain: bool = False,
    ) -> RecommendResponse:
        """`/recommend`'s work, on the calling thread (arguments as validated by the API)."""
        serving = self.serving
        keys = _store_keys(serving, user_id)
        try:
            with stage(self._tracer, STAGE_STATE):  # a failure is recorded on the span
                read = self.state.read_requests([(user_id, _present(keys))])[0]
                if isinstance(read, Exception):
                    raise read
        except Exception as error:
            read = self._without_state(error)
        return self._recommend_read(serving, read, keys, user_id, k, context, filters, explain)

    def _without_state(self, error: Exception) -> StateRead | None:
        """Redis unreachable: the request answers without the session, not with a 5xx."""
        logger.warning("online state unavailable (%r): answering without it", error)
        self._store_down = True  # off the event loop until the store poll reaches Redis
        return None

    def _recommend_read(
        self,
        serving: "Serving",
        read: StateRead | None,
        keys: tuple[str | None, str | None],
        user_id: str,
        k: int,
        context: RecommendContext | None,
        filters: RecommendFilters | None,
        explain: bool = False,
    ) -> RecommendResponse:
        """`/recommend`'s answer once the online state is read (`read`; None: unavailable) with
        the values of the user's `keys` in the Redis candidate store (`_store_keys`)."""
        ranked_key, candidates_key = keys
        ranked_value, candidates_value = None, None
        if read is None:
            activity, stock = UserActivity(), {}
        else:
            activity, stock, values = read
            found = iter(values)
            ranked_value = next(found) if ranked_key is not None else None
            candidates_value = next(found) if candidates_key is not None else None
        fetched = read is not None
        context = context or _NO_CONTEXT
        session = Session(
            activity.item_ids, activity.carted_ids, activity.purchased_ids
        ).with_context(context.item_id, context.session_item_ids)
        # The item on the page is never recommended on its own page.
        if filters is None and context.item_id is None:
            rules = _NO_FILTERS_RULES  # most requests: built once
        else:
            rules = (filters or _NO_FILTERS).to_rules(exclude=context.item_id)
        trial, rec_id = None, None
        # Explanations and drift samples read the ranked rows: such a request is re-ranked even
        # when its ranked list would answer it.
        sampled = self.feature_samples.draw()
        need_rows = explain or sampled
        experiment = self._experiment
        if experiment is not None:  # the one check it costs when no experiment runs
            rec_id = new_id()  # seeds the interleaving: the list can be drawn again
            trial = self._try_experiment(
                experiment,
                serving,
                user_id,
                k,
                rules,
                session,
                context.item_id,
                stock,
                rec_id,
                need_rows,
            )
        if trial is not None:
            answer = trial.recommendation
        else:
            answer = serving.recommender.recommend(
                user_id,
                k,
                rules,
                session,
                context.item_id,
                stock,
                need_rows,
                ranked_value,
                fetched and ranked_key is not None,
                candidates_value,
                fetched and candidates_key is not None,
            )
        # Only with `explain`: a request without it does no more than before.
        explanations = self._explain(answer, serving, trial) if explain else None
        return self._respond(
            "recommend",
            user_id,
            answer,
            serving,
            RecommendResponse,
            trial,
            rec_id,
            explanations,
            sampled,
        )

    def _explain(
        self, answer: Recommendation, serving: "Serving", trial: ExperimentAnswer | None = None
    ) -> list[Explanation]:
        """The explanation of each item of an answer (`models.explanations`).

        Contributions come from production's booster, so only for an answer production's
        ranker scored: outside an experiment, or from an arm serving production's ranker (not
        interleaved). Other arms' answers have their generators and no contributions.
        """
        booster = serving.booster
        if trial is not None and (
            trial.drafted_by is not None or trial.model_version != serving.model_version
        ):
            booster = None
        return explain_answer(
            answer, booster, serving.feature_names, serving.recommender.neighbours
        )

    def _try_experiment(
        self,
        experiment: LiveExperiment,
        serving: "Serving",
        user_id: str,
        k: int,
        rules: RequestFilters,
        session: Session,
        context_item_id: str | None,
        stock: dict,
        rec_id: str,
        need_rows: bool = False,
    ) -> ExperimentAnswer | None:
        """The experiment's answer; None (production answers) if its arms do not fit the
        production just swapped in (the upkeep refuses it) or an arm failed unexpectedly."""
        try:
            return experiment.recommend(
                serving.recommender,
                serving.model_version,
                user_id,
                k,
                rules,
                session,
                context_item_id,
                stock,
                rec_id,
                need_rows,
            )
        except ExperimentRefused:
            return None
        except Exception:  # an arm's bug must not fail the request: production answers
            logger.exception(
                "Experiment %s failed for user %s: production answers", experiment.name, user_id
            )
            return None

    @bentoml.api(route="/similar", input_spec=SimilarRequest)
    async def similar(
        self,
        item_id: str,
        k: int = 10,
        user_id: str | None = None,
        filters: RecommendFilters | None = None,
    ) -> SimilarResponse:
        """Items viewed or bought together with an item ("customers who viewed this also
        viewed"); content-based neighbours (same category, price, brand) for new items."""
        # Reads no online state, so it never waits on the network: always on the event loop.
        serving = self.serving
        answer = serving.recommender.similar(
            item_id, k, (filters or _NO_FILTERS).to_rules(exclude=item_id)
        )
        return self._respond("similar", user_id or "", answer, serving, SimilarResponse)

    @bentoml.api(route="/history", input_spec=HistoryRequest)
    async def history(self, user_id: str, limit: int = 20) -> HistoryResponse:
        """A user's recent history, most recent first: the live session since the snapshot,
        then what the serving snapshot knows (recent and bought items), with category and price
        (needs the token when SHELFWISE_API_TOKEN is set: it shows what a shopper did)."""
        return await self._run(functools.partial(self.history_now, user_id, limit))

    def history_now(self, user_id: str, limit: int = 20) -> HistoryResponse:
        """`/history`'s work, on the calling thread; Redis being away leaves out what it holds
        (the session, or the user's snapshot state) instead of failing."""
        complete = True
        try:
            activity = self.state.activity(user_id)
        except Exception as error:
            logger.warning("online state unavailable (%r): history without the session", error)
            activity, complete = UserActivity(), False
            self._store_down = True
        session = Session(activity.item_ids, activity.carted_ids, activity.purchased_ids)
        recommender = self.serving.recommender
        try:
            found = recommender.history(user_id, session, limit)
        except Exception as error:  # the candidate store (Redis) is unreachable
            logger.warning("candidates unavailable (%r): history of the session only", error)
            found, complete = recommender.history_of_session(session, limit), False
        return HistoryResponse(
            user_id=user_id,
            known=found.known,
            complete=complete,
            items=[HistoryItem(**vars(entry)) for entry in found.entries],
        )

    @bentoml.api(route="/events", input_spec=EventsRequest)
    def events(
        self,
        ctx: bentoml.Context,
        events: list[dict[str, Any]],
        stock: list[StockUpdate],
    ) -> EventsResponse:
        """Feedback from the shop: views, carts, purchases (and stock changes). Acknowledged only
        once durable in the write-ahead log (stock changes too: a restart restores them); a
        re-sent event (same event_id) is harmless. The user's next /recommend reflects it at
        once."""
        now = datetime.now(UTC)
        valid, rejected = [], []
        plausible = {"earliest": self.settings.earliest_event_at}
        for index, raw in enumerate(events):
            try:
                event = EVENT_VALIDATOR.validate_python(raw, context=plausible)
                valid.append(event_row(event, now))
            except ValidationError as error:
                field, message = first_error(error)
                rejected.append(RejectedEvent(index=index, field=field, message=message))
        fresh = list({row["event_id"]: row for row in valid}.values())
        try:
            unseen = self.state.unseen([row["event_id"] for row in fresh])
            state_up = True
        except Exception as error:  # Redis unreachable: the log still makes them durable
            logger.warning("online state unavailable (%r): events logged, not applied", error)
            unseen, state_up = [True] * len(fresh), False
        fresh = [row for row, new in zip(fresh, unseen, strict=True) if new]
        if fresh:
            self.feedback.append("events", fresh)  # durable (fsync'ed) before anything else
            if state_up:
                self._update_state(
                    self.state.record, sorted(fresh, key=lambda row: row["occurred_at"])
                )
        if stock:
            # Per item the newest update of the request (the later one on a tie), in the log as in
            # the online state, which keeps it only if newer than what it holds.
            latest: dict[str, StockUpdate] = {}
            for update in stock:
                dated = update.model_copy(update={"updated_at": update.updated_at or now})
                kept = latest.get(update.item_id)
                if kept is None or kept.updated_at <= dated.updated_at:
                    latest[update.item_id] = dated
            self.feedback.append(STOCK_UPDATES, [update.model_dump() for update in latest.values()])
            self._update_state(
                self.state.update_stock,
                {
                    item: StockChange.at(update.is_in_stock, update.updated_at)
                    for item, update in latest.items()
                },
            )
        EVENTS.labels(outcome="accepted").inc(len(fresh))
        EVENTS.labels(outcome="duplicate").inc(len(valid) - len(fresh))
        EVENTS.labels(outcome="rejected").inc(len(rejected))
        if rejected and not valid:
            ctx.response.status_code = 400
        return EventsResponse(
            accepted=len(fresh),
            duplicates=len(valid) - len(fresh),
            rejected=rejected,
            stock_updates=len(stock),
        )

    def _update_state(self, update: Callable[[Any], None], changes: Any) -> None:  # noqa: ANN401
        """Applies logged changes to the online state; Redis being away loses their real-time
        effect only (the log has them: the lake gets them, a restart restores the stock)."""
        try:
            update(changes)
        except Exception as error:
            logger.warning("online state unavailable (%r): logged, not applied", error)

    @bentoml.api(route="/admin/reload", input_spec=ReloadRequest)
    def admin_reload(self) -> ReloadResponse:
        """Loads the newly promoted model now instead of at the next poll (needs the token when
        SHELFWISE_API_TOKEN is set)."""
        swapped = self.reload()
        self._refresh_ranked_lists_safely()  # and lists ranked since
        self._refresh_experiment_safely()  # the book of experiments too, now
        return ReloadResponse(reloaded=swapped, model_version=self.serving.model_version)

    @bentoml.api(route="/experiments", input_spec=ExperimentsRequest)
    def experiments(self) -> ExperimentsResponse:
        """Every experiment of the book with its status and its latest results (needs the token
        when SHELFWISE_API_TOKEN is set)."""
        lake = Lake(self.settings.lake_url)
        try:
            book = read_experiments(lake)
        except Exception:  # the lake away or a broken book: the book as last read
            logger.exception("Could not read the book of experiments: answering the last one read")
            book = self._book
        try:
            results = read_results(lake)
        except Exception:  # results are optional: the book without them
            logger.exception("Could not read the experiments' results")
            results = {}
        return ExperimentsResponse(
            experiments=[
                ExperimentOut(
                    name=experiment.name,
                    mode=experiment.mode,
                    status=status_of(experiment),
                    started_at=experiment.started_at,
                    stopped_at=experiment.stopped_at,
                    arms=[ExperimentArmOut(**arm.model_dump()) for arm in experiment.arms],
                    results=results.get(experiment.name),
                )
                for experiment in book
            ]
        )

    def _respond(
        self,
        endpoint: str,
        user_id: str,
        answer: Recommendation,
        serving: "Serving",
        response_type,
        trial: ExperimentAnswer | None = None,
        rec_id: str | None = None,
        explanations: list[Explanation] | None = None,
        sampled: bool | None = None,
    ):
        rec_id = rec_id or new_id()
        if trial is None:  # as without experiments
            experiment = arm = None
            model_version = serving.model_version
            drafted: list[str | None] = [None] * len(answer.items)
            versions: list[str | None] = [model_version] * len(answer.items)
        else:
            experiment, arm, model_version = trial.experiment, trial.arm, trial.model_version
            drafted = trial.drafted_by or [None] * len(answer.items)
            versions = trial.item_model_versions or [model_version] * len(answer.items)
        if self._tracer is not None:  # the request's span (bentos/tracing.py RouteTracing)
            span = trace.get_current_span()
            span.set_attributes(
                {
                    "shelfwise.rec_id": rec_id,
                    "shelfwise.strategy": answer.strategy,
                    "shelfwise.fallback_level": answer.fallback_level,
                    "shelfwise.model_version": model_version or "none",
                    "shelfwise.ranker_engine": serving.ranker_engine,
                    "shelfwise.items": len(answer.items),
                }
            )
            if trial is not None:
                span.set_attributes({"shelfwise.experiment": experiment, "shelfwise.arm": arm})
        _responses(endpoint, answer.strategy, answer.fallback_level).inc()
        shown_at = datetime.now(UTC)
        self.impressions.add(
            ShownItems(
                rec_id=rec_id,
                shown_at=shown_at,
                user_id=user_id,
                item_ids=[item.item_id for item in answer.items],
                model_versions=versions,
                strategy=f"{endpoint}:{answer.strategy}",
                fallback_level=answer.fallback_level,
                experiment=experiment,
                arm=arm,
                drafted_by=drafted,
            )
        )
        # The ranked rows of a share of the personalised answers, for the drift check.
        self.feature_samples.maybe_add(
            answer.rows,
            rec_id=rec_id,
            sampled_at=shown_at,
            user_id=user_id,
            model_version=model_version,
            fallback_level=answer.fallback_level,
            drawn=sampled,
        )
        if explanations is None:
            # Plain dicts, validated into `RecommendedItem`s with the response in one call of
            # pydantic's core: a model built per item cost more (and `model_construct`, in
            # Python, more still).
            items = [
                {"item_id": item.item_id, "score": item.score, "source": item.source, "arm": by}
                for item, by in zip(answer.items, drafted, strict=True)
            ]
        else:
            items = [
                RecommendedItem(
                    **vars(item),
                    arm=by,
                    explanation=ItemExplanation.model_validate(explained, from_attributes=True),
                )
                for item, by, explained in zip(answer.items, drafted, explanations, strict=True)
            ]
        return response_type(
            rec_id=rec_id,
            items=items,
            strategy=answer.strategy,
            fallback_level=answer.fallback_level,
            model_version=model_version,
            experiment=experiment,
            arm=arm,
        )


# Tracing first (a no-op, not even a layer, unless SHELFWISE_OTLP_ENDPOINT is set: its span
# covers the rest), then the guard (token, body size), then the contract (media type,
# validation, OpenAPI), then the pages.
RecommendationService.add_asgi_middleware(request_tracing)
RecommendationService.add_asgi_middleware(RequestGuard)
RecommendationService.add_asgi_middleware(
    RequestContract,
    routes={
        "/recommend": (RecommendRequest, RecommendResponse),
        "/similar": (SimilarRequest, SimilarResponse),
        "/events": (EventsRequest, EventsResponse),
        "/history": (HistoryRequest, HistoryResponse),
        "/admin/reload": (ReloadRequest, ReloadResponse),
        "/experiments": (ExperimentsRequest, ExperimentsResponse),
    },
    protected=PROTECTED_PREFIXES,
    openapi=lambda: RecommendationService.openapi_spec.asdict(),
)
# The inspector page at `/` (instead of BentoML's Swagger UI) and the OpenAPI page at `/docs`.
RecommendationService.add_asgi_middleware(ServicePages)


@dataclass(frozen=True)
class Serving:
    """What answers requests: replaced as a whole on a model swap, never changed in place."""

    recommender: Recommender
    model_version: str | None
    tag: str | None
    # What predicts the ranker's scores: "compiled" (lleaves), "lightgbm", or "none".
    ranker_engine: str = "none"
    # The online store's version the recommender reads (None: the lake's snapshot in process).
    store_version: int | None = None
    # The LightGBM booster of the ranker served and its features, for `explain` (the compiled
    # ranker predicts the same scores but has no per-feature contributions); None without one.
    booster: Any = None
    feature_names: list[str] | None = None


def _on_store(serving: Serving, store: CandidateStore) -> Serving:
    """`serving` on another store of its snapshot, answering from ranked lists if that one has
    them for its model."""
    recommender = serving.recommender.with_store(store)
    return replace(serving, recommender=recommender.with_ranked_lists(serving.model_version))


def load_ranker(
    model_dir: Path, settings: Settings | None = None
) -> tuple[RankerEngine, list[str]]:
    """The ranker and its feature list from a model store folder.

    The ranker compiled by lleaves when a library fits (shipped in the folder, or compiled
    earlier into `settings.compiled_ranker_dir`; each checked against LightGBM), else LightGBM
    (`models.compiled_ranker.load_ranker_engine`); nothing is compiled here, so a start or a
    swap never waits for LLVM (`_compile_later` does it in the background). LightGBM alone
    without settings, or with `SHELFWISE_RANKER_ENGINE=lightgbm`.
    """
    text, info = read_ranker(model_dir)
    if settings is None or settings.ranker_engine == ENGINE_LIGHTGBM:
        booster = booster_from_text(text)
        return RankerEngine(booster, booster, ENGINE_LIGHTGBM, "configured"), info["features"]
    engine = load_ranker_engine(text, model_dir, settings.compiled_ranker_dir, compiler=None)
    return engine, info["features"]


def load_segment_policy(model_dir: Path) -> SegmentPolicy | None:
    """The segment policy shipped with a model (its info's `segment_policy`), if any.

    A model registered before segment policies existed has none: the ranker serves every
    known user. An unreadable policy is logged and ignored the same way.
    """
    try:
        return SegmentPolicy.from_dict(read_ranker(model_dir)[1].get("segment_policy"))
    except Exception:  # a bad policy must not take the ranker down with it
        logger.exception("Unreadable segment policy in %s: the ranker serves everyone", model_dir)
        return None


def event_row(event: EventIn, now: datetime) -> dict[str, Any]:
    """An accepted event as a lake row (`shelfwise.contracts.EVENTS_SCHEMA`)."""
    occurred_at = event.occurred_at or now
    return {
        "event_id": event.event_id or new_id(),
        "occurred_at": occurred_at,
        "user_id": event.user_id,
        "session_id": event.session_id or f"api:{event.user_id}",
        "item_id": event.item_id,
        "event_type": event.event_type,
        "quantity": event.quantity,
        "price": event.price,
        "rec_id": event.rec_id,
        "source": event.source,
    }
