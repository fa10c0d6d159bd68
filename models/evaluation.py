"""Offline evaluation on the held-out window after the evaluation cutoff (a time split).

Every approach — the ranker and each baseline — is a recommendation frame (as_of, user_id,
item_id, rank) for the same users, scored against the same labels by the same metric code
(`models.metrics`). The baselines are pure functions of the feature marts (and, for the oracle,
of the generator's ground truth), so each can be tested on a few hand-made rows.

Approaches (`evaluate`):

* `ranker`: the LambdaRank scores of the candidates;
* `candidate_order`: the candidates in the generators' own order (`candidate_rank`);
* `covisitation`: the candidates that co-visitation proposed, by `covisit_score`;
* `buy_again`: the user's own past items by purchases, then interactions, then recency;
* `popularity`: the most popular items as of the cutoff, the same for everyone;
* `trending`: items by `trend x views in the last 7 days`, the same for everyone;
* `oracle` (only with the generator's ground truth): the candidates by their true preference;
* `production` (when given): the model in production today, scored on the same candidates.
* the strong baselines of `models.baselines` (when the interaction history is given):
  `buy_again_recency`, `basket_cooccurrence`, `item_knn`, `ease` and `blend` (buy-again mixed
  with one of the others, chosen on a validation cutoff). They are baselines like the others:
  the best baseline of the report and of the gate is the best of all of them.

How sure the numbers are: every per-user metric (`ndcg`, `recall`, `map`, `hit_rate`, `mrr` at
each k) gets a 95% percentile-bootstrap interval over the evaluated users (`models.confidence`:
1,000 seeded resamples), and the ranker gets a *paired* difference against every other
approach: the same resampled users for both, so what the two share cancels. Coverage and
novelty describe all the lists together (a share of the catalog, a mean over recommended
slots), not a mean over users, so they get no interval. The per-user values come from
`models.metrics.per_user_metrics`, the code behind every mean.

Two more views of the same approaches and users:

* `new_items_only` (`NewItemsView`): what is new to each customer. A past item is any item the
  user interacted with before the cutoff (`past_items`: a view, cart or purchase); past items
  leave each approach's ranking *before* it is cut to k (`without_past_items`; the ranker and
  the candidate-based approaches rank all their candidates, popularity and trending their whole
  list, the strong baselines their top `DEPTH`; an approach with only k items keeps what
  remains) and leave the truth; users left without a positive drop out. Intervals and paired
  differences as above.
* each segment against its fallback (`segment_vs_fallback`): the ranker minus `popularity` on
  the segment's users, paired, and the segment policy of `models.segments` (chosen on the
  validation cutoff) saying who serves it; `EvaluationReport.segments_as_served` is what the
  promotion gate reads.

A baseline the data cannot define is not scored 0 but listed as not applicable, with the
reason (`not_applicable_baselines`): it is absent from the metrics and cannot be the "best
baseline" the ranker must beat.

Baselines never recommend an item whose `is_recommendable` is false (fees, postage); an
absent column or a null counts as recommendable. (The candidates exclude them upstream.)

The label window (`label_window_days` of the `feature_cutoffs` config, 7 by default) is what
"held out" means: the evaluated users are those with a positive in it. Choose it by the shop's
buying rhythm: 7 to 14 days for a weekly grocer, 28 or more for a fashion shop or a wholesaler
whose customers order monthly; the window must hold enough purchases per evaluated user to rank
against, and stay short relative to the data's length (the training cutoffs need room before it).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import lightgbm as lgb
import numpy as np
import polars as pl

from models.baselines import Validation, strong_baselines
from models.candidates import popular_items
from models.confidence import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    bootstrap_means,
    percentile_interval,
)
from models.features import feature_matrix
from models.metrics import (
    QUERY,
    evaluation_metrics,
    item_interactions,
    list_metrics,
    mean_metrics,
    per_user_metrics,
    top_k,
)
from models.segments import (
    FALLBACK,
    FALLBACK_APPROACH,
    SEGMENTS,
    SegmentPolicy,
    choose_segment_policy,
    default_policy,
)
from models.segments import RANKER as SEGMENT_RANKER

RANKER = "ranker"
PRODUCTION = "production"
ORACLE = "oracle"
# Approaches that are not baselines: the candidate itself, the model in production and the oracle
# (an upper bound, not something to beat).
NOT_BASELINES = (RANKER, PRODUCTION, ORACLE)
# Suffixes of the interval and paired keys in `EvaluationReport.to_dict` (a 95% interval).
CI_SUFFIX = "_ci95"
DIFF_SUFFIX = "_diff"
# The generator's constants (shelfwise/intake/generate.py): share of sessions whose leaf comes from
# the global leaf popularity, width of the price fit, and the view weight of an out-of-stock
# item.
_EXPLORE = 0.12
_PRICE_FIT_WIDTH = 0.55
_OUT_OF_STOCK_WEIGHT = 0.15
_DAY_SECONDS = 86_400.0
ORACLE_TABLES = ("user_category_tastes", "user_brand_affinities", "item_profiles")


def score_with_ranker(assembled: pl.DataFrame, booster: lgb.Booster) -> pl.DataFrame:
    """Adds the ranker's score to assembled candidate rows."""
    scores = booster.predict(
        feature_matrix(assembled), num_threads=booster.params.get("num_threads", 0)
    )
    return assembled.with_columns(pl.Series("score", scores, dtype=pl.Float64))


def evaluated_users(labels: pl.DataFrame) -> pl.DataFrame:
    """The users every average is over: those with at least one positive label.

    Args:
        labels: Columns as_of, user_id, item_id, label.

    Returns:
        Unique as_of, user_id.
    """
    return labels.filter(pl.col("label") > 0).select(QUERY).unique().sort(QUERY)


def _same_for_everyone(users: pl.DataFrame, ranked: pl.DataFrame) -> pl.DataFrame:
    return (
        users.select(QUERY)
        .unique()
        .join(ranked.select("as_of", "item_id", "rank"), on="as_of", how="inner")
        .select(*QUERY, "item_id", pl.col("rank").cast(pl.Int64))
        .sort(*QUERY, "rank")
    )


