"""Candidate generation: a couple of hundred plausible items per user, for the ranker to order.

Each generator is a plain function returning `(as_of, user_id, item_id, <generator>_score)`:

- `history`: the user's most recent items ("continue shopping"), scored by recency;
- `buy_again`: items the user bought, in categories whose repeat-purchase rate (learned from data,
  `category_repurchase_rates`) makes buying again plausible, scored by that rate;
- `covisit`: co-visitation neighbours of the recent items, weighted by the seed's recency;
- `bought_together`: items carted or bought with what the user carted or bought;
- `collaborative`: items the user never touched that users with a similar history took: EASE
  learned from the whole user x item matrix of the cutoff (`models.collaborative`);
- `category_popular`: the most popular items of the user's favourite categories;
- `content`: new items (no or little history) in the user's favourite categories, closest to the
  user's usual price first — so new items reach users before anyone interacted with them;
- `trending`: items rising fastest overall (decayed popularity times trend);
- `popular`: the most popular items overall (all a user without history gets, with `trending`).

Items the catalog marks as not recommendable (`is_recommendable` false: fees, postage, gift cards)
are never proposed. They stay in every feature (they are real purchases), but each generator drops
them before its own top-n cut, so its list keeps its length; nor are they among the user's recent
items that seed the neighbour generators (serving rebuilds those from the snapshot's candidates).

`generate_candidates` merges them into up to `max_candidates` per user, plus up to
`discovery_slots` items new to the user when the cut dropped some. Every generator's score
stays a feature of the candidate (0 when that generator did not propose it), and
`candidate_rank` is the order the generators alone would show. `generate_candidates_in_chunks`
does the same chunk by chunk of queries, for shops whose candidates do not fit in memory at once.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from models.collaborative import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_REGULARISATION,
    ItemItemModel,
    collaborative_scores,
    fit_item_models,
)
from models.marts import CANDIDATE_FIELDS, Marts
from models.queries import query_chunks
from shelfwise.lake import Lake

KEY = ["as_of", "user_id"]
ROW = [*KEY, "item_id"]

GENERATORS = (
    "history",
    "buy_again",
    "covisit",
    "bought_together",
    "collaborative",
    "category_popular",
    "content",
    "trending",
    "popular",
)
SCORE_COLUMNS = [f"{name}_score" for name in GENERATORS]
# The `item_features` column that is false for items never to propose (fees, postage, gift cards).
IS_RECOMMENDABLE = "is_recommendable"


@dataclass(frozen=True)
class CandidateConfig:
    """Sizes of the candidate generators.

    Attributes:
        recent_items: How many of the user's most recent items are candidates and seed
            co-visitation and bought-together.
        min_repeat_rate: Categories below this repeat-purchase rate get no "buy again".
        top_categories: How many favourite categories feed category_popular and content.
        per_category: Items per favourite category (category_popular and content each).
        new_item_days: Items younger than this count as new for the content generator.
        trending_items: Items from the trending generator.
        popular_items: Items from the popular generator.
        max_candidates: Candidates kept per user after merging.
        collaborative_items: Items per user from the collaborative generator.
        discovery_slots: Candidates added beyond `max_candidates` to a list it cut: the best
            cut items that are not the user's own (neither history nor buy-again), so a long
            history does not leave the ranker nothing new to show.
        collaborative_max_items: Items in the collaborative model (those with the most users;
            its weights are a dense square of this size).
        collaborative_regularisation: The collaborative model's lambda (EASE).
    """

    recent_items: int = 20
    min_repeat_rate: float = 0.05
    top_categories: int = 3
    per_category: int = 15
    new_item_days: float = 14.0
    trending_items: int = 30
    popular_items: int = 50
    max_candidates: int = 200
    collaborative_items: int = 50
    discovery_slots: int = 50
    collaborative_max_items: int = DEFAULT_MAX_ITEMS
    collaborative_regularisation: float = DEFAULT_REGULARISATION


@dataclass(frozen=True)
class CandidateSources(Marts):
    """The marts the generators read and the collaborative model of each cutoff.

    Any cutoffs: the generators join on `as_of`.

    Attributes:
        item_models: The collaborative model of each cutoff, fitted from `user_items` (as_of →
            model; without one the collaborative generator proposes nothing at that cutoff).
    """

    item_models: Mapping[datetime, ItemItemModel] = field(default_factory=dict)

    @classmethod
    def from_lake(cls, lake: Lake, config: CandidateConfig | None = None) -> "CandidateSources":
        """Reads the marts the generators need and fits each cutoff's collaborative model.

        Args:
            lake: The lake dbt exported to.
            config: The collaborative model's sizes (defaults when None).

        Returns:
            The sources, every cutoff included.
        """
        config = config or CandidateConfig()
        marts = Marts.load(lake, fields=CANDIDATE_FIELDS)
        models = fit_item_models(
            marts.user_items, config.collaborative_max_items, config.collaborative_regularisation
        )
        return cls(**{name: getattr(marts, name) for name in CANDIDATE_FIELDS}, item_models=models)


def recommendable(item_features: pl.DataFrame) -> pl.DataFrame:
    """The rows of items that may be recommended.

    Args:
        item_features: Rows with as_of and item_id; `is_recommendable` when known (a frame
            without it, from marts built before the flag, counts every item as recommendable;
            a null flag is recommendable too).

    Returns:
        The rows whose `is_recommendable` is not false, in their order.
    """
    if IS_RECOMMENDABLE not in item_features.columns:
        return item_features
    return item_features.filter(pl.col(IS_RECOMMENDABLE).fill_null(True))


def not_recommendable(item_features: pl.DataFrame) -> pl.DataFrame:
    """The (as_of, item_id) pairs of items that must never be proposed (empty when none)."""
    if IS_RECOMMENDABLE not in item_features.columns:
        return pl.DataFrame(schema={"as_of": item_features.schema["as_of"], "item_id": pl.String})
    return item_features.filter(~pl.col(IS_RECOMMENDABLE).fill_null(True)).select(
        "as_of", "item_id"
    )


def popular_items(item_features: pl.DataFrame, n: int) -> pl.DataFrame:
    """The `n` most popular recommendable items per cutoff.

    Items that are not recommendable are left out before the cut, so each cutoff still gets `n`.

    Args:
        item_features: The `item_features` mart (columns as_of, item_id, popularity_rank and
            optionally is_recommendable).
        n: Items per cutoff.

    Returns:
        Columns as_of, item_id, popularity_rank (1 = most popular), sorted.
    """
    return (
        recommendable(item_features)
        .filter(pl.col("popularity_rank").rank(method="ordinal").over("as_of") <= n)
        .select("as_of", "item_id", "popularity_rank")
        .sort("as_of", "popularity_rank")
    )


def _recent(queries: pl.DataFrame, user_items: pl.DataFrame, n: int) -> pl.DataFrame:
    return (
        user_items.join(queries, on=KEY, how="semi")
        .with_columns(
            pl.col("days_since_last").rank(method="ordinal").over(KEY).alias("recency_rank")
        )
        .filter(pl.col("recency_rank") <= n)
    )


def history(queries: pl.DataFrame, user_items: pl.DataFrame, n: int) -> pl.DataFrame:
    """The user's `n` most recent items, scored 1 / recency rank."""
    recent = _recent(queries, user_items, n)
    return recent.select(*ROW, (1.0 / pl.col("recency_rank")).alias("history_score"))


