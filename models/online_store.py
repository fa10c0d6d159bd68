"""The serving state in Redis: versions written by the pipeline, read by stateless replicas.

A version holds what a worker would otherwise load from the lake's serving snapshot:

- per user, one compact binary value (`encode_user`): the candidates' item codes (int32) and ranks
  (int32), their pair features (`PAIR_COLUMNS`, float32), the user's features (`USER_COLUMNS`,
  float32) and the codes of the items the user bought before the snapshot (int32), after a
  12-byte header (magic, candidate count, purchase count);
- shared, O(items) parts, read once per version by each worker: the item table (item ids by code
  and their `ITEM_COLUMNS`), the popular items, the neighbours, the business rules' item facts
  (Parquet bytes);
- a description (`meta`, JSON): the column layout, the snapshot's columns, counts.

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
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from models.features import FEATURE_COLUMNS
from models.snapshot import (
    _USER_EVENTS,
    ITEM_COLUMNS,
    PAIR_COLUMNS,
    USER_COLUMNS,
    CandidateSnapshot,
    UserCandidates,
    assemble_rows,
    load_snapshot,
)
from shelfwise.lake import (
    SERVING_CANDIDATES,
    SERVING_ITEMS,
    SERVING_NEIGHBOURS,
    SERVING_POPULAR,
    SERVING_PURCHASES,
    Lake,
)
from shelfwise.runtime import store_keys as keys

logger = logging.getLogger(__name__)

# The layout of a user's value; a reader refuses a version written in another.
FORMAT = "shelfwise-user-v1"
_MAGIC = b"SWU1"
_HEADER = struct.Struct("<4sII")  # magic, candidates, purchases
# Users written per pipelined round trip.
WRITE_BATCH_USERS = 2_000
# Keys removed per UNLINK.
DELETE_BATCH_KEYS = 5_000


def encode_user(
    codes: np.ndarray, ranks: np.ndarray, pairs: np.ndarray, user: np.ndarray, bought: np.ndarray
) -> bytes:
    """One user's value: the header, then item codes, ranks, pair and user features, purchases.

    Args:
        codes: The candidates' item codes (int32), best first.
        ranks: The candidates' ranks (int32).
        pairs: The candidates' `PAIR_COLUMNS` (float32, candidates × pair columns).
        user: The user's `USER_COLUMNS` (float32).
        bought: Codes of the items the user bought before the snapshot (int32).

    Returns:
        The bytes stored under the user's key.
    """
    return b"".join(
        (
            _HEADER.pack(_MAGIC, len(codes), len(bought)),
            np.ascontiguousarray(codes, np.int32).tobytes(),
            np.ascontiguousarray(ranks, np.int32).tobytes(),
            np.ascontiguousarray(pairs, np.float32).tobytes(),
            np.ascontiguousarray(user, np.float32).tobytes(),
            np.ascontiguousarray(bought, np.int32).tobytes(),
        )
    )


def decode_user(
    raw: bytes, items: np.ndarray, item_part: np.ndarray
) -> tuple[UserCandidates, np.ndarray]:
    """A user's value as candidates in `FEATURE_COLUMNS` order (as `CandidateSnapshot` gives).

    Args:
        raw: The value `encode_user` wrote.
        items: The version's item ids by code.
        item_part: The version's item features by code.

    Returns:
        The user's candidates (with the purchases as item ids) and the user's feature vector.

    Raises:
        ValueError: The value is not in this layout.
    """
    magic, rows, bought_count = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise ValueError("not a Shelfwise user value")
    offset = _HEADER.size
    pair_width, user_width = len(PAIR_COLUMNS), len(USER_COLUMNS)

    def take(dtype: type, count: int) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(raw, dtype, count, offset)
        offset += 4 * count
        return array

    codes = take(np.int32, rows)
    ranks = take(np.int32, rows)
    pairs = take(np.float32, rows * pair_width).reshape(rows, pair_width)
    user = take(np.float32, user_width)
    bought = take(np.int32, bought_count)
    candidates = UserCandidates(
        assemble_rows(pairs, item_part[codes], user),
        items[codes],
        ranks,
        float(user[_USER_EVENTS]),
        frozenset(items[bought].tolist()),
    )
    return candidates, user


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
    snapshot: CandidateSnapshot,
    *,
    popular: pl.DataFrame,
    neighbours: pl.DataFrame,
    facts: pl.DataFrame,
    purchases: pl.DataFrame,
    columns: Iterable[str] = FEATURE_COLUMNS,
    batch_users: int = WRITE_BATCH_USERS,
) -> WrittenVersion:
    """Writes a new version of the serving state, switches the pointer to it, removes old ones.

    Args:
        client: A Redis client (bytes responses).
        snapshot: The candidates with their features.
        popular: item_id, popularity (most popular first).
        neighbours: kind, item_id, neighbour_item_id, score.
        facts: The business rules' item facts (`serving_facts`' items).
        purchases: user_id, item_id bought before the snapshot.
        columns: The features the snapshot file holds (the others are unknown, NaN).
        batch_users: Users written per round trip.

    Returns:
        The new version and what writing it took.
    """
    started = time.perf_counter()
    version = int(client.incr(keys.NEXT_VERSION))
    client.sadd(keys.VERSIONS, version)
    # The item table: the snapshot's items by their codes, then purchased items it lacks.
    codes = {item: n for n, item in enumerate(snapshot.items.tolist())}
    by_user: dict[str, list[int]] = {}
    for user_id, item_ids in purchases.group_by("user_id").agg("item_id").iter_rows():
        by_user[user_id] = [codes.setdefault(item, len(codes)) for item in item_ids]
    extra = len(codes) - len(snapshot.items)
    item_part = np.vstack(
        [snapshot.item_part, np.full((extra, len(ITEM_COLUMNS)), np.nan, np.float32)]
    )
    item_table = pl.DataFrame(
        {"item_id": list(codes), **{c: item_part[:, n] for n, c in enumerate(ITEM_COLUMNS)}},
        schema={"item_id": pl.String, **{c: pl.Float32 for c in ITEM_COLUMNS}},
    )
    shared = {
        keys.SHARED_ITEMS: item_table,
        keys.SHARED_POPULAR: popular,
        keys.SHARED_NEIGHBOURS: neighbours,
        keys.SHARED_FACTS: facts,
    }
    written = 0
    pipe = client.pipeline(transaction=False)
    for part, frame in shared.items():
        value = _parquet_bytes(frame)
        written += len(value)
        pipe.set(keys.shared_key(version, part), value)
    pipe.execute()

    empty_user = np.full(len(USER_COLUMNS), np.nan, np.float32)
    no_rows = np.zeros(0, np.int32)
    users = list(snapshot.spans) + [u for u in by_user if u not in snapshot.spans]
    for first in range(0, len(users), batch_users):
        pipe = client.pipeline(transaction=False)
        for user_id in users[first : first + batch_users]:
            bought = np.array(by_user.get(user_id, ()), np.int32)
            span = snapshot.spans.get(user_id)
            if span is None:
                value = encode_user(no_rows, no_rows, no_rows, empty_user, bought)
            else:
                start, end, index = span
                value = encode_user(
                    snapshot.item_codes[start:end],
                    snapshot.ranks[start:end],
                    snapshot.pairs[start:end],
                    snapshot.user_part[index],
                    bought,
                )
            written += len(value)
            pipe.set(keys.user_key(version, user_id), value)
        pipe.execute()
    meta = {
        "format": FORMAT,
        "version": version,
        "written_at": time.time(),
        "users": len(users),
        "known_users": len(snapshot.spans),
        "rows": len(snapshot.ranks),
        "items": len(codes),
        "columns": list(columns),
        "pair_columns": PAIR_COLUMNS,
        "user_columns": USER_COLUMNS,
        "item_columns": ITEM_COLUMNS,
    }
    client.set(keys.meta_key(version), json.dumps(meta))
    # The switch: one SET; a replica sees the old version or the new one, whole.
    previous = client.getset(keys.CURRENT, version)
    previous = int(previous) if previous is not None else None
    removed = remove_versions(client, keep={version, previous})
    return WrittenVersion(
        version,
        len(users),
        len(snapshot.spans),
        written,
        time.perf_counter() - started,
        previous,
        removed,
    )


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
    """Writes the lake's serving snapshot as a new version of the online store.

    Args:
        client: A Redis client (bytes responses).
        lake: The lake holding the serving snapshot (`serving_features`).

    Returns:
        The new version, now served.
    """
    snapshot = load_snapshot(lake, [])
    names = next(lake.iter_parquet(SERVING_CANDIDATES, 1)).schema.names
    columns = [c for c in FEATURE_COLUMNS if c in names]
    return write_version(
        client,
        snapshot,
        popular=lake.read_frame(SERVING_POPULAR),
        neighbours=lake.read_frame(SERVING_NEIGHBOURS),
        facts=lake.read_frame(SERVING_ITEMS),
        purchases=lake.read_frame(SERVING_PURCHASES),
        columns=columns,
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
        items: The version's item ids by code.
        item_part: The version's item features by code.
        known_users: How many users of the version have candidates.
    """

    def __init__(
        self,
        client: Any,  # noqa: ANN401
        version: int,
        items: np.ndarray,
        item_part: np.ndarray,
        known_users: int,
    ) -> None:
        self.client = client
        self.version = version
        self._items = items
        self._item_part = item_part
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
        return decode_user(raw, self._items, self._item_part)[0]