def recommendable_items(item_features: pl.DataFrame) -> pl.DataFrame:
    """The rows of items that may be recommended: `is_recommendable` not false.

    Fees and postage are countable as history but never recommended. Marts written before the
    column existed lack it, and a null means the shop did not say: both count as recommendable.

    Args:
        item_features: The `item_features` mart (as_of, item_id, optionally is_recommendable).

    Returns:
        The rows whose item may be recommended.
    """
    if "is_recommendable" not in item_features.columns:
        return item_features
    return item_features.filter(pl.col("is_recommendable").fill_null(True))


def _not_recommendable(item_features: pl.DataFrame) -> pl.DataFrame:
    if "is_recommendable" not in item_features.columns:
        return item_features.select("as_of", "item_id").clear()
    return item_features.filter(~pl.col("is_recommendable").fill_null(True)).select(
        "as_of", "item_id"
    )


def popularity_baseline(users: pl.DataFrame, item_features: pl.DataFrame, k: int) -> pl.DataFrame:
    """The `k` most popular recommendable items as of the cutoff (decayed weighted events).

    The same list for every user; items that are not recommendable are skipped (the next most
    popular take their places).

    Args:
        users: Columns as_of, user_id.
        item_features: The `item_features` mart (as_of, item_id, popularity_rank, optionally
            is_recommendable).
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    return _same_for_everyone(users, _popularity_list(item_features, k))


def _popularity_list(item_features: pl.DataFrame, k: int) -> pl.DataFrame:
    """The popularity baseline's one list per cutoff (as_of, item_id, rank)."""
    # Ranked again among the recommendable items, so that a skipped fee leaves no gap.
    eligible = (
        recommendable_items(item_features)
        .filter(pl.col("popularity_rank").is_not_null())
        .sort("as_of", "popularity_rank", "item_id")
        .with_columns((pl.int_range(pl.len()).over("as_of") + 1).alias("popularity_rank"))
    )
    return popular_items(eligible, k).rename({"popularity_rank": "rank"})


def trending_baseline(users: pl.DataFrame, item_features: pl.DataFrame, k: int) -> pl.DataFrame:
    """The `k` items rising fastest with volume, for every user.

    An item's score is `trend * views_7d`: the ratio of its daily views over 7 days to those
    over 30 days (`trend`, above 1 = rising) times its views in the last 7 days, so a rising item
    needs volume too (a niche item going from 0 to 2 views does not win). Items without a view
    in the last 7 days are left out, and so are items that are not recommendable; ties break by
    item_id.

    Args:
        users: Columns as_of, user_id.
        item_features: The `item_features` mart (as_of, item_id, trend, views_7d, optionally
            is_recommendable).
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    return _same_for_everyone(users, _trending_list(item_features, k))


def _trending_list(item_features: pl.DataFrame, k: int) -> pl.DataFrame:
    """The trending baseline's one list per cutoff (as_of, item_id, rank)."""
    scored = (
        recommendable_items(item_features)
        .filter(pl.col("views_7d").fill_null(0) > 0)
        .select(
            "as_of",
            "item_id",
            (pl.col("trend").fill_null(1.0) * pl.col("views_7d")).cast(pl.Float64).alias("score"),
        )
    )
    return (
        scored.sort(["as_of", "score", "item_id"], descending=[False, True, False])
        .with_columns((pl.int_range(pl.len()).over("as_of") + 1).alias("rank"))
        .filter(pl.col("rank") <= k)
        .select("as_of", "item_id", "rank")
    )


def candidate_order_baseline(candidates: pl.DataFrame, k: int) -> pl.DataFrame:
    """The candidates in the generators' own order, without the ranker.

    Args:
        candidates: Candidate rows (as_of, user_id, item_id, candidate_rank).
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    return top_k(candidates.with_columns((-pl.col("candidate_rank")).alias("score")), "score", k)


def covisitation_baseline(candidates: pl.DataFrame, k: int) -> pl.DataFrame:
    """Co-visitation alone: the candidates it proposed, by `covisit_score` (ties by item_id).

    Candidates without a co-visitation score (proposed only by history or popularity) are left
    out, so a user without recent items gets an empty list.

    Args:
        candidates: Candidate rows (as_of, user_id, item_id, covisit_score).
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    scored = candidates.filter(pl.col("covisit_score").fill_null(0) > 0).with_columns(
        pl.col("covisit_score").cast(pl.Float64).alias("score")
    )
    return top_k(scored, "score", k)


