"""Each user's serving state: compact, lossless, and the same bytes in process and in Redis.

The snapshot file (`serving_features`) has one row per (user, candidate) with the whole feature
vector, assembled as for training. Most of a row follows from far less, which is all a user's
state keeps:

- the item's features are the item's: the `ItemTable`, shared by every user (O(items)), which
  also knows each item's price, category and brand;
- the user's features are the user's: stored once;
- the pair features follow from keys the service already holds:
  - a generator's score is 0 unless it proposed the item; `popular_score` and `trending_score`
    are the item's own (the same for everyone those generators serve); the co-visitation and
    bought-together scores are recomputed from the neighbour tables and the user's recent items,
    as the generators sum them;
  - `sources` counts the generators with a positive score;
  - the user-item features are null for items the user never touched, and the purchase ones are
    those of a never-bought item unless the user bought it;
  - the user-category and user-brand features are the user's per category and per brand: a
    small per-user table, looked up through the item's category and brand;
  - `price_to_user_mean` is the item's price over the user's mean price (both float64, divided
    as the assembly divides them).

The candidates themselves follow in good part from the user's recent items too: most of a
user's list is what the neighbour generators propose, and those proposals are the neighbourhood
of the user's recent items (the history generator's candidates), which the decoder recomputes.
In the generators' order (co-visitation score, then bought-together, descending; then id), the
neighbourhood's items are candidates up to a point (the `max_candidates` cut) and not beyond it.
So the value lists by code only the candidates outside that prefix (recent items, collaborative,
category and popular ones), and keeps of the prefix its length, its holes (items of it that are
not candidates: blocked, or cut) and one bit per candidate saying which slots of the list the
prefix fills, in its order. On the 10M-event shop this takes 205 of a user's 238 candidates
from the neighbourhood.

So a user's value holds the listed candidates as item codes, the user's features and mean
price, the items they bought (codes), the category and brand tables, and, for each group of
pair columns, only the candidates where that prediction differs from the snapshot's row.
Decoding rebuilds the snapshot's rows exactly (equal, or both NaN) in the snapshot's order: the
codec is lossless by construction — a wrong prediction or a hole costs bytes, never a different
score — so the service ranks the very numbers the training
assembly produced (`models.features.assemble_features`).

Each value is compressed as a whole with zstd and a dictionary trained on the snapshot's first
values (`train_codec`); the dictionary is shared like the item table, which holds it
(`StateCodec`), and is written beside the values. On the demo shop that makes 764 bytes a value
where zlib made 993, decompressed in 4.8 µs instead of 9.9 (the choices are measured at
`_COMPRESSION_LEVEL`).

Value layout (little-endian, before compression): header (magic, candidates n,
purchases m, neighbourhood prefix, holes h, flags, mean price); the counts (uint16, uint32 past
65,535 candidates) of the category and brand tables' entries and of each block's exceptions; the
listed item codes (uint16, or uint32 when the table has more than 65,535 items); the holes'
positions in the prefix; when the prefix is not empty, a bit per candidate (set: filled from
the prefix); the ranks (int32) when they are not 1..n; the user's features (float32); m purchase
codes; the tables' int32 keys, then their float32 values; the exceptions' candidate positions
(uint8/uint16/uint32 by n), then their values (float32), block after block in `BLOCKS` order.
"""

import dataclasses
import functools
import itertools
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import polars as pl
import zstandard

from models.candidates import SCORE_COLUMNS
from models.features import (
    FEATURE_COLUMNS,
    ITEM_FEATURES,
    USER_BRAND_FEATURES,
    USER_CATEGORY_FEATURES,
    USER_FEATURES,
    USER_ITEM_FEATURES,
    feature_matrix,
)
from models.session import BOUGHT_TOGETHER, COVISIT

FORMAT = "shelfwise-user-v4"
_MAGIC = b"SWU4"
# magic, candidates, purchases, neighbourhood prefix, holes in it, flags, mean price
_HEADER = struct.Struct("<4sIIIIBd")
_EXPLICIT_RANKS = 1  # the ranks are not 1..n

ITEM_COLUMNS = list(ITEM_FEATURES.values())
USER_COLUMNS = list(USER_FEATURES.values())
PAIR_COLUMNS = [c for c in FEATURE_COLUMNS if c not in {*ITEM_COLUMNS, *USER_COLUMNS}]
# Generators that propose the same items with the same scores to every user they serve.
ITEM_LEVEL_SCORES = ["popular_score", "trending_score"]
PRICE_RATIO = "price_to_user_mean"
SOURCES = "sources"


_USER_ITEM_ACTIVITY = ("views", "carts", "purchases", "days_since_last", "interest")
_USER_ITEM_PURCHASE_COLUMNS = tuple(
    v for k, v in USER_ITEM_FEATURES.items() if k not in _USER_ITEM_ACTIVITY
)
# The purchase features of an item the user touched but never bought, as dbt's
# `user_item_features` gives them: decayed counts and occasions 0 (coalesced), the rest null.
_NEVER_BOUGHT = np.array(
    [
        0.0 if k.startswith("purchases_decayed_") or k == "purchase_occasions" else np.nan
        for k, v in USER_ITEM_FEATURES.items()
        if k not in _USER_ITEM_ACTIVITY
    ],
    np.float32,
)


@dataclass(frozen=True)
class Block:
    """A group of pair columns stored as exceptions to one prediction.

    Attributes:
        columns: The pair columns, stored together (a candidate's whole row of them).
        predict: How the decoder predicts them: "zero", "item" (the item's own score), "sources"
            (generators with a positive score), "null", "category" or "brand" (the user's
            per-category or per-brand table), "price" (item price over the user's mean).
    """

    columns: tuple[str, ...]
    predict: str


