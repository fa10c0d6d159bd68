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
* `oracle` (only with the generator's ground truth): the candidates by their true preference.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import lightgbm as lgb
import numpy as np
import polars as pl

from models.candidates import popular_items
from models.features import feature_matrix
from models.metrics import QUERY, evaluation_metrics, item_interactions, top_k

SEGMENTS = ("new", "light", "heavy")
# The generator's constants (shelfwise/generate.py): share of sessions whose leaf comes from
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


def popularity_baseline(users: pl.DataFrame, item_features: pl.DataFrame, k: int) -> pl.DataFrame:
    """The `k` most popular items as of the cutoff (decayed weighted events), for every user.

    Args:
        users: Columns as_of, user_id.
        item_features: The `item_features` mart (as_of, item_id, popularity_rank).
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    ranked = popular_items(item_features, k).rename({"popularity_rank": "rank"})
    return _same_for_everyone(users, ranked)


def trending_baseline(users: pl.DataFrame, item_features: pl.DataFrame, k: int) -> pl.DataFrame:
    """The `k` items rising fastest with volume, for every user.

    An item's score is `trend * views_7d`: the ratio of its daily views over 7 days to those
    over 30 days (`trend`, above 1 = rising) times its views in the last 7 days, so a rising item
    needs volume too (a niche item going from 0 to 2 views does not win). Items without a view
    in the last 7 days are left out; ties break by item_id.

    Args:
        users: Columns as_of, user_id.
        item_features: The `item_features` mart (as_of, item_id, trend, views_7d).
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
    scored = item_features.filter(pl.col("views_7d").fill_null(0) > 0).select(
        "as_of",
        "item_id",
        (pl.col("trend").fill_null(1.0) * pl.col("views_7d")).cast(pl.Float64).alias("score"),
    )
    ranked = (
        scored.sort(["as_of", "score", "item_id"], descending=[False, True, False])
        .with_columns((pl.int_range(pl.len()).over("as_of") + 1).alias("rank"))
        .filter(pl.col("rank") <= k)
    )
    return _same_for_everyone(users, ranked)


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


def buy_again_baseline(users: pl.DataFrame, user_items: pl.DataFrame, k: int) -> pl.DataFrame:
    """Personal top frequency: the user's own past items.

    Ranked by purchases, then interactions (views + carts + purchases), then recency (fewest
    days since the last event), then item_id.

    Args:
        users: Columns as_of, user_id.
        user_items: The `user_item_features` mart (as_of, user_id, item_id, views, carts,
            purchases, days_since_last) as of the cutoff.
        k: List length.

    Returns:
        Columns as_of, user_id, item_id, rank.
    """
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

    The generator (`shelfwise/generate.py`) makes a view of item `i` by user `u` on day `d` by
    picking a leaf category (from the user's tastes with probability 0.88, else from the global
    leaf popularity) and then an item of that leaf with probability proportional to
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
    """

    metrics: dict[str, dict[str, float]]
    segments: dict[str, dict[str, dict[str, float]]]
    segment_users: dict[str, int]
    k: int
    heavy_threshold: int
    evaluation_cutoffs: list[str] = field(default_factory=list)

    @property
    def approaches(self) -> list[str]:
        """The approaches in evaluation order."""
        return list(self.metrics)

    def to_dict(self) -> dict[str, object]:
        """The report as plain dicts, lists, str, int and float (JSON-ready)."""

        def plain(metrics: dict[str, float]) -> dict[str, float | int]:
            return {
                name: int(value) if name == "users" else _finite(value)
                for name, value in metrics.items()
            }

        return {
            "evaluation_cutoffs": [str(cutoff) for cutoff in self.evaluation_cutoffs],
            "k": int(self.k),
            "heavy_threshold": int(self.heavy_threshold),
            "metrics": {name: plain(values) for name, values in self.metrics.items()},
            "segments": {
                segment: {name: plain(values) for name, values in approaches.items()}
                for segment, approaches in self.segments.items()
            },
            "segment_users": {name: int(count) for name, count in self.segment_users.items()},
        }


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


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
) -> EvaluationReport:
    """Evaluates the ranker and every baseline on the same users and held-out labels.

    Averages are over users with at least one positive label (`evaluated_users`), or over those
    of them among `queries` when a sample of queries is given: the labels and the candidates are
    then restricted to the sample first, so the ranker, every baseline and the oracle are
    scored on exactly the same users. Metrics are `ranking_metrics` at 10 and `k`, and coverage
    and novelty of the top 10 (`evaluation_metrics`). Novelty uses the interactions before the
    cutoff (`user_items`) of all users, sampled or not: it is a property of the items.

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

    Returns:
        The report; approaches in the order ranker, candidate_order, covisitation, buy_again,
        popularity, trending, oracle (when ground truth is given).
    """
    scored = _ranker_frame(assembled, scores)
    if queries is not None:
        sample = queries.select(QUERY).unique()
        labels = labels.join(sample, on=QUERY, how="semi")
        scored = scored.join(sample, on=QUERY, how="semi", maintain_order="left")
    assembled = scored.drop("score")
    users = evaluated_users(labels)
    k_values = tuple(sorted({min(10, k), k}))
    list_k = min(10, k)
    approaches: dict[str, pl.DataFrame] = {
        "ranker": top_k(scored, "score", k),
        "candidate_order": candidate_order_baseline(assembled, k),
        "covisitation": covisitation_baseline(assembled, k),
        "buy_again": buy_again_baseline(users, user_items, k),
        "popularity": popularity_baseline(users, item_features, k),
        "trending": trending_baseline(users, item_features, k),
    }
    if ground_truth is not None:
        approaches["oracle"] = oracle_baseline(
            assembled, ground_truth, k, item_features=item_features, trend_pivot=trend_pivot
        )
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
    cutoffs = sorted(users.get_column("as_of").unique().to_list())
    return EvaluationReport(
        metrics=score_all(labels),
        segments=per_segment,
        segment_users=segment_users,
        k=k,
        heavy_threshold=heavy_threshold,
        evaluation_cutoffs=[cutoff.isoformat() for cutoff in cutoffs],
    )
