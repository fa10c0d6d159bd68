"""The serving state in Redis: versions written by the pipeline, read by stateless replicas.

A version holds what a worker would otherwise hold in process (`models.snapshot`):

- per user, one compact value, the very bytes of the lake's user states
  (`models.user_state`: candidates as item codes, the user's features and purchases, and the pair
  features that cannot be predicted from shared parts);
- shared, O(items) parts, read once per version by each worker: the item table the values refer
  to, the popular items, the business rules' item facts (Parquet bytes), the neighbours
  already indexed by item code (`SHARED_FORMAT`: NumPy arrays), and the zstd dictionary the
  values are compressed with;
- a description (`meta`, JSON): the value layout, the shared parts' format, the snapshot's
  columns, counts.

`write_version` writes a new version in pipelined batches, then switches the pointer
(`store_keys.CURRENT`) with one `SET`, then removes every version but the new one and the one it
replaced (a replica may still be reading that one until it polls the pointer again). The key
names are in `shelfwise.runtime.store_keys`.

A worker reads the pointer (`current_version`), loads the shared parts of that version
(`load_version`) and reads each request's user from that version only (`RedisCandidateStore`):
the recommender of a version never mixes in another's.
"""

import dataclasses
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from models.neighbour_arrays import read_neighbour_arrays
from models.ranked_lists import (
    RankedListsInfo,
    decode_ranked,
    read_ranked_info,
    read_ranked_lists,
)
from models.session import NeighbourIndex
from models.snapshot import CandidateSnapshot, lake_states, snapshot_columns, snapshot_id
from models.user_state import (
    LAYOUT,
    ItemTable,
    StateCodec,
    UserCandidates,
    candidate_count,
    decode_user,
)
from shelfwise.lake import (
    SERVING_ITEMS,
    SERVING_POPULAR,
    SERVING_USER_STATES,
    Lake,
)
from shelfwise.runtime import store_keys as keys
from shelfwise.runtime.redis_clients import SERVING_CLUSTER_RETRIES, redis_client

logger = logging.getLogger(__name__)

# How the shared parts are written; a version of another format is refused (`load_version`).
# 2: the neighbours as arrays by item code (`neighbour_arrays`) instead of Parquet rows, so a
# worker's start-up neither sorts, groups nor joins the millions of neighbour rows.
SHARED_FORMAT = "shelfwise-shared-v2"
# Users written per pipelined round trip.
WRITE_BATCH_USERS = 2_000
# Keys removed per UNLINK.
DELETE_BATCH_KEYS = 5_000


@dataclass(frozen=True)
class WrittenVersion:
    """What `write_version` did.

    Attributes:
        version: The new version, now served.
        users: Users written (with candidates or purchases).
        known_users: Users with candidates.
        bytes: Bytes of values written (users and shared parts, without Redis' overhead).
        seconds: How long writing and switching took.
        previous: The version it replaced (kept until the next switch), if any.
        removed: Older versions removed.
    """

    version: int
    users: int
    known_users: int
    bytes: int
    seconds: float
    previous: int | None
    removed: list[int] = field(default_factory=list)


def write_version(
    client: Any,  # noqa: ANN401 - a redis.Redis
    table: ItemTable,
    states: Iterable[tuple[str, bytes, bool]],
    *,
    popular: pl.DataFrame,
    neighbours: bytes,
    facts: pl.DataFrame,
    columns: Iterable[str],
    batch_users: int = WRITE_BATCH_USERS,
    snapshot: str | None = None,
) -> WrittenVersion:
    """Writes a new version of the serving state, switches the pointer to it, removes old ones.

    Args:
        client: A Redis client (bytes responses).
        table: The item table the users' values refer to, with their codec.
        states: (user_id, value, has candidates) per user (`models.snapshot`), streamed.
        popular: item_id, popularity (most popular first).
        neighbours: The neighbours indexed by `table`'s item codes
            (`models.neighbour_arrays.neighbour_arrays`).
        facts: The business rules' item facts (`serving_facts`' items).
        columns: The features the snapshot holds (the others are unknown, NaN).
        batch_users: Users written per round trip.
        snapshot: The id of the lake's states written (`models.snapshot.snapshot_id`), which
            ranked lists name; None when they were encoded afresh.

    Returns:
        The new version and what writing it took.
    """
    started = time.perf_counter()
    version = int(client.incr(keys.NEXT_VERSION))
    client.sadd(keys.VERSIONS, version)
    shared = {
        keys.SHARED_ITEMS: _parquet_bytes(table.to_frame()),
        keys.SHARED_POPULAR: _parquet_bytes(popular),
        keys.SHARED_NEIGHBOURS: neighbours,
        keys.SHARED_FACTS: _parquet_bytes(facts),
        keys.SHARED_DICTIONARY: table.codec.dictionary,
    }
    written = 0
    pipe = client.pipeline(transaction=False)
    for part, value in shared.items():
        written += len(value)
        pipe.set(keys.shared_key(version, part), value)
    pipe.execute()

    users = known = 0
    pipe = client.pipeline(transaction=False)
    for user_id, value, has_candidates in states:
        pipe.set(keys.user_key(version, user_id), value)
        written += len(value)
        users += 1
        known += has_candidates
        if users % batch_users == 0:
            pipe.execute()
            pipe = client.pipeline(transaction=False)
    pipe.execute()
    meta = {
        "layout": LAYOUT,
        "shared_format": SHARED_FORMAT,
        "version": version,
        "written_at": time.time(),
        "users": users,
        "known_users": known,
        "items": len(table),
        "columns": list(columns),
        "snapshot_id": snapshot,
    }
    client.set(keys.meta_key(version), json.dumps(meta))
    # The switch: one SET; a replica sees the old version or the new one, whole.
    previous = client.getset(keys.CURRENT, version)
    previous = int(previous) if previous is not None else None
    removed = remove_versions(client, keep={version, previous})
    return WrittenVersion(
        version, users, known, written, time.perf_counter() - started, previous, removed
    )