BLOCKS: tuple[Block, ...] = (
    Block(("history_score",), "zero"),
    Block(("buy_again_score",), "zero"),
    Block(("collaborative_score",), "zero"),
    Block(("category_popular_score",), "zero"),
    Block(("content_score",), "zero"),
    Block(("popular_score",), "item"),
    Block(("trending_score",), "item"),
    # The user-item features: what the user did with the item (null if nothing), then what only
    # a purchase gives (stored for the items the user bought, a small part of their items).
    Block(tuple(USER_ITEM_FEATURES[name] for name in _USER_ITEM_ACTIVITY), "null"),
    Block(_USER_ITEM_PURCHASE_COLUMNS, "never_bought"),
    Block(tuple(USER_CATEGORY_FEATURES.values()), "category"),
    Block(tuple(USER_BRAND_FEATURES.values()), "brand"),
    Block((PRICE_RATIO,), "price"),
    # Predicted from the blocks above, once they are decoded: the user's recent items (the
    # history generator's candidates, by rank) seed the neighbour generators, as in
    # `models.candidates.neighbours`; the carted ones (user-item carts or purchases) seed
    # bought-together.
    Block(("covisit_score", "covisit_hits"), COVISIT),
    Block(("bought_together_score", "bought_together_hits"), BOUGHT_TOGETHER),
    # Last: it counts every generator's score.
    Block((SOURCES,), "sources"),
)
NEIGHBOUR_KINDS = (COVISIT, BOUGHT_TOGETHER)
# Predictions that read decoded pair columns: made in block order, after those columns.
_DEPENDENT = {"sources", "never_bought", *NEIGHBOUR_KINDS}
_KEYED = {"category": 0, "brand": 1}

if sorted(c for block in BLOCKS for c in block.columns) != sorted(PAIR_COLUMNS):
    raise RuntimeError("BLOCKS must cover every pair column once")

# Every index below is a position in `FEATURE_COLUMNS`: the codec works on whole rows.
_COLUMN = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
_BLOCK_INDEX = [np.array([_COLUMN[c] for c in block.columns]) for block in BLOCKS]
_SCORE_INDEX = np.array([_COLUMN[c] for c in SCORE_COLUMNS])
_ITEM_FEATURES = np.array([_COLUMN[c] for c in ITEM_COLUMNS])
_USER_FEATURES = np.array([_COLUMN[c] for c in USER_COLUMNS])
_USER_EVENTS = USER_COLUMNS.index(USER_FEATURES["events"])
# What a reader must agree on to decode a value; written beside every set of values.
LAYOUT = {
    "format": FORMAT,
    "pair_columns": PAIR_COLUMNS,
    "user_columns": USER_COLUMNS,
    "item_columns": ITEM_COLUMNS,
    "blocks": [[block.predict, *block.columns] for block in BLOCKS],
}
_WIDTHS = [len(block.columns) for block in BLOCKS]
_KEYED_INDEX = {
    kind: next(i for b, i in zip(BLOCKS, _BLOCK_INDEX, strict=True) if b.predict == kind)
    for kind in _KEYED
}
_KEYED_WIDTHS = [len(_KEYED_INDEX[kind]) for kind in _KEYED]
_NULL_ROWS = {
    kind: np.full((1, width), np.nan, np.float32)
    for kind, width in zip(_KEYED, _KEYED_WIDTHS, strict=True)
}
_ITEM_SCORE_INDEX = np.array([_COLUMN[c] for c in ITEM_LEVEL_SCORES])
_PRICE_INDEX = _COLUMN[PRICE_RATIO]
_HISTORY = _COLUMN["history_score"]
_USER_ITEM_VIEWS = _COLUMN[USER_ITEM_FEATURES["views"]]
_CARTED_INDEX = np.array(
    [_COLUMN[USER_ITEM_FEATURES["carts"]], _COLUMN[USER_ITEM_FEATURES["purchases"]]]
)
# The decoder finds the seeds of the neighbourhood before the neighbourhood's candidates: their
# history scores and carts come from the exceptions of blocks predicted without any candidate.
_HISTORY_BLOCK = next(n for n, b in enumerate(BLOCKS) if b.columns == ("history_score",))
_ACTIVITY_BLOCK = next(n for n, b in enumerate(BLOCKS) if b.predict == "null")
_CARTED_IN_ACTIVITY = [
    BLOCKS[_ACTIVITY_BLOCK].columns.index(USER_ITEM_FEATURES[name])
    for name in ("carts", "purchases")
]
if BLOCKS[_HISTORY_BLOCK].predict != "zero":
    raise RuntimeError("the history scores must be stored as exceptions to zero")
# The prediction before any lookup: 0 for scores, null for what the user never touched (the
# item's and the user's parts are filled in from the table and the value).
_DEFAULT_ROW = np.array(
    [
        0.0
        if name in PAIR_COLUMNS
        and not any(
            name in b.columns for b in BLOCKS if b.predict in {"null", "never_bought", *_KEYED}
        )
        else np.nan
        for name in FEATURE_COLUMNS
    ],
    np.float32,
)


