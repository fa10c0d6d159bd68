"""The serving snapshot as the service holds it: each user's compact state, and where it is kept.

The pipeline's snapshot file has one row per (user, candidate) with the whole feature vector, as
training assembles it. The service never holds those rows: `write_user_states` encodes each user
into one compact value (`models.user_state`, lossless) and writes the values, the shared item
table, the dictionary the values are compressed with, and the neighbours indexed by the table's
item codes (`models.neighbour_arrays`) next to the file.
A worker holds those values in process (`CandidateSnapshot`, the embedded default) or reads them
from Redis per request (`models.online_store`); either way a request decodes one user's rows, the
very numbers training would assemble for that user.

Encoding reads the snapshot file batch by batch (each user's rows contiguous, as
`serving_features` writes them), so memory holds one batch and the values, never the rows.
"""

import ctypes
import dataclasses
import json
import logging
import uuid
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from models.arrow_buffers import binary_parts, joined_parts
from models.features import FEATURE_COLUMNS
from models.neighbour_arrays import neighbour_arrays, read_neighbour_arrays
from models.queries import whole_queries
from models.ranked_lists import RankedLists, RankedListsInfo, decode_ranked, read_ranked_lists
from models.session import NeighbourIndex
from models.user_state import (
    ITEM_COLUMNS,
    ITEM_LEVEL_SCORES,
    LAYOUT,
    ItemTable,
    StateCodec,
    UserCandidates,
    decode_user,
    encode_users,
    purchases_only,
    train_codec,
)
from shelfwise.lake import (
    SERVING_CANDIDATES,
    SERVING_ITEMS,
    SERVING_NEIGHBOUR_ARRAYS,
    SERVING_NEIGHBOURS,
    SERVING_PURCHASES,
    SERVING_STATE_DICTIONARY,
    SERVING_STATE_ITEMS,
    SERVING_USER_STATES,
    Lake,
)

logger = logging.getLogger(__name__)

USER_KEY = "user_id"
ITEM_KEY = "item_id"
RANK = "candidate_rank"
SNAPSHOT_KEY = [USER_KEY, ITEM_KEY, RANK]
# The order a snapshot's rows are written in: each user's rows together, best candidate first.
SNAPSHOT_ORDER = [USER_KEY, RANK]
# Rows decoded at a time while encoding: a few hundred MB of a data frame at most.
LOAD_BATCH_ROWS = 500_000
# The key of the value layout in the item table's Parquet metadata.
LAYOUT_KEY = b"shelfwise.user_state.layout"
# A new id per snapshot written: what ranked lists (`models.ranked_lists`) and online store
# versions say they belong to.
SNAPSHOT_ID_KEY = b"shelfwise.snapshot_id"
# Values per Parquet row group of the user states.
STATES_BATCH_USERS = 50_000
# The serving snapshot's neighbour rows (`SERVING_NEIGHBOURS`).
NEIGHBOUR_ROWS = pl.DataFrame(
    schema={
        "kind": pl.String,
        "item_id": pl.String,
        "neighbour_item_id": pl.String,
        "score": pl.Float64,
    }
)


class CandidateStore(Protocol):
    """Where a recommender finds a known user's candidates: in process or in Redis."""

    @property
    def known_users(self) -> int:
        """How many users have candidates."""
        ...

    @property
    def ranked_lists(self) -> "RankedListsInfo | None":
        """What the store's ranked lists were ranked for; None when it holds none."""
        ...

    def ranked_of(self, user_id: str) -> list[tuple[str, tuple[float, str]]] | None:
        """The user's ranked list (`models.ranked_lists.decode_ranked`), or None.

        A store in Redis also takes the value its caller already read (`ranked_key_of`).
        """
        ...

    def candidates_of(self, user_id: str) -> UserCandidates | None:
        """The user's candidates, or None when the store knows nothing of the user.

        Raises:
            Exception: The store cannot be read (Redis unreachable); the caller degrades.
        """
        ...


