"""A deterministic synthetic shop: catalog, users and a stream of behaviour events.

`generate_shop` builds a shop whose events carry structure a recommender can learn and a test can
check; `write_shop` lands it in the lake. Everything is a pure function of `ShopConfig`: the same
config gives byte-identical tables. The random draws never depend on `end_date`; all times are
drawn as offsets from the window start and shifted at the end, so `end_date` only moves the
timestamps. The work is vectorised with numpy (loops run over days, categories or repeat-purchase
generations, never over events or sessions).

The model:

* Categories: 8 top-level categories ("t0".."t7"), each with 3-6 leaves ("c0", "c1", ...; the
  `category_id` of an item), `category_path` "Top > Leaf". About a quarter of the leaves are
  consumable (coffee, pet food, skincare...). Each leaf has a median price and a popularity.
* Brands: 100-200, each tied to 1-3 top-level categories, with a heavy-tailed size.
* Items: leaf, brand (one tied to the leaf's top category), log-normal price around the leaf
  median, heavy-tailed base popularity and a trend. About 70% exist before the window; the rest
  are created on every day of the window and can be seen from the day after their creation.
  About 5% go out of stock inside the window (`is_in_stock` False): no cart or purchase after
  that time, and views drop to 15% from the next day.
* Popularity of item i on day d (0 = first day of the window) is
  `base_popularity * exp(trend_slope * (d - (days - 1) / 2))`.
* Users: "u<n>", about 60% signed up before the window and the rest on every day of it, no event
  before `signed_up_at`. Each has 2-4 taste leaves (Dirichlet weights, mostly within one
  top-level category), favourite brands found in those leaves, a preferred price level and a
  heavy-tailed activity.
* Sessions: a user's sessions are spread over the time they are active (evening-heavy by hour of
  day). A session picks a leaf from the user's tastes (88%) or from the global leaf popularity
  (12%) and views about 5 items of it (12% of later views stray to another leaf). Items are drawn
  with probability proportional to popularity(day) x brand affinity x price fit, among items
  created before that day (sampling-importance-resampling from 8 popularity-drawn candidates).
* Funnel: a view is added to the cart (once per item and session) with a probability that grows
  with the taste fit (price fit, favourite brand, taste leaf); at the end of some sessions carts
  are purchased (a few at a small discount), some other carts are removed. Cart/purchase quantity
  is 1-3, views 1. In regular sessions a user buys a non-consumable item at most once.
* Repeat purchases: a purchase in a consumable leaf is bought again, with probability 0.55,
  after about the leaf's `repurchase_days` (in a short "buy again" session); other purchases are
  repeated with probability 0.02.

Ground truth (`Shop.ground_truth`, written to `ground_truth/{name}.parquet`):

* `categories`: category_id, category_name, category_path, top_category_id, top_category_name,
  is_consumable, repurchase_days (null unless consumable), price_median, popularity (share of
  sessions picked from the global popularity).
* `brands`: brand, top_category_ids (list of "t<n>"), size (relative weight among a category's
  brands).
* `user_category_tastes`: user_id, category_id, weight (a user's weights sum to 1; used for 88%
  of sessions).
* `user_brand_affinities`: user_id, brand, affinity (multiplier of an item's choice weight;
  brands not listed have 1).
* `user_profiles`: user_id, price_level (preferred log price relative to the leaf median; the
  price fit is `exp(-0.5 * ((log(price / median) - price_level) / 0.55) ** 2)`), activity
  (relative session rate, mean 1), top_category_id (the top-level category most tastes are in).
* `item_profiles`: item_id, category_id, brand, base_popularity (mean 1), is_consumable, trend
  ("rising", "falling" or "steady"), trend_slope (change of log popularity per day, pivot at the
  middle of the window), out_of_stock_at (null when always in stock).
"""

import datetime
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shelfwise.contracts import (
    EVENT_TYPES,
    EVENTS_SCHEMA,
    ITEMS_SCHEMA,
    TIMESTAMP,
    USERS_SCHEMA,
    conform,
)
from shelfwise.lake import (
    LANDING_EVENTS,
    LANDING_ITEMS,
    LANDING_USERS,
    Lake,
    dataset_file,
    ground_truth_table,
)

DAY = 86_400.0
SOURCE = "generator"

VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE = (EVENT_TYPES.index(name) for name in EVENT_TYPES)

# Top-level categories: name, median price, leaves as (name, is_consumable).
_TAXONOMY: tuple[tuple[str, float, tuple[tuple[str, bool], ...]], ...] = (
    (
        "Electronics",
        120.0,
        (
            ("Headphones", False),
            ("Smartphones", False),
            ("Laptops", False),
            ("Cameras", False),
            ("Smart Home", False),
            ("Batteries", True),
        ),
    ),
    (
        "Home & Kitchen",
        45.0,
        (
            ("Cookware", False),
            ("Bedding", False),
            ("Furniture", False),
            ("Lighting", False),
            ("Storage", False),
            ("Cleaning Supplies", True),
        ),
    ),
    (
        "Fashion",
        60.0,
        (
            ("Sneakers", False),
            ("Jackets", False),
            ("Dresses", False),
            ("Bags", False),
            ("Watches", False),
            ("Socks", False),
        ),
    ),
    (
        "Sports & Outdoors",
        50.0,
        (
            ("Running", False),
            ("Cycling", False),
            ("Camping", False),
            ("Fitness", False),
            ("Yoga", False),
            ("Sports Nutrition", True),
        ),
    ),
    (
        "Toys & Games",
        30.0,
        (
            ("Board Games", False),
            ("Puzzles", False),
            ("Building Sets", False),
            ("Dolls", False),
            ("Outdoor Toys", False),
            ("Video Games", False),
        ),
    ),
    (
        "Books & Media",
        15.0,
        (
            ("Fiction", False),
            ("Cookbooks", False),
            ("Comics", False),
            ("Children's Books", False),
            ("Music", False),
            ("Travel Guides", False),
        ),
    ),
    (
        "Beauty & Personal Care",
        18.0,
        (
            ("Skincare", True),
            ("Hair Care", True),
            ("Makeup", True),
            ("Fragrance", False),
            ("Shaving", True),
            ("Hair Tools", False),
        ),
    ),
    (
        "Grocery & Pets",
        9.0,
        (
            ("Coffee", True),
            ("Tea", True),
            ("Snacks", True),
            ("Pet Food", True),
            ("Breakfast", True),
            ("Pasta & Sauces", True),
        ),
    ),
)

