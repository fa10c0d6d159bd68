"""Business rules: one declarative layer deciding which ranked items a shopper may be shown.

Each rule is a named predicate over (user, item, request filters); `BusinessRules.select` walks a
ranked list, drops what any rule forbids, caps items per category for diversity, and stops at k.
One rule is always on, whatever the request: an item the catalog marks as not recommendable (fees,
postage, gift cards) is never shown, in any list. The facts come from the serving snapshot: the
catalog as of the serving cutoff (category, price, stock, whether the item may be recommended,
whether the category is bought again often enough to repeat) and what each user bought;
`OnlineFacts` adds what happened since (purchases and stock updates posted to `/events`). Of an
item's stock the newest word wins: an online update older than the catalog's stock (a catalog
delivered after the update) no longer applies.
"""

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

import polars as pl

from models.candidates import IS_RECOMMENDABLE
from models.features import ITEM_FEATURES
from shelfwise.lake import SERVING_ITEMS, SERVING_PURCHASES, Lake
from shelfwise.runtime.online_state import StockChange


@dataclass(frozen=True)
class RequestFilters:
    """What the shop asked for in this request.

    Attributes:
        category_ids: Only items of these categories, when given.
        exclude_item_ids: Never these items (already on the page, in the cart, ...).
        price_max: Only items at most this expensive, when given.
        in_stock_only: Only items in stock (the default).
    """

    category_ids: frozenset[str] | None = None
    exclude_item_ids: frozenset[str] = frozenset()
    price_max: float | None = None
    in_stock_only: bool = True


@dataclass(frozen=True)
class ItemFacts:
    """What the rules need to know about an item.

    `stock_updated_at_us` is when the catalog's `is_in_stock` was set (microseconds since the
    epoch; None: unknown, and then any online update is newer). `is_recommendable` is false for
    items that may be bought but are never shown (fees, postage, gift cards).
    """

    category_id: str | None
    price: float | None
    is_in_stock: bool
    is_repeatable: bool
    brand: str | None = None
    popularity: float = 0.0
    trending: float = 0.0
    stock_updated_at_us: int | None = None
    is_recommendable: bool = True


@dataclass(frozen=True)
class OnlineFacts:
    """What the service learned since the snapshot, for one request.

    Attributes:
        purchased: Items this user bought since the snapshot.
        stock: Stock updates posted to the service (item_id → the newest), for every user.
    """

    purchased: Collection[str] = frozenset()
    stock: Mapping[str, StockChange] = field(default_factory=dict)


NO_ONLINE_FACTS = OnlineFacts()

# A rule sees what the user bought, the item, its facts (None when unknown) and the request.
Rule = Callable[[Collection[str], str, ItemFacts | None, RequestFilters], bool]
# The rules whose verdict on an item for a user no request and no online fact changes
# (`BusinessRules.rejects_always`); ranked lists (`models.ranked_lists`) leave out what they
# reject. The others read the request's filters or the stock.
STATIC_RULES = frozenset({"not_recommendable", "already_bought"})
_ANY_REQUEST = RequestFilters()


