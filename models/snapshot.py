"""The serving snapshot held in memory, factorised, and loaded without holding the file twice.

The snapshot file has one row per (user, candidate item) with the whole feature vector. Most of a
row repeats: the item's features are the same in every row of that item, the user's in every row
of that user (the snapshot has one cutoff). Memory keeps, per row, only what depends on the pair
(and the item as a code); the item's and the user's parts once each. A request reassembles its
user's rows (`CandidateSnapshot.rows_of`).

Loading streams the file in batches into arrays sized from its footer, so start-up memory is the
held arrays plus one batch, not the file as a data frame plus a sorted copy of it. That needs each
user's rows to be contiguous and in candidate order, which `serving_features` guarantees; a file
that is not (written by an older pipeline) is loaded whole and sorted instead.
"""

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

from models.features import FEATURE_COLUMNS, ITEM_FEATURES, USER_FEATURES
from shelfwise.lake import SERVING_CANDIDATES, Lake

logger = logging.getLogger(__name__)

USER_KEY = "user_id"
ITEM_KEY = "item_id"
RANK = "candidate_rank"
SNAPSHOT_KEY = [USER_KEY, ITEM_KEY, RANK]
# The order a snapshot's rows must be in: each user's rows together, best candidate first.
SNAPSHOT_ORDER = [USER_KEY, RANK]

ITEM_COLUMNS = list(ITEM_FEATURES.values())
USER_COLUMNS = list(USER_FEATURES.values())
PAIR_COLUMNS = [c for c in FEATURE_COLUMNS if c not in {*ITEM_COLUMNS, *USER_COLUMNS}]
_COLUMN = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
_PAIR_INDEX = np.array([_COLUMN[c] for c in PAIR_COLUMNS])
_ITEM_INDEX = np.array([_COLUMN[c] for c in ITEM_COLUMNS])
_USER_INDEX = np.array([_COLUMN[c] for c in USER_COLUMNS])
# Rows decoded at a time while loading: a few hundred MB of a data frame at most.
LOAD_BATCH_ROWS = 500_000


_USER_EVENTS = USER_COLUMNS.index(USER_FEATURES["events"])


@dataclass(frozen=True)
class UserCandidates:
    """What a candidate store knows of one user, as of its snapshot.

    Attributes:
        matrix: The candidates' feature vectors (candidates × `FEATURE_COLUMNS`), best first.
        item_ids: The candidates' item ids.
        ranks: The candidates' ranks in their generators' order (1 = first).
        events: The user's event count (`user_events`, the user's segment).
        bought: Items the user bought before the snapshot, when the store keeps them (the
            Redis store does); empty when the business rules hold them (the embedded snapshot).
    """

    matrix: np.ndarray
    item_ids: np.ndarray
    ranks: np.ndarray
    events: float
    bought: frozenset[str] = frozenset()


class CandidateStore(Protocol):
    """Where a recommender finds a known user's candidates: in process or in Redis."""

    @property
    def known_users(self) -> int:
        """How many users have candidates."""
        ...

    def candidates_of(self, user_id: str) -> UserCandidates | None:
        """The user's candidates, or None when the store knows nothing of the user.

        Raises:
            Exception: The store cannot be read (Redis unreachable); the caller degrades.
        """
        ...


class SnapshotOrderError(ValueError):
    """A snapshot's rows are not grouped by user in candidate order (they cannot be streamed)."""


class SnapshotFeaturesError(ValueError):
    """A snapshot lacks features the ranker needs (it was built for another ranker)."""


