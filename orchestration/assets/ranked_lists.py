"""Ranked lists: the serving snapshot's candidates ranked once by the production ranker."""

import time
from collections.abc import Iterator
from typing import Any

import dagster as dg

from models.compiled_ranker import load_ranker_engine
from models.online_store import open_client, write_ranked_from_lake
from models.ranked_lists import (
    DEFAULT_DEPTH,
    MAX_DEPTH,
    RankedListsInfo,
    write_ranked_lists,
)
from models.recommender import Recommender
from models.segments import SegmentPolicy
from models.snapshot import CandidateSnapshot, snapshot_id
from orchestration.resources import ShelfwiseResource
from shelfwise.runtime.redis_clients import WRITER_CLUSTER_RETRIES
from shelfwise.runtime.registry import production, production_path, read_ranker

# Users between two progress lines in the run's log.
PROGRESS_USERS = 50_000


class RankedListsConfig(dg.Config):
    """How many of each user's ranked candidates are kept."""

    # A request for more items than a list holds is re-ranked (docs/serving-api.md).
    depth: int = DEFAULT_DEPTH


@dg.asset(deps=["serving_features", "online_store", "production_model"], group_name="serving")
def ranked_lists(
    context: dg.AssetExecutionContext, shelfwise: ShelfwiseResource, config: RankedListsConfig
) -> dg.MaterializeResult:
    """Every known user's candidates as the production ranker ranks them, as of the serving
    snapshot: the best items (`depth`) the business rules may ever show the user, with their
    scores and generators. A request with no session answers from its user's list (the rules
    walk it as they walk a full ranking, so the answer is the same) instead of decoding and
    re-ranking the candidates; anything else is re-ranked. Written to the lake beside the user
    states, and with Redis into the online store's version of this snapshot. Lists ranked for
    another snapshot or model are never served: after a promotion by hand, materialize this asset
    again to answer from lists."""
    if not 1 <= config.depth <= MAX_DEPTH:
        raise dg.Failure(f"depth must be within 1..{MAX_DEPTH}, not {config.depth}")
    settings, lake = shelfwise.settings(), shelfwise.lake()
    current = production(settings.bentoml_home)
    if current is None:
        raise dg.Failure("Nothing in production yet: materialize production_model first.")
    snapshot = snapshot_id(lake)
    if snapshot is None:
        raise dg.Failure("No user states of this layout in the lake: materialize serving_features.")
    model_dir = production_path(settings.bentoml_home)
    text, info = read_ranker(model_dir)
    # The compiled ranker shipped with the model when it fits, as the service ranks (the same
    # scores within 1e-6), else LightGBM; nothing is compiled here.
    engine = load_ranker_engine(text, model_dir, None, compiler=None)
    recommender = Recommender.from_lake(
        lake,
        engine.predictor,
        info["features"],
        segment_policy=SegmentPolicy.from_dict(info.get("segment_policy")),
    )
    store = recommender.store
    if not isinstance(store, CandidateSnapshot) or store.snapshot_id != snapshot:
        raise dg.Failure("The lake's user states changed while they were read: run again.")
    model_version = current.source_tag or current.tag
    started = time.perf_counter()

    def lists() -> Iterator[bytes]:
        for done, user_id in enumerate(store.states, start=1):
            yield recommender.ranked_list(user_id, config.depth)
            if done % PROGRESS_USERS == 0:
                elapsed = time.perf_counter() - started
                total = len(store.states)
                context.log.info(f"ranked {done:,} of {total:,} users in {elapsed:.0f} s")

    ranking = RankedListsInfo(snapshot, model_version, config.depth)
    written = write_ranked_lists(lake, lists(), ranking)
    seconds = time.perf_counter() - started
    metadata: dict[str, Any] = {
        "model_version": model_version,
        "ranker_engine": engine.engine,
        "snapshot_id": snapshot,
        "depth": config.depth,
        "users_with_a_list": written.users,
        "known_users": store.known_users,
        "seconds": round(seconds, 1),
    }
    if settings.redis_url:
        client = open_client(
            settings.redis_url,
            30.0,
            cluster=settings.redis_cluster,
            cluster_retries=WRITER_CLUSTER_RETRIES,
        )
        version, switched = write_ranked_from_lake(client, lake)
        if switched is None:
            context.log.warning(
                "The online store's version %s holds another snapshot: its lists are left as "
                "they are (materialize online_store, then this asset)",
                version,
            )
        metadata["online_store_version"] = -1 if version is None else version
        metadata["online_store_ranking"] = -1 if switched is None else switched.ranking
    return dg.MaterializeResult(metadata=metadata)
