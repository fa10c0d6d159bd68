"""Real-time signals: the shopper's session since the snapshot, and item-to-item neighbours.

The batch pipeline knows each user's history up to the serving cutoff. Views and carts posted to
`/events` since then (plus the request's own context) form the *session*. The generators whose
scores depend on recency — history, co-visitation and bought together — are recomputed for the
session exactly as `models.candidates` computes them at a cutoff: the session's items become the
most recent items, ahead of the snapshot's, and every neighbour score is `Σ score / recency rank`
over the seeds. So a view changes both the candidates (the viewed item's neighbours join) and the
ranker's features (`history_score`, `covisit_score`, ... of the existing candidates).
"""

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from models.business_rules import ItemFacts

# Neighbour tables exported with the serving snapshot (`serving/neighbours.parquet`, column kind).
COVISIT = "covisit"
BOUGHT_TOGETHER = "bought_together"
# The collaborative model's strongest item-item weights (`models.collaborative`).
COLLABORATIVE = "collaborative"
NEIGHBOUR_KINDS = (COVISIT, BOUGHT_TOGETHER, COLLABORATIVE)
CONTENT = "content"


@dataclass(frozen=True)
class Session:
    """What one shopper did since the snapshot.

    Attributes:
        item_ids: Items viewed or carted, most recent first, distinct.
        carted_ids: Items in the cart (added and not removed since).
        purchased_ids: Items bought since the snapshot.
    """

    item_ids: tuple[str, ...] = ()
    carted_ids: frozenset[str] = frozenset()
    purchased_ids: frozenset[str] = frozenset()

    def with_context(self, item_id: str | None, session_item_ids: Iterable[str]) -> "Session":
        """The session with the request's context in front.

        The item on the page first, then the client's own session items, then what `/events`
        recorded.
        """
        front = [item_id] if item_id else []
        ordered = dict.fromkeys([*front, *session_item_ids, *self.item_ids])
        return Session(tuple(ordered), self.carted_ids, self.purchased_ids)


Neighbours = Mapping[str, list[tuple[str, float]]]