@dataclass(frozen=True)
class OnlineVersion:
    """One version of the online store as a worker holds it: its shared parts and its users.

    Attributes:
        version: The version.
        store: Its users' candidates, read per request.
        popular: Popular items.
        neighbours: Item neighbours.
        facts: The business rules' item facts.
        columns: The features the snapshot holds.
    """

    version: int
    store: RedisCandidateStore
    popular: pl.DataFrame
    neighbours: pl.DataFrame
    facts: pl.DataFrame
    columns: list[str]


class OnlineStoreError(RuntimeError):
    """A version is missing, incomplete or written in another layout."""


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
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.meta_key(version))
    for part in keys.SHARED_PARTS:
        pipe.get(keys.shared_key(version, part))
    raw_meta, *parts = pipe.execute()
    if raw_meta is None or any(part is None for part in parts):
        raise OnlineStoreError(f"online store version {version} is missing or incomplete")
    meta = json.loads(raw_meta)
    layout = (meta.get("pair_columns"), meta.get("user_columns"), meta.get("item_columns"))
    if meta.get("format") != FORMAT or layout != (PAIR_COLUMNS, USER_COLUMNS, ITEM_COLUMNS):
        raise OnlineStoreError(f"online store version {version} has another layout")
    frames = {
        part: pl.read_parquet(io.BytesIO(raw))
        for part, raw in zip(keys.SHARED_PARTS, parts, strict=True)
    }
    table = frames[keys.SHARED_ITEMS]
    items = np.array(table.get_column("item_id").to_list(), dtype=object)
    item_part = table.select(ITEM_COLUMNS).to_numpy().astype(np.float32, copy=False)
    store = RedisCandidateStore(client, version, items, item_part, int(meta["known_users"]))
    return OnlineVersion(
        version,
        store,
        frames[keys.SHARED_POPULAR],
        frames[keys.SHARED_NEIGHBOURS],
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