class SnapshotFeaturesError(ValueError):
    """A snapshot lacks features the ranker needs (it was built for another ranker)."""


def require_features(features: Iterable[str], held: Iterable[str], source: str) -> None:
    """Raises `SnapshotFeaturesError` naming the ranker's `features` that `source` lacks.

    Args:
        features: The features the ranker needs.
        held: The features the snapshot (or online store version) holds.
        source: What holds them, for the message ("serving snapshot", "online store").
    """
    held = set(held)
    missing = [name for name in features if name not in held]
    if missing:
        raise SnapshotFeaturesError(f"{source} lacks the ranker's features: {missing}")


class PackedStates(Mapping[str, bytes]):
    """Users' values in two Arrow buffers, found by the hash of the user id.

    A `dict[str, bytes]` costs about 200 bytes of Python objects per user on top of the value
    (the key's and the value's objects, the table's slot); here a user costs the id's bytes,
    two offsets and a hash with its position, about 40 bytes. A lookup hashes the id, binary
    searches the sorted hashes and compares the id at each match.
    """

    _CHUNK = 10_000  # users turned into Python objects at a time when iterating

    def __init__(self, user_ids: pa.Array, values: pa.Array) -> None:
        """Takes the ids (strings) and their values (binary), one per user, no id twice."""
        self._ids = user_ids.cast(pa.large_string())
        self._values = values.cast(pa.large_binary())
        # The ids' offsets and bytes, read directly by `row_of`: an Arrow scalar per lookup
        # (`self._ids[row].as_py()`) cost more than the binary search.
        _, offsets, data = self._ids.buffers()
        start = self._ids.offset
        self._id_offsets = np.frombuffer(offsets, np.int64)[start : start + len(self._ids) + 1]
        self._id_bytes = memoryview(data if data is not None else b"").cast("B")
        hashes = np.fromiter((hash(user) for user in self._ids.to_pylist()), np.int64)
        order = np.argsort(hashes, kind="stable")
        # Python arrays, searched with `bisect`: NumPy's `searchsorted` releases the GIL, and in
        # the service a background thread waiting for it (the impression writer) takes it in the
        # middle of the request; a lookup also cost three times as long (6 µs in the service).
        self._hashes = array("q", hashes[order].tobytes())
        self._order = array("i", order.astype(np.int32).tobytes())

    @classmethod
    def from_tables(cls, tables: Iterable[pa.Table]) -> "PackedStates":
        """The states of tables of `user_id` and `state` columns, read one at a time.

        Each table's buffers are copied into NumPy arrays and released before the next is read
        (`models.arrow_buffers`), so the read never holds more than one table beyond the states.
        """
        ids, values = [], []
        for table in tables:
            ids.append(binary_parts(table.column(USER_KEY).cast(pa.large_string())))
            values.append(binary_parts(table.column("state").cast(pa.large_binary())))
        return cls(_joined(ids, pa.large_string()), _joined(values, pa.large_binary()))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, bytes]]) -> "PackedStates":
        """The states of (user_id, value) pairs."""
        users, values = [], []
        for user_id, value in pairs:
            users.append(user_id)
            values.append(value)
        return cls(pa.array(users, pa.large_string()), pa.array(values, pa.large_binary()))

    def row_of(self, user_id: str) -> int | None:
        """The user's row (values of other columns aligned with these are at it), or None."""
        key = hash(user_id)
        hashes = self._hashes
        at = bisect_left(hashes, key)
        encoded = None
        while at < len(hashes) and hashes[at] == key:
            row = self._order[at]
            if encoded is None:
                encoded = user_id.encode()
            start, end = self._id_offsets[row : row + 2].tolist()
            if self._id_bytes[start:end] == encoded:
                return row
            at += 1
        return None

    def __getitem__(self, user_id: str) -> bytes:
        row = self.row_of(user_id)
        if row is None:
            raise KeyError(user_id)
        return self._values[row].as_py()

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self._ids), self._CHUNK):
            yield from self._ids.slice(start, self._CHUNK).to_pylist()

    def items(self) -> Iterator[tuple[str, bytes]]:  # type: ignore[override]
        """(user_id, value) per user, a chunk of Python objects at a time."""
        for start in range(0, len(self._ids), self._CHUNK):
            yield from zip(
                self._ids.slice(start, self._CHUNK).to_pylist(),
                self._values.slice(start, self._CHUNK).to_pylist(),
                strict=True,
            )

    @property
    def value_bytes(self) -> int:
        """The bytes of every value together."""
        return int(pc.sum(pc.binary_length(self._values)).as_py() or 0)