_BRAND_HEADS = (
    "Al", "Bel", "Cor", "Dal", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lum",
    "Mar", "Nor", "Or", "Pel", "Quin", "Ros", "Sol", "Tor", "Ul", "Ver", "Wil", "Zen",
)  # fmt: skip
_BRAND_TAILS = (
    "a", "ex", "ico", "ion", "is", "ara", "ova", "ent", "ix", "on", "ura", "vik",
    "wood", "line", "core", "max",
)  # fmt: skip

_COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "PL", "SE", "CA")
_COUNTRY_P = (0.30, 0.12, 0.12, 0.10, 0.07, 0.07, 0.06, 0.06, 0.05, 0.05)
_DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_P = (0.55, 0.35, 0.10)
# Relative session starts per UTC hour (evening-heavy).
_HOURLY = (2, 1.5, 1, 1, 1, 1.5, 2.5, 4, 5, 5.5, 6, 6, 6.5, 6, 6, 6, 6.5, 7, 8, 9, 9.5, 8.5, 6, 4)

_NEW_ITEM_SHARE = 0.30
_NEW_USER_SHARE = 0.40
_OUT_OF_STOCK_SHARE = 0.05
_TASTE_SLOTS = 4
_EXPLORE = 0.12  # share of sessions whose leaf comes from the global popularity
_STRAY = 0.12  # share of later views in a session that go to another leaf
_CANDIDATES = 8
_PRICE_FIT_WIDTH = 0.55
_VIEW_STOP = 0.2  # views per session: geometric with this stop probability (mean 5)
_MAX_VIEWS = 40
_SLACK = 1_500.0  # seconds kept after a session's last view for carts, removals and checkout
_REPEAT_CONSUMABLE = 0.55
_REPEAT_OTHER = 0.02
# Events per view: the funnel, plus repeat purchases that grow with the window (measured).
_FUNNEL_EVENTS_PER_VIEW = 1.142
_REPEAT_EVENTS_PER_VIEW = 0.045

# Stages of the random stream; each stage has its own generator so stages stay independent.
_RNG_CATEGORIES, _RNG_BRANDS, _RNG_ITEMS, _RNG_USERS, _RNG_SESSIONS = 1, 2, 3, 4, 5
_RNG_DAY, _RNG_FUNNEL, _RNG_REPEAT = 6, 7, 8


@dataclass(frozen=True)
class ShopConfig:
    """Size and seed of a synthetic shop.

    Attributes:
        users: Number of users.
        items: Number of items (at least 100).
        days: Length of the event window in days.
        events: Target number of events; the result is within about ±5%.
        seed: Seed of every random draw (not negative).
        end_date: Exclusive end of the window (midnight UTC); None means today (UTC).
    """

    users: int = 20_000
    items: int = 5_000
    days: int = 42
    events: int = 500_000
    seed: int = 7
    end_date: datetime.date | None = None


@dataclass(frozen=True)
class Shop:
    """A generated shop.

    Attributes:
        items: The catalog, conformed to `ITEMS_SCHEMA`.
        users: The users, conformed to `USERS_SCHEMA`.
        events: The events, conformed to `EVENTS_SCHEMA`, sorted by `occurred_at`.
        ground_truth: The latent structure by name (see the module docstring).
    """

    items: pa.Table
    users: pa.Table
    events: pa.Table
    ground_truth: dict[str, pa.Table]


@dataclass(frozen=True)
class _Categories:
    names: list[str]  # leaf names
    top: np.ndarray  # top-level index per leaf
    consumable: np.ndarray
    median: np.ndarray  # median price per leaf
    popularity: np.ndarray  # sums to 1
    repurchase_days: np.ndarray  # NaN unless consumable


@dataclass(frozen=True)
class _Brands:
    names: list[str]
    tops: np.ndarray  # bool (brands, tops)
    size: np.ndarray


@dataclass(frozen=True)
class _Items:
    leaf: np.ndarray
    brand: np.ndarray
    price: np.ndarray
    rel_log_price: np.ndarray  # log(price / leaf median)
    base_popularity: np.ndarray
    trend: np.ndarray  # 0 steady, 1 rising, 2 falling
    trend_slope: np.ndarray
    created: np.ndarray  # seconds from the window start (negative: before the window)
    out_of_stock: np.ndarray  # seconds from the window start, inf when always in stock
    model_number: np.ndarray


@dataclass(frozen=True)
class _Users:
    signup: np.ndarray  # seconds from the window start
    country: np.ndarray
    device: np.ndarray
    activity: np.ndarray
    price_level: np.ndarray
    top: np.ndarray
    taste_leaf: np.ndarray  # (users, slots), -1 padded
    taste_weight: np.ndarray  # (users, slots), 0 padded
    fav_brand: np.ndarray  # (users, slots), -1 padded
    fav_affinity: np.ndarray  # (users, slots), 1 padded


@dataclass
class _Events:
    time: np.ndarray  # seconds from the window start
    user: np.ndarray
    session: np.ndarray
    item: np.ndarray
    kind: np.ndarray
    quantity: np.ndarray
    price: np.ndarray


def _rng(seed: int, stage: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, *extra])


def _check(config: ShopConfig) -> None:
    if config.items < 100:
        raise ValueError(f"items must be at least 100, got {config.items}")
    if config.users < 1 or config.days < 1 or config.events < 1 or config.seed < 0:
        raise ValueError(f"users, days and events must be positive, seed not negative: {config}")


