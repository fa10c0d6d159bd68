"""Offline evaluation on the held-out window after the evaluation cutoff (a time split)."""

import lightgbm as lgb
import polars as pl

from models.candidates import popular_items
from models.features import feature_matrix
from models.metrics import ranking_metrics, top_k


def score_with_ranker(assembled: pl.DataFrame, booster: lgb.Booster) -> pl.DataFrame:
    """Adds the ranker's score to assembled candidate rows."""
    scores = booster.predict(
        feature_matrix(assembled), num_threads=booster.params.get("num_threads", 0)
    )
    return assembled.with_columns(pl.Series("score", scores, dtype=pl.Float64))


def evaluate_against_baselines(
    assembled: pl.DataFrame,
    booster: lgb.Booster,
    labels: pl.DataFrame,
    item_features: pl.DataFrame,
    k: int = 20,
) -> dict[str, dict[str, float]]:
    """Scores the ranker and the baselines on the same users and the same held-out labels.

    Args:
        assembled: Candidates of the evaluation users at the evaluation cutoff, with features.
        booster: The ranker.
        labels: Labels of the evaluation window (as_of = evaluation cutoff).
        item_features: `item_features` at the evaluation cutoff (for the popularity baseline).
        k: Longest list to evaluate (the largest metric cut-off).

    Returns:
        Metrics per approach: `ranker`, `candidate_order` (the generators without the ranker)
        and `popularity` (the same top items for everyone).
    """
    ranker = top_k(score_with_ranker(assembled, booster), "score", k)
    candidate_order = top_k(
        assembled.with_columns((-pl.col("candidate_rank")).alias("score")), "score", k
    )
    users = labels.filter(pl.col("label") > 0).select("as_of", "user_id").unique()
    popular = users.join(popular_items(item_features, k), on="as_of").select(
        "as_of", "user_id", "item_id", pl.col("popularity_rank").alias("rank")
    )
    return {
        name: ranking_metrics(recommendations, labels)
        for name, recommendations in (
            ("ranker", ranker),
            ("candidate_order", candidate_order),
            ("popularity", popular),
        )
    }