def snapshot_states(snapshot: CandidateSnapshot) -> Iterator[tuple[str, bytes, bool]]:
    """The states of a snapshot held in process, as `write_version` takes them."""
    for user_id, value in snapshot.states.items():
        yield user_id, value, candidate_count(value, snapshot.table) > 0


def remove_versions(client: Any, keep: set[int | None]) -> list[int]:  # noqa: ANN401
    """Removes every written version (complete or not) but those in `keep`.

    Args:
        client: A Redis client.
        keep: Versions to keep (the served one and the one it replaced).

    Returns:
        The versions removed.
    """
    removed = []
    for raw in client.smembers(keys.VERSIONS):
        version = int(raw)
        if version in keep:
            continue
        _unlink_matching(client, keys.version_prefix(version) + "*")
        client.srem(keys.VERSIONS, version)
        removed.append(version)
    return sorted(removed)


def _unlink_matching(client: Any, pattern: str) -> None:  # noqa: ANN401
    """Removes every key matching a pattern, in batches."""
    batch = []
    for key in client.scan_iter(match=pattern, count=10_000):
        batch.append(key)
        if len(batch) == DELETE_BATCH_KEYS:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def write_from_lake(client: Any, lake: Lake) -> WrittenVersion:  # noqa: ANN401
    """Writes the lake's serving state (`serving_features`) as a new version of the online store.

    The users' values are streamed from the lake, batch by batch, never held together; values
    written by another version of the code are encoded afresh from the snapshot's rows.

    Args:
        client: A Redis client (bytes responses).
        lake: The lake holding the serving snapshot and its user states.

    Returns:
        The new version, now served.
    """
    table, neighbours, states = lake_states(lake)
    return write_version(
        client,
        table,
        states,
        popular=lake.read_frame(SERVING_POPULAR),
        neighbours=neighbours,
        facts=lake.read_frame(SERVING_ITEMS),
        columns=snapshot_columns(lake),
        snapshot=snapshot_id(lake),
    )


def current_version(client: Any) -> int | None:  # noqa: ANN401
    """The version being served (the pointer), or None when none was written."""
    value = client.get(keys.CURRENT)
    return int(value) if value is not None else None