def buy_again(
    queries: pl.DataFrame,
    user_items: pl.DataFrame,
    item_features: pl.DataFrame,
    repurchase_rates: pl.DataFrame,
    min_repeat_rate: float,
) -> pl.DataFrame:
    """Items the user bought in categories people do buy again, scored by the repeat rate."""
    categories = item_features.select("as_of", "item_id", "category_id")
    return (
        user_items.join(queries, on=KEY, how="semi")
        .filter(pl.col("purchases") > 0)
        .join(categories, on=["as_of", "item_id"], how="inner")
        .join(repurchase_rates, on=["as_of", "category_id"], how="inner")
        .filter(pl.col("repeat_rate") >= min_repeat_rate)
        .select(*ROW, pl.col("repeat_rate").alias("buy_again_score"))
    )


def neighbours(seeds: pl.DataFrame, neighbourhood: pl.DataFrame, score_name: str) -> pl.DataFrame:
    """Neighbours of each user's seed items, summing `score / seed rank` over the seeds.

    Args:
        seeds: as_of, user_id, item_id, recency_rank.
        neighbourhood: as_of, item_id, neighbour_item_id, score (co-visitation, bought together).
        score_name: Name of the summed score column.

    Returns:
        as_of, user_id, item_id, `score_name`, and `<score_name without _score>_hits`.
    """
    hits = score_name.removesuffix("_score") + "_hits"
    return (
        seeds.join(neighbourhood, on=["as_of", "item_id"], how="inner")
        .group_by(*KEY, "neighbour_item_id")
        .agg(
            (pl.col("score") / pl.col("recency_rank")).sum().alias(score_name),
            pl.len().cast(pl.Float64).alias(hits),
        )
        .rename({"neighbour_item_id": "item_id"})
    )


def _favourite_categories(
    queries: pl.DataFrame, user_categories: pl.DataFrame, n: int
) -> pl.DataFrame:
    return (
        user_categories.join(queries, on=KEY, how="semi")
        .with_columns(
            pl.col("affinity").rank(method="ordinal", descending=True).over(KEY).alias("rank")
        )
        .filter(pl.col("rank") <= n)
        .select(*KEY, "category_id", "affinity")
    )