class NeighbourIndex:
    """Item-to-item neighbours as of the serving cutoff, strongest first, by item code.

    Compressed rows: the neighbours of the item with code c (its position in `ids`) of the k-th
    of `NEIGHBOUR_KINDS` are row k × len(ids) + c, from `starts[row]` to `starts[row + 1]` in
    `codes` (their item codes) and `scores`. Held as arrays, so a worker of the online store reads
    them from Redis as they were written (`models.online_store`) instead of sorting and grouping
    millions of rows at start-up; each item's list is built on first use (`of`).

    Args:
        ids: Item ids by code (an object array of str).
        starts: Per row, where its neighbours start (one more entry at the end), int64.
        codes: The neighbours' item codes, each row's strongest first.
        scores: The neighbours' scores (float64), in the same order.
    """

    def __init__(
        self, ids: np.ndarray, starts: np.ndarray, codes: np.ndarray, scores: np.ndarray
    ) -> None:
        if len(starts) != len(NEIGHBOUR_KINDS) * len(ids) + 1 or len(codes) != len(scores):
            raise ValueError("neighbour rows do not match the items")
        self.ids, self.starts, self.codes, self.scores = ids, starts, codes, scores
        self._code = {item: n for n, item in enumerate(ids.tolist())}
        self.tables: dict[str, Neighbours] = {
            kind: _KindNeighbours(self, k) for k, kind in enumerate(NEIGHBOUR_KINDS)
        }

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, ids: Iterable[str] = ()) -> "NeighbourIndex":
        """The index of neighbour rows.

        Args:
            frame: kind (covisit, bought_together or collaborative), item_id, neighbour_item_id,
                score. A snapshot without a kind has no neighbours of that kind; other kinds are
                left out.
            ids: Item ids to give the first codes, in order (e.g. the item table's); items of
                the frame not among them follow, sorted.

        Returns:
            The index; each item's neighbours strongest first.
        """
        ids = list(ids)
        frame = frame.filter(pl.col("kind").is_in(NEIGHBOUR_KINDS))
        named = pl.concat([frame.get_column("item_id"), frame.get_column("neighbour_item_id")])
        more = set(named.unique().to_list()).difference(ids)
        ids = np.array([*ids, *sorted(more)], dtype=object)
        # Ids to codes through Enum casts (a category's position is its code), not joins.
        codes, kinds = pl.Enum(ids.tolist()), pl.Enum(NEIGHBOUR_KINDS)
        # Strongest first: this very sort (not a stable one) orders the ties within an item as
        # the service always had them, and their order decides ties between candidates later.
        ordered = (
            frame.select("kind", "item_id", "neighbour_item_id", pl.col("score").cast(pl.Float64))
            .sort("kind", "item_id", "score", descending=[False, False, True])
            .select(
                (
                    pl.col("kind").cast(kinds).to_physical().cast(pl.Int64) * len(ids)
                    + pl.col("item_id").cast(codes).to_physical().cast(pl.Int64)
                ).alias("row"),
                pl.col("neighbour_item_id").cast(codes).to_physical().alias("neighbour"),
                "score",
            )
            # Rows in code order, each keeping the order above.
            .sort("row", maintain_order=True)
        )
        starts = np.searchsorted(
            ordered.get_column("row").to_numpy(), np.arange(len(NEIGHBOUR_KINDS) * len(ids) + 1)
        )
        return cls(
            ids,
            starts.astype(np.int64),
            ordered.get_column("neighbour").to_numpy().astype(np.int32),
            ordered.get_column("score").to_numpy().astype(np.float64),
        )

    @classmethod
    def empty(cls) -> "NeighbourIndex":
        """An index without neighbours (no snapshot)."""
        return cls(
            np.array([], dtype=object),
            np.zeros(1, np.int64),
            np.array([], np.int32),
            np.array([], np.float64),
        )

    def of(self, kind: str, item_id: str) -> list[tuple[str, float]]:
        """The item's neighbours of one kind, strongest first."""
        return self.tables[kind].get(item_id, [])

    def span(self, kind_index: int, item_id: str) -> tuple[int, int]:
        """Where the item's neighbours of the kind are in `codes` (start, end); equal if none."""
        code = self._code.get(item_id)
        if code is None:
            return 0, 0
        row = kind_index * len(self.ids) + code
        return int(self.starts[row]), int(self.starts[row + 1])


class _KindNeighbours(Mapping[str, list[tuple[str, float]]]):
    """One kind's neighbour lists by item, each built from the index's arrays on first use.

    A request reads a few dozen lists; building all of them (3.2 million neighbours on the
    10M-event shop) took seconds.
    """

    def __init__(self, index: NeighbourIndex, kind_index: int) -> None:
        self._index, self._kind = index, kind_index
        self._lists: dict[str, list[tuple[str, float]]] = {}

    def __getitem__(self, item_id: str) -> list[tuple[str, float]]:
        found = self._lists.get(item_id)
        if found is None:
            start, end = self._index.span(self._kind, item_id)
            if start == end:
                raise KeyError(item_id)
            index = self._index
            found = list(
                zip(
                    index.ids[index.codes[start:end]].tolist(),
                    index.scores[start:end].tolist(),
                    strict=True,
                )
            )
            self._lists[item_id] = found  # one assignment: safe across request threads
        return found

    def _rows(self) -> np.ndarray:
        """The codes of the items with neighbours of this kind."""
        items = len(self._index.ids)
        starts = self._index.starts[self._kind * items : (self._kind + 1) * items + 1]
        return np.flatnonzero(np.diff(starts))

    def __iter__(self) -> Iterator[str]:
        return iter(self._index.ids[self._rows()].tolist())

    def __len__(self) -> int:
        return len(self._rows())


def neighbour_scores(
    seeds: list[tuple[str, int]], neighbours: Mapping[str, list[tuple[str, float]]]
) -> dict[str, tuple[float, float]]:
    """`models.candidates.neighbours` for one user: Σ score / seed rank, and the hit count.

    Args:
        seeds: (item_id, recency rank) of the seed items.
        neighbours: Neighbour lists of one kind.

    Returns:
        item_id → (score, hits).
    """
    scores: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for seed, rank in seeds:
        for neighbour, score in neighbours.get(seed, ()):
            entry = scores[neighbour]
            entry[0] += score / rank
            entry[1] += 1.0
    return {item: (score, hits) for item, (score, hits) in scores.items()}