@dataclass(frozen=True)
class CandidateSnapshot:
    """Every known user's state in process: the embedded candidate store.

    Attributes:
        table: The item table the states refer to.
        states: Each user's value (`models.user_state.encode_user`).
        known: How many of them have candidates (the others only purchases).
        neighbours: The session's neighbour index, when read with the states from the same
            arrays (`read_user_states`); None when the caller builds its own.
        snapshot_id: The id the states were written with (`snapshot_id`); None when encoded
            here.
        ranked: The users' ranked lists for this snapshot, row-aligned with `states`.
    """

    table: ItemTable
    states: PackedStates
    known: int
    neighbours: NeighbourIndex | None = None
    snapshot_id: str | None = None
    ranked: RankedLists | None = None

    @classmethod
    def from_frame(
        cls,
        frame: pl.DataFrame,
        facts: pl.DataFrame | None = None,
        neighbours: pl.DataFrame | None = None,
    ) -> "CandidateSnapshot":
        """Encodes snapshot rows held in memory (tests, small shops).

        Args:
            frame: user_id, item_id, candidate_rank and any of `FEATURE_COLUMNS` (missing ones
                are null), in any order.
            facts: The business rules' item facts (prices, categories, brands), and
            neighbours: the item neighbours, if at hand: they make the states smaller, not
                different.
        """
        table = ItemTable.build(_snapshot_items(frame), facts).with_neighbours(neighbours)
        table, values = train_codec(table, encode_users(table, frame, compressed=False))
        states = PackedStates.from_pairs(values)
        return cls(table, states, len(states))

    @property
    def known_users(self) -> int:
        """How many users have candidates."""
        return self.known

    @property
    def state_bytes(self) -> int:
        """The bytes of every user's value together."""
        return self.states.value_bytes

    def candidates_of(self, user_id: str) -> UserCandidates | None:
        """The user's candidates and purchases (see `CandidateStore`), or None when unknown."""
        raw = self.states.get(user_id)
        return None if raw is None else decode_user(raw, self.table)

    @property
    def ranked_lists(self) -> RankedListsInfo | None:
        """What the held ranked lists were ranked for; None when none are held."""
        return None if self.ranked is None else self.ranked.info

    def ranked_of(self, user_id: str) -> list[tuple[str, tuple[float, str]]] | None:
        """The user's ranked list (see `CandidateStore`), or None."""
        if self.ranked is None:
            return None
        row = self.states.row_of(user_id)
        raw = None if row is None else self.ranked.at(row)
        return None if raw is None else decode_ranked(raw, self.table.ids, self.table.wide_codes)

    def with_ranked(self, ranked: RankedLists | None) -> "CandidateSnapshot":
        """These states with other ranked lists (ranked for this snapshot, row-aligned)."""
        return dataclasses.replace(self, ranked=ranked)


@dataclass(frozen=True)
class WrittenStates:
    """What `write_user_states` wrote.

    Attributes:
        users: Values written (users with candidates or purchases).
        known_users: Users with candidates.
        bytes: Bytes of the values together.
    """

    users: int
    known_users: int
    bytes: int


