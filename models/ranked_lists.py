"""Ranked lists: each known user's candidates as the production ranker ranks them, precomputed.

A user with no activity since the snapshot gets the same ranking on every request: the ranker
scores the snapshot's rows of that user, and nothing in such a request changes them (stock and
the request's filters only decide which of the ranked items may be shown). So the
`ranked_lists` asset ranks every known user once per snapshot and production model, with the
code a request runs (`Recommender.ranked_list`), and keeps each user's best `depth` items with
their scores and proposing generators.

A request of such a user is answered from the list: the business rules walk its items exactly
as they walk the full ranking, and when k items pass before the list ends, the answer is the one
re-ranking would give. The walk sees the same items in the same order; the items a list leaves
out are only those the rules reject whatever the request (never to recommend, or bought before
the snapshot in a category not bought again), which a walk of the full ranking skips too.
Anything else is re-ranked at request time (`Recommender.recommend`): a session or the page's
item, `explain`, a drift sample, a list ranked by another model or for another snapshot, or more
items rejected than the list can spare.

A list is one small binary value, uncompressed (it is read on every such request): the count n
(uint8), n item codes of the snapshot's item table (uint16, or uint32 past 65,535 items), n
scores (float32: within 1e-7 of the ranker's float64, the compiled ranker's own tolerance is
1e-6), n generator indexes (uint8, into `models.candidates.GENERATORS`). In the lake, the values
are one Parquet column row-aligned with the user states (`serving/user_states.parquet`; an
empty value for a user without a list) and the file's metadata says which snapshot and model
they were ranked for; in Redis, one key per user in the version they were ranked for
(`shelfwise.runtime.store_keys.ranked_key`) and a description written after them.
"""

import functools
import json
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from models.arrow_buffers import binary_parts, joined_parts
from models.candidates import GENERATORS
from shelfwise.lake import SERVING_RANKED_LISTS, Lake

RANKED_LISTS_FORMAT = "shelfwise-ranked-v1"
# Items kept per user: a default request asks for 10, and on the shops measured (docs/
# benchmarks.md) the rules reject fewer than 2 of a list's first 12 items for 98% of the users;
# a deeper list costs 7 bytes per item and user.
DEFAULT_DEPTH = 16
MAX_DEPTH = 255  # the count is one byte
VALUE = "ranked"
INFO_KEY = b"shelfwise.ranked_lists"
# Users read at a time.
WRITE_BATCH_USERS = 50_000


