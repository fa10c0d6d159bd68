"""Ranking metrics, computed by our own code over users with at least one positive.

LightGBM's built-in NDCG scores a query without positives as 1.0, which flatters any model on
sparse data; here such users are excluded from every average, as ARCHITECTURE.md §5 requires.
"""

import polars as pl

QUERY = ["as_of", "user_id"]


RANKING_METRICS = ("ndcg", "recall", "map", "hit_rate", "mrr")


def per_user_metrics(
    recommendations: pl.DataFrame, labels: pl.DataFrame, k_values: tuple[int, ...] = (10, 20)
) -> pl.DataFrame:
    """Each evaluated user's ranking metrics at each k (what `ranking_metrics` averages).

    NDCG@k uses graded gains `2^label - 1`; the other metrics treat `label > 0` as relevant:

    * `recall@k`: positives in the top k / all of the user's positives;
    * `map@k`: average precision, `sum(precision@i for each relevant rank i <= k) /
      min(k, positives)`;
    * `hit_rate@k`: 1 when at least one positive is in the top k;
    * `mrr@k`: 1 / rank of the first positive in the top k (0 when none).

    Args:
        recommendations: Columns as_of, user_id, item_id, rank (1 = shown first). Ranks beyond
            the largest k are ignored.
        labels: Columns as_of, user_id, item_id, label (> 0 is a positive). Every positive
            counts in the ideal ranking and in recall, also those no candidate reached.
        k_values: The cut-offs to report.

    Returns:
        One row per user with at least one positive, sorted by as_of, user_id: the query
        columns and a Float64 column `<metric>@<k>` per metric and k. Users with positives but
        no recommendations score 0; users without a positive are absent.
    """
    positives = labels.filter(pl.col("label") > 0)
    users = positives.select(QUERY).unique().sort(QUERY)
    gain = (pl.lit(2.0).pow(pl.col("label")) - 1.0).alias("gain")
    hits = (
        recommendations.join(
            positives.select(*QUERY, "item_id", "label"), on=[*QUERY, "item_id"], how="inner"
        )
        .with_columns(gain)
        .sort(*QUERY, "rank")
        # How many positives are at or above this rank: precision@rank = this / rank.
        .with_columns((pl.int_range(pl.len()).over(QUERY) + 1).alias("hits_so_far"))
    )
    ideal = positives.with_columns(gain).with_columns(
        pl.col("gain").rank(method="ordinal", descending=True).over(QUERY).alias("rank")
    )
    n_positives = positives.group_by(QUERY).agg(pl.len().alias("n_positives"))
    result = users
    for k in k_values:
        discount = 1.0 / (pl.col("rank") + 1).log(base=2)
        dcg = (
            hits.filter(pl.col("rank") <= k)
            .group_by(QUERY)
            .agg(
                (pl.col("gain") * discount).sum().alias("dcg"),
                pl.len().alias("hits"),
                (pl.col("hits_so_far") / pl.col("rank")).sum().alias("precision_sum"),
                (1.0 / pl.col("rank").min()).alias("reciprocal_rank"),
            )
        )
        idcg = (
            ideal.filter(pl.col("rank") <= k)
            .group_by(QUERY)
            .agg((pl.col("gain") * discount).sum().alias("idcg"))
        )
        per_user = (
            users.join(idcg, on=QUERY, how="left")
            .join(dcg, on=QUERY, how="left")
            .join(n_positives, on=QUERY, how="left")
            .with_columns(pl.col("dcg", "hits", "precision_sum", "reciprocal_rank").fill_null(0))
            .select(
                *QUERY,
                (pl.col("dcg") / pl.col("idcg")).alias(f"ndcg@{k}"),
                (pl.col("hits") / pl.col("n_positives")).alias(f"recall@{k}"),
                (
                    pl.col("precision_sum") / pl.min_horizontal(pl.col("n_positives"), pl.lit(k))
                ).alias(f"map@{k}"),
                (pl.col("hits") > 0).alias(f"hit_rate@{k}"),
                pl.col("reciprocal_rank").alias(f"mrr@{k}"),
            )
        )
        result = result.join(per_user, on=QUERY, how="left")
    return result.with_columns(pl.exclude(QUERY).cast(pl.Float64)).sort(QUERY)