@dataclass
class BusinessRules:
    """The rules and the facts they read.

    Args:
        items: Facts per item id (from the serving catalog snapshot).
        purchased: Item ids each user bought before the serving cutoff.
        max_per_category: At most this many items of one category per list (0: no cap).
    """

    items: dict[str, ItemFacts] = field(default_factory=dict)
    purchased: dict[str, set[str]] = field(default_factory=dict)
    max_per_category: int = 0

    def __post_init__(self) -> None:
        # Declarative: (name, rule); an item is shown only if every rule allows it. An item without
        # facts (no catalog snapshot) cannot be judged on its attributes and passes those rules.
        self.rules: list[tuple[str, Rule]] = [
            # Always on: no request can ask for an item the shop never wants recommended.
            ("not_recommendable", lambda b, i, f, r: f is None or f.is_recommendable),
            ("excluded_by_request", lambda b, i, f, r: i not in r.exclude_item_ids),
            ("out_of_stock", lambda b, i, f, r: f is None or not r.in_stock_only or f.is_in_stock),
            (
                "outside_requested_categories",
                lambda b, i, f, r: (
                    r.category_ids is None or (f is not None and f.category_id in r.category_ids)
                ),
            ),
            (
                "above_price_max",
                lambda b, i, f, r: (
                    r.price_max is None
                    or f is None
                    or (f.price is not None and f.price <= r.price_max)
                ),
            ),
            (
                "already_bought",
                lambda b, i, f, r: i not in b or (f is not None and f.is_repeatable),
            ),
        ]

    @classmethod
    def from_lake(
        cls, lake: Lake, max_per_category: int = 0, purchases: bool = True
    ) -> "BusinessRules":
        """Loads the facts the pipeline exported with the serving snapshot (empty when absent).

        Args:
            lake: The lake holding the serving snapshot.
            max_per_category: At most this many items of one category per list (0: no cap).
            purchases: Whether to load every user's purchases; not when the candidate store
                keeps them with each user (the users' values do: a dict of sets of every
                buyer's items cost 240 MB on the 10M-event shop).
        """
        load_purchases = purchases and lake.exists(SERVING_PURCHASES)
        return cls.from_frames(
            lake.read_frame(SERVING_ITEMS) if lake.exists(SERVING_ITEMS) else None,
            lake.read_frame(SERVING_PURCHASES) if load_purchases else None,
            max_per_category,
        )

    @classmethod
    def from_frames(
        cls,
        items_frame: pl.DataFrame | None,
        purchases: pl.DataFrame | None,
        max_per_category: int = 0,
    ) -> "BusinessRules":
        """The rules on the serving snapshot's facts.

        Args:
            items_frame: The item facts (`serving_facts`' items), or None when absent.
            purchases: user_id, item_id bought before the snapshot, or None when absent (or kept
                elsewhere: the online store keeps each user's with their candidates).
            max_per_category: At most this many items of one category per list (0: no cap).

        Returns:
            The rules with their facts.
        """
        items: dict[str, ItemFacts] = {}
        purchased: dict[str, set[str]] = {}
        if items_frame is not None:
            frame = items_frame
            if "stock_updated_at" in frame.columns:  # snapshots before it have no stock time
                frame = frame.with_columns(pl.col("stock_updated_at").dt.epoch("us"))

            def column(name: str, required: bool = False) -> list:
                """A column's values; None for each row when an older snapshot lacks it."""
                if required or name in frame.columns:
                    return frame.get_column(name).to_list()
                return [None] * frame.height

            # Column by column, not `iter_rows(named=True)`: a dict per row of every column
            # (the item features too) took half of this at a worker's start-up.
            for item_id, category, price, in_stock, repeatable, brand, *more in zip(
                *(column(name, True) for name in ("item_id", "category_id", "price")),
                column("is_in_stock", True),
                column("is_repeatable", True),
                column("brand"),
                column("popularity"),
                column("trending"),
                column("stock_updated_at"),
                column("is_recommendable"),
                strict=True,
            ):
                popularity, trending, stock_updated_at, is_recommendable = more
                items[item_id] = ItemFacts(
                    category,
                    price,
                    bool(in_stock),
                    bool(repeatable),
                    brand,
                    float(popularity or 0.0),
                    float(trending or 0.0),
                    stock_updated_at,
                    # Snapshots before the flag have none; null means the catalog said nothing.
                    is_recommendable is not False,
                )
        if purchases is not None:
            for user_id, item_ids in purchases.group_by("user_id").agg("item_id").iter_rows():
                purchased[user_id] = set(item_ids)
        return cls(items, purchased, max_per_category)

    def facts(self, item_id: str, online: OnlineFacts = NO_ONLINE_FACTS) -> ItemFacts | None:
        """The item's facts, with the online stock update if newer (None when nothing is known)."""
        facts = self.items.get(item_id)
        change = online.stock.get(item_id)
        if change is None:
            return facts
        if facts is None:
            return ItemFacts(None, None, change.in_stock, False)
        if (
            facts.stock_updated_at_us is not None
            and facts.stock_updated_at_us > change.updated_at_us
        ):
            return facts
        return replace(facts, is_in_stock=change.in_stock)

    def bought(self, user_id: str, online: OnlineFacts = NO_ONLINE_FACTS) -> Collection[str]:
        """Everything the user bought: before the snapshot and since."""
        before = self.purchased.get(user_id, frozenset())
        return before | set(online.purchased) if online.purchased else before

    def rejects_always(self, bought: Collection[str], item_id: str) -> bool:
        """Whether the rules reject an item for a user whatever the request and the online facts.

        Only `STATIC_RULES` decide it: the catalog's flag and purchases before the snapshot
        (later purchases only add to those, and a stock update changes no other fact).

        Args:
            bought: What the user bought before the snapshot.
            item_id: The item.
        """
        facts = self.items.get(item_id)
        return any(
            not rule(bought, item_id, facts, _ANY_REQUEST)
            for name, rule in self.rules
            if name in STATIC_RULES
        )

    def violated(
        self,
        user_id: str,
        item_id: str,
        filters: RequestFilters,
        online: OnlineFacts = NO_ONLINE_FACTS,
    ) -> list[str]:
        """The names of the rules that forbid showing this item to this user."""
        return self._violated(self.bought(user_id, online), item_id, filters, online)

    def _allows(
        self, bought: Collection[str], item_id: str, filters: RequestFilters, online: OnlineFacts
    ) -> bool:
        """Whether every rule allows the item (`_violated` is empty), stopping at the first no."""
        facts = self.facts(item_id, online)
        for _, rule in self.rules:
            if not rule(bought, item_id, facts, filters):
                return False
        return True

    def _violated(
        self, bought: Collection[str], item_id: str, filters: RequestFilters, online: OnlineFacts
    ) -> list[str]:
        facts = self.facts(item_id, online)
        return [name for name, rule in self.rules if not rule(bought, item_id, facts, filters)]

    def select(
        self,
        user_id: str,
        ranked: Iterable[tuple[str, object]],
        filters: RequestFilters,
        k: int,
        already: Iterable[str] = (),
        online: OnlineFacts = NO_ONLINE_FACTS,
    ) -> list[tuple[str, object]]:
        """Takes up to k allowed items from a ranked list, best first, with the category cap.

        Args:
            user_id: The shopper.
            ranked: (item_id, payload) best first; the payload is passed through.
            filters: The request's filters.
            k: How many to take.
            already: Items chosen before (by an earlier list): not repeated, count for the cap.
            online: Purchases and stock updates since the snapshot.

        Returns:
            The chosen (item_id, payload) pairs.
        """
        chosen: list[tuple[str, object]] = []
        seen = set(already)
        capped = self.max_per_category > 0
        if capped:
            per_category = Counter(self.items[i].category_id for i in seen if i in self.items)
        bought = self.bought(user_id, online)
        for item_id, payload in ranked:
            if len(chosen) == k:
                break
            if item_id in seen or not self._allows(bought, item_id, filters, online):
                continue
            if capped and (facts := self.items.get(item_id)) is not None:
                category = facts.category_id
                if category is not None:
                    if per_category[category] >= self.max_per_category:
                        continue
                    per_category[category] += 1
            seen.add(item_id)
            chosen.append((item_id, payload))
        return chosen


