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

import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from models.neighbour_arrays import read_neighbour_arrays
from models.session import NeighbourIndex
from models.snapshot import CandidateSnapshot, lake_states, snapshot_columns
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
    Lake,
)
from shelfwise.runtime import store_keys as keys

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
        batch = []
        for key in client.scan_iter(match=keys.version_prefix(version) + "*", count=10_000):
            batch.append(key)
            if len(batch) == DELETE_BATCH_KEYS:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
        client.srem(keys.VERSIONS, version)
        removed.append(version)
    return sorted(removed)


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
    """

    def __init__(
        self,
        client: Any,  # noqa: ANN401
        version: int,
        table: ItemTable,
        known_users: int,
    ) -> None:
        self.client = client
        self.version = version
        self._table = table
        self._known_users = known_users

    @property
    def known_users(self) -> int:
        """How many users have candidates."""
        return self._known_users

    def candidates_of(self, user_id: str) -> UserCandidates | None:
        """The user's candidates and purchases from this version (one GET).

        Args:
            user_id: Any user id.

        Returns:
            None when the version knows nothing of the user.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        raw = self.client.get(keys.user_key(self.version, user_id))
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
    store = RedisCandidateStore(client, version, table, int(meta["known_users"]))
    return OnlineVersion(
        version,
        store,
        frames[keys.SHARED_POPULAR],
        neighbours,
        frames[keys.SHARED_FACTS],
        list(meta["columns"]),
    )


def open_client(url: str, timeout_s: float = 2.0) -> Any:  # noqa: ANN401
    """A Redis client for the online store (bytes responses, bounded waits).

    Args:
        url: A Redis URL, e.g. `redis://127.0.0.1:6379/0`.
        timeout_s: Seconds a connection or a command may take before it fails.
    """
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()