def _make_categories(seed: int) -> _Categories:
    rng = _rng(seed, _RNG_CATEGORIES)
    names: list[str] = []
    tops: list[int] = []
    consumable: list[bool] = []
    medians: list[float] = []
    for top, (_, median, leaves) in enumerate(_TAXONOMY):
        count = int(rng.integers(3, len(leaves) + 1))
        chosen = np.sort(rng.choice(len(leaves), size=count, replace=False))
        factors = np.exp(rng.normal(0.0, 0.35, size=count))
        for index, factor in zip(chosen, factors, strict=True):
            names.append(leaves[index][0])
            consumable.append(leaves[index][1])
            tops.append(top)
            medians.append(median * float(factor))
    leaf_count = len(names)
    popularity = rng.lognormal(0.0, 0.5, size=leaf_count)
    cycles = rng.uniform(5.0, 15.0, size=leaf_count)
    is_consumable = np.array(consumable)
    return _Categories(
        names=names,
        top=np.array(tops, dtype=np.int16),
        consumable=is_consumable,
        median=np.array(medians),
        popularity=popularity / popularity.sum(),
        repurchase_days=np.where(is_consumable, cycles, np.nan),
    )


def _make_brands(seed: int, items: int) -> _Brands:
    rng = _rng(seed, _RNG_BRANDS)
    count = int(np.clip(round(2 * np.sqrt(items)), 100, 200))
    pool = [head + tail for head in _BRAND_HEADS for tail in _BRAND_TAILS]
    names = [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]
    top_count = len(_TAXONOMY)
    tops = np.zeros((count, top_count), dtype=bool)
    tops[np.arange(count), rng.permutation(count) % top_count] = True
    extra = rng.choice(3, size=count, p=(0.55, 0.33, 0.12))
    keys = rng.random((count, top_count)) + tops  # the primary category sorts last
    ranked = np.argsort(keys, axis=1)
    for slot in range(2):
        chosen = extra > slot
        tops[np.flatnonzero(chosen), ranked[chosen, slot]] = True
    return _Brands(names=names, tops=tops, size=rng.lognormal(0.0, 1.0, size=count))


def _stratified_days(rng: np.random.Generator, count: int, days: int) -> np.ndarray:
    """Offsets (seconds) spread over every day of the window when count >= days."""
    day = (rng.permutation(count) * days) // max(count, 1)
    return day * DAY + rng.uniform(0.0, DAY, size=count)


def _make_items(config: ShopConfig, cats: _Categories, brands: _Brands) -> _Items:
    rng = _rng(config.seed, _RNG_ITEMS)
    n, leaf_count, window = config.items, len(cats.names), config.days * DAY
    # Two old items per leaf, the rest spread by leaf popularity; shuffled so ids hide the leaf.
    guaranteed = np.tile(np.arange(leaf_count), 2)
    share = cats.popularity**0.8
    rest = rng.choice(leaf_count, size=n - guaranteed.size, p=share / share.sum())
    leaf = np.concatenate([guaranteed, rest]).astype(np.int16)
    must_be_old = np.arange(n) < guaranteed.size
    shuffle = rng.permutation(n)
    leaf, must_be_old = leaf[shuffle], must_be_old[shuffle]

    brand = np.zeros(n, dtype=np.int16)
    for top in range(len(_TAXONOMY)):
        members = np.flatnonzero(cats.top[leaf] == top)
        allowed = np.flatnonzero(brands.tops[:, top])
        weight = brands.size[allowed]
        brand[members] = allowed[
            rng.choice(allowed.size, size=members.size, p=weight / weight.sum())
        ]

    rel_log_price = rng.normal(0.0, 0.5, size=n)
    price = np.maximum(np.floor(cats.median[leaf] * np.exp(rel_log_price)), 0.0) + 0.99
    rel_log_price = np.log(price / cats.median[leaf])

    base = rng.lognormal(0.0, 1.2, size=n)
    base_popularity = base / base.mean()
    trend = rng.choice(3, size=n, p=(0.7, 0.15, 0.15)).astype(np.int8)
    change = rng.uniform(0.8, 2.5, size=n)
    steady = rng.normal(0.0, 0.15, size=n)
    slope = np.select([trend == 1, trend == 2], [change, -change], steady) / config.days

    free_share = _NEW_ITEM_SHARE * n / (n - guaranteed.size)
    is_new = (rng.random(n) < free_share) & ~must_be_old
    created = -rng.uniform(1.0, 730.0, size=n) * DAY
    created[is_new] = _stratified_days(rng, int(is_new.sum()), config.days)

    out_of_stock = np.full(n, np.inf)
    eligible = np.flatnonzero(created < window - 2 * DAY)
    count = min(int(round(_OUT_OF_STOCK_SHARE * n)), eligible.size)
    chosen = np.sort(rng.choice(eligible, size=count, replace=False))
    low = np.maximum(created[chosen] + DAY, 0.0)
    out_of_stock[chosen] = low + rng.random(count) * (window - low)
    return _Items(
        leaf=leaf,
        brand=brand,
        price=price,
        rel_log_price=rel_log_price,
        base_popularity=base_popularity,
        trend=trend,
        trend_slope=slope,
        created=created,
        out_of_stock=out_of_stock,
        model_number=rng.integers(100, 1000, size=n),
    )