def buy_again_baseline(
    users: pl.DataFrame,
    user_items: pl.DataFrame,
    k: int,
    item_features: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Personal top frequency: the user's own past items.

    Ranked by purchases, then interactions (views + carts + purchases), then recency (fewest
    days since the last event), then item_id. Items that are not recommendable (fees, postage:
    bought in every order, so they would top every list) are left out.

    Args:
        users: Columns as_of, user_id.
        user_items: The `user_item_features` mart (as_of, user_id, item_id, views, carts,
            purchases, days_since_last) as of the cutoff.
        k: List length.
        item_features: The `item_features` mart (as_of, item_id, is_recommendable), to leave out
            items that are not recommendable; None (or no such column) leaves out nothing.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    if item_features is not None:
        user_items = user_items.join(
            _not_recommendable(item_features), on=["as_of", "item_id"], how="anti"
        )
    history = user_items.join(users.select(QUERY).unique(), on=QUERY, how="semi").with_columns(
        pl.col("purchases").fill_null(0).alias("_purchases"),
        pl.sum_horizontal(
            pl.col("views").fill_null(0),
            pl.col("carts").fill_null(0),
            pl.col("purchases").fill_null(0),
        ).alias("_interactions"),
        pl.col("days_since_last").fill_null(float("inf")).alias("_days"),
    )
    return (
        history.sort(
            [*QUERY, "_purchases", "_interactions", "_days", "item_id"],
            descending=[False, False, True, True, False, False],
        )
        .with_columns((pl.int_range(pl.len()).over(QUERY) + 1).alias("rank"))
        .filter(pl.col("rank") <= k)
        .select(*QUERY, "item_id", pl.col("rank").cast(pl.Int64))
    )


def oracle_scores(
    candidates: pl.DataFrame,
    ground_truth: Mapping[str, pl.DataFrame],
    item_features: pl.DataFrame | None = None,
    trend_pivot: datetime | None = None,
    label_window_days: float = 7.0,
) -> pl.DataFrame:
    """Scores candidates by the generator's true preference (an approximation of it).

    The generator (`shelfwise/intake/generate.py`) makes a view of item `i` by user `u` on day
    `d` by picking a leaf category (from the user's tastes with probability 0.88, else from the
    global leaf popularity) and then an item of that leaf with probability proportional to
    `popularity_i(d) * brand_affinity(u, brand_i) * price_fit(u, i)`. The oracle scores

        `P(leaf_i | u) * popularity_i(d) * brand_affinity * price_fit / leaf_popularity(d)`

    with `P(leaf | u) = 0.88 * taste_weight(u, leaf) + 0.12 * global_popularity(leaf)` (the
    second term only when the `categories` table is given) and `leaf_popularity(d)` the sum of
    the popularity of the leaf's items. Approximations: the within-leaf normaliser ignores the
    user's brand and price fit (it would need every user x item of the leaf), the 8-candidate
    sampling-importance-resampling is taken at its limit, stray views and the funnel (cart and
    purchase probabilities, repeat purchases of consumables) are not modelled, so the score is a
    view propensity. `popularity_i(d)` is `base_popularity * exp(trend_slope * (d - pivot))` at
    the middle of the label window when `trend_pivot` (the middle of the generated window) is
    given, else `base_popularity`; items out of stock before the cutoff weigh 0.15. The price fit
    needs `user_profiles`, `categories` and the item price (`item_features`); without them it
    is 1.

    Args:
        candidates: Candidate rows (as_of, user_id, item_id).
        ground_truth: The generator's tables by name; needs `user_category_tastes`,
            `user_brand_affinities` and `item_profiles`, uses `user_profiles` and `categories`
            when present.
        item_features: The `item_features` mart (as_of, item_id, price), for the price fit.
        trend_pivot: The middle of the generated window (the trend's pivot), if known.
        label_window_days: Length of the label window after the cutoff.

    Returns:
        The candidates' as_of, user_id, item_id with a Float64 `score` (0 for items the ground
        truth does not know).
    """
    missing = [name for name in ORACLE_TABLES if name not in ground_truth]
    if missing:
        raise ValueError(f"the oracle needs the ground-truth tables {missing}")
    items = ground_truth["item_profiles"].select(
        "item_id",
        "category_id",
        "brand",
        pl.col("base_popularity").cast(pl.Float64),
        pl.col("trend_slope").cast(pl.Float64).fill_null(0.0),
        pl.col("out_of_stock_at").cast(pl.Datetime("us", "UTC")),
    )
    pairs = candidates.select(*QUERY, "item_id").unique()
    cutoffs = pairs.select("as_of").unique()
    # Item popularity at each cutoff (the middle of its label window).
    days_from_pivot = pl.lit(0.0)
    if trend_pivot is not None:
        pivot = pl.lit(trend_pivot, dtype=pl.Datetime("us", "UTC"))
        days_from_pivot = (pl.col("as_of") - pivot).dt.total_seconds() / _DAY_SECONDS + (
            label_window_days / 2
        )
    popularity = (
        cutoffs.join(items, how="cross")
        .with_columns(days_from_pivot.alias("_days"))
        .with_columns(
            (
                pl.col("base_popularity")
                * (pl.col("trend_slope") * pl.col("_days")).exp()
                * pl.when(pl.col("out_of_stock_at") < pl.col("as_of"))
                .then(_OUT_OF_STOCK_WEIGHT)
                .otherwise(1.0)
            ).alias("popularity")
        )
        .with_columns(pl.col("popularity").sum().over("as_of", "category_id").alias("leaf_total"))
        .select("as_of", "item_id", "category_id", "brand", "popularity", "leaf_total")
    )
    tastes = ground_truth["user_category_tastes"].select(
        "user_id", "category_id", pl.col("weight").cast(pl.Float64)
    )
    affinities = ground_truth["user_brand_affinities"].select(
        "user_id", "brand", pl.col("affinity").cast(pl.Float64)
    )
    scored = (
        pairs.join(popularity, on=["as_of", "item_id"], how="left")
        .join(tastes, on=["user_id", "category_id"], how="left")
        .join(affinities, on=["user_id", "brand"], how="left")
        .with_columns(pl.col("weight").fill_null(0.0), pl.col("affinity").fill_null(1.0))
    )
    leaf_choice = (1.0 - _EXPLORE) * pl.col("weight")
    categories = ground_truth.get("categories")
    if categories is not None:
        scored = scored.join(
            categories.select(
                "category_id",
                pl.col("popularity").cast(pl.Float64).alias("leaf_popularity"),
                pl.col("price_median").cast(pl.Float64),
            ),
            on="category_id",
            how="left",
        )
        leaf_choice = leaf_choice + _EXPLORE * pl.col("leaf_popularity").fill_null(0.0)
    price_fit = pl.lit(1.0)
    profiles = ground_truth.get("user_profiles")
    if profiles is not None and categories is not None and item_features is not None:
        scored = scored.join(
            item_features.select("as_of", "item_id", pl.col("price").cast(pl.Float64)),
            on=["as_of", "item_id"],
            how="left",
        ).join(
            profiles.select("user_id", pl.col("price_level").cast(pl.Float64)),
            on="user_id",
            how="left",
        )
        gap = (
            (pl.col("price") / pl.col("price_median")).log() - pl.col("price_level")
        ) / _PRICE_FIT_WIDTH
        price_fit = (-0.5 * gap * gap).exp().fill_null(1.0).fill_nan(1.0)
    score = (
        leaf_choice * pl.col("popularity") / pl.col("leaf_total") * pl.col("affinity") * price_fit
    )
    return scored.select(
        *QUERY, "item_id", score.cast(pl.Float64).fill_null(0.0).fill_nan(0.0).alias("score")
    )


def oracle_baseline(
    candidates: pl.DataFrame,
    ground_truth: Mapping[str, pl.DataFrame],
    k: int,
    item_features: pl.DataFrame | None = None,
    trend_pivot: datetime | None = None,
) -> pl.DataFrame:
    """The candidates ranked by the generator's true preference (see `oracle_scores`).

    It is bounded by the candidates like the ranker, so it shows how much of the gap is ranking
    (ranker vs oracle) and how much is candidate generation (oracle vs a perfect list).

    Args:
        candidates: Candidate rows (as_of, user_id, item_id).
        ground_truth: The generator's tables by name.
        k: List length.
        item_features: The `item_features` mart, for the price fit.
        trend_pivot: The middle of the generated window, if known.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    return top_k(oracle_scores(candidates, ground_truth, item_features, trend_pivot), "score", k)


# What "new to the customer" means in the `new_items_only` view (see `past_items`).
NEW_ITEMS_RULE = (
    "the user's past items (any interaction before the cutoff: view, cart or purchase) "
    "removed from every approach's ranking before it is cut to k, and from the truth; users "
    "left without a positive drop out"
)
# Users whose same-for-everyone lists are cut at a time in the `new_items_only` view.
_NEW_ITEMS_CHUNK_USERS = 5_000


def past_items(user_items: pl.DataFrame) -> pl.DataFrame:
    """The items each user interacted with before the cutoff: what is not new to them.

    One rule for every shop: any interaction (a view, a cart or a purchase: a row of the
    `user_item_features` mart, which holds the whole history before the cutoff). For a purchase
    log that is "bought before"; for a click log, "seen before", which is what a customer would
    not call a discovery either.

    Args:
        user_items: The `user_item_features` mart (as_of, user_id, item_id, ...).

    Returns:
        Unique as_of, user_id, item_id.
    """
    return user_items.select(*QUERY, "item_id").unique()


def without_past_items(scored: pl.DataFrame, past: pl.DataFrame, k: int) -> pl.DataFrame:
    """Each user's top k of a scored ranking once their past items are removed.

    The removal comes before the cut to k, so an approach whose ranking goes deeper than k
    keeps k items; a ranking only k deep keeps what remains.

    Args:
        scored: Rows as_of, user_id, item_id, score (higher first; ties by item_id).
        past: The items not new to each user (`past_items`).
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    fresh = scored.join(past, on=[*QUERY, "item_id"], how="anti")
    return top_k(fresh, "score", k)


def _same_for_everyone_without_past(
    users: pl.DataFrame, ranked: pl.DataFrame, past: pl.DataFrame, k: int
) -> pl.DataFrame:
    """A same-for-everyone list (as_of, item_id, rank) per user, past items removed, top k.

    Each user needs the list only as deep as k plus their past items on it: users are crossed
    with that prefix chunk by chunk, so memory stays bounded by a chunk, not users x catalog.
    """
    on_list = past.join(ranked.select("as_of", "item_id"), on=["as_of", "item_id"], how="semi")
    depth = (
        users.select(QUERY)
        .unique()
        .join(on_list.group_by(QUERY).agg(pl.len().alias("_past")), on=QUERY, how="left")
        .with_columns((pl.col("_past").fill_null(0) + k).alias("_depth"))
        .sort(QUERY)
    )
    parts = []
    for start in range(0, depth.height, _NEW_ITEMS_CHUNK_USERS):
        chunk = depth.slice(start, _NEW_ITEMS_CHUNK_USERS)
        deepest = int(chunk.get_column("_depth").max() or 0)
        prefix = ranked.filter(pl.col("rank") <= deepest).select("as_of", "item_id", "rank")
        crossed = chunk.join(prefix, on="as_of", how="inner").filter(
            pl.col("rank") <= pl.col("_depth")
        )
        parts.append(
            without_past_items(
                crossed.select(
                    *QUERY, "item_id", (-pl.col("rank")).cast(pl.Float64).alias("score")
                ),
                past,
                k,
            )
        )
    if not parts:
        return pl.DataFrame(
            schema={**users.select(QUERY).schema, "item_id": pl.String, "rank": pl.Int64}
        )
    return pl.concat(parts).with_columns(pl.col("rank").cast(pl.Int64))


def _by_rank(ranked: pl.DataFrame) -> pl.DataFrame:
    """A ranked list as scored rows (score = -rank)."""
    return ranked.select(*QUERY, "item_id", (-pl.col("rank")).cast(pl.Float64).alias("score"))


def user_segments(
    users: pl.DataFrame, user_features: pl.DataFrame, heavy_threshold: int = 20
) -> pl.DataFrame:
    """Segments users by their history at the cutoff.

    Args:
        users: Columns as_of, user_id.
        user_features: The `user_features` mart (as_of, user_id, events) as of the cutoff.
        heavy_threshold: `N`: `new` has no event before the cutoff, `light` 1 to N events,
            `heavy` more than N.

    Returns:
        Columns as_of, user_id, events (0 when unknown), segment.
    """
    return (
        users.select(QUERY)
        .unique()
        .join(user_features.select(*QUERY, "events"), on=QUERY, how="left")
        .with_columns(pl.col("events").fill_null(0).cast(pl.Int64))
        .with_columns(
            pl.when(pl.col("events") <= 0)
            .then(pl.lit("new"))
            .when(pl.col("events") <= heavy_threshold)
            .then(pl.lit("light"))
            .otherwise(pl.lit("heavy"))
            .alias("segment")
        )
        .sort(QUERY)
    )


def not_applicable_baselines(
    assembled: pl.DataFrame, item_features: pl.DataFrame, user_items: pl.DataFrame
) -> dict[str, str]:
    """The baselines the data cannot define, each with the reason.

    Such a baseline would score 0 for a reason that says nothing about ranking (a shop without
    views has no "trending"), and a 0 would make the ranker look good against it; it is listed
    instead, and is never the best baseline. The rules, decided on the data before the cutoff
    (never on the labels), are:

    * `trending`: no recommendable item was viewed in the 7 days before the cutoff, e.g. order
      lines without views: every trending list would be empty;
    * `buy_again`: nobody bought any recommendable item twice before the cutoff (no user x item
      with two or more purchase events): the data shows no repeat purchases to rely on. (Fees
      and postage, bought in every order, do not count.);
    * `covisitation`: no candidate of an evaluated user has a co-visitation score: every
      co-visitation list would be empty.

    Args:
        assembled: The evaluated users' candidates (as_of, user_id, item_id, covisit_score).
        item_features: The `item_features` mart at the evaluation cutoff (views_7d,
            optionally is_recommendable).
        user_items: The `user_item_features` mart at the evaluation cutoff (purchases).

    Returns:
        Approach name → reason; empty when every baseline is defined.
    """
    reasons: dict[str, str] = {}
    viewed = recommendable_items(item_features).filter(pl.col("views_7d").fill_null(0) > 0)
    if viewed.height == 0:
        reasons["trending"] = (
            "no recommendable item was viewed in the 7 days before the cutoff (no view events, "
            "e.g. purchase-only order lines)"
        )
    repeats = user_items.join(
        _not_recommendable(item_features), on=["as_of", "item_id"], how="anti"
    ).filter(pl.col("purchases").fill_null(0) >= 2)
    if repeats.height == 0:
        reasons["buy_again"] = (
            "no user bought any recommendable item twice before the cutoff (no repeat purchases)"
        )
    if assembled.filter(pl.col("covisit_score").fill_null(0) > 0).height == 0:
        reasons["covisitation"] = "no candidate has a co-visitation score"
    return reasons


def _with_intervals(
    metrics: dict[str, float], intervals: dict[str, tuple[float, float]]
) -> dict[str, float | int | list[float]]:
    values: dict[str, float | int | list[float]] = {}
    for metric, value in metrics.items():
        values[metric] = int(value) if metric == "users" else _finite(value)
        if metric in intervals:
            values[metric + CI_SUFFIX] = _pair(intervals[metric])
    return values


def _paired_dict(
    differences: dict[str, float], intervals: dict[str, tuple[float, float]]
) -> dict[str, float | list[float]]:
    values: dict[str, float | list[float]] = {}
    for metric, difference in differences.items():
        values[metric + DIFF_SUFFIX] = _finite(difference)
        values[metric + DIFF_SUFFIX + CI_SUFFIX] = _pair(intervals[metric])
    return values


@dataclass
class NewItemsView:
    """The evaluation on what is new to each customer (`NEW_ITEMS_RULE`).

    Attributes:
        metrics: Approach → per-user metric → mean, and `users` (those left with a positive).
        intervals: Approach → per-user metric → 95% bootstrap interval.
        paired: Approach other than the ranker → per-user metric → the ranker's mean minus
            the approach's, on the same users.
        paired_intervals: Approach → per-user metric → 95% paired interval of that difference.
        dropped_users: Evaluated users whose every positive was a past item (not in the view).
        rule: What was removed, in words.
    """

    metrics: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float]]]
    paired: dict[str, dict[str, float]]
    paired_intervals: dict[str, dict[str, tuple[float, float]]]
    dropped_users: int
    rule: str = NEW_ITEMS_RULE

    @property
    def users(self) -> int:
        """Users in the view (with a positive among their new items)."""
        return int(next(iter(self.metrics.values()), {}).get("users", 0))

    def to_dict(self) -> dict[str, object]:
        """The view as plain values (JSON-ready).

        Returns:
            `rule`, `users`, `dropped_users`, `metrics` (with `<metric>_ci95`) and `paired`
            (`<metric>_diff` and `<metric>_diff_ci95`, the ranker minus that approach).
        """
        return {
            "rule": self.rule,
            "users": self.users,
            "dropped_users": int(self.dropped_users),
            "metrics": {
                name: _with_intervals(values, self.intervals.get(name, {}))
                for name, values in self.metrics.items()
            },
            "paired": {
                name: _paired_dict(differences, self.paired_intervals[name])
                for name, differences in self.paired.items()
            },
        }