class RedisCandidateStore:
    """One version's users in Redis (a `models.snapshot.CandidateStore`).

    Args:
        client: A Redis client (bytes responses).
        version: The version read; never another.
        table: The version's item table.
        known_users: How many users of the version have candidates.
        snapshot_id: The id of the lake states the version was written from, if known.
        ranked: What the version's ranked lists were ranked for; None: the version has none.
    """

    def __init__(
        self,
        client: Any,  # noqa: ANN401
        version: int,
        table: ItemTable,
        known_users: int,
        snapshot_id: str | None = None,
        ranked: RankedListsInfo | None = None,
    ) -> None:
        self.client = client
        self.version = version
        self.snapshot_id = snapshot_id
        self._table = table
        self._known_users = known_users
        self._ranked = ranked

    @property
    def ranked_lists(self) -> RankedListsInfo | None:
        """What the version's ranked lists were ranked for; None when it has none."""
        return self._ranked

    @property
    def table(self) -> ItemTable:
        """The item table the version's values refer to."""
        return self._table

    def with_ranked(self, ranked: RankedListsInfo | None) -> "RedisCandidateStore":
        """This version's store reading its ranked lists as `ranked` describes them."""
        return RedisCandidateStore(
            self.client, self.version, self._table, self._known_users, self.snapshot_id, ranked
        )

    def lost(self) -> "RedisCandidateStore":
        """This version once Redis no longer holds it (restarted empty, flushed).

        No user has candidates or a ranked list any more, as in a missing snapshot.
        """
        return RedisCandidateStore(self.client, self.version, self._table, 0, self.snapshot_id)

    def ranked_key_of(self, user_id: str) -> str | None:
        """The key of the user's ranked list in this version's ranking (None: it has none)."""
        if self._ranked is None:
            return None
        return keys.ranked_key(self.version, self._ranked.ranking, user_id)

    def ranked_of(
        self, user_id: str, value: bytes | None = None, fetched: bool = False
    ) -> list[tuple[str, tuple[float, str]]] | None:
        """The user's ranked list from this version (one GET), or None.

        Args:
            user_id: Any user id.
            value: The list's value, when the caller fetched it (`ranked_key_of`) already.
            fetched: Whether it did (then `value` None means the user has no list).

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        key = self.ranked_key_of(user_id)
        if key is None:
            return None
        raw = value if fetched else self.client.get(key)
        if not raw:
            return None
        return decode_ranked(raw, self._table.ids, self._table.wide_codes)

    @property
    def known_users(self) -> int:
        """How many users have candidates."""
        return self._known_users

    def user_key_of(self, user_id: str) -> str:
        """The key of the user's candidates and purchases in this version."""
        return keys.user_key(self.version, user_id)

    def candidates_of(
        self, user_id: str, value: bytes | None = None, fetched: bool = False
    ) -> UserCandidates | None:
        """The user's candidates and purchases from this version (one GET).

        Args:
            user_id: Any user id.
            value: The user's value, when the caller fetched it (`user_key_of`) already.
            fetched: Whether it did (then `value` None means the version knows no such user).

        Returns:
            None when the version knows nothing of the user.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        raw = value if fetched else self.client.get(keys.user_key(self.version, user_id))
        if raw is None:
            return None
        return decode_user(raw, self._table)


@dataclass(frozen=True)
class OnlineVersion:
    """One version of the online store as a worker holds it: its shared parts and its users.

    Attributes:
        version: The version.
        store: Its users' candidates, read per request.
        popular: Popular items.
        neighbours: Item neighbours (the session's and `/similar`'s).
        facts: The business rules' item facts.
        columns: The features the snapshot holds.
    """

    version: int
    store: RedisCandidateStore
    popular: pl.DataFrame
    neighbours: NeighbourIndex
    facts: pl.DataFrame
    columns: list[str]


class OnlineStoreError(RuntimeError):
    """A version is missing, incomplete or written in another layout or format."""


def load_version(client: Any, version: int) -> OnlineVersion:  # noqa: ANN401
    """Reads a version's description and shared parts (O(items), never per user).

    Args:
        client: A Redis client (bytes responses).
        version: The version (usually `current_version`).

    Returns:
        The version, its users read on demand.

    Raises:
        OnlineStoreError: The version is gone, incomplete or in another layout.
    """
    # The description first: a version refused for its layout costs one small read per poll.
    raw_meta = client.get(keys.meta_key(version))
    if raw_meta is None:
        raise OnlineStoreError(f"online store version {version} is missing or incomplete")
    meta = json.loads(raw_meta)
    if meta.get("layout") != LAYOUT:
        raise OnlineStoreError(f"online store version {version} has another layout")
    if meta.get("shared_format") != SHARED_FORMAT:
        raise OnlineStoreError(
            f"online store version {version} holds its shared parts in another format "
            f"({meta.get('shared_format')!r}, not {SHARED_FORMAT!r}): write a new version "
            "(the online_store asset)"
        )
    pipe = client.pipeline(transaction=False)
    for part in keys.SHARED_PARTS:
        pipe.get(keys.shared_key(version, part))
    parts = pipe.execute()
    if any(part is None for part in parts):
        raise OnlineStoreError(f"online store version {version} is missing or incomplete")
    raw = dict(zip(keys.SHARED_PARTS, parts, strict=True))
    frames = {
        part: pl.read_parquet(io.BytesIO(raw[part]))
        for part in (keys.SHARED_ITEMS, keys.SHARED_POPULAR, keys.SHARED_FACTS)
    }
    items = ItemTable.from_frame(frames[keys.SHARED_ITEMS])
    items = items.with_codec(StateCodec(raw[keys.SHARED_DICTIONARY]))
    table, neighbours = read_neighbour_arrays(items, raw[keys.SHARED_NEIGHBOURS])
    snapshot = meta.get("snapshot_id")
    store = RedisCandidateStore(
        client, version, table, int(meta["known_users"]), snapshot, ranked_info(client, version)
    )
    return OnlineVersion(
        version,
        store,
        frames[keys.SHARED_POPULAR],
        neighbours,
        frames[keys.SHARED_FACTS],
        list(meta["columns"]),
    )


def version_snapshot_id(client: Any, version: int) -> str | None:  # noqa: ANN401
    """The id of the lake states a version was written from (None: unknown or no version)."""
    raw = client.get(keys.meta_key(version))
    return None if raw is None else json.loads(raw).get("snapshot_id")


def ranked_info(client: Any, version: int) -> RankedListsInfo | None:  # noqa: ANN401
    """What a version's ranked lists were ranked for; None when it has none (yet)."""
    raw = client.get(keys.ranked_meta_key(version))
    return None if raw is None else RankedListsInfo.from_json(raw)