def _leaf_index(leaf: np.ndarray, leaf_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items sorted by leaf, and each leaf's [start, end) in that order."""
    order = np.argsort(leaf, kind="stable")
    bounds = np.searchsorted(leaf[order], np.arange(leaf_count + 1))
    return order, bounds[:-1], bounds[1:]


def _draw_in_leaves(
    rng: np.random.Generator,
    cumulative: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    leaves: np.ndarray,
    shape: tuple[int, ...],
) -> np.ndarray:
    """Positions in leaf order, drawn within each given leaf proportionally to the weights.

    Args:
        rng: The random stream.
        cumulative: Cumulative weights of the items in leaf order.
        low: Cumulative weight before each leaf.
        high: Cumulative weight at the end of each leaf (> low).
        leaves: The leaf of each draw, shape `shape[0]`.
        shape: Shape of the result; the first axis follows `leaves`.

    Returns:
        Positions into the leaf order; an item of zero weight is never drawn.
    """
    lo = low[leaves].reshape((-1,) + (1,) * (len(shape) - 1))
    hi = high[leaves].reshape(lo.shape)
    target = np.minimum(lo + rng.random(shape) * (hi - lo), np.nextafter(hi, 0.0))
    return np.searchsorted(cumulative, target, side="right")


def _make_users(config: ShopConfig, cats: _Categories, items: _Items) -> _Users:
    rng = _rng(config.seed, _RNG_USERS)
    n, leaf_count = config.users, len(cats.names)
    is_new = rng.random(n) < _NEW_USER_SHARE
    signup = -rng.uniform(1.0, 1000.0, size=n) * DAY
    signup[is_new] = _stratified_days(rng, int(is_new.sum()), config.days)
    country = rng.choice(len(_COUNTRIES), size=n, p=_COUNTRY_P).astype(np.int8)
    device = rng.choice(len(_DEVICES), size=n, p=_DEVICE_P).astype(np.int8)
    activity = rng.lognormal(0.0, 1.1, size=n)
    activity /= activity.mean()
    price_level = rng.normal(0.0, 0.45, size=n)

    top_popularity = np.bincount(cats.top, weights=cats.popularity, minlength=len(_TAXONOMY))
    top = rng.choice(len(_TAXONOMY), size=n, p=top_popularity / top_popularity.sum())
    top = top.astype(np.int16)
    slots = min(_TASTE_SLOTS, leaf_count)
    taste_leaf = np.empty((n, slots), dtype=np.int16)
    log_pop = np.log(cats.popularity).astype(np.float32)
    for start in range(0, n, 100_000):  # Gumbel top-k, by chunks to bound memory
        stop = min(start + 100_000, n)
        keys = rng.gumbel(size=(stop - start, leaf_count)).astype(np.float32) + log_pop
        keys += 1.5 * (cats.top[None, :] == top[start:stop, None])
        taste_leaf[start:stop] = np.argsort(-keys, axis=1)[:, :slots]
    count = np.minimum(rng.choice((2, 3, 4), size=n, p=(0.35, 0.4, 0.25)), slots)
    used = np.arange(slots)[None, :] < count[:, None]
    weight = rng.gamma(1.0, size=(n, slots)) * used
    taste_weight = weight / weight.sum(axis=1, keepdims=True)
    taste_leaf[~used] = -1

    # A favourite brand for most taste leaves: the brand of an item of that leaf.
    order, low_idx, high_idx = _leaf_index(items.leaf, leaf_count)
    cumulative = np.cumsum(items.base_popularity[order])
    before = np.concatenate([[0.0], cumulative])
    leaves = np.where(used, taste_leaf, 0).ravel()
    position = _draw_in_leaves(
        rng, cumulative, before[low_idx], before[high_idx], leaves, (leaves.size,)
    )
    fav_brand = items.brand[order[position]].reshape(n, slots).astype(np.int16)
    has_favourite = used & (rng.random((n, slots)) < 0.7)
    fav_brand[~has_favourite] = -1
    fav_affinity = np.where(has_favourite, rng.uniform(2.5, 6.0, size=(n, slots)), 1.0)
    return _Users(
        signup=signup,
        country=country,
        device=device,
        activity=activity,
        price_level=price_level,
        top=top,
        taste_leaf=taste_leaf,
        taste_weight=taste_weight,
        fav_brand=fav_brand,
        fav_affinity=fav_affinity,
    )


def _events_per_view(days: int) -> float:
    """Expected events per view for a window length (calibrates the number of views)."""
    return _FUNNEL_EVENTS_PER_VIEW + _REPEAT_EVENTS_PER_VIEW * days / (days + 30)


def _hour_of_day(fraction: np.ndarray) -> np.ndarray:
    """Maps uniform day fractions to seconds of day following the hourly profile."""
    weight = np.array(_HOURLY, dtype=float)
    cdf = np.concatenate([[0.0], np.cumsum(weight / weight.sum())])
    hour = np.clip(np.searchsorted(cdf, fraction, side="right") - 1, 0, 23)
    within = (fraction - cdf[hour]) / (cdf[hour + 1] - cdf[hour])
    return (hour + within) * 3600.0


def _sample_taste(rng: np.random.Generator, users: _Users, user: np.ndarray) -> np.ndarray:
    cumulative = np.cumsum(users.taste_weight[user], axis=1)
    slot = (rng.random(user.size)[:, None] >= cumulative).sum(axis=1)
    slot = np.minimum(slot, (users.taste_leaf[user] >= 0).sum(axis=1) - 1)
    return users.taste_leaf[user, slot].astype(np.int16)


def _sample_global(rng: np.random.Generator, cats: _Categories, size: int) -> np.ndarray:
    cumulative = np.cumsum(cats.popularity)
    leaf = np.searchsorted(cumulative, rng.random(size) * cumulative[-1], side="right")
    return np.minimum(leaf, len(cats.names) - 1).astype(np.int16)


def _plan_sessions(
    config: ShopConfig, cats: _Categories, users: _Users
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sessions sorted by start and their views.

    Returns:
        `(session_user, session_start, view_session, view_time, view_leaf)`; views are grouped
        by session, in session order, and times are seconds from the window start.
    """
    rng = _rng(config.seed, _RNG_SESSIONS)
    window = config.days * DAY
    active_from = np.maximum(users.signup, 0.0)
    latest = window - 2 * _SLACK
    weight = users.activity * np.clip(latest - active_from, 0.0, None) / window
    # Draw a surplus of sessions, then keep a random subset whose views meet the target, so
    # the total does not carry the noise of the session counts and lengths.
    mean_views = (1 - (1 - _VIEW_STOP) ** _MAX_VIEWS) / _VIEW_STOP
    target_views = config.events / _events_per_view(config.days)
    total_weight = weight.sum()
    expected = 1.3 * target_views / mean_views * weight / (total_weight or 1.0)
    pool_user = np.repeat(np.arange(config.users, dtype=np.int32), rng.poisson(expected))
    pool_views = np.minimum(rng.geometric(_VIEW_STOP, size=pool_user.size), _MAX_VIEWS)
    priority = rng.permutation(pool_user.size)
    before = np.cumsum(pool_views[priority]) - pool_views[priority]
    kept = np.sort(priority[before < target_views])
    session_user, views = pool_user[kept], pool_views[kept]

    low = active_from[session_user]
    start = low + rng.random(session_user.size) * (latest - low)
    day = np.floor(start / DAY)
    shaped = day * DAY + _hour_of_day(rng.random(start.size))
    start = np.where((shaped >= low) & (shaped < latest), shaped, start)
    order = np.argsort(start, kind="stable")
    session_user, start, views = session_user[order], start[order], views[order]

    count = session_user.size
    first = np.cumsum(views) - views
    view_session = np.repeat(np.arange(count, dtype=np.int64), views)
    dwell = np.clip(rng.lognormal(np.log(30.0), 0.9, size=view_session.size), 2.0, 1200.0)
    dwell[first] = 0.0
    offset = np.cumsum(dwell)
    offset -= np.repeat(offset[first], views)
    span = offset[first + views - 1]
    room = window - _SLACK - start
    squeeze = np.where(span > room, room / np.maximum(span, 1e-9), 1.0)
    view_time = start[view_session] + offset * squeeze[view_session]

    session_leaf = np.where(
        rng.random(count) < _EXPLORE,
        _sample_global(rng, cats, count),
        _sample_taste(rng, users, session_user),
    )
    view_leaf = session_leaf[view_session]
    stray = rng.random(view_leaf.size) < _STRAY
    stray[first] = False
    stray_idx = np.flatnonzero(stray)
    from_taste = rng.random(stray_idx.size) < 2 / 3
    view_leaf[stray_idx] = np.where(
        from_taste,
        _sample_taste(rng, users, session_user[view_session[stray_idx]]),
        _sample_global(rng, cats, stray_idx.size),
    )
    return session_user, start, view_session, view_time, view_leaf


def _choose_items(
    config: ShopConfig,
    cats: _Categories,
    items: _Items,
    users: _Users,
    view_user: np.ndarray,
    view_day: np.ndarray,
    view_leaf: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws the viewed items, day by day.

    Returns:
        `(item, is_favourite_brand, price_fit)` per view.
    """
    leaf_count = len(cats.names)
    order, low_idx, high_idx = _leaf_index(items.leaf, leaf_count)
    item = np.empty(view_user.size, dtype=np.int32)
    favourite = np.empty(view_user.size, dtype=bool)
    price_fit = np.empty(view_user.size)
    bounds = np.searchsorted(view_day, np.arange(config.days + 1))
    pivot = (config.days - 1) / 2
    for day in range(config.days):
        begin, end = int(bounds[day]), int(bounds[day + 1])
        if begin == end:
            continue
        rng = _rng(config.seed, _RNG_DAY, day)
        day_start = day * DAY
        weight = items.base_popularity * np.exp(items.trend_slope * (day - pivot))
        weight = np.where(items.created < day_start, weight, 0.0)
        weight = np.where(items.out_of_stock < day_start, 0.15 * weight, weight)
        cumulative = np.cumsum(weight[order])
        before = np.concatenate([[0.0], cumulative])
        user = view_user[begin:end]
        position = _draw_in_leaves(
            rng,
            cumulative,
            before[low_idx],
            before[high_idx],
            view_leaf[begin:end],
            (end - begin, _CANDIDATES),
        )
        candidate = order[position]
        candidate_brand = items.brand[candidate]
        fav_brand, fav_affinity = users.fav_brand[user], users.fav_affinity[user]
        affinity = np.ones(candidate.shape)
        for slot in range(fav_brand.shape[1]):
            match = candidate_brand == fav_brand[:, slot, None]
            np.maximum(affinity, np.where(match, fav_affinity[:, slot, None], 1.0), out=affinity)
        gap = (items.rel_log_price[candidate] - users.price_level[user][:, None]) / _PRICE_FIT_WIDTH
        fit = np.exp(-0.5 * gap * gap)
        choice_weight = np.cumsum(affinity * fit, axis=1)
        target = rng.random(end - begin) * choice_weight[:, -1]
        pick = np.minimum((choice_weight < target[:, None]).sum(axis=1), _CANDIDATES - 1)
        rows = np.arange(end - begin)
        item[begin:end] = candidate[rows, pick]
        favourite[begin:end] = affinity[rows, pick] > 1.0
        price_fit[begin:end] = fit[rows, pick]
    return item, favourite, price_fit


def _quantity(rng: np.random.Generator, consumable: np.ndarray) -> np.ndarray:
    draw = rng.random(consumable.size)
    return np.where(
        consumable,
        1 + (draw > 0.55) + (draw > 0.85),
        1 + (draw > 0.80) + (draw > 0.95),
    ).astype(np.int8)


def _discounted(rng: np.random.Generator, price: np.ndarray) -> np.ndarray:
    off = np.where(rng.random(price.size) < 0.15, rng.choice((0.05, 0.1, 0.15, 0.2), price.size), 0)
    return np.round(price * (1.0 - off), 2)


def _funnel(
    config: ShopConfig,
    cats: _Categories,
    items: _Items,
    users: _Users,
    session_user: np.ndarray,
    view_session: np.ndarray,
    view_time: np.ndarray,
    view_leaf: np.ndarray,
    view_item: np.ndarray,
    favourite: np.ndarray,
    price_fit: np.ndarray,
) -> _Events:
    """Views plus the carts, removals and purchases they lead to."""
    rng = _rng(config.seed, _RNG_FUNNEL)
    view_user = session_user[view_session]
    in_taste = (users.taste_leaf[view_user] == view_leaf[:, None]).any(axis=1)
    fit = price_fit * np.where(favourite, 1.0, 0.5) * np.where(in_taste, 1.0, 0.5)
    consumable = cats.consumable[items.leaf[view_item]]
    p_cart = (0.015 + 0.17 * fit) * np.where(consumable, 1.3, 1.0)
    cart_time_all = view_time + rng.uniform(3.0, 90.0, size=view_time.size)
    is_cart = (rng.random(view_time.size) < p_cart) & (
        cart_time_all < items.out_of_stock[view_item]
    )
    cart = np.flatnonzero(is_cart)
    # An item goes to a session's cart once (at its first carted view).
    _, first_cart = np.unique(
        view_session[cart] * items.leaf.size + view_item[cart], return_index=True
    )
    cart = cart[np.sort(first_cart)]
    cart_item, cart_session = view_item[cart], view_session[cart]
    cart_time, cart_fit = cart_time_all[cart], fit[cart]
    cart_quantity = _quantity(rng, consumable[cart])

    count = session_user.size
    views = np.bincount(view_session, minlength=count)
    last_view = view_time[np.cumsum(views) - 1]
    checkout = rng.random(count) < 0.6
    checkout_time = last_view + 90.0 + rng.uniform(20.0, 300.0, size=count)  # after carts
    buys = checkout[cart_session] & (rng.random(cart.size) < 0.45 + 0.45 * cart_fit)
    # Purchases of one session share the checkout, a second apart.
    rank = np.arange(cart.size) - np.searchsorted(cart_session, cart_session, side="left")
    purchase_time = checkout_time[cart_session] + rank
    buys &= purchase_time < items.out_of_stock[cart_item]
    # A durable (non-consumable) item is bought once per user in regular sessions.
    candidate = np.flatnonzero(buys & ~consumable[cart])
    key = session_user[cart_session[candidate]].astype(np.int64) * items.leaf.size
    key += cart_item[candidate]
    order = np.lexsort((purchase_time[candidate], key))
    repeated = np.zeros(order.size, dtype=bool)
    repeated[1:] = key[order][1:] == key[order][:-1]
    buys[candidate[order[repeated]]] = False
    removes = ~buys & (rng.random(cart.size) < 0.3)
    remove_time = cart_time + rng.uniform(10.0, 600.0, size=cart.size)

    bought, removed = np.flatnonzero(buys), np.flatnonzero(removes)
    n_views = view_time.size
    return _Events(
        time=np.concatenate([view_time, cart_time, remove_time[removed], purchase_time[bought]]),
        user=session_user[
            np.concatenate(
                [view_session, cart_session, cart_session[removed], cart_session[bought]]
            )
        ],
        session=np.concatenate(
            [view_session, cart_session, cart_session[removed], cart_session[bought]]
        ),
        item=np.concatenate([view_item, cart_item, cart_item[removed], cart_item[bought]]),
        kind=np.repeat(
            np.array([VIEW, ADD_TO_CART, REMOVE_FROM_CART, PURCHASE], dtype=np.int8),
            [n_views, cart.size, removed.size, bought.size],
        ),
        quantity=np.concatenate(
            [
                np.ones(n_views, dtype=np.int8),
                cart_quantity,
                cart_quantity[removed],
                cart_quantity[bought],
            ]
        ),
        price=np.concatenate(
            [
                items.price[view_item],
                items.price[cart_item],
                items.price[cart_item[removed]],
                _discounted(rng, items.price[cart_item[bought]]),
            ]
        ),
    )


def _repeat_purchases(
    config: ShopConfig,
    cats: _Categories,
    items: _Items,
    events: _Events,
    first_session: int,
) -> tuple[_Events, np.ndarray]:
    """Short "buy again" sessions that follow purchases, generation after generation.

    Returns:
        The new events and the start time of each new session (numbered from `first_session`).
    """
    rng = _rng(config.seed, _RNG_REPEAT)
    latest = config.days * DAY - _SLACK
    purchase = events.kind == PURCHASE
    user, item, time = events.user[purchase], events.item[purchase], events.time[purchase]
    empty = np.empty(0)
    parts: list[tuple[np.ndarray, ...]] = [
        (user[:0], item[:0], empty, empty.astype(bool), empty, empty)
        + (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int8), empty)
    ]
    next_session = first_session
    while user.size:
        leaf = items.leaf[item]
        consumable = cats.consumable[leaf]
        again = rng.random(user.size) < np.where(consumable, _REPEAT_CONSUMABLE, _REPEAT_OTHER)
        interval = np.where(
            consumable,
            np.nan_to_num(cats.repurchase_days[leaf]) * rng.lognormal(0.0, 0.25, user.size),
            rng.uniform(2.0, 40.0, user.size),
        )
        start = time + interval * DAY
        has_view = rng.random(user.size) < 0.6
        cart_time = start + np.where(has_view, rng.uniform(5.0, 60.0, user.size), 0.0)
        purchase_time = cart_time + rng.uniform(20.0, 300.0, user.size)
        keep = again & (start < latest) & (purchase_time < items.out_of_stock[item])
        user, item, start = user[keep], item[keep], start[keep]
        has_view, cart_time, purchase_time = has_view[keep], cart_time[keep], purchase_time[keep]
        session = np.arange(next_session, next_session + user.size, dtype=np.int64)
        next_session += user.size
        quantity = _quantity(rng, cats.consumable[items.leaf[item]])
        price = _discounted(rng, items.price[item])
        parts.append(
            (user, item, start, has_view, cart_time, purchase_time, session, quantity, price)
        )
        time = purchase_time

    def cat(index: int) -> np.ndarray:
        return np.concatenate([part[index] for part in parts])

    user, item, start, has_view = cat(0), cat(1), cat(2), cat(3)
    cart_time, purchase_time, session, quantity, price = cat(4), cat(5), cat(6), cat(7), cat(8)
    viewed = np.flatnonzero(has_view)
    n_views, n = viewed.size, user.size
    repeat = _Events(
        time=np.concatenate([start[viewed], cart_time, purchase_time]),
        user=np.concatenate([user[viewed], user, user]),
        session=np.concatenate([session[viewed], session, session]),
        item=np.concatenate([item[viewed], item, item]),
        kind=np.repeat(np.array([VIEW, ADD_TO_CART, PURCHASE], dtype=np.int8), [n_views, n, n]),
        quantity=np.concatenate([np.ones(n_views, dtype=np.int8), quantity, quantity]),
        price=np.concatenate([items.price[item[viewed]], items.price[item], price]),
    )
    return repeat, start


def _numbered(prefix: str, numbers: np.ndarray) -> pa.Array:
    """Strings `prefix + str(number)`, built in Arrow."""
    text = pc.cast(pa.array(numbers, type=pa.int64()), pa.string())
    return pc.binary_join_element_wise(prefix, text, "")


def _timestamps(start_us: int, seconds: np.ndarray) -> pa.Array:
    micros = start_us + np.floor(seconds * 1e6).astype(np.int64)
    return pa.array(micros, type=pa.int64()).view(TIMESTAMP)


def _window_start_us(config: ShopConfig) -> int:
    end = config.end_date or datetime.datetime.now(datetime.UTC).date()
    start = datetime.datetime.combine(
        end - datetime.timedelta(days=config.days), datetime.time(), tzinfo=datetime.UTC
    )
    return int(start.timestamp()) * 1_000_000


def generate_shop(config: ShopConfig) -> Shop:
    """Generates a synthetic shop (see the module docstring for the model).

    Args:
        config: Sizes, seed and end of the window.

    Returns:
        The catalog, users, events sorted by time, and the ground truth.

    Raises:
        ValueError: The config is too small (fewer than 100 items, or a non-positive size) or
            the seed is negative.
    """
    _check(config)
    start_us = _window_start_us(config)
    cats = _make_categories(config.seed)
    brands = _make_brands(config.seed, config.items)
    items = _make_items(config, cats, brands)
    users = _make_users(config, cats, items)

    session_user, session_start, view_session, view_time, view_leaf = _plan_sessions(
        config, cats, users
    )
    view_user = session_user[view_session]
    view_day = np.floor(session_start / DAY).astype(np.int32)[view_session]
    view_item, favourite, price_fit = _choose_items(
        config, cats, items, users, view_user, view_day, view_leaf
    )
    del view_user, view_day
    events = _funnel(
        config,
        cats,
        items,
        users,
        session_user,
        view_session,
        view_time,
        view_leaf,
        view_item,
        favourite,
        price_fit,
    )
    del view_session, view_time, view_leaf, view_item, favourite, price_fit
    repeat, repeat_start = _repeat_purchases(config, cats, items, events, session_user.size)
    all_starts = np.concatenate([session_start, repeat_start])
    session_rank = np.empty(all_starts.size, dtype=np.int64)
    session_rank[np.argsort(all_starts, kind="stable")] = np.arange(all_starts.size)

    event_table = _events_table(config, events, repeat, session_rank, start_us)
    del events, repeat, session_rank
    return Shop(
        items=_items_table(config, cats, brands, items, start_us),
        users=_users_table(config, users, start_us),
        events=event_table,
        ground_truth=_ground_truth(config, cats, brands, items, users, start_us),
    )


def _events_table(
    config: ShopConfig, events: _Events, repeat: _Events, session_rank: np.ndarray, start_us: int
) -> pa.Table:
    """All events in one table sorted by time, with ids numbered in that order."""
    order = np.argsort(np.concatenate([events.time, repeat.time]), kind="stable")

    def merged(name: str) -> np.ndarray:
        return np.concatenate([getattr(events, name), getattr(repeat, name)])[order]

    count = order.size
    table = pa.table(
        {
            "event_id": _numbered(f"e{config.seed}-", np.arange(count)),
            "occurred_at": _timestamps(start_us, merged("time")),
            "user_id": _numbered("u", np.arange(config.users)).take(merged("user")),
            "session_id": _numbered(f"s{config.seed}-", np.arange(session_rank.size)).take(
                session_rank[merged("session")]
            ),
            "item_id": _numbered("i", np.arange(config.items)).take(merged("item")),
            "event_type": pa.array(EVENT_TYPES).take(merged("kind")),
            "quantity": pa.array(merged("quantity").astype(np.int32)),
            "price": pa.array(merged("price")),
            "rec_id": pa.nulls(count, pa.string()),
            "source": pa.array([SOURCE]).take(np.zeros(count, dtype=np.int8)),
        }
    )
    return conform(table, EVENTS_SCHEMA, "generator")


def _leaf_ids(count: int) -> pa.Array:
    return _numbered("c", np.arange(count))


def _category_paths(cats: _Categories) -> list[str]:
    return [f"{_TAXONOMY[top][0]} > {name}" for top, name in zip(cats.top, cats.names, strict=True)]


def _items_table(
    config: ShopConfig, cats: _Categories, brands: _Brands, items: _Items, start_us: int
) -> pa.Table:
    brand = pa.array(brands.names).take(items.brand)
    leaf_name = pa.array(cats.names).take(items.leaf)
    title = pc.binary_join_element_wise(
        brand, leaf_name, pc.cast(pa.array(items.model_number), pa.string()), " "
    )
    table = pa.table(
        {
            "item_id": _numbered("i", np.arange(config.items)),
            "title": title,
            "category_id": _leaf_ids(len(cats.names)).take(items.leaf),
            "category_path": pa.array(_category_paths(cats)).take(items.leaf),
            "brand": brand,
            "price": pa.array(items.price),
            "is_in_stock": pa.array(~np.isfinite(items.out_of_stock)),
            "created_at": _timestamps(start_us, items.created),
        }
    )
    return conform(table, ITEMS_SCHEMA, "generator")


def _users_table(config: ShopConfig, users: _Users, start_us: int) -> pa.Table:
    table = pa.table(
        {
            "user_id": _numbered("u", np.arange(config.users)),
            "signed_up_at": _timestamps(start_us, users.signup),
            "country": pa.array(_COUNTRIES).take(users.country),
            "device": pa.array(_DEVICES).take(users.device),
        }
    )
    return conform(table, USERS_SCHEMA, "generator")


def _ground_truth(
    config: ShopConfig,
    cats: _Categories,
    brands: _Brands,
    items: _Items,
    users: _Users,
    start_us: int,
) -> dict[str, pa.Table]:
    leaf_ids = _leaf_ids(len(cats.names))
    top_ids = _numbered("t", np.arange(len(_TAXONOMY)))
    top_names = pa.array([name for name, _, _ in _TAXONOMY])
    user_ids = _numbered("u", np.arange(config.users))
    brand_names = pa.array(brands.names)

    categories = pa.table(
        {
            "category_id": leaf_ids,
            "category_name": pa.array(cats.names),
            "category_path": pa.array(_category_paths(cats)),
            "top_category_id": top_ids.take(cats.top),
            "top_category_name": top_names.take(cats.top),
            "is_consumable": pa.array(cats.consumable),
            "repurchase_days": pa.array(cats.repurchase_days, from_pandas=True),
            "price_median": pa.array(cats.median),
            "popularity": pa.array(cats.popularity),
        }
    )
    brand_tops = [
        [f"t{top}" for top in np.flatnonzero(row)] for row in brands.tops
    ]  # at most 200 brands
    brand_table = pa.table(
        {
            "brand": brand_names,
            "top_category_ids": pa.array(brand_tops, type=pa.list_(pa.string())),
            "size": pa.array(brands.size),
        }
    )
    user_slot, slot = np.nonzero(users.taste_leaf >= 0)
    tastes = pa.table(
        {
            "user_id": user_ids.take(user_slot),
            "category_id": leaf_ids.take(users.taste_leaf[user_slot, slot]),
            "weight": pa.array(users.taste_weight[user_slot, slot]),
        }
    )
    fav_user, fav_slot = np.nonzero(users.fav_brand >= 0)
    fav_brand = users.fav_brand[fav_user, fav_slot]
    fav_affinity = users.fav_affinity[fav_user, fav_slot]
    # A brand picked for two taste leaves counts once, with its largest affinity.
    key = fav_user.astype(np.int64) * len(brands.names) + fav_brand
    order = np.lexsort((-fav_affinity, key))
    first = np.ones(order.size, dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    chosen = order[first]
    affinities = pa.table(
        {
            "user_id": user_ids.take(fav_user[chosen]),
            "brand": brand_names.take(fav_brand[chosen]),
            "affinity": pa.array(fav_affinity[chosen]),
        }
    )
    profiles = pa.table(
        {
            "user_id": user_ids,
            "price_level": pa.array(users.price_level),
            "activity": pa.array(users.activity),
            "top_category_id": top_ids.take(users.top),
        }
    )
    out_of_stock = np.where(np.isfinite(items.out_of_stock), items.out_of_stock, 0.0)
    item_profiles = pa.table(
        {
            "item_id": _numbered("i", np.arange(config.items)),
            "category_id": leaf_ids.take(items.leaf),
            "brand": brand_names.take(items.brand),
            "base_popularity": pa.array(items.base_popularity),
            "is_consumable": pa.array(cats.consumable[items.leaf]),
            "trend": pa.array(["steady", "rising", "falling"]).take(items.trend),
            "trend_slope": pa.array(items.trend_slope),
            "out_of_stock_at": pc.if_else(
                pa.array(np.isfinite(items.out_of_stock)),
                _timestamps(start_us, out_of_stock),
                pa.scalar(None, TIMESTAMP),
            ),
        }
    )
    return {
        "categories": categories,
        "brands": brand_table,
        "user_category_tastes": tastes,
        "user_brand_affinities": affinities,
        "user_profiles": profiles,
        "item_profiles": item_profiles,
    }


def write_shop(shop: Shop, lake: Lake, seed: int) -> dict[str, int]:
    """Lands a shop in the lake: events one file per UTC day, items, users and ground truth.

    Files: `landing/events/generated-seed{seed}-{YYYY-MM-DD}.parquet` (days with events),
    `landing/items/generated-seed{seed}.parquet`, `landing/users/generated-seed{seed}.parquet`
    and `ground_truth/{name}.parquet`.

    Args:
        shop: The generated shop.
        lake: Where to write.
        seed: The seed the shop was generated with (names the files).

    Returns:
        Counts: `events`, `items`, `users` (rows) and `files` (files written).
    """
    events = shop.events
    micros = events.column("occurred_at").cast(pa.int64()).to_numpy()
    files = 0
    if events.num_rows:
        day_us = 86_400 * 1_000_000
        first, last = int(micros[0] // day_us), int(micros[-1] // day_us)
        bounds = np.searchsorted(micros, np.arange(first, last + 2) * day_us)
        for index in range(last - first + 1):
            begin, end = int(bounds[index]), int(bounds[index + 1])
            if begin == end:
                continue
            date = datetime.date(1970, 1, 1) + datetime.timedelta(days=first + index)
            name = f"generated-seed{seed}-{date.isoformat()}"
            lake.write_parquet(events.slice(begin, end - begin), dataset_file(LANDING_EVENTS, name))
            files += 1
    lake.write_parquet(shop.items, dataset_file(LANDING_ITEMS, f"generated-seed{seed}"))
    lake.write_parquet(shop.users, dataset_file(LANDING_USERS, f"generated-seed{seed}"))
    files += 2
    for name, table in shop.ground_truth.items():
        lake.write_parquet(table, ground_truth_table(name))
        files += 1
    return {
        "events": events.num_rows,
        "items": shop.items.num_rows,
        "users": shop.users.num_rows,
        "files": files,
    }
