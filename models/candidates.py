"""Candidate generation: a few hundred plausible items per user, for the ranker to order.

Three generators, merged: the user's own recent items ("continue shopping", "buy again"), the
co-visitation neighbours of those items, and the globally popular items as of the cutoff (which is
also all a user with no history gets). Each candidate keeps the signals of the generators that
proposed it as features, and `candidate_rank` is the order the generators alone would show.
"""

from dataclasses import dataclass

import polars as pl

KEY = ["as_of", "user_id"]


@dataclass(frozen=True)
class CandidateConfig:
    """Sizes of the candidate generators.

    Attributes:
        recent_items: How many of the user's most recent items seed co-visitation (and are
            candidates themselves).
        popular_items: How many popular items every user gets.
        max_candidates: Candidates kept per user after merging.
    """

    recent_items: int = 10
    popular_items: int = 50
    max_candidates: int = 150


def popular_items(item_features: pl.DataFrame, n: int) -> pl.DataFrame:
    """The `n` most popular items per cutoff.

    Args:
        item_features: The `item_features` mart (columns as_of, item_id, popularity_rank).
        n: Items per cutoff.

    Returns:
        Columns as_of, item_id, popularity_rank (1 = most popular), sorted.
    """
    return (
        item_features.filter(pl.col("popularity_rank") <= n)
        .select("as_of", "item_id", "popularity_rank")
        .sort("as_of", "popularity_rank")
    )


def generate_candidates(
    users: pl.DataFrame,
    user_items: pl.DataFrame,
    covisitation: pl.DataFrame,
    item_features: pl.DataFrame,
    config: CandidateConfig,
) -> pl.DataFrame:
    """Merges the generators into up to `config.max_candidates` candidates per (as_of, user).

    Args:
        users: The queries: columns as_of, user_id (users unknown at that cutoff are fine).
        user_items: The `user_item_features` mart (as_of, user_id, item_id, days_since_last,
            interest).
        covisitation: The `item_covisitation` mart (as_of, item_id, neighbour_item_id, score).
        item_features: The `item_features` mart (as_of, item_id, popularity_rank).
        config: Generator sizes.

    Returns:
        One row per (as_of, user_id, item_id) with covisit_score, covisit_hits, from_history,
        from_popular and candidate_rank (1 = first in the generators' own order).
    """
    queries = users.select(KEY).unique()
    recent = (
        user_items.join(queries, on=KEY, how="semi")
        .with_columns(
            pl.col("days_since_last").rank(method="ordinal").over(KEY).alias("recency_rank")
        )
        .filter(pl.col("recency_rank") <= config.recent_items)
        .select(*KEY, "item_id", "recency_rank")
    )
    history = recent.select(
        *KEY,
        "item_id",
        pl.lit(1.0).alias("from_history"),
        (1.0 / pl.col("recency_rank")).alias("history_score"),
    )
    # A neighbour of a more recent item counts more: weight by 1 / recency rank.
    covisited = (
        recent.join(covisitation, on=["as_of", "item_id"], how="inner")
        .group_by(*KEY, "neighbour_item_id")
        .agg(
            (pl.col("score") / pl.col("recency_rank")).sum().alias("covisit_score"),
            pl.len().cast(pl.Float64).alias("covisit_hits"),
        )
        .rename({"neighbour_item_id": "item_id"})
    )
    popular = queries.join(
        popular_items(item_features, config.popular_items), on="as_of", how="inner"
    ).select(*KEY, "item_id", pl.lit(1.0).alias("from_popular"), "popularity_rank")

    merged = (
        pl.concat([history, covisited, popular], how="diagonal_relaxed")
        .group_by(*KEY, "item_id")
        .agg(
            pl.col("covisit_score").sum(),
            pl.col("covisit_hits").sum(),
            pl.col("from_history").max().fill_null(0.0),
            pl.col("from_popular").max().fill_null(0.0),
            pl.col("history_score").max().fill_null(0.0),
            pl.col("popularity_rank").min(),
        )
    )
    # The generators' own order: recent history first, then co-visitation, then popularity.
    ranked = merged.sort(
        [*KEY, "history_score", "covisit_score", "popularity_rank", "item_id"],
        descending=[False, False, True, True, False, False],
        nulls_last=True,
    ).with_columns((pl.int_range(pl.len()).over(KEY) + 1).alias("candidate_rank"))
    return (
        ranked.filter(pl.col("candidate_rank") <= config.max_candidates)
        .select(
            *KEY,
            "item_id",
            "covisit_score",
            "covisit_hits",
            "from_history",
            "from_popular",
            pl.col("candidate_rank").cast(pl.Int32),
        )
        .sort(*KEY, "candidate_rank")
    )