def serving_facts(
    item_features: pl.DataFrame,
    repurchase_rates: pl.DataFrame,
    user_items: pl.DataFrame,
    min_repeat_rate: float,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The facts the rules read, as of the serving cutoff, for the serving snapshot.

    Args:
        item_features: `item_features` at the serving cutoff.
        repurchase_rates: `category_repurchase_rates` at the serving cutoff.
        user_items: `user_item_features` at the serving cutoff.
        min_repeat_rate: Categories at or above this repeat-purchase rate are repeatable.

    Returns:
        `(items, purchases)`: item_id, category_id, price, is_in_stock, stock_updated_at,
        is_repeatable, brand, popularity, trending (decayed popularity times trend),
        is_recommendable (true when the mart predates the flag) and the item's
        part of the ranker's feature vector (`ITEM_FEATURES`, for candidates found in real time);
        and the (user_id, item_id) pairs the users bought.
    """
    flag = (
        pl.col(IS_RECOMMENDABLE).fill_null(True)
        if IS_RECOMMENDABLE in item_features.columns
        else pl.lit(True).alias(IS_RECOMMENDABLE)
    )
    items = item_features.join(
        repurchase_rates.select("as_of", "category_id", "repeat_rate"),
        on=["as_of", "category_id"],
        how="left",
    ).select(
        "item_id",
        "category_id",
        "price",
        "is_in_stock",
        "stock_updated_at",
        (pl.col("repeat_rate").fill_null(0.0) >= min_repeat_rate).alias("is_repeatable"),
        "brand",
        pl.col("popularity").cast(pl.Float64),
        (pl.col("popularity") * pl.col("trend")).cast(pl.Float64).alias("trending"),
        flag,
        *[pl.col(k).cast(pl.Float32).alias(v) for k, v in ITEM_FEATURES.items()],
    )
    purchases = user_items.filter(pl.col("purchases") > 0).select("user_id", "item_id")
    return items, purchases