@dataclass
class EvaluationReport:
    """Metrics per approach, overall and per user segment, on the same users and labels.

    Attributes:
        metrics: Approach → metric name → value (see `models.metrics.evaluation_metrics`).
        segments: Segment (`new`, `light`, `heavy`) → approach → metric name → value; a
            segment without evaluated users is absent.
        segment_users: Evaluated users per segment (0 for an empty one).
        k: Longest list evaluated.
        heavy_threshold: Events above which a user is `heavy`.
        evaluation_cutoffs: The cutoffs evaluated (ISO 8601).
        intervals: Approach → per-user metric → 95% bootstrap interval (lower, upper).
        paired: Approach other than the ranker → per-user metric → the ranker's mean minus the
            approach's, on the same users.
        paired_intervals: Approach → per-user metric → 95% paired bootstrap interval of that
            difference (the same resampled users for both).
        not_applicable: Baselines the data cannot define → reason (see
            `not_applicable_baselines`); they are absent from every other field.
        notes: Approach → how it was defined on this data (e.g. the blend used).
        resamples: Bootstrap resamples behind the intervals.
        seed: Seed of the bootstrap.
        new_items_only: The same approaches on what is new to each customer
            (`NewItemsView`); None when not computed.
        segment_vs_fallback: Segment → per-user metric → the ranker's mean minus the
            fallback's (`popularity`) on that segment's users.
        segment_vs_fallback_intervals: Segment → per-user metric → 95% paired interval of it.
        segment_policy: Who serves each segment (`models.segments`), chosen on validation.
    """

    metrics: dict[str, dict[str, float]]
    segments: dict[str, dict[str, dict[str, float]]]
    segment_users: dict[str, int]
    k: int
    heavy_threshold: int
    evaluation_cutoffs: list[str] = field(default_factory=list)
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    paired: dict[str, dict[str, float]] = field(default_factory=dict)
    paired_intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    new_items_only: NewItemsView | None = None
    segment_vs_fallback: dict[str, dict[str, float]] = field(default_factory=dict)
    segment_vs_fallback_intervals: dict[str, dict[str, tuple[float, float]]] = field(
        default_factory=dict
    )
    segment_policy: SegmentPolicy | None = None

    @property
    def approaches(self) -> list[str]:
        """The approaches in evaluation order."""
        return list(self.metrics)

    def to_dict(self) -> dict[str, object]:
        """The report as plain dicts, lists, str, int and float (JSON-ready).

        Each approach's metrics hold `<metric>_ci95: [lower, upper]` after every per-user
        metric; `paired.<approach>` holds `<metric>_diff` and `<metric>_diff_ci95` (the ranker
        minus that approach); `not_applicable` maps a baseline the data cannot define to why.
        """

        def plain(metrics: dict[str, float]) -> dict[str, float | int]:
            return {
                name: int(value) if name == "users" else _finite(value)
                for name, value in metrics.items()
            }

        def with_intervals(name: str) -> dict[str, float | int | list[float]]:
            values: dict[str, float | int | list[float]] = {}
            intervals = self.intervals.get(name, {})
            for metric, value in plain(self.metrics[name]).items():
                values[metric] = value
                if metric in intervals:
                    values[metric + CI_SUFFIX] = _pair(intervals[metric])
            return values

        return {
            "evaluation_cutoffs": [str(cutoff) for cutoff in self.evaluation_cutoffs],
            "k": int(self.k),
            "heavy_threshold": int(self.heavy_threshold),
            "metrics": {name: with_intervals(name) for name in self.metrics},
            "paired": {
                name: {
                    key: value
                    for metric, difference in differences.items()
                    for key, value in (
                        (metric + DIFF_SUFFIX, _finite(difference)),
                        (
                            metric + DIFF_SUFFIX + CI_SUFFIX,
                            _pair(self.paired_intervals[name][metric]),
                        ),
                    )
                }
                for name, differences in self.paired.items()
            },
            "not_applicable": {name: str(reason) for name, reason in self.not_applicable.items()},
            "notes": {name: str(note) for name, note in self.notes.items()},
            "confidence": {
                "method": "percentile bootstrap over the evaluated users, paired across approaches",
                "level": 0.95,
                "resamples": int(self.resamples),
                "seed": int(self.seed),
            },
            "segments": {
                segment: {name: plain(values) for name, values in approaches.items()}
                for segment, approaches in self.segments.items()
            },
            "segment_users": {name: int(count) for name, count in self.segment_users.items()},
            **(
                {"new_items_only": self.new_items_only.to_dict()}
                if self.new_items_only is not None
                else {}
            ),
            "segments_vs_fallback": self.segments_as_served(),
            **(
                {"segment_policy": self.segment_policy.to_dict()}
                if self.segment_policy is not None
                else {}
            ),
        }

    def segments_as_served(self) -> dict[str, object]:
        """Each segment against its fallback (popularity), as the ranker would and as served.

        Returns:
            `fallback` (the approach), and per segment with evaluated users: `users`,
            `served_by` (`ranker` or `fallback`, from the segment policy; the ranker without
            one), `ranker_minus_fallback` (`<metric>_diff` and `<metric>_diff_ci95` for every
            per-user metric) and `served_minus_fallback`: the same when the ranker serves the
            segment, exactly 0 with the interval [0, 0] when the fallback does (the served
            lists are then the fallback's). The promotion gate reads `served_minus_fallback`.
        """
        segments: dict[str, object] = {}
        for segment, differences in self.segment_vs_fallback.items():
            intervals = self.segment_vs_fallback_intervals[segment]
            fallback = self.segment_policy is not None and self.segment_policy.serves_fallback(
                segment
            )
            ranker = _paired_dict(differences, intervals)
            served = (
                _paired_dict(
                    dict.fromkeys(differences, 0.0), dict.fromkeys(differences, (0.0, 0.0))
                )
                if fallback
                else ranker
            )
            segments[segment] = {
                "users": int(self.segment_users.get(segment, 0)),
                "served_by": FALLBACK if fallback else SEGMENT_RANKER,
                "ranker_minus_fallback": ranker,
                "served_minus_fallback": served,
            }
        return {"fallback": FALLBACK_APPROACH, "segments": segments}


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def _pair(bounds: tuple[float, float]) -> list[float]:
    return [_finite(bounds[0]), _finite(bounds[1])]


