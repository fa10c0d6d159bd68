"""A user's recent history as the serving state knows it: what `POST /history` answers.

Two sources, newest first:

1. the live session from the online state (what `/events` recorded since the snapshot): the
   viewed or carted items, most recent first, then the items bought since the snapshot (the
   online state keeps them as a set, without their order);
2. the serving snapshot's state of the user (`models.user_state.UserCandidates`): the history
   generator's candidates (the user's most recent items at the cutoff, `history_score` = 1 /
   recency rank), candidates the user interacted with, and the items bought before the
   snapshot. What happened comes from the (user, item) features: a purchase, else a cart, else
   a view; "history" when the snapshot only knows the item as one of the recent items. They
   are ordered by `user_item_days_since_last` (the recency rank, then the item id, on a tie);
   bought items that are no longer candidates (a category not bought again) have no date and
   come last.

The snapshot keeps no event log, only these features: the history is what serving knows and
acts on, not the shop's full record of the user.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from models.business_rules import ItemFacts
from models.features import FEATURE_COLUMNS
from models.session import Session
from models.user_state import UserCandidates

EVENT_VIEW = "view"
EVENT_CART = "cart"
EVENT_PURCHASE = "purchase"
EVENT_HISTORY = "history"  # only known as one of the user's recent items

_COLUMN = {name: n for n, name in enumerate(FEATURE_COLUMNS)}


@dataclass(frozen=True)
class HistoryEntry:
    """One item of a user's history.

    Attributes:
        item_id: The item.
        event: What happened: `view`, `cart`, `purchase`, or `history` (a recent item of the
            snapshot whose counts say no more).
        live: Whether it comes from the session since the snapshot (else from the snapshot).
        days_before_snapshot: For a snapshot entry, days between the user's last interaction
            with the item and the snapshot's cutoff, when known.
        category_id: The item's category, when the catalog facts know the item.
        price: The item's price, when the catalog facts know it.
    """

    item_id: str
    event: str
    live: bool
    days_before_snapshot: float | None = None
    category_id: str | None = None
    price: float | None = None


@dataclass(frozen=True)
class UserHistory:
    """What `user_history` answers.

    Attributes:
        known: Whether the serving snapshot holds a state for the user (candidates or
            purchases): a known user, as `/recommend` sees them.
        entries: The history, most recent first.
    """

    known: bool
    entries: list[HistoryEntry]


def user_history(
    candidates: UserCandidates | None,
    session: Session,
    items: Mapping[str, ItemFacts],
    limit: int,
) -> UserHistory:
    """A user's recent history, most recent first (see the module docstring).

    Args:
        candidates: What the serving snapshot holds for the user (None: an unknown user).
        session: The user's live session from the online state.
        items: The catalog facts by item id (category, price).
        limit: At most this many entries.

    Returns:
        Whether the snapshot knows the user, and up to `limit` entries: the live session's
        first, then the snapshot's. An item may appear in both (e.g. viewed today, bought two
        weeks before the snapshot), once in each.
    """
    entries = _live(session) + _snapshot(candidates)
    return UserHistory(
        known=candidates is not None,
        entries=[_with_facts(entry, items.get(entry.item_id)) for entry in entries[:limit]],
    )


def _live(session: Session) -> list[HistoryEntry]:
    def event(item_id: str) -> str:
        if item_id in session.purchased_ids:
            return EVENT_PURCHASE
        return EVENT_CART if item_id in session.carted_ids else EVENT_VIEW

    entries = [HistoryEntry(item_id, event(item_id), live=True) for item_id in session.item_ids]
    seen = set(session.item_ids)
    entries += [
        HistoryEntry(item_id, EVENT_PURCHASE, live=True)
        for item_id in sorted(session.purchased_ids - seen)
    ]
    return entries


def _snapshot(candidates: UserCandidates | None) -> list[HistoryEntry]:
    if candidates is None:
        return []
    matrix = candidates.matrix
    item_ids = [str(item) for item in candidates.item_ids]

    def column(name: str) -> np.ndarray:
        if not len(item_ids):
            return np.zeros(0)
        return np.nan_to_num(matrix[:, _COLUMN[name]].astype(np.float64), nan=0.0)

    history = column("history_score")
    views, carts = column("user_item_views"), column("user_item_carts")
    purchases = column("user_item_purchases")
    days = (
        matrix[:, _COLUMN["user_item_days_since_last"]].astype(np.float64)
        if len(item_ids)
        else np.zeros(0)
    )
    dated: list[tuple[float, float, str, HistoryEntry]] = []
    for n, item_id in enumerate(item_ids):
        bought = item_id in candidates.bought or purchases[n] > 0
        if not (history[n] > 0 or bought or carts[n] > 0 or views[n] > 0):
            continue  # a candidate the user never touched (a neighbour, a popular item)
        if bought:
            event = EVENT_PURCHASE
        elif carts[n] > 0:
            event = EVENT_CART
        else:
            event = EVENT_VIEW if views[n] > 0 else EVENT_HISTORY
        age = float(days[n]) if math.isfinite(days[n]) else None
        # Recency rank (1 / history_score) breaks ties; items outside the recent ones after.
        rank = 1.0 / history[n] if history[n] > 0 else math.inf
        entry = HistoryEntry(item_id, event, live=False, days_before_snapshot=age)
        dated.append((math.inf if age is None else age, rank, item_id, entry))
    dated.sort(key=lambda row: row[:3])
    listed = set(item_ids)
    undated = [
        HistoryEntry(item_id, EVENT_PURCHASE, live=False)
        for item_id in sorted(candidates.bought - listed)
    ]
    return [row[3] for row in dated] + undated


def _with_facts(entry: HistoryEntry, facts: ItemFacts | None) -> HistoryEntry:
    if facts is None:
        return entry
    price = facts.price if facts.price is not None and math.isfinite(facts.price) else None
    return HistoryEntry(
        entry.item_id,
        entry.event,
        entry.live,
        entry.days_before_snapshot,
        facts.category_id,
        price,
    )