def category_popular(
    favourites: pl.DataFrame, item_features: pl.DataFrame, per_category: int
) -> pl.DataFrame:
    """The most popular items of each favourite category, scored affinity / rank in category."""
    ranked = item_features.with_columns(
        pl.col("popularity")
        .rank(method="ordinal", descending=True)
        .over("as_of", "category_id")
        .alias("category_rank")
    ).filter(pl.col("category_rank") <= per_category)
    return favourites.join(ranked, on=["as_of", "category_id"], how="inner").select(
        *ROW, (pl.col("affinity") / pl.col("category_rank")).alias("category_popular_score")
    )


def content(
    favourites: pl.DataFrame,
    item_features: pl.DataFrame,
    user_features: pl.DataFrame,
    per_category: int,
    new_item_days: float,
) -> pl.DataFrame:
    """New items of each favourite category, nearest the user's usual price first."""
    new_items = item_features.filter(pl.col("age_days") < new_item_days).select(
        "as_of", "item_id", "category_id", "price"
    )
    prices = user_features.select(*KEY, "mean_price")
    return (
        favourites.join(new_items, on=["as_of", "category_id"], how="inner")
        .join(prices, on=KEY, how="left")
        .with_columns(
            (pl.col("price").log() - pl.col("mean_price").log()).abs().fill_null(0.0).alias("gap")
        )
        .with_columns(pl.col("gap").rank(method="ordinal").over(*KEY, "category_id").alias("r"))
        .filter(pl.col("r") <= per_category)
        .select(*ROW, (pl.col("affinity") / (1.0 + pl.col("gap"))).alias("content_score"))
    )


def trending(queries: pl.DataFrame, item_features: pl.DataFrame, n: int) -> pl.DataFrame:
    """The items rising fastest overall: decayed popularity times trend."""
    top = (
        item_features.with_columns((pl.col("popularity") * pl.col("trend")).alias("trending"))
        .with_columns(
            pl.col("trending").rank(method="ordinal", descending=True).over("as_of").alias("r")
        )
        .filter(pl.col("r") <= n)
        .select("as_of", "item_id", pl.col("trending").alias("trending_score"))
    )
    return queries.join(top, on="as_of", how="inner").select(*ROW, "trending_score")


def popular(queries: pl.DataFrame, item_features: pl.DataFrame, n: int) -> pl.DataFrame:
    """The most popular items overall, scored 1 / popularity rank."""
    top = popular_items(item_features, n)
    return queries.join(top, on="as_of", how="inner").select(
        *ROW, (1.0 / pl.col("popularity_rank")).alias("popular_score")
    )


def generate_candidates(
    users: pl.DataFrame, sources: CandidateSources, config: CandidateConfig
) -> pl.DataFrame:
    """Merges every generator into up to `config.max_candidates` candidates per (as_of, user).

    Args:
        users: The queries: columns as_of, user_id (users unknown at that cutoff are fine).
        sources: The feature marts.
        config: Generator sizes.

    Returns:
        One row per (as_of, user_id, item_id) with every generator's score (0 when it did not
        propose the item), `covisit_hits`, `bought_together_hits`, `sources` (how many
        generators proposed it) and `candidate_rank` (1 = first in the generators' own order).
    """
    queries = users.select(KEY).unique()
    # Items never to propose leave the generators' inputs before any top-n cut (the user's own
    # items, the catalog's); the neighbour marts have no cut here and are filtered afterwards.
    blocked = not_recommendable(sources.items)
    user_items = sources.user_items
    if blocked.height:
        user_items = user_items.join(blocked, on=["as_of", "item_id"], how="anti")
    items = recommendable(sources.items)
    recent = _recent(queries, user_items, config.recent_items)
    carted = recent.filter((pl.col("carts") > 0) | (pl.col("purchases") > 0))
    favourites = _favourite_categories(queries, sources.user_categories, config.top_categories)
    generated = [
        history(queries, user_items, config.recent_items),
        buy_again(queries, user_items, items, sources.repurchase_rates, config.min_repeat_rate),
        neighbours(recent, sources.covisitation, "covisit_score"),
        neighbours(carted, sources.bought_together, "bought_together_score"),
        collaborative_scores(
            queries, user_items, sources.item_models, config.collaborative_items, blocked
        ),
        category_popular(favourites, items, config.per_category),
        content(favourites, items, sources.users, config.per_category, config.new_item_days),
        trending(queries, items, config.trending_items),
        popular(queries, items, config.popular_items),
    ]
    proposed = pl.concat(generated, how="diagonal_relaxed")
    if blocked.height:  # marts built before the flag may still hold them as neighbours
        proposed = proposed.join(blocked, on=["as_of", "item_id"], how="anti")
    extra = ["covisit_hits", "bought_together_hits"]
    merged = (
        proposed.group_by(ROW)
        .agg(*[pl.col(name).max() for name in [*SCORE_COLUMNS, *extra]])
        .with_columns([pl.col(name).fill_null(0.0) for name in [*SCORE_COLUMNS, *extra]])
        .with_columns(pl.sum_horizontal([pl.col(s) > 0 for s in SCORE_COLUMNS]).alias("sources"))
    )
    # The generators' own order: the user's own items, then their neighbourhoods, then what
    # their categories and the whole shop offer.
    ranked = merged.sort(
        [*KEY, *SCORE_COLUMNS, "item_id"],
        descending=[False, False, *[True] * len(SCORE_COLUMNS), False],
    )
    # Discovery keeps room: a grocer's regular has bought more items than `max_candidates`, and
    # in the generators' order their own items alone would fill every slot, leaving the ranker
    # nothing new to show. A list cut at `max_candidates` gets up to `discovery_slots` more: the
    # best of the cut items that are not the user's own (proposed by neither history nor
    # buy-again). Cutting own items instead cost the full Complete Journey year 0.005 NDCG@10.
    own = (pl.col("history_score") > 0) | (pl.col("buy_again_score") > 0)
    head = pl.int_range(pl.len()).over(KEY) < config.max_candidates
    beyond = ~own & ~head
    extra_slots = max(0, config.discovery_slots)
    kept = ranked.filter(
        head | (beyond & (beyond.cast(pl.Int32).cum_sum().over(KEY) <= extra_slots))
    )
    # Still in (as_of, user_id, generators') order: filters keep the sort above.
    return kept.with_columns(
        (pl.int_range(pl.len()).over(KEY) + 1).cast(pl.Int32).alias("candidate_rank")
    ).select(*ROW, *SCORE_COLUMNS, *extra, pl.col("sources").cast(pl.Int32), "candidate_rank")