# Values are zstd frames compressed with a dictionary trained on the snapshot's own values
# (`train_codec`). Measured on the demo shop (15,304 users, values of 1,373 bytes uncompressed;
# trained on the first 5,000 values, sizes over all of them, times per value):
#   zlib level 6 (layout v3): 993 bytes, 68 µs to compress, 9.7 µs to decompress;
#   zstd without a dictionary, levels 3/9/19: 1,025/1,015/976 bytes;
#   with a 64 KiB dictionary, levels 3/9/15/19: 835/787/765/764 bytes, 12/53/160/246 µs to
#   compress; 4.0 to 4.4 µs to decompress at any level.
# Level 15: level 19's size at two thirds of its time, 22 bytes (3%) under level 9. Encoding the
# whole demo snapshot (training included) took 23 s at level 15, 21 s at level 9, 20 s with zlib:
# 12% more, once per snapshot, for memory that Redis and every worker hold per user.
_COMPRESSION_LEVEL = 15
# At level 9, dictionaries of 16/32/64/110 KiB gave 799/792/787/783 bytes. Past 64 KiB the gain
# is under 0.5%, and zstd wants about 100 times the dictionary in samples (5,000 values are 7 MB).
DICTIONARY_BYTES = 64 * 1024
# The values the dictionary is trained on: the first ones encoded. As good as a random sample
# (800 against 800 bytes with the trainer's defaults); 2,000 gave 1 byte more, 8,000 1 byte less,
# and 10 values already a dictionary worth 190 bytes a value (836 against 1,026 without one).
TRAINING_VALUES = 5_000
# The trainer's segment and d-mer sizes, fixed: its own search of them (0.6 s) gave values 2.4%
# larger at level 15 than k=256 (0.8 s).
_TRAINING_K, _TRAINING_D = 256, 8
# Frames without zstd's magic number and dictionary id (8 bytes a value): a value starts with
# this layout's own magic, and is only read with the dictionary written beside it.
_FRAMES = {
    "format": zstandard.FORMAT_ZSTD1_MAGICLESS,
    "write_content_size": True,
    "write_dict_id": False,
    "write_checksum": False,
}
_EMPTY_FRAME = zstandard.ZstdCompressor(
    compression_params=zstandard.ZstdCompressionParameters.from_level(1, **_FRAMES)
).compress(b"")