def encode_snapshot(
    lake: Lake,
    mean_prices: pl.DataFrame | None = None,
    relpath: str = SERVING_CANDIDATES,
    batch_rows: int = LOAD_BATCH_ROWS,
) -> tuple[ItemTable, Iterator[tuple[str, bytes, bool]]]:
    """The item table of the lake's snapshot and its users' values, encoded batch by batch.

    Args:
        lake: The lake holding the snapshot, its item facts and purchases.
        mean_prices: user_id, mean_price (the users mart at the serving cutoff), for the price
            ratio; without them it is stored for every candidate.
        relpath: The snapshot file.
        batch_rows: Rows read at a time.

    Returns:
        The table (with the codec trained on the first values, which are encoded here), and
        (user_id, value, has candidates) for every user with candidates, then for every user
        with purchases only.

    Raises:
        ValueError: A user's rows are not contiguous in the file.
    """
    held = snapshot_columns(lake, relpath)
    wanted = [ITEM_KEY, *[c for c in [*ITEM_COLUMNS, *ITEM_LEVEL_SCORES] if c in held]]
    items = [
        _snapshot_items(pl.from_arrow(batch))
        for batch in lake.iter_parquet(relpath, batch_rows, columns=wanted)
    ]
    snapshot_items = _snapshot_items(pl.concat(items))
    facts = lake.read_frame(SERVING_ITEMS) if lake.exists(SERVING_ITEMS) else None
    bought: dict[str, list[str]] = {}
    if lake.exists(SERVING_PURCHASES):
        grouped = lake.read_frame(SERVING_PURCHASES).group_by(USER_KEY).agg(ITEM_KEY)
        bought = dict(grouped.iter_rows())
    table = ItemTable.build(
        snapshot_items, facts, {item for items in bought.values() for item in items}
    ).with_neighbours(_neighbours(lake))
    prices: dict[str, float] = {}
    if mean_prices is not None:
        prices = dict(
            mean_prices.select(USER_KEY, pl.col("mean_price").cast(pl.Float64)).iter_rows()
        )

    def values() -> Iterator[tuple[tuple[str, bool], bytes]]:
        seen = set()
        batches = (pl.from_arrow(batch) for batch in lake.iter_parquet(relpath, batch_rows))
        for chunk in whole_queries(batches, key=(USER_KEY,)):
            for user_id, value in encode_users(table, chunk, bought, prices, compressed=False):
                seen.add(user_id)
                yield (user_id, True), value
        for user_id, item_ids in bought.items():
            if user_id not in seen:
                yield (user_id, False), purchases_only(table, item_ids, compressed=False)

    table, compressed = train_codec(table, values())
    return table, ((user_id, value, known) for (user_id, known), value in compressed)


def write_user_states(lake: Lake, mean_prices: pl.DataFrame | None = None) -> WrittenStates:
    """Encodes the lake's snapshot into the users' values and writes them with the item table.

    Args:
        lake: The lake holding the snapshot (`serving_features`).
        mean_prices: user_id, mean_price (see `encode_snapshot`).

    Returns:
        What was written (`SERVING_USER_STATES`, `SERVING_NEIGHBOUR_ARRAYS`,
        `SERVING_STATE_DICTIONARY`, `SERVING_STATE_ITEMS`; the item table last, as it tells
        readers the states are whole).
    """
    table, values = encode_snapshot(lake, mean_prices)
    counts = {"users": 0, "known_users": 0, "bytes": 0}

    def batches() -> Iterator:
        users, states, known = [], [], []
        for user_id, value, has_candidates in values:
            users.append(user_id)
            states.append(value)
            known.append(has_candidates)
            counts["users"] += 1
            counts["known_users"] += has_candidates
            counts["bytes"] += len(value)
            if len(users) == STATES_BATCH_USERS:
                yield _states_frame(users, states, known).to_arrow()
                users, states, known = [], [], []
        yield _states_frame(users, states, known).to_arrow()

    lake.write_parquet_tables(batches(), SERVING_USER_STATES)
    lake.write_bytes(neighbour_arrays(table, _neighbour_rows(lake)), SERVING_NEIGHBOUR_ARRAYS)
    lake.write_bytes(table.codec.dictionary, SERVING_STATE_DICTIONARY)
    items = table.to_frame().to_arrow()
    layout = {LAYOUT_KEY: json.dumps(LAYOUT).encode(), SNAPSHOT_ID_KEY: uuid.uuid4().hex.encode()}
    lake.write_parquet(items.replace_schema_metadata(layout), SERVING_STATE_ITEMS)
    return WrittenStates(**counts)