def _ranker_frame(
    assembled: pl.DataFrame, scores: np.ndarray | pl.Series | lgb.Booster
) -> pl.DataFrame:
    if isinstance(scores, lgb.Booster) or hasattr(scores, "predict"):
        return score_with_ranker(assembled, scores)  # type: ignore[arg-type]
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (assembled.height,):
        raise ValueError(
            f"scores must have one value per assembled row ({assembled.height}), "
            f"got shape {values.shape}"
        )
    return assembled.with_columns(pl.Series("score", values, dtype=pl.Float64))


def _intervals(
    per_user: dict[str, pl.DataFrame], resamples: int, seed: int
) -> tuple[
    dict[str, dict[str, tuple[float, float]]],
    dict[str, dict[str, float]],
    dict[str, dict[str, tuple[float, float]]],
]:
    # One set of resamples for every approach: each difference of two means is paired.
    names = list(per_user)
    frames = list(per_user.values())
    metrics = [column for column in frames[0].columns if column not in QUERY]
    users = frames[0].select(QUERY)
    for frame in frames[1:]:
        # Every approach is scored on the same users: the rows must line up for pairing.
        if not frame.select(QUERY).equals(users):
            raise ValueError("the approaches were not scored on the same users")
    # Columns: approach-major, metric-minor.
    values = np.column_stack([frame.select(metrics).to_numpy() for frame in frames])
    means = bootstrap_means(values, resamples, seed).reshape(resamples, len(names), len(metrics))
    lower, upper = percentile_interval(means.reshape(resamples, -1))
    lower = lower.reshape(len(names), len(metrics))
    upper = upper.reshape(len(names), len(metrics))
    intervals = {
        name: {metric: (float(lower[a, m]), float(upper[a, m])) for m, metric in enumerate(metrics)}
        for a, name in enumerate(names)
    }
    paired: dict[str, dict[str, float]] = {}
    paired_intervals: dict[str, dict[str, tuple[float, float]]] = {}
    if RANKER not in per_user:
        return intervals, paired, paired_intervals
    ranker = names.index(RANKER)
    point = values.mean(axis=0).reshape(len(names), len(metrics)) if len(users) else None
    for a, name in enumerate(names):
        if a == ranker:
            continue
        low, high = percentile_interval(means[:, ranker, :] - means[:, a, :])
        paired[name] = {
            metric: float(point[ranker, m] - point[a, m]) if point is not None else 0.0
            for m, metric in enumerate(metrics)
        }
        paired_intervals[name] = {
            metric: (float(low[m]), float(high[m])) for m, metric in enumerate(metrics)
        }
    return intervals, paired, paired_intervals