class StateCodec:
    """How a snapshot's values are compressed: zstd, with the dictionary trained for them.

    One per snapshot (or online store version), held by the `ItemTable` that the values also
    refer to. zstd's compressors and decompressors must not be used by two threads at once, and
    the service decodes on the event loop and in its thread pool: each thread gets its own on
    first use (4.7 µs a value with the lookup; a decompressor made per value cost 7.3 µs). They
    share the dictionary, digested once.

    Args:
        dictionary: The trained dictionary (`train_codec`); empty for none (values then
            compress less, and decode the same).
    """

    def __init__(self, dictionary: bytes = b"") -> None:
        self.dictionary = bytes(dictionary)
        self._dictionary = (
            zstandard.ZstdCompressionDict(self.dictionary, dict_type=zstandard.DICT_TYPE_FULLDICT)
            if self.dictionary
            else None
        )
        self._params = zstandard.ZstdCompressionParameters.from_level(
            _COMPRESSION_LEVEL, dict_size=len(self.dictionary), **_FRAMES
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._digested = False
        # Digests the dictionary for decoding here, in one thread, rather than in whichever
        # threads decode first (an empty frame reads nothing of it).
        self.decompress(_EMPTY_FRAME)

    def compress(self, raw: bytes) -> bytes:
        """A value's bytes compressed (one zstd frame)."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            # Only writers compress: the dictionary is digested for it on first use, once.
            with self._lock:
                if self._dictionary is not None and not self._digested:
                    self._dictionary.precompute_compress(compression_params=self._params)
                    self._digested = True
            compressor = zstandard.ZstdCompressor(
                dict_data=self._dictionary, compression_params=self._params
            )
            self._local.compressor = compressor
        return compressor.compress(raw)

    def decompress(self, value: bytes) -> bytes:
        """A value's bytes as `compress` took them.

        Raises:
            zstandard.ZstdError: The value is not a frame this codec wrote.
        """
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor(
                dict_data=self._dictionary, format=_FRAMES["format"]
            )
            self._local.decompressor = decompressor
        return decompressor.decompress(value)


# Values compressed without a dictionary: a table's until it is given its snapshot's codec.
NO_DICTIONARY = StateCodec()


@dataclass(frozen=True)
class UserCandidates:
    """What a candidate store knows of one user, as of its snapshot.

    Attributes:
        matrix: The candidates' feature vectors (candidates × `FEATURE_COLUMNS`), best first.
        item_ids: The candidates' item ids.
        ranks: The candidates' ranks in their generators' order (1 = first).
        events: The user's event count (`user_events`, the user's segment).
        bought: Items the user bought before the snapshot.
    """

    matrix: np.ndarray
    item_ids: np.ndarray
    ranks: np.ndarray
    events: float
    bought: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ItemTable:
    """What every user's state refers to by item code: shared, O(items).

    Attributes:
        ids: Item ids by code.
        features: The items' `ITEM_COLUMNS` (float32; NaN for an item the snapshot lacks).
        price: The items' price (float64, as the feature assembly divides it; NaN unknown).
        category: The items' category code (-1: none).
        brand: The items' brand code (-1: none).
        item_scores: The items' `ITEM_LEVEL_SCORES` (float32; 0 when not proposed).
        neighbours: The neighbour generators' tables (`with_neighbours`), if any.
        codec: How the values that refer to the table are compressed (`with_codec`).
    """

    ids: np.ndarray
    features: np.ndarray
    price: np.ndarray
    category: np.ndarray
    brand: np.ndarray
    item_scores: np.ndarray
    neighbours: "NeighbourTable | None" = field(default=None, compare=False)
    codec: StateCodec = field(default=NO_DICTIONARY, compare=False)
    _codes: dict[str, int] = field(init=False, repr=False, compare=False)

    _rows: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_codes", {item: n for n, item in enumerate(self.ids.tolist())})
        # Each item's candidate row as predicted before anything of the user is known.
        rows = np.tile(_DEFAULT_ROW, (len(self.ids), 1))
        rows[:, _ITEM_FEATURES] = self.features
        rows[:, _ITEM_SCORE_INDEX] = self.item_scores
        object.__setattr__(self, "_rows", rows)

    def with_neighbours(self, neighbours: "pl.DataFrame | NeighbourTable | None") -> "ItemTable":
        """This table with the neighbour generators' tables (`NEIGHBOUR_KINDS`).

        With them the codec recomputes those generators' scores instead of storing them.

        Args:
            neighbours: kind, item_id, neighbour_item_id, score (the serving snapshot's
                neighbours: the marts the generators read at its cutoff); or a table already
                built for this item table (`NeighbourTable.build`, e.g. as the online store
                keeps it); None for none.
        """
        built = (
            NeighbourTable.build(self, neighbours)
            if isinstance(neighbours, pl.DataFrame)
            else neighbours
        )
        return dataclasses.replace(self, neighbours=built)

    def with_codec(self, codec: StateCodec) -> "ItemTable":
        """This table with the codec of its snapshot's values (its dictionary)."""
        return dataclasses.replace(self, codec=codec)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def code_dtype(self) -> type:
        """The dtype of item codes in a user's value."""
        return np.uint16 if len(self.ids) <= np.iinfo(np.uint16).max else np.uint32

    @functools.cached_property
    def wide_codes(self) -> bool:
        """Whether item codes take 32 bits (more than 65,535 items), not 16."""
        return self.code_dtype is np.uint32

    def codes_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """The codes of items in the table.

        Raises:
            KeyError: An item is not in the table.
        """
        return np.fromiter((self._codes[item] for item in item_ids), np.int64)

    @classmethod
    def build(
        cls,
        snapshot_items: pl.DataFrame,
        facts: pl.DataFrame | None = None,
        more_items: Iterable[str] = (),
    ) -> "ItemTable":
        """The table of every item a state may name.

        Args:
            snapshot_items: One row per item of the snapshot: item_id, `ITEM_COLUMNS` and
                `ITEM_LEVEL_SCORES` as the snapshot's rows hold them.
            facts: The business rules' item facts (item_id, price, category_id, brand), for
                prices, categories and brands; without them every price ratio, category and
                brand feature is stored as an exception (still lossless).
            more_items: Items the states name besides the candidates (their purchases).

        Returns:
            The table, items sorted by id.
        """
        names = set(snapshot_items.get_column("item_id").to_list()) | set(more_items)
        if facts is not None:
            names |= set(facts.get_column("item_id").to_list())
        ids = pl.DataFrame({"item_id": sorted(names)}, schema={"item_id": pl.String})
        frame = ids.join(snapshot_items, on="item_id", how="left", maintain_order="left")
        if facts is not None:
            described = facts.select(
                "item_id",
                pl.col("price").cast(pl.Float64).alias("_price"),
                pl.col("category_id").cast(pl.String).alias("_category"),
                pl.col("brand").cast(pl.String).alias("_brand"),
            )
            frame = frame.join(described, on="item_id", how="left", maintain_order="left")
        else:
            frame = frame.with_columns(
                pl.lit(None, pl.Float64).alias("_price"),
                pl.lit(None, pl.String).alias("_category"),
                pl.lit(None, pl.String).alias("_brand"),
            )
        return cls(
            np.array(frame.get_column("item_id").to_list(), dtype=object),
            _floats(frame, ITEM_COLUMNS),
            frame.get_column("_price").fill_null(np.nan).to_numpy().astype(np.float64),
            _codes_of(frame.get_column("_category")),
            _codes_of(frame.get_column("_brand")),
            np.nan_to_num(_floats(frame, ITEM_LEVEL_SCORES), nan=0.0),
        )

    def to_frame(self) -> pl.DataFrame:
        """The table as a frame (its Parquet form in the lake and in Redis)."""
        return pl.DataFrame(
            {
                "item_id": self.ids.tolist(),
                **{c: self.features[:, n] for n, c in enumerate(ITEM_COLUMNS)},
                "price": self.price,
                "category_code": self.category,
                "brand_code": self.brand,
                **{c: self.item_scores[:, n] for n, c in enumerate(ITEM_LEVEL_SCORES)},
            },
            schema={
                "item_id": pl.String,
                **{c: pl.Float32 for c in ITEM_COLUMNS},
                "price": pl.Float64,
                "category_code": pl.Int32,
                "brand_code": pl.Int32,
                **{c: pl.Float32 for c in ITEM_LEVEL_SCORES},
            },
        )

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> "ItemTable":
        """The table `to_frame` wrote."""
        return cls(
            np.array(frame.get_column("item_id").to_list(), dtype=object),
            _floats(frame, ITEM_COLUMNS),
            frame.get_column("price").to_numpy().astype(np.float64),
            frame.get_column("category_code").to_numpy().astype(np.int32),
            frame.get_column("brand_code").to_numpy().astype(np.int32),
            _floats(frame, ITEM_LEVEL_SCORES),
        )