def mean_metrics(per_user: pl.DataFrame) -> dict[str, float]:
    """Averages `per_user_metrics` over its users.

    Args:
        per_user: The frame `per_user_metrics` returns.

    Returns:
        Each metric's mean (0.0 when there are no users) and `users`, how many were averaged.
    """
    names = [name for name in per_user.columns if name not in QUERY]
    metrics: dict[str, float] = {"users": float(per_user.height)}
    means = per_user.select(pl.col(names).mean()).row(0, named=True) if per_user.height else {}
    for name in names:
        metrics[name] = float(means.get(name) or 0.0)
    return metrics


def ranking_metrics(
    recommendations: pl.DataFrame, labels: pl.DataFrame, k_values: tuple[int, ...] = (10, 20)
) -> dict[str, float]:
    """Per-user ranking metrics at each k, averaged over users with at least one positive.

    The metrics are those of `per_user_metrics`, averaged by `mean_metrics`.

    Args:
        recommendations: Columns as_of, user_id, item_id, rank (1 = shown first).
        labels: Columns as_of, user_id, item_id, label (> 0 is a positive).
        k_values: The cut-offs to report.

    Returns:
        `ndcg@k`, `recall@k`, `map@k`, `hit_rate@k` and `mrr@k` for each k, plus `users` (how
        many users were averaged). Users with positives but no recommendations count as 0.
    """
    return mean_metrics(per_user_metrics(recommendations, labels, k_values))


def item_interactions(user_items: pl.DataFrame) -> pl.DataFrame:
    """How often each item was interacted with before each cutoff (the training history).

    Args:
        user_items: The `user_item_features` mart (as_of, user_id, item_id, views, carts,
            purchases).

    Returns:
        Columns as_of, item_id, interactions (views + carts + purchases over all users).
    """
    return user_items.group_by("as_of", "item_id").agg(
        pl.sum_horizontal(
            pl.col("views").fill_null(0),
            pl.col("carts").fill_null(0),
            pl.col("purchases").fill_null(0),
        )
        .sum()
        .cast(pl.Float64)
        .alias("interactions")
    )


def catalog_coverage(recommendations: pl.DataFrame, catalog: pl.DataFrame, k: int = 10) -> float:
    """Share of the catalog that appears in at least one user's top k.

    Args:
        recommendations: Columns as_of, user_id, item_id, rank.
        catalog: Columns as_of, item_id: the items that could be recommended at each cutoff
            (for example the `item_features` mart). Recommended items outside it are ignored.
        k: List length.

    Returns:
        Distinct (as_of, item) pairs recommended in a top k / catalog (as_of, item) pairs; 0.0
        for an empty catalog.
    """
    items = catalog.select("as_of", "item_id").unique()
    if items.height == 0:
        return 0.0
    shown = (
        recommendations.filter(pl.col("rank") <= k)
        .select("as_of", "item_id")
        .unique()
        .join(items, on=["as_of", "item_id"], how="semi")
    )
    return shown.height / items.height