@dataclass(frozen=True)
class RankedListsInfo:
    """What a set of ranked lists was ranked for.

    Attributes:
        snapshot_id: The serving snapshot's id (`models.snapshot.snapshot_id`).
        model_version: The ranker that ranked them (the production model's source tag).
        depth: Items kept per user at most.
        users: Users with a list.
        ranking: Which ranking of the version in Redis (its keys' number); 0 in the lake.
        format: The value layout (`RANKED_LISTS_FORMAT`).
    """

    snapshot_id: str
    model_version: str
    depth: int
    users: int = 0
    ranking: int = 0
    format: str = RANKED_LISTS_FORMAT

    def to_json(self) -> str:
        """The description as JSON (the Parquet metadata's and Redis' form)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "RankedListsInfo | None":
        """The description, or None when it is in another format or unreadable."""
        try:
            found = json.loads(raw)
            info = cls(**found)
        except (TypeError, ValueError):
            return None
        return info if info.format == RANKED_LISTS_FORMAT else None

    def serves(self, snapshot_id: str | None, model_version: str | None) -> bool:
        """Whether these lists are the ranking of this snapshot by this model."""
        return (
            snapshot_id is not None
            and model_version is not None
            and self.snapshot_id == snapshot_id
            and self.model_version == model_version
        )


@functools.lru_cache(maxsize=2 * (MAX_DEPTH + 1))
def _layout(count: int, wide_codes: bool) -> struct.Struct:
    return struct.Struct(f"<{count}{'I' if wide_codes else 'H'}{count}f{count}B")


def encode_ranked(
    codes: Iterable[int], scores: Iterable[float], generators: Iterable[int], wide_codes: bool
) -> bytes:
    """One user's list as a value.

    Args:
        codes: The items' codes in the snapshot's item table, best first.
        scores: The ranker's scores, in the same order.
        generators: Each item's proposing generator (an index into `GENERATORS`).
        wide_codes: Whether the item table needs uint32 codes (more than 65,535 items).

    Returns:
        The value (`decode_ranked` reads it).

    Raises:
        ValueError: More than `MAX_DEPTH` items, or the three differ in length.
    """
    codes, scores, generators = list(codes), list(scores), list(generators)
    count = len(codes)
    if count > MAX_DEPTH or len(scores) != count or len(generators) != count:
        raise ValueError(f"a ranked list holds at most {MAX_DEPTH} items, each with a score")
    return bytes([count]) + _layout(count, wide_codes).pack(*codes, *scores, *generators)


def decode_ranked(
    raw: bytes, item_ids: np.ndarray, wide_codes: bool
) -> list[tuple[str, tuple[float, str]]]:
    """A user's list as the business rules walk it: (item_id, (score, generator)), best first.

    Args:
        raw: The value `encode_ranked` wrote.
        item_ids: The item table's ids by code.
        wide_codes: As it was encoded with.
    """
    count = raw[0]
    fields = _layout(count, wide_codes).unpack_from(raw, 1)
    codes, scores, generators = fields[:count], fields[count : 2 * count], fields[2 * count :]
    return [
        (item_ids[code], (score, GENERATORS[generator]))
        for code, score, generator in zip(codes, scores, generators, strict=True)
    ]


@dataclass(frozen=True)
class RankedLists:
    """Ranked lists held in process, row-aligned with the users' states (`PackedStates`).

    Held as one bytes object and NumPy offsets, copied out of Arrow's buffers as they are read
    (8 bytes per user besides the values; Arrow's reader kept about 150 bytes more per user of
    the 10M-event shop, which its allocator did not return).

    Attributes:
        info: What they were ranked for.
        offsets: Where each state row's value starts in `data`, and one more entry at the end.
        data: The values, one after another (a row without a list has an empty one).
    """

    info: RankedListsInfo
    offsets: np.ndarray
    data: bytes

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def at(self, row: int) -> bytes | None:
        """The list of the user in state row `row`, or None when that user has none."""
        raw = self.data[int(self.offsets[row]) : int(self.offsets[row + 1])]
        return raw or None


def write_ranked_lists(
    lake: Lake, values: Iterable[bytes], info: RankedListsInfo
) -> RankedListsInfo:
    """Writes ranked lists, one per state row in the states' order, with their description.

    Args:
        lake: The lake holding the user states they are aligned with.
        values: One value per user state, in `serving/user_states.parquet`'s order (b"": none).
        info: What they were ranked for (`users` is counted here).

    Returns:
        The description written (with the users counted).
    """
    # The description is only known once every user is ranked: the file is written in one
    # piece with it (it appears whole).
    held = list(values)
    users = sum(1 for value in held if value)
    written = RankedListsInfo(info.snapshot_id, info.model_version, info.depth, users)
    table = pa.table({VALUE: pa.array(held, pa.large_binary())})
    table = table.replace_schema_metadata({INFO_KEY: written.to_json()})
    lake.write_parquet(table, SERVING_RANKED_LISTS)
    return written


def read_ranked_info(lake: Lake) -> RankedListsInfo | None:
    """The description of the lake's ranked lists, or None when there are none (or unreadable)."""
    if not lake.exists(SERVING_RANKED_LISTS):
        return None
    metadata = lake.parquet_schema(SERVING_RANKED_LISTS).metadata or {}
    raw = metadata.get(INFO_KEY)
    return RankedListsInfo.from_json(raw) if raw is not None else None


def read_ranked_lists(lake: Lake, snapshot_id: str | None, rows: int) -> RankedLists | None:
    """The lake's ranked lists when they were ranked for this snapshot, else None.

    Args:
        lake: The lake.
        snapshot_id: The id of the states held (`models.snapshot.snapshot_id`).
        rows: How many state rows are held: the lists must be aligned with them.
    """
    info = read_ranked_info(lake)
    if info is None or snapshot_id is None or info.snapshot_id != snapshot_id:
        return None
    parts = [
        binary_parts(table.column(VALUE).cast(pa.large_binary()))
        for table in lake.iter_parquet(SERVING_RANKED_LISTS, WRITE_BATCH_USERS, columns=[VALUE])
    ]
    offsets, data = joined_parts(parts)
    if len(offsets) - 1 != rows:
        return None
    return RankedLists(info, offsets, data.tobytes())