@dataclass(frozen=True)
class NeighbourTable:
    """The neighbour generators' tables by item code, as compressed rows.

    The neighbours of item code c for the k-th of `NEIGHBOUR_KINDS` are row k × items + c.

    Attributes:
        starts: Per row, where its neighbours start in `codes` (one more entry at the end).
        codes: The neighbours' item codes.
        scores: The neighbours' scores (float64, as the generators sum them).
    """

    starts: np.ndarray
    codes: np.ndarray
    scores: np.ndarray

    @classmethod
    def build(cls, table: ItemTable, rows: pl.DataFrame) -> "NeighbourTable":
        """The table of neighbour rows (kind, item_id, neighbour_item_id, score).

        Rows naming an item the table lacks are left out: such an item is never a candidate.
        """
        items = len(table)
        kinds = pl.DataFrame(
            {"kind": list(NEIGHBOUR_KINDS), "kind_index": range(len(NEIGHBOUR_KINDS))},
            schema={"kind": pl.String, "kind_index": pl.Int64},
        )
        codes = pl.DataFrame(
            {"item_id": table.ids.tolist(), "code": np.arange(items)},
            schema={"item_id": pl.String, "code": pl.Int64},
        )
        # Joins, not a dict lookup per row: this runs at every worker's start-up.
        coded = (
            rows.select("kind", "item_id", "neighbour_item_id", pl.col("score").cast(pl.Float64))
            .with_row_index("order")
            .join(kinds, on="kind")
            .join(codes, on="item_id")
            .join(
                codes.rename({"item_id": "neighbour_item_id", "code": "neighbour"}),
                on="neighbour_item_id",
            )
            .select(
                (pl.col("kind_index") * items + pl.col("code")).alias("row"),
                "neighbour",
                "score",
                "order",
            )
            .sort("row", "order")
        )
        starts = np.searchsorted(
            coded.get_column("row").to_numpy(), np.arange(len(NEIGHBOUR_KINDS) * items + 1)
        )
        return cls(
            starts.astype(np.int64),
            coded.get_column("neighbour").to_numpy().astype(np.int64),
            coded.get_column("score").to_numpy().astype(np.float64),
        )


def encode_user(
    table: ItemTable,
    codes: np.ndarray,
    ranks: np.ndarray,
    rows: np.ndarray,
    bought: np.ndarray,
    mean_price: float = float("nan"),
    *,
    compressed: bool = True,
) -> bytes:
    """One user's value (see the module docstring).

    Args:
        table: The shared item table the codes refer to (and its codec).
        codes: The candidates' item codes, best first.
        ranks: The candidates' ranks.
        rows: The candidates' feature vectors (candidates × `FEATURE_COLUMNS`, float32).
        bought: Codes of the items the user bought before the snapshot.
        mean_price: The user's mean price (float64; NaN when unknown).
        compressed: False for the bytes before compression (what `train_codec` trains on).

    Returns:
        The bytes stored for the user.

    Raises:
        ValueError: The rows' item features differ from the table's, or the user's features
            differ between rows (they are not a snapshot of one user at one cutoff).
    """
    n = len(codes)
    codes = np.asarray(codes, np.intp)
    rows = np.asarray(rows, np.float32).reshape(n, len(FEATURE_COLUMNS))
    if not _same(rows[:, _ITEM_FEATURES], table.features[codes]).all():
        raise ValueError("a candidate's item features differ from the item table's")
    user = rows[0, _USER_FEATURES] if n else np.full(len(USER_COLUMNS), np.nan, np.float32)
    if n and not _same(rows[:, _USER_FEATURES], user[None, :]).all():
        raise ValueError("the user's features differ between the user's rows")
    ranks = np.asarray(ranks, np.int32)
    flags = 0 if np.array_equal(ranks, np.arange(1, n + 1, dtype=np.int32)) else _EXPLICIT_RANKS
    seeds = np.flatnonzero(rows[:, _HISTORY] > 0)
    hood = _neighbourhood(table, codes[seeds], rows[seeds, _HISTORY], _carted(rows[seeds]))
    prefix, holes, taken = _taken_from_neighbourhood(codes, hood.proposed)
    code_dtype, index_dtype = table.code_dtype, _index_dtype(n)
    keyed = [_keyed_table(table, codes, rows, kind) for kind in _KEYED]
    predicted = _predicted(table, codes, keyed, mean_price)
    positions, values, counts = [], [], [len(keys) for keys, _ in keyed]
    made: dict[str, np.ndarray] = {}
    for block, index in zip(BLOCKS, _BLOCK_INDEX, strict=True):
        if block.predict in _DEPENDENT:  # from the true columns, which the decoder has by then
            predicted[:, index] = _dependent(block, codes, rows, hood, made)
        actual = rows[:, index]
        off = np.flatnonzero(~_same(actual, predicted[:, index]).all(axis=1))
        counts.append(len(off))
        positions.append(off.astype(index_dtype))
        values.append(actual[off].ravel())
    value = b"".join(
        [
            _HEADER.pack(_MAGIC, n, len(bought), prefix, len(holes), flags, mean_price),
            np.array(counts, _count_dtype(n)).tobytes(),
            codes[~taken].astype(code_dtype).tobytes(),
            holes.astype(_index_dtype(prefix)).tobytes(),
            np.packbits(taken).tobytes() if prefix else b"",
            ranks.tobytes() if flags & _EXPLICIT_RANKS else b"",
            user.astype(np.float32).tobytes(),
            np.asarray(bought).astype(code_dtype).tobytes(),
            *[keys.tobytes() for keys, _ in keyed],
            *[keyed_values.tobytes() for _, keyed_values in keyed],
            *[block_positions.tobytes() for block_positions in positions],
            *[block_values.astype(np.float32).tobytes() for block_values in values],
        ]
    )
    return table.codec.compress(value) if compressed else value