@dataclass(frozen=True)
class RecencySignals:
    """The recency-driven candidate scores of one user, recomputed with the session.

    Attributes:
        history: item_id → 1 / recency rank.
        covisit: item_id → (score, hits) over the recent items.
        bought_together: item_id → (score, hits) over the recent carted or bought items.
    """

    history: dict[str, float]
    covisit: dict[str, tuple[float, float]]
    bought_together: dict[str, tuple[float, float]]

    def proposed(self) -> set[str]:
        """Every item these signals propose."""
        return {*self.history, *self.covisit, *self.bought_together}


def recency_signals(
    session: Session,
    snapshot_recent: list[str],
    snapshot_carted: set[str],
    index: NeighbourIndex,
    recent_items: int,
) -> RecencySignals:
    """Recomputes history, co-visitation and bought-together with the session in front.

    Args:
        session: The session (most recent first).
        snapshot_recent: The user's recent items at the snapshot, most recent first.
        snapshot_carted: Which of those the user carted or bought.
        index: The neighbour tables.
        recent_items: How many recent items count (`CandidateConfig.recent_items`).

    Returns:
        The recomputed signals.
    """
    recent = list(dict.fromkeys([*session.item_ids, *snapshot_recent]))[:recent_items]
    ranked = [(item, rank) for rank, item in enumerate(recent, start=1)]
    carted = snapshot_carted | session.carted_ids | session.purchased_ids
    return RecencySignals(
        history={item: 1.0 / rank for item, rank in ranked},
        covisit=neighbour_scores(ranked, index.tables[COVISIT]),
        bought_together=neighbour_scores(
            [(item, rank) for item, rank in ranked if item in carted],
            index.tables[BOUGHT_TOGETHER],
        ),
    )


class ContentIndex:
    """Content-based neighbours from the catalog: same category, nearest price, same brand.

    New items have no co-visitation yet; this is how they reach shoppers and `/similar`.

    Args:
        items: Item facts of the serving catalog.
        per_category: How many of each category's most popular items are considered.
    """

    def __init__(self, items: Mapping[str, ItemFacts], per_category: int = 300) -> None:
        self.items = items
        by_category: dict[str, list[str]] = defaultdict(list)
        for item_id, facts in items.items():
            # Items never recommended are no one's content neighbour (they would take a place).
            if facts.category_id is not None and facts.is_recommendable:
                by_category[facts.category_id].append(item_id)
        self.by_category = {
            category: sorted(ids, key=lambda i: (-items[i].trending, -items[i].popularity, i))[
                :per_category
            ]
            for category, ids in by_category.items()
        }

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """Up to k items of the same category, the closest in price and brand first.

        Args:
            item_id: The item (unknown items have no content neighbours).
            k: How many.

        Returns:
            (item_id, similarity in (0, 1]) best first, without the item itself.
        """
        facts = self.items.get(item_id)
        if facts is None or facts.category_id is None:
            return []
        scored = []
        for other in self.by_category.get(facts.category_id, ()):
            if other == item_id:
                continue
            other_facts = self.items[other]
            gap = _price_gap(facts.price, other_facts.price)
            same_brand = facts.brand is not None and facts.brand == other_facts.brand
            scored.append((other, (1.5 if same_brand else 1.0) / (1.0 + gap) / 1.5))
        scored.sort(key=lambda pair: -pair[1])
        return scored[:k]

    def trending_in(self, category_id: str | None) -> list[tuple[str, float]]:
        """The category's items, trending first (empty for an unknown category)."""
        return [(i, self.items[i].trending) for i in self.by_category.get(category_id or "", ())]


def _price_gap(price: float | None, other: float | None) -> float:
    if not price or not other or price <= 0 or other <= 0:
        return 1.0
    return abs(math.log(price) - math.log(other))