def write_ranked(
    client: Any,  # noqa: ANN401
    version: int,
    lists: Iterable[tuple[str, bytes]],
    info: RankedListsInfo,
    batch_users: int = WRITE_BATCH_USERS,
) -> RankedListsInfo:
    """Writes ranked lists into a version as a new ranking, switches to it, removes the old one.

    Each ranking has keys of its own, so a replica never reads one model's list under another's
    description; one still reading the ranking replaced finds its keys gone and re-ranks.

    Args:
        client: A Redis client.
        version: The version the lists were ranked for (its snapshot).
        lists: (user_id, value) per user; b"" for a user without a list.
        info: What they were ranked for.
        batch_users: Users written per round trip.

    Returns:
        The description switched in (with its ranking's number).
    """
    ranking = int(client.incr(keys.next_ranking_key(version)))
    pipe = client.pipeline(transaction=False)
    count = 0
    for user_id, value in lists:
        if value:
            pipe.set(keys.ranked_key(version, ranking, user_id), value)
            count += 1
            if count % batch_users == 0:
                pipe.execute()
                pipe = client.pipeline(transaction=False)
    pipe.execute()
    switched = dataclasses.replace(info, ranking=ranking)
    before = ranked_info(client, version)
    client.set(keys.ranked_meta_key(version), switched.to_json())
    if before is not None and before.ranking != ranking:
        _unlink_matching(client, keys.ranking_prefix(version, before.ranking) + "*")
    return switched


def write_ranked_from_lake(client: Any, lake: Lake) -> tuple[int | None, RankedListsInfo | None]:  # noqa: ANN401
    """Writes the lake's ranked lists into the current version, when it holds their snapshot.

    Args:
        client: A Redis client.
        lake: The lake holding the user states and their ranked lists.

    Returns:
        The current version (None: none written yet) and the ranking switched in (None when the
        version holds another snapshot or the lake no lists of its states).
    """
    version = current_version(client)
    info = read_ranked_info(lake)
    if version is None or info is None or version_snapshot_id(client, version) != info.snapshot_id:
        return version, None
    users = lake.read_table(SERVING_USER_STATES, columns=["user_id"]).column("user_id")
    lists = read_ranked_lists(lake, info.snapshot_id, len(users))
    if lists is None:
        return version, None
    pairs = ((user_id, lists.at(row) or b"") for row, user_id in enumerate(users.to_pylist()))
    return version, write_ranked(client, version, pairs, info)


def open_client(
    url: str,
    timeout_s: float = 2.0,
    cluster: bool = False,
    cluster_retries: int = SERVING_CLUSTER_RETRIES,
) -> Any:  # noqa: ANN401
    """A Redis client for the online store (bytes responses, bounded waits).

    Args:
        url: A Redis URL, e.g. `redis://127.0.0.1:6379/0`; with `cluster`, any one node of the
            cluster (`shelfwise.runtime.redis_clients`).
        timeout_s: Seconds a connection or a command may take before it fails.
        cluster: Whether `url` is a node of a Redis Cluster (`SHELFWISE_REDIS_CLUSTER`).
        cluster_retries: With `cluster`, retries of a command that met a connection error or a
            cluster-down reply (the service's default: once; a writer passes more).
    """
    return redis_client(
        url,
        cluster=cluster,
        timeout_s=timeout_s,
        connect_timeout_s=timeout_s,
        cluster_retries=cluster_retries,
    )


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()