def lake_states(lake: Lake) -> tuple[ItemTable, bytes, Iterator[tuple[str, bytes, bool]]]:
    """What a version of the online store is written from, as `write_user_states` wrote it.

    The item table, its neighbour arrays, and the users' values, streamed.

    When the lake has no states in this code's layout (a snapshot written by an older pipeline,
    or by hand), they are encoded from the snapshot file instead, without the users' mean prices
    (larger values, the same rows).

    Returns:
        The table with its codec (its neighbours are in the arrays, `models.neighbour_arrays`),
        the arrays, and (user_id, value, has candidates) per user.
    """
    if not states_fit(lake):
        table, values = _encode_afresh(lake)
        return table, neighbour_arrays(table, _neighbour_rows(lake)), values

    def stored() -> Iterator[tuple[str, bytes, bool]]:
        for batch in lake.iter_parquet(SERVING_USER_STATES, STATES_BATCH_USERS):
            yield from zip(
                batch.column(USER_KEY).to_pylist(),
                batch.column("state").to_pylist(),
                batch.column("has_candidates").to_pylist(),
                strict=True,
            )

    return _stored_items(lake), lake.read_bytes(SERVING_NEIGHBOUR_ARRAYS), stored()


def read_user_states(lake: Lake) -> CandidateSnapshot:
    """The users' values and their item table, held in process, with the session's index.

    Encoded from the snapshot file when the lake has no states in this code's layout, as
    `lake_states` does (then without the index: the caller builds it from the rows).
    """
    if not states_fit(lake):
        table, values = _encode_afresh(lake)
        counted = _Counted(values)
        return CandidateSnapshot(table, PackedStates.from_pairs(counted), counted.known)
    # Straight from the file's Arrow buffers, a row group at a time: no Python object per user.
    known = 0

    def tables() -> Iterator[pa.Table]:
        nonlocal known
        columns = [USER_KEY, "state", "has_candidates"]
        for table in lake.iter_parquet(SERVING_USER_STATES, STATES_BATCH_USERS, columns):
            known += pc.sum(table.column("has_candidates")).as_py() or 0
            yield table

    states = PackedStates.from_tables(tables())
    table, neighbours = _stored_table(lake)
    stored_id = snapshot_id(lake)
    ranked = read_ranked_lists(lake, stored_id, len(states))
    snapshot = CandidateSnapshot(table, states, known, neighbours, stored_id, ranked)
    # The reads' buffers went back to Arrow's allocator, which keeps them (about 200 MB on the
    # 10M-event shop) unless asked to return them to the system; the copies made on the way
    # went back to glibc's heap, which keeps them too (41 MiB there, 140 bytes per user).
    pa.default_memory_pool().release_unused()
    _trim_heap()
    return snapshot


def _trim_heap() -> None:
    """Returns the freed pages of glibc's heap to the system (nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def _encode_afresh(lake: Lake) -> tuple[ItemTable, Iterator[tuple[str, bytes, bool]]]:
    logger.warning("serving snapshot without user states of this layout: encoding the rows")
    return encode_snapshot(lake)


def _joined(parts: list[tuple[np.ndarray, np.ndarray]], kind: pa.DataType) -> pa.Array:
    """One Arrow array of `kind` over the concatenated `binary_parts` (no copy into Arrow)."""
    offsets, data = joined_parts(parts)
    return pa.Array.from_buffers(
        kind, len(offsets) - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


class _Counted:
    """(user_id, value) of (user_id, value, has candidates), counting the users with candidates."""

    def __init__(self, values: Iterable[tuple[str, bytes, bool]]) -> None:
        self.values, self.known = values, 0

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        for user_id, value, has_candidates in self.values:
            self.known += has_candidates
            yield user_id, value


def _stored_table(lake: Lake) -> tuple[ItemTable, NeighbourIndex]:
    """The item table `write_user_states` wrote, with its neighbours, and the session's index."""
    return read_neighbour_arrays(_stored_items(lake), lake.read_bytes(SERVING_NEIGHBOUR_ARRAYS))