@dataclass(frozen=True)
class CandidateSnapshot:
    """Every known user's candidates with their feature vectors, stored factorised.

    Attributes:
        pairs: Per row, the features of the (user, item) pair (`PAIR_COLUMNS`).
        item_codes: Per row, the item's code (its index in `items` and `item_part`).
        ranks: Per row, the candidate's rank in its generators' order (1 = first).
        items: Item ids by code.
        item_part: The items' features (`ITEM_COLUMNS`) by code.
        user_part: The users' features (`USER_COLUMNS`), one row per user.
        spans: Per user id, (first row, end row, index into `user_part`).
    """

    pairs: np.ndarray
    item_codes: np.ndarray
    ranks: np.ndarray
    items: np.ndarray
    item_part: np.ndarray
    user_part: np.ndarray
    spans: dict[str, tuple[int, int, int]]

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> "CandidateSnapshot":
        """Builds the snapshot from rows in any order (sorted here, in memory).

        Args:
            frame: user_id, item_id, candidate_rank and any of `FEATURE_COLUMNS` (missing ones
                are null).

        Returns:
            The factorised snapshot.
        """
        return cls.from_batches([frame.sort(SNAPSHOT_ORDER)], frame.height)

    @classmethod
    def from_batches(cls, batches: Iterable[pl.DataFrame], rows: int) -> "CandidateSnapshot":
        """Builds the snapshot from consecutive batches of rows, holding one batch at a time.

        Args:
            batches: The rows in `SNAPSHOT_ORDER` (a user's rows may span batches), with the
                columns of `from_frame`.
            rows: How many rows the batches hold together (from the file's footer).

        Returns:
            The factorised snapshot.

        Raises:
            SnapshotOrderError: A user's rows are not contiguous or not in candidate order, or
                the batches hold more or fewer rows than `rows`.
        """
        pairs = np.empty((rows, len(PAIR_COLUMNS)), np.float32)
        item_codes = np.empty(rows, np.int32)
        ranks = np.empty(rows, np.int32)
        codes: dict[str, int] = {}
        item_parts: list[np.ndarray] = []
        user_parts: list[np.ndarray] = []
        spans: dict[str, tuple[int, int, int]] = {}
        offset, last_user, last_rank = 0, None, 0
        for raw in batches:
            if raw.height == 0:
                continue
            if offset + raw.height > rows:
                raise SnapshotOrderError(f"the batches hold more than the {rows} rows announced")
            batch = raw.with_columns(
                [pl.lit(None, pl.Float32).alias(c) for c in FEATURE_COLUMNS if c not in raw.columns]
            )
            end = offset + batch.height
            _check_order(batch, last_user, last_rank)
            pairs[offset:end] = _floats(batch, PAIR_COLUMNS)
            ranks[offset:end] = batch.get_column(RANK).to_numpy()

            firsts = batch.group_by(ITEM_KEY, maintain_order=True).agg(pl.col(ITEM_COLUMNS).first())
            new = firsts.filter(~pl.col(ITEM_KEY).is_in(list(codes)))
            for item in new.get_column(ITEM_KEY).to_list():
                codes[item] = len(codes)
            item_parts.append(_floats(new, ITEM_COLUMNS))
            item_codes[offset:end] = (
                batch.get_column(ITEM_KEY).replace_strict(codes, return_dtype=pl.Int32).to_numpy()
            )

            runs = (
                batch.with_columns(pl.col(USER_KEY).rle_id().alias("_run"))
                .group_by("_run", maintain_order=True)
                .agg(pl.col(USER_KEY).first(), pl.len(), pl.col(USER_COLUMNS).first())
            )
            new_users, start = [], offset
            for n, (user, length) in enumerate(runs.select(USER_KEY, "len").iter_rows()):
                if user == last_user and n == 0:  # continues from the previous batch
                    first, _, index = spans[user]
                    spans[user] = (first, start + length, index)
                else:
                    if user in spans:
                        raise SnapshotOrderError(f"user {user!r}'s rows are not contiguous")
                    spans[user] = (start, start + length, len(spans))
                    new_users.append(n)
                start += length
            user_parts.append(_floats(runs, USER_COLUMNS)[new_users])
            offset, last_user = end, batch.get_column(USER_KEY)[-1]
            last_rank = int(ranks[end - 1])
        if offset != rows:
            raise SnapshotOrderError(f"the batches hold {offset} rows, not the {rows} announced")
        return cls(
            pairs,
            item_codes,
            ranks,
            np.array(list(codes), dtype=object),
            _stack(item_parts, len(ITEM_COLUMNS)),
            _stack(user_parts, len(USER_COLUMNS)),
            spans,
        )

    def rows_of(self, span: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """A user's candidate rows reassembled into `FEATURE_COLUMNS` order, and their item ids.

        Args:
            span: The user's entry in `spans`.

        Returns:
            The (candidates × features) matrix and the candidates' item ids.
        """
        start, end, user = span
        codes = self.item_codes[start:end]
        rows = assemble_rows(self.pairs[start:end], self.item_part[codes], self.user_part[user])
        return rows, self.items[codes]

    @property
    def known_users(self) -> int:
        """How many users have candidates."""
        return len(self.spans)

    def candidates_of(self, user_id: str) -> UserCandidates | None:
        """The user's candidates (see `CandidateStore`), or None for a user without any.

        Args:
            user_id: Any user id.

        Returns:
            The rows of `rows_of`, the ranks and the user's event count.
        """
        span = self.spans.get(user_id)
        if span is None:
            return None
        matrix, item_ids = self.rows_of(span)
        events = float(self.user_part[span[2], _USER_EVENTS])
        return UserCandidates(matrix, item_ids, self.ranks[span[0] : span[1]], events)


def assemble_rows(pairs: np.ndarray, items: np.ndarray, user: np.ndarray) -> np.ndarray:
    """A user's candidate rows in `FEATURE_COLUMNS` order from their factorised parts.

    The one reassembly of the in-process snapshot and the online store's user values.

    Args:
        pairs: Per candidate, the `PAIR_COLUMNS`.
        items: Per candidate, its item's `ITEM_COLUMNS`.
        user: The user's `USER_COLUMNS`.

    Returns:
        The (candidates × features) float32 matrix.
    """
    rows = np.empty((len(pairs), len(FEATURE_COLUMNS)), dtype=np.float32)
    rows[:, _PAIR_INDEX] = pairs
    rows[:, _ITEM_INDEX] = items
    rows[:, _USER_INDEX] = user
    return rows


def load_snapshot(
    lake: Lake,
    features: list[str],
    relpath: str = SERVING_CANDIDATES,
    batch_rows: int = LOAD_BATCH_ROWS,
) -> CandidateSnapshot:
    """Loads the serving snapshot the pipeline exported, streaming it batch by batch.

    Args:
        lake: The lake holding the snapshot.
        features: The features the ranker needs; each must be in the file.
        relpath: The snapshot file, relative to the lake root.
        batch_rows: Rows decoded at a time.

    Returns:
        The factorised snapshot.

    Raises:
        SnapshotFeaturesError: The file lacks some of `features`.
    """
    batches = (pl.from_arrow(table) for table in lake.iter_parquet(relpath, batch_rows))
    first = next(batches)
    missing = [name for name in features if name not in first.columns]
    if missing:
        raise SnapshotFeaturesError(f"serving snapshot lacks the ranker's features: {missing}")
    try:
        rows = lake.parquet_rows(relpath)
        return CandidateSnapshot.from_batches(itertools.chain([first], batches), rows)
    except SnapshotOrderError as error:
        logger.warning("serving snapshot %s: %s; loading it whole", lake.uri(relpath), error)
        return CandidateSnapshot.from_frame(lake.read_frame(relpath))


def _check_order(batch: pl.DataFrame, last_user: str | None, last_rank: int) -> None:
    """Raises unless each user's rows are in ascending candidate order.

    The batch's first row continues the previous batch's last one (`last_user`, `last_rank`);
    contiguity across users is checked by the caller.
    """
    users, ranks = pl.col(USER_KEY), pl.col(RANK)
    previous_user = users.shift(1, fill_value=last_user)
    previous_rank = ranks.shift(1, fill_value=last_rank)
    unordered = batch.select(((users == previous_user) & (ranks <= previous_rank)).any()).item()
    if unordered:
        raise SnapshotOrderError("a user's candidates are not in candidate_rank order")


def _floats(frame: pl.DataFrame, columns: list[str]) -> np.ndarray:
    return frame.select(pl.col(columns).cast(pl.Float32)).to_numpy().astype(np.float32, copy=False)


def _stack(parts: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)
