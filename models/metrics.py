"""Ranking metrics, computed by our own code over users with at least one positive.

LightGBM's built-in NDCG scores a query without positives as 1.0, which flatters any model on
sparse data; here such users are excluded from every average, as ARCHITECTURE.md §5 requires.
"""

import polars as pl

QUERY = ["as_of", "user_id"]


def ranking_metrics(
    recommendations: pl.DataFrame, labels: pl.DataFrame, k_values: tuple[int, ...] = (10, 20)
) -> dict[str, float]:
    """NDCG@k (graded gains) and Recall@k, averaged over users with at least one positive.

    Args:
        recommendations: Columns as_of, user_id, item_id, rank (1 = shown first). Ranks beyond
            the largest k are ignored.
        labels: Columns as_of, user_id, item_id, label (> 0 is a positive). Every positive
            counts in the ideal ranking and in recall, also those no candidate reached.
        k_values: The cut-offs to report.

    Returns:
        `ndcg@k` and `recall@k` for each k, plus `users` (how many users were averaged). Users
        with positives but no recommendations count as 0.
    """
    positives = labels.filter(pl.col("label") > 0)
    users = positives.select(QUERY).unique()
    metrics: dict[str, float] = {"users": float(users.height)}
    if users.height == 0:
        for k in k_values:
            metrics[f"ndcg@{k}"] = 0.0
            metrics[f"recall@{k}"] = 0.0
        return metrics
    gain = (pl.lit(2.0).pow(pl.col("label")) - 1.0).alias("gain")
    hits = recommendations.join(
        positives.select(*QUERY, "item_id", "label"), on=[*QUERY, "item_id"], how="inner"
    ).with_columns(gain)
    ideal = positives.with_columns(gain).with_columns(
        pl.col("gain").rank(method="ordinal", descending=True).over(QUERY).alias("rank")
    )
    n_positives = positives.group_by(QUERY).agg(pl.len().alias("n_positives"))
    for k in k_values:
        discount = 1.0 / (pl.col("rank") + 1).log(base=2)
        dcg = (
            hits.filter(pl.col("rank") <= k)
            .group_by(QUERY)
            .agg((pl.col("gain") * discount).sum().alias("dcg"), pl.len().alias("hits"))
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
            .with_columns(pl.col("dcg", "hits").fill_null(0))
        )
        metrics[f"ndcg@{k}"] = float(
            per_user.select((pl.col("dcg") / pl.col("idcg")).mean()).item()
        )
        metrics[f"recall@{k}"] = float(
            per_user.select((pl.col("hits") / pl.col("n_positives")).mean()).item()
        )
    return metrics


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