def evaluate(
    assembled: pl.DataFrame,
    scores: np.ndarray | pl.Series | lgb.Booster,
    labels: pl.DataFrame,
    item_features: pl.DataFrame,
    user_features: pl.DataFrame,
    user_items: pl.DataFrame,
    ground_truth: Mapping[str, pl.DataFrame] | None = None,
    k: int = 20,
    heavy_threshold: int = 20,
    trend_pivot: datetime | None = None,
    queries: pl.DataFrame | None = None,
    production: np.ndarray | pl.Series | lgb.Booster | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    history: pl.DataFrame | None = None,
    bought_together: pl.DataFrame | None = None,
    validation: Validation | None = None,
    segment_metric: str = "ndcg@10",
) -> EvaluationReport:
    """Evaluates the ranker and every baseline on the same users and held-out labels.

    Averages are over users with at least one positive label (`evaluated_users`), or over those
    of them among `queries` when a sample of queries is given: the labels and the candidates are
    then restricted to the sample first, so the ranker, every baseline and the oracle are
    scored on exactly the same users. Metrics are `ranking_metrics` at 10 and `k`, and coverage
    and novelty of the top 10 (`evaluation_metrics`). Novelty uses the interactions before the
    cutoff (`user_items`) of all users, sampled or not: it is a property of the items.

    Every per-user metric gets a 95% bootstrap interval over the evaluated users, and the
    ranker a paired difference (with its interval) against every other approach; baselines the
    data cannot define are left out and listed (`not_applicable_baselines`). Segments get
    means only.

    Args:
        assembled: Candidates of the evaluation users at the evaluation cutoff (as_of, user_id,
            item_id, candidate_rank, covisit_score, ...), one row per candidate.
        scores: The ranker's score per row of `assembled` (same order), or the booster itself.
        labels: Labels of the evaluation window (as_of = evaluation cutoff).
        item_features: `item_features` at the evaluation cutoff (catalog, popularity, trend).
        user_features: `user_features` at the evaluation cutoff (segments).
        user_items: `user_item_features` at the evaluation cutoff (buy-again, novelty).
        ground_truth: The generator's tables by name (`ground_truth/` in the lake) for the
            oracle; omitted for real data.
        k: Longest list to evaluate (the largest metric cut-off).
        heavy_threshold: Events above which a user is `heavy` (`light` is 1 to this many).
        trend_pivot: The middle of the generated window, for the oracle's trends (optional).
        queries: The sampled queries (as_of, user_id) to evaluate; None evaluates every user
            with a positive label.
        production: The production model's score per row of `assembled`, or its booster; it is
            then scored as the approach `production` on the same candidates and users.
        resamples: Bootstrap resamples of the users.
        seed: Seed of the bootstrap (the report is deterministic).
        history: The interaction history (user_id, item_id, event_type, occurred_at; events
            at or after the cutoff are ignored) for the strong baselines of `models.baselines`;
            None leaves them out.
        bought_together: The `item_bought_together` mart at the evaluation cutoff, for
            `basket_cooccurrence`.
        validation: The validation cutoff on which the blend is chosen (else a fixed blend)
            and, when it holds the ranker's scores and the marts, the segment policy
            (`models.segments`; else the ranker serves every known segment).
        segment_metric: The per-user metric the segment policy compares on validation.

    Returns:
        The report; approaches in the order ranker, candidate_order, covisitation, buy_again,
        popularity, trending, the strong baselines (when `history` is given), oracle (when
        ground truth is given), production (when given), without those not applicable.
    """
    scored = _ranker_frame(assembled, scores)
    production_scored = _ranker_frame(assembled, production) if production is not None else None
    if queries is not None:
        sample = queries.select(QUERY).unique()
        labels = labels.join(sample, on=QUERY, how="semi")
        scored = scored.join(sample, on=QUERY, how="semi", maintain_order="left")
        if production_scored is not None:
            production_scored = production_scored.join(
                sample, on=QUERY, how="semi", maintain_order="left"
            )
    assembled = scored.drop("score")
    users = evaluated_users(labels)
    k_values = tuple(sorted({min(10, k), k}))
    list_k = min(10, k)
    not_applicable = not_applicable_baselines(
        assembled.join(users, on=QUERY, how="semi"), item_features, user_items
    )
    approaches: dict[str, pl.DataFrame] = {
        RANKER: top_k(scored, "score", k),
        "candidate_order": candidate_order_baseline(assembled, k),
        "covisitation": covisitation_baseline(assembled, k),
        "buy_again": buy_again_baseline(users, user_items, k, item_features),
        "popularity": popularity_baseline(users, item_features, k),
        "trending": trending_baseline(users, item_features, k),
    }
    # Each approach's ranking deeper than k where it has one, for the `new_items_only` view
    # (its past items removed before the cut to k). Buy-again's lists are the user's past
    # items only, so its view is empty whatever the depth.
    deep: dict[str, pl.DataFrame] = {
        RANKER: scored.select(*QUERY, "item_id", "score"),
        "candidate_order": assembled.select(
            *QUERY, "item_id", (-pl.col("candidate_rank")).cast(pl.Float64).alias("score")
        ),
        "covisitation": assembled.filter(pl.col("covisit_score").fill_null(0) > 0).select(
            *QUERY, "item_id", pl.col("covisit_score").cast(pl.Float64).alias("score")
        ),
        "buy_again": _by_rank(approaches["buy_again"]),
    }
    same_for_everyone = {
        "popularity": _popularity_list(item_features, item_features.height),
        "trending": _trending_list(item_features, item_features.height),
    }
    notes: dict[str, str] = {}
    if history is not None:
        strong = strong_baselines(
            users, history, item_features, k, bought_together=bought_together, validation=validation
        )
        approaches.update(strong.ranked)
        not_applicable.update(strong.not_applicable)
        notes.update(strong.notes)
        deep.update(strong.scored)
    if ground_truth is not None:
        deep[ORACLE] = oracle_scores(assembled, ground_truth, item_features, trend_pivot)
        approaches[ORACLE] = top_k(deep[ORACLE], "score", k)
    if production_scored is not None:
        deep[PRODUCTION] = production_scored.select(*QUERY, "item_id", "score")
        approaches[PRODUCTION] = top_k(production_scored, "score", k)
    approaches = {name: ranked for name, ranked in approaches.items() if name not in not_applicable}
    catalog = item_features.select("as_of", "item_id")
    interactions = item_interactions(user_items)

    def score_all(selected_labels: pl.DataFrame) -> dict[str, dict[str, float]]:
        return {
            name: evaluation_metrics(
                recommendations, selected_labels, catalog, interactions, k_values, list_k
            )
            for name, recommendations in approaches.items()
        }

    segments = user_segments(users, user_features, heavy_threshold)
    per_segment: dict[str, dict[str, dict[str, float]]] = {}
    segment_users: dict[str, int] = {}
    for segment in SEGMENTS:
        members = segments.filter(pl.col("segment") == segment).select(QUERY)
        segment_users[segment] = members.height
        if members.height:
            per_segment[segment] = score_all(labels.join(members, on=QUERY, how="semi"))
    # Overall: the per-user values once per approach, for the means and for the intervals.
    per_user = {
        name: per_user_metrics(recommendations, labels, k_values)
        for name, recommendations in approaches.items()
    }
    metrics = {
        name: {
            **mean_metrics(per_user[name]),
            **list_metrics(recommendations, labels, catalog, interactions, list_k),
        }
        for name, recommendations in approaches.items()
    }
    intervals, paired, paired_intervals = _intervals(per_user, resamples, seed)
    # Each segment: the ranker against its fallback (popularity), paired on its users.
    segment_vs_fallback: dict[str, dict[str, float]] = {}
    segment_vs_fallback_intervals: dict[str, dict[str, tuple[float, float]]] = {}
    for segment in per_segment:
        members = segments.filter(pl.col("segment") == segment).select(QUERY)
        _, differences, bounds = _intervals(
            {
                name: per_user[name].join(members, on=QUERY, how="semi")
                for name in (RANKER, FALLBACK_APPROACH)
            },
            resamples,
            seed,
        )
        segment_vs_fallback[segment] = differences[FALLBACK_APPROACH]
        segment_vs_fallback_intervals[segment] = bounds[FALLBACK_APPROACH]
    new_items = _new_items_view(
        users, labels, approaches, deep, same_for_everyone, user_items, k, k_values, resamples, seed
    )
    cutoffs = sorted(users.get_column("as_of").unique().to_list())
    return EvaluationReport(
        metrics=metrics,
        segments=per_segment,
        segment_users=segment_users,
        k=k,
        heavy_threshold=heavy_threshold,
        evaluation_cutoffs=[cutoff.isoformat() for cutoff in cutoffs],
        intervals=intervals,
        paired=paired,
        paired_intervals=paired_intervals,
        not_applicable=not_applicable,
        notes=notes,
        resamples=resamples,
        seed=seed,
        new_items_only=new_items,
        segment_vs_fallback=segment_vs_fallback,
        segment_vs_fallback_intervals=segment_vs_fallback_intervals,
        segment_policy=_segment_policy(validation, heavy_threshold, segment_metric),
    )