def generate_candidates_in_chunks(
    users: pl.DataFrame, sources: CandidateSources, config: CandidateConfig, chunk_size: int
) -> Iterator[pl.DataFrame]:
    """`generate_candidates` chunk by chunk of at most `chunk_size` queries.

    The chunks are contiguous in (as_of, user_id) order, so their concatenation is the frame
    `generate_candidates(users, sources, config)` returns, row for row; memory is bounded by the
    chunk (a 300,000-user shop's co-visitation neighbours alone do not fit at once). Each chunk
    joins only against its own users' rows of the per-user marts.

    Args:
        users: The queries: columns as_of, user_id.
        sources: The feature marts.
        config: Generator sizes.
        chunk_size: Queries per chunk.

    Yields:
        Each chunk's candidates (see `generate_candidates`); one empty frame when there is no
        query.
    """
    queries = users.select(KEY).unique()
    # Cut the marts down to these queries once, then per chunk from the smaller frames.
    sources = sources.for_queries(queries)
    for chunk in query_chunks(queries, chunk_size):
        yield generate_candidates(chunk, sources.for_queries(chunk), config)


def generator_recall_per_user(candidates: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Each user's share of held-out positives that each generator (and the merged set) proposed.

    Args:
        candidates: Output of `generate_candidates` for the evaluation cutoff.
        labels: Labels of the window after that cutoff (label > 0 is a positive); only the
            users with at least one positive get a row.

    Returns:
        as_of, user_id, `merged` and one column per generator, sorted by user.
    """
    positives = labels.filter(pl.col("label") > 0).select(ROW)
    joined = positives.join(candidates, on=ROW, how="left")
    columns = {"merged": pl.col("candidate_rank").is_not_null()}
    columns |= {name: pl.col(f"{name}_score").fill_null(0) > 0 for name in GENERATORS}
    return (
        joined.group_by(KEY)
        .agg([expr.cast(pl.Float64).mean().alias(name) for name, expr in columns.items()])
        .sort(KEY)
    )


def mean_recall(per_user: pl.DataFrame) -> dict[str, float]:
    """Averages `generator_recall_per_user` rows (of one or several chunks) over the users.

    Returns:
        `merged` and each generator's recall; empty when no user has a positive.
    """
    if per_user.height == 0:
        return {}
    names = ["merged", *GENERATORS]
    return {name: float(per_user.get_column(name).mean()) for name in names}


def generator_recall(candidates: pl.DataFrame, labels: pl.DataFrame) -> dict[str, float]:
    """Share of the held-out positives each generator (and the merged set) proposed.

    Averaged over users with at least one positive, like the ranking metrics.

    Args:
        candidates: Output of `generate_candidates` for the evaluation cutoff.
        labels: Labels of the window after that cutoff (label > 0 is a positive).

    Returns:
        `merged` recall of the merged candidates and `<generator>` recall for each generator.
    """
    return mean_recall(generator_recall_per_user(candidates, labels))
