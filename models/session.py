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
    """Item-to-item neighbours as of the serving cutoff, strongest first.

    Args:
        frame: kind (covisit, bought_together or collaborative), item_id, neighbour_item_id,
            score. A snapshot without a kind has no neighbours of that kind.
    """

    def __init__(self, frame: pl.DataFrame) -> None:
        ordered = frame.sort("kind", "item_id", "score", descending=[False, False, True])
        ordered = ordered.with_row_index("row")
        spans: dict[str, dict[str, tuple[int, int]]] = {
            COVISIT: {},
            BOUGHT_TOGETHER: {},
            COLLABORATIVE: {},
        }
        groups = ordered.group_by("kind", "item_id", maintain_order=True).agg(
            pl.col("row").first(), pl.len()
        )
        for kind, item_id, row, length in groups.iter_rows():
            spans.setdefault(kind, {})[item_id] = (row, length)
        neighbours, scores = ordered.get_column("neighbour_item_id"), ordered.get_column("score")
        self.tables: dict[str, Neighbours] = {
            kind: _LazyNeighbours(kind_spans, neighbours, scores)
            for kind, kind_spans in spans.items()
        }

    @classmethod
    def empty(cls) -> "NeighbourIndex":
        """An index without neighbours (no snapshot)."""
        return cls(
            pl.DataFrame(
                schema={
                    "kind": pl.String,
                    "item_id": pl.String,
                    "neighbour_item_id": pl.String,
                    "score": pl.Float64,
                }
            )
        )

    def of(self, kind: str, item_id: str) -> list[tuple[str, float]]:
        """The item's neighbours of one kind, strongest first."""
        return self.tables[kind].get(item_id, [])


class _LazyNeighbours(Mapping[str, list[tuple[str, float]]]):
    """One kind's neighbour lists by item, each built from the sorted columns on first use.

    Building every list at start-up took 3 s for the 10M-event shop's 3.2 million neighbour rows;
    a request reads a few dozen lists.
    """

    def __init__(
        self, spans: dict[str, tuple[int, int]], neighbours: pl.Series, scores: pl.Series
    ) -> None:
        self._spans, self._neighbours, self._scores = spans, neighbours, scores
        self._lists: dict[str, list[tuple[str, float]]] = {}

    def __getitem__(self, item_id: str) -> list[tuple[str, float]]:
        found = self._lists.get(item_id)
        if found is None:
            start, length = self._spans[item_id]
            found = list(
                zip(
                    self._neighbours.slice(start, length).to_list(),
                    self._scores.slice(start, length).to_list(),
                    strict=True,
                )
            )
            self._lists[item_id] = found  # one assignment: safe across request threads
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


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