def _segment_policy(
    validation: Validation | None, heavy_threshold: int, metric: str
) -> SegmentPolicy:
    """The segment policy chosen on the validation cutoff, or the default without one."""
    if (
        validation is None
        or validation.ranker_scores is None
        or validation.item_features is None
        or validation.user_features is None
        or validation.users.height == 0
    ):
        return default_policy(heavy_threshold)
    k = int(metric.rsplit("@", 1)[1])
    return choose_segment_policy(
        validation.ranker_scores,
        popularity_baseline(validation.users, validation.item_features, k),
        validation.labels,
        user_segments(validation.users, validation.user_features, heavy_threshold),
        metric=metric,
        heavy_threshold=heavy_threshold,
    )


def _new_items_view(
    users: pl.DataFrame,
    labels: pl.DataFrame,
    approaches: dict[str, pl.DataFrame],
    deep: dict[str, pl.DataFrame],
    same_for_everyone: dict[str, pl.DataFrame],
    user_items: pl.DataFrame,
    k: int,
    k_values: tuple[int, ...],
    resamples: int,
    seed: int,
) -> NewItemsView:
    """Every approach on the items new to each user (`NEW_ITEMS_RULE`), paired like the rest.

    An approach's deeper ranking (`deep`, or its same-for-everyone list) loses the user's past
    items before the cut to k; an approach with neither keeps what remains of its k items.
    """
    past = past_items(user_items.join(users, on=QUERY, how="semi"))
    fresh_labels = labels.join(users, on=QUERY, how="semi").join(
        past, on=[*QUERY, "item_id"], how="anti"
    )
    fresh_users = evaluated_users(fresh_labels)
    fresh_labels = fresh_labels.join(fresh_users, on=QUERY, how="semi")
    per_user: dict[str, pl.DataFrame] = {}
    for name, ranked in approaches.items():
        if name in same_for_everyone:
            lists = _same_for_everyone_without_past(fresh_users, same_for_everyone[name], past, k)
        else:
            source = deep.get(name)
            scored = source if source is not None else _by_rank(ranked)
            lists = without_past_items(scored.join(fresh_users, on=QUERY, how="semi"), past, k)
        per_user[name] = per_user_metrics(lists, fresh_labels, k_values)
    intervals, paired, paired_intervals = _intervals(per_user, resamples, seed)
    return NewItemsView(
        metrics={name: mean_metrics(frame) for name, frame in per_user.items()},
        intervals=intervals,
        paired=paired,
        paired_intervals=paired_intervals,
        dropped_users=users.height - fresh_users.height,
    )