def _stored_items(lake: Lake) -> ItemTable:
    """The item table `write_user_states` wrote, with the codec of its values."""
    table = ItemTable.from_frame(lake.read_frame(SERVING_STATE_ITEMS))
    return table.with_codec(StateCodec(lake.read_bytes(SERVING_STATE_DICTIONARY)))


def snapshot_id(lake: Lake) -> str | None:
    """The id of the lake's user states (new with every `write_user_states`).

    None when the lake holds none in this code's layout.
    """
    if not states_fit(lake):
        return None
    metadata = lake.parquet_schema(SERVING_STATE_ITEMS).metadata or {}
    found = metadata.get(SNAPSHOT_ID_KEY)
    return found.decode() if found else None


def states_fit(lake: Lake) -> bool:
    """Whether the lake holds user states written in this code's layout (with their arrays)."""
    parts = (
        SERVING_USER_STATES,
        SERVING_NEIGHBOUR_ARRAYS,
        SERVING_STATE_DICTIONARY,
        SERVING_STATE_ITEMS,
    )
    if not all(lake.exists(part) for part in parts):
        return False
    metadata = lake.parquet_schema(SERVING_STATE_ITEMS).metadata or {}
    return json.loads(metadata.get(LAYOUT_KEY, b"null")) == LAYOUT


def snapshot_columns(lake: Lake, relpath: str = SERVING_CANDIDATES) -> list[str]:
    """The `FEATURE_COLUMNS` the snapshot file holds (the others are unknown, NaN)."""
    names = lake.parquet_schema(relpath).names
    return [name for name in FEATURE_COLUMNS if name in names]


def load_snapshot(lake: Lake, features: list[str]) -> CandidateSnapshot:
    """Loads the serving state the pipeline exported, for a ranker of `features`.

    Args:
        lake: The lake holding the snapshot.
        features: The features the ranker needs; each must be in the snapshot.

    Returns:
        Every user's state, in process.

    Raises:
        SnapshotFeaturesError: The snapshot lacks some of `features`.
    """
    require_features(features, snapshot_columns(lake), "serving snapshot")
    return read_user_states(lake)


def _neighbours(lake: Lake) -> pl.DataFrame | None:
    """The snapshot's item neighbours (the codec recomputes neighbour scores from them)."""
    return lake.read_frame(SERVING_NEIGHBOURS) if lake.exists(SERVING_NEIGHBOURS) else None


def _neighbour_rows(lake: Lake) -> pl.DataFrame:
    """The snapshot's item neighbours; no rows when it has none."""
    found = _neighbours(lake)
    return NEIGHBOUR_ROWS.clear() if found is None else found


def _snapshot_items(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per item of snapshot rows: its item features and item-level scores."""
    missing = [c for c in [*ITEM_COLUMNS, *ITEM_LEVEL_SCORES] if c not in frame.columns]
    return (
        frame.with_columns([pl.lit(None, pl.Float32).alias(c) for c in missing])
        .group_by(ITEM_KEY, maintain_order=True)
        .agg(pl.col(ITEM_COLUMNS).first(), pl.col(ITEM_LEVEL_SCORES).max())
    )


def _states_frame(users: list[str], states: list[bytes], known: list[bool]) -> pl.DataFrame:
    return pl.DataFrame(
        {USER_KEY: users, "state": states, "has_candidates": known},
        schema={USER_KEY: pl.String, "state": pl.Binary, "has_candidates": pl.Boolean},
    )