def novelty(
    recommendations: pl.DataFrame,
    interactions: pl.DataFrame,
    catalog: pl.DataFrame,
    k: int = 10,
    smoothing: float = 1.0,
) -> float:
    """Mean self-information `-log2(p)` of the recommended items (higher = less popular).

    `p` is the item's share of the interactions before the cutoff, Laplace-smoothed so that
    never-seen items stay finite: `(interactions + smoothing) / (total + smoothing * items)`,
    where `items` counts the catalog and every item in the history.

    Args:
        recommendations: Columns as_of, user_id, item_id, rank.
        interactions: Columns as_of, item_id, interactions (see `item_interactions`).
        catalog: Columns as_of, item_id.
        k: List length; every (user, item) slot in the top k counts once.
        smoothing: Pseudo-count added to every item.

    Returns:
        The mean over recommended slots; 0.0 when nothing is recommended.
    """
    shown = recommendations.filter(pl.col("rank") <= k).select("as_of", "item_id")
    if shown.height == 0:
        return 0.0
    items = pl.concat(
        [
            catalog.select("as_of", "item_id"),
            interactions.select("as_of", "item_id"),
            shown,
        ]
    ).unique()
    counts = items.join(
        interactions.select("as_of", "item_id", "interactions"),
        on=["as_of", "item_id"],
        how="left",
    ).with_columns(pl.col("interactions").fill_null(0.0))
    share = counts.with_columns(
        (
            (pl.col("interactions") + smoothing)
            / (pl.col("interactions").sum().over("as_of") + smoothing * pl.len().over("as_of"))
        ).alias("share")
    )
    scored = shown.join(share, on=["as_of", "item_id"], how="left")
    return float(scored.select((-pl.col("share").log(base=2)).mean()).item())


def evaluation_metrics(
    recommendations: pl.DataFrame,
    labels: pl.DataFrame,
    catalog: pl.DataFrame,
    interactions: pl.DataFrame,
    k_values: tuple[int, ...] = (10, 20),
    list_k: int = 10,
) -> dict[str, float]:
    """`ranking_metrics` plus list-level `coverage@list_k` and `novelty@list_k`.

    The list-level metrics use only the lists of users with at least one positive, like every
    other metric, so that all approaches are compared on the same users.

    Args:
        recommendations: Columns as_of, user_id, item_id, rank.
        labels: Columns as_of, user_id, item_id, label.
        catalog: Columns as_of, item_id (see `catalog_coverage`).
        interactions: Columns as_of, item_id, interactions (see `item_interactions`).
        k_values: Cut-offs of the ranking metrics.
        list_k: List length of coverage and novelty.

    Returns:
        The metrics by name (see `ranking_metrics`), with `coverage@list_k` and
        `novelty@list_k`.
    """
    return {
        **ranking_metrics(recommendations, labels, k_values),
        **list_metrics(recommendations, labels, catalog, interactions, list_k),
    }


def list_metrics(
    recommendations: pl.DataFrame,
    labels: pl.DataFrame,
    catalog: pl.DataFrame,
    interactions: pl.DataFrame,
    list_k: int = 10,
) -> dict[str, float]:
    """`coverage@list_k` and `novelty@list_k` of the lists of users with at least one positive.

    Both are properties of all the lists together, not means of a value per user, so they
    have no per-user variant (and the evaluation gives them no bootstrap interval).

    Args:
        recommendations: Columns as_of, user_id, item_id, rank.
        labels: Columns as_of, user_id, item_id, label.
        catalog: Columns as_of, item_id (see `catalog_coverage`).
        interactions: Columns as_of, item_id, interactions (see `item_interactions`).
        list_k: List length.

    Returns:
        `coverage@list_k` and `novelty@list_k`.
    """
    users = labels.filter(pl.col("label") > 0).select(QUERY).unique()
    evaluated = recommendations.join(users, on=QUERY, how="semi")
    return {
        f"coverage@{list_k}": catalog_coverage(evaluated, catalog, list_k),
        f"novelty@{list_k}": novelty(evaluated, interactions, catalog, list_k),
    }


def top_k(scored: pl.DataFrame, score_column: str, k: int) -> pl.DataFrame:
    """Turns scored (as_of, user_id, item_id) rows into each user's top-k with a 1-based rank.

    Args:
        scored: Rows with the query columns, item_id and a score.
        score_column: Higher is better; ties break by item_id for determinism.
        k: How many to keep per user.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    return (
        scored.sort([*QUERY, score_column, "item_id"], descending=[False, False, True, False])
        .with_columns((pl.int_range(pl.len()).over(QUERY) + 1).alias("rank"))
        .filter(pl.col("rank") <= k)
        .select(*QUERY, "item_id", "rank")
    )