def decode_user(raw: bytes, table: ItemTable) -> UserCandidates:
    """A user's value as candidates in `FEATURE_COLUMNS` order, as the snapshot's rows were.

    Args:
        raw: The value `encode_user` wrote.
        table: The item table it was written with (and its codec).

    Returns:
        The user's candidates and purchases.

    Raises:
        ValueError: The value is not in this layout.
    """
    raw = _unpacked(raw, table.codec)
    _, n, bought_count, prefix, hole_count, flags, mean_price = _HEADER.unpack_from(raw)
    reader = _Reader(raw, _HEADER.size)
    counts = reader.take(_count_dtype(n), len(_KEYED) + len(BLOCKS)).tolist()
    keyed_counts, block_counts = counts[: len(_KEYED)], counts[len(_KEYED) :]
    code_dtype, index_dtype = table.code_dtype, _index_dtype(n)
    listed = reader.take(code_dtype, n - (prefix - hole_count)).astype(np.intp)
    holes = reader.take(_index_dtype(prefix), hole_count)
    codes = np.empty(n, np.intp)
    if prefix:  # which candidates the neighbourhood gives, one bit each
        taken = np.unpackbits(reader.take(np.uint8, (n + 7) // 8), count=n).astype(bool)
        codes[~taken] = listed
    else:
        codes[:] = listed
    if flags & _EXPLICIT_RANKS:
        ranks = reader.take(np.int32, n)
    else:
        ranks = np.arange(1, n + 1, dtype=np.int32)
    user = reader.take(np.float32, len(USER_COLUMNS))
    bought = reader.take(code_dtype, bought_count)
    keys = [reader.take(np.int32, count) for count in keyed_counts]
    keyed = [
        (kind_keys, reader.take(np.float32, count * width).reshape(count, width))
        for kind_keys, count, width in zip(keys, keyed_counts, _KEYED_WIDTHS, strict=True)
    ]
    positions = reader.take(index_dtype, sum(block_counts)).astype(np.intp)
    values = reader.take(np.float32, sum(c * w for c, w in zip(block_counts, _WIDTHS, strict=True)))
    exceptions = _Exceptions(positions, values, block_counts)
    # The neighbourhood's seeds are listed candidates with a history score (block 0's
    # exceptions); whether they were carted is in the user-item activity block.
    seed_at, seed_history = exceptions.of(_HISTORY_BLOCK)
    positive = seed_history[:, 0] > 0
    seed_at, seed_history = seed_at[positive], seed_history[positive, 0]
    activity_at, activity = exceptions.of(_ACTIVITY_BLOCK)
    found, present = _find(activity_at, seed_at)
    carted = np.zeros(len(seed_at), bool)
    carted[present] = (activity[found[present]][:, _CARTED_IN_ACTIVITY] > 0).any(axis=1)
    if prefix and taken[seed_at].any():
        raise ValueError("a user value's seed is not among its listed candidates")
    hood = _neighbourhood(table, codes[seed_at], seed_history, carted)
    if prefix:
        if prefix > len(hood.proposed):
            raise ValueError("a user value's neighbourhood is shorter than it says")
        in_prefix = np.ones(prefix, bool)
        in_prefix[holes] = False
        codes[taken] = hood.proposed[:prefix][in_prefix]
    matrix = _predicted(table, codes, keyed, mean_price)
    matrix[:, _USER_FEATURES] = user
    made: dict[str, np.ndarray] = {}
    for block, index, (rows, block_values) in zip(BLOCKS, _BLOCK_INDEX, exceptions, strict=True):
        if block.predict in _DEPENDENT:
            matrix[:, index] = _dependent(block, codes, matrix, hood, made)
        if len(rows):
            if len(index) == 1:
                matrix[rows, index[0]] = block_values[:, 0]
            else:
                matrix[rows[:, None], index] = block_values
    return UserCandidates(
        matrix,
        table.ids[codes],
        ranks,
        float(user[_USER_EVENTS]),
        frozenset(table.ids[bought.astype(np.intp)].tolist()),
    )


def candidate_count(raw: bytes, table: ItemTable) -> int:
    """How many candidates a value holds (0: a user with purchases only), from its header.

    Args:
        raw: The value `encode_user` wrote.
        table: The item table it was written with (its codec decompresses the value).
    """
    return int(_HEADER.unpack_from(_unpacked(raw, table.codec))[1])


def _unpacked(value: bytes, codec: StateCodec) -> bytes:
    """A value's bytes, uncompressed, after checking they are in this layout."""
    try:
        raw = codec.decompress(value)
    except zstandard.ZstdError as error:
        raise ValueError("not a Shelfwise user value of this layout") from error
    if raw[: len(_MAGIC)] != _MAGIC:
        raise ValueError("not a Shelfwise user value of this layout")
    return raw


def encode_users(
    table: ItemTable,
    frame: pl.DataFrame,
    purchases: dict[str, list[str]] | None = None,
    mean_prices: dict[str, float] | None = None,
    *,
    compressed: bool = True,
) -> Iterator[tuple[str, bytes]]:
    """The values of the users whose rows `frame` holds (each user's rows, all of them).

    Args:
        table: The item table (every candidate and purchased item in it).
        frame: Snapshot rows: user_id, item_id, candidate_rank and `FEATURE_COLUMNS` (missing
            ones are null), in any order.
        purchases: Item ids each user bought before the snapshot.
        mean_prices: Each user's mean price.
        compressed: False for the values before compression (to `train_codec`).

    Yields:
        (user_id, value) per user of the frame.
    """
    purchases, mean_prices = purchases or {}, mean_prices or {}
    missing = [c for c in FEATURE_COLUMNS if c not in frame.columns]
    frame = frame.with_columns([pl.lit(None, pl.Float32).alias(c) for c in missing]).sort(
        "user_id", "candidate_rank"
    )
    if frame.height == 0:
        return
    users = frame.get_column("user_id").to_numpy()
    codes = table.codes_of(frame.get_column("item_id").to_list())
    ranks = frame.get_column("candidate_rank").to_numpy()
    rows = feature_matrix(frame)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        user_id = users[start]
        yield (
            user_id,
            encode_user(
                table,
                codes[start:end],
                ranks[start:end],
                rows[start:end],
                table.codes_of(purchases.get(user_id, ())),
                mean_prices.get(user_id, float("nan")),
                compressed=compressed,
            ),
        )


def purchases_only(table: ItemTable, bought: list[str], *, compressed: bool = True) -> bytes:
    """The value of a user with purchases but no candidates (`compressed` as `encode_user`)."""
    empty = np.zeros(0, np.int64)
    return encode_user(
        table,
        empty,
        empty,
        np.zeros((0, len(FEATURE_COLUMNS))),
        table.codes_of(bought),
        compressed=compressed,
    )


_Key = TypeVar("_Key")


def train_codec(
    table: ItemTable, values: Iterable[tuple[_Key, bytes]]
) -> tuple[ItemTable, Iterator[tuple[_Key, bytes]]]:
    """The table with a codec trained on the first of `values`, and every value compressed by it.

    Encoding is streamed and training needs values first: the first `TRAINING_VALUES` are
    encoded and held here, the dictionary is trained on them, and the rest are compressed as
    the returned iterator reaches them. With too few values to train on (a tiny shop), the
    codec has no dictionary.

    Args:
        table: The item table the values were encoded with.
        values: (key, value) pairs, each value uncompressed (`encode_users(compressed=False)`).

    Returns:
        The table with its codec, and (key, compressed value) for each of `values`, in order.
    """
    values = iter(values)
    held = list(itertools.islice(values, TRAINING_VALUES))
    codec = StateCodec(_trained_dictionary([value for _, value in held]))

    def compressed() -> Iterator[tuple[_Key, bytes]]:
        held.reverse()
        while held:  # each held value is let go once compressed
            key, value = held.pop()
            yield key, codec.compress(value)
        for key, value in values:
            yield key, codec.compress(value)

    return table.with_codec(codec), compressed()


def _trained_dictionary(samples: list[bytes]) -> bytes:
    """A dictionary for values like `samples`; empty when they are too few to train one."""
    try:
        trained = zstandard.train_dictionary(
            DICTIONARY_BYTES,
            samples,
            k=_TRAINING_K,
            d=_TRAINING_D,
            level=_COMPRESSION_LEVEL,
        )
    except zstandard.ZstdError:  # zstd's trainer refuses too little data (under seven values)
        return b""
    return trained.as_bytes()


def _predicted(
    table: ItemTable,
    codes: np.ndarray,
    keyed: list[tuple[np.ndarray, np.ndarray]],
    mean_price: float,
) -> np.ndarray:
    """Every pair column as the decoder predicts it, but `sources` (read from the scores)."""
    rows = table._rows[codes]
    for kind, (keys, values) in zip(_KEYED, keyed, strict=True):
        if len(keys):
            item_keys = (table.category if kind == "category" else table.brand)[codes]
            # Keys are sorted. Items whose key the user lacks (or without one, -1) read the null
            # row appended to the values.
            at, held = _find(keys, item_keys)
            at[~held] = len(keys)
            rows[:, _KEYED_INDEX[kind]] = np.concatenate((values, _NULL_ROWS[kind]))[at]
    if np.isfinite(mean_price) and mean_price != 0:  # `errstate` costs more than the division
        rows[:, _PRICE_INDEX] = table.price[codes] / mean_price
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            rows[:, _PRICE_INDEX] = table.price[codes] / mean_price
    return rows


def _dependent(
    block: Block, codes: np.ndarray, rows: np.ndarray, hood: "_Neighbourhood", made: dict
) -> np.ndarray:
    """A prediction that reads pair columns decoded before the block (see `_DEPENDENT`).

    `made` keeps what one call computes for a later block (both neighbour generators at once).
    """
    if block.predict == "sources":  # how many generators proposed each candidate
        return (rows[:, _SCORE_INDEX] > 0).sum(axis=1).reshape(len(codes), 1)
    if block.predict == "never_bought":  # the user's items as if not bought, others null
        touched = ~np.isnan(rows[:, _USER_ITEM_VIEWS])
        return np.where(touched[:, None], _NEVER_BOUGHT, np.float32(np.nan))
    if not made:
        made.update(zip(NEIGHBOUR_KINDS, hood.scores_of(codes), strict=True))
    return made[block.predict]


@dataclass(frozen=True)
class _Neighbourhood:
    """What the neighbour generators propose to one user, from the user's recent items.

    Attributes:
        codes: Every item some seed names, sorted.
        made: Per kind (`NEIGHBOUR_KINDS`), each of `codes`' (score, hits), float32.
        proposed: The items of `codes` that are not seeds, in the generators' order of their
            neighbour scores (co-visitation, then bought-together, descending; then code).
    """

    codes: np.ndarray
    made: np.ndarray
    proposed: np.ndarray

    def scores_of(self, codes: np.ndarray) -> np.ndarray:
        """Per kind, (score, hits) of each item of `codes` (0 for items no seed names)."""
        scores = np.zeros((len(NEIGHBOUR_KINDS), len(codes), 2), np.float32)
        at, named = _find(self.codes, codes)
        scores[:, named] = self.made[:, at[named]]
        return scores


_NO_NEIGHBOURHOOD = _Neighbourhood(
    np.zeros(0, np.intp), np.zeros((len(NEIGHBOUR_KINDS), 0, 2), np.float32), np.zeros(0, np.intp)
)


def _neighbourhood(
    table: ItemTable, seeds: np.ndarray, history: np.ndarray, carted: np.ndarray
) -> _Neighbourhood:
    """The neighbour generators' scores for the user, as `models.candidates.neighbours` sums them.

    Over the user's recent items (seeds): the sum of score / the seed's recency rank, and the
    number of seeds; bought-together seeds only from the carted or bought ones. Seeds are summed
    in (rank, code) order, so encoder and decoder add the same floats in the same order.

    Args:
        table: The item table, with its neighbour tables.
        seeds: The seeds' item codes (the candidates with a history score).
        history: The seeds' history scores (1 / recency rank).
        carted: Whether each seed was carted or bought.
    """
    neighbours = table.neighbours
    if not len(seeds) or neighbours is None:
        return _NO_NEIGHBOURHOOD
    ranks = np.rint(1.0 / np.asarray(history, np.float64))
    by_rank = np.lexsort((seeds, ranks))
    seeds, ranks, carted = seeds[by_rank], ranks[by_rank], np.asarray(carted)[by_rank]
    both = np.concatenate((np.arange(len(seeds)), np.flatnonzero(carted)))
    kind_of = (np.arange(len(both)) >= len(seeds)).astype(np.int64)
    seed_rows = kind_of * len(table) + seeds[both]
    starts = neighbours.starts[seed_rows]
    lengths = neighbours.starts[seed_rows + 1] - starts
    total = int(lengths.sum())
    if not total:
        return _NO_NEIGHBOURHOOD
    at = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
    codes, inverse = np.unique(neighbours.codes[at], return_inverse=True)
    kinds, width = len(NEIGHBOUR_KINDS), len(codes)
    slots = np.repeat(kind_of, lengths) * width + inverse
    weights = neighbours.scores[at] / np.repeat(ranks[both], lengths)
    made = np.empty((kinds, width, 2), np.float32)
    made[:, :, 0] = np.bincount(slots, weights, minlength=kinds * width).reshape(kinds, width)
    made[:, :, 1] = np.bincount(slots, minlength=kinds * width).reshape(kinds, width)
    others = np.flatnonzero(~_find(np.sort(seeds), codes)[1])
    by_score = np.lexsort((codes[others], -made[1, others, 0], -made[0, others, 0]))
    return _Neighbourhood(codes, made, codes[others[by_score]])


def _taken_from_neighbourhood(
    codes: np.ndarray, proposed: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Which candidates the value takes from the neighbourhood instead of listing their codes.

    The neighbourhood's items, in the generators' order, are mostly candidates up to a point
    and mostly not beyond it. The value keeps that prefix's length, the positions of the prefix's
    items it does not take (holes), and one bit per candidate: taken from the prefix, in its
    order, or listed. A prefix item is taken if it is a candidate placed after the ones taken
    before it (candidates keep their given order); the prefix ends where listing codes instead
    would cost most.

    Returns:
        The prefix length, the holes' positions in it, and per candidate whether it is taken.
    """
    taken = np.zeros(len(codes), bool)
    if not len(proposed) or not len(codes):
        return 0, np.zeros(0, np.intp), taken
    by_code = np.argsort(codes)
    at = by_code[np.minimum(np.searchsorted(codes, proposed, sorter=by_code), len(codes) - 1)]
    position = np.where(codes[at] == proposed, at, -1)
    # In the prefix's order, a candidate placed after every one kept before it (few are not:
    # candidates tied on both neighbour scores that later scores order otherwise).
    latest = np.maximum.accumulate(position)
    kept = (position >= 0) & (position == latest)
    kept[1:] &= position[1:] != latest[:-1]
    gain = np.cumsum(np.where(kept, 1, -1))
    prefix = int(gain.argmax()) + 1 if gain.max() > 0 else 0
    taken[position[:prefix][kept[:prefix]]] = True
    return prefix, np.flatnonzero(~kept[:prefix]), taken


def _find(ordered: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `values` is in the sorted array `ordered`, and whether it is there at all.

    Faster than `np.isin` at a few hundred values. A value not found gets some valid position
    (0 when `ordered` is empty): read positions only where found.
    """
    if not len(ordered):
        return np.zeros(len(values), np.intp), np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return at, ordered[at] == values


def _carted(rows: np.ndarray) -> np.ndarray:
    """Whether each row's user carted or bought its item (the bought-together seeds)."""
    return (rows[:, _CARTED_INDEX] > 0).any(axis=1)


class _Exceptions:
    """A value's exceptions, block by block: (positions, values as count × width)."""

    def __init__(self, positions: np.ndarray, values: np.ndarray, counts: list[int]) -> None:
        self.blocks = []
        at_position = at_value = 0
        for count, width in zip(counts, _WIDTHS, strict=True):
            self.blocks.append(
                (
                    positions[at_position : at_position + count],
                    values[at_value : at_value + count * width].reshape(count, width),
                )
            )
            at_position += count
            at_value += count * width

    def of(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        return self.blocks[block]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter(self.blocks)


def _keyed_table(
    table: ItemTable, codes: np.ndarray, rows: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """The user's values per category (or brand): the first candidate's of each, sorted by key."""
    index = _KEYED_INDEX[kind]
    item_keys = (table.category if kind == "category" else table.brand)[codes]
    values = rows[:, index]
    known = (item_keys >= 0) & ~np.isnan(values).all(axis=1)
    keys, first = np.unique(item_keys[known], return_index=True)
    return keys.astype(np.int32), np.ascontiguousarray(values[known][first], np.float32)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise: equal, or both NaN."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _count_dtype(n: int) -> type:
    """The dtype of a value's counts (none exceeds the candidates)."""
    return np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32


def _index_dtype(n: int) -> type:
    if n <= 256:
        return np.uint8
    return np.uint16 if n <= 65_536 else np.uint32


def _codes_of(values: pl.Series) -> np.ndarray:
    """Codes of a column's distinct values (-1 for null)."""
    codes = values.cast(pl.Categorical).to_physical().cast(pl.Int64)
    return codes.fill_null(-1).to_numpy().astype(np.int32)


def _floats(frame: pl.DataFrame, columns: list[str]) -> np.ndarray:
    return frame.select(pl.col(columns).cast(pl.Float32)).to_numpy().astype(np.float32, copy=False)


class _Reader:
    """Consecutive arrays out of one value."""

    def __init__(self, raw: bytes, offset: int) -> None:
        self.raw, self.offset = raw, offset

    def take(self, dtype: type, count: int) -> np.ndarray:
        array = np.frombuffer(self.raw, dtype, count, self.offset)
        self.offset += array.nbytes
        return array
