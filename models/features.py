"""The ranker's feature vector, assembled in one place for training and for serving.

Training (past cutoffs) and the service (the serving cutoff) both call `assemble_features` on the
same dbt feature tables, so the two cannot drift apart. Missing values stay missing (null → NaN):
LightGBM learns what "no history" means instead of us pretending it is zero.
"""

import hashlib
from collections.abc import Sequence

import numpy as np
import polars as pl

from models.candidates import SCORE_COLUMNS
from models.marts import FEATURE_FIELDS, MART_OF_FIELD, Marts

# Candidate-generation signals, produced by `models.candidates.generate_candidates`.
CANDIDATE_FEATURES = [*SCORE_COLUMNS, "covisit_hits", "bought_together_hits", "sources"]

ITEM_FEATURES = {
    "popularity": "item_popularity",
    "popularity_rank": "item_popularity_rank",
    "views_1d": "item_views_1d",
    "views_7d": "item_views_7d",
    "views_30d": "item_views_30d",
    "purchases_7d": "item_purchases_7d",
    "purchases_30d": "item_purchases_30d",
    "users_30d": "item_users_30d",
    "trend": "item_trend",
    "view_to_cart_rate": "item_view_to_cart_rate",
    "cart_to_purchase_rate": "item_cart_to_purchase_rate",
    "price": "item_price",
    "age_days": "item_age_days",
    "buyers": "item_buyers",
    "rebuyer_share": "item_rebuyer_share",
    "repurchase_interval_days": "item_repurchase_interval_days",
}

USER_FEATURES = {
    "events": "user_events",
    "views": "user_views",
    "carts": "user_carts",
    "purchases": "user_purchases",
    "spend": "user_spend",
    "events_1d": "user_events_1d",
    "events_7d": "user_events_7d",
    "sessions": "user_sessions",
    "session_conversion_rate": "user_session_conversion_rate",
    "days_since_last_event": "user_days_since_last_event",
    "repeat_purchase_share": "user_repeat_purchase_share",
}

USER_ITEM_FEATURES = {
    "views": "user_item_views",
    "carts": "user_item_carts",
    "purchases": "user_item_purchases",
    "days_since_last": "user_item_days_since_last",
    "interest": "user_item_interest",
    # Repeat-purchase signals (dbt user_item_features).
    "purchases_decayed_7d": "user_item_purchases_decayed_7d",
    "purchases_decayed_30d": "user_item_purchases_decayed_30d",
    "purchases_decayed_90d": "user_item_purchases_decayed_90d",
    "days_since_last_purchase": "user_item_days_since_last_purchase",
    "purchase_occasions": "user_item_purchase_occasions",
    "purchase_basket_share": "user_item_purchase_basket_share",
    "own_repurchase_interval_days": "user_item_own_repurchase_interval_days",
    "repurchase_due_ratio": "user_item_repurchase_due_ratio",
}

USER_CATEGORY_FEATURES = {
    "affinity": "user_category_affinity",
    "purchases": "user_category_purchases",
    "days_since_last": "user_category_days_since_last",
}

USER_BRAND_FEATURES = {
    "affinity": "user_brand_affinity",
    "purchases": "user_brand_purchases",
    "days_since_last": "user_brand_days_since_last",
}

DERIVED_FEATURES = ["price_to_user_mean"]

FEATURE_COLUMNS: list[str] = [
    *CANDIDATE_FEATURES,
    *ITEM_FEATURES.values(),
    *USER_FEATURES.values(),
    *USER_ITEM_FEATURES.values(),
    *USER_CATEGORY_FEATURES.values(),
    *USER_BRAND_FEATURES.values(),
    *DERIVED_FEATURES,
]

# Candidate rows assembled into feature vectors at a time (training set, evaluation, serving
# snapshot): the joins' Float64 intermediates of 60 million rows would not fit in memory.
ASSEMBLY_CHUNK_ROWS = 2_000_000
# The marts of the feature vector (what the assets that assemble it depend on).
TABLE_NAMES = tuple(MART_OF_FIELD[name] for name in FEATURE_FIELDS)


def assemble_features(candidates: pl.DataFrame, tables: Marts) -> pl.DataFrame:
    """Joins candidates with every feature table into the ranker's feature vector.

    Args:
        candidates: One row per (as_of, user_id, item_id) with `CANDIDATE_FEATURES`; other
            columns (labels, sources) are kept.
        tables: The feature marts for the candidates' cutoffs.

    Returns:
        The candidates in their original order with `FEATURE_COLUMNS` added as Float32.
    """
    items = tables.items.select(
        "as_of",
        "item_id",
        "category_id",
        "brand",
        *[pl.col(k).alias(v) for k, v in ITEM_FEATURES.items()],
    )
    users = tables.users.select(
        "as_of", "user_id", "mean_price", *[pl.col(k).alias(v) for k, v in USER_FEATURES.items()]
    )
    user_items = tables.user_items.select(
        "as_of", "user_id", "item_id", *[pl.col(k).alias(v) for k, v in USER_ITEM_FEATURES.items()]
    )
    user_categories = tables.user_categories.select(
        "as_of",
        "user_id",
        "category_id",
        *[pl.col(k).alias(v) for k, v in USER_CATEGORY_FEATURES.items()],
    )
    user_brands = tables.user_brands.select(
        "as_of", "user_id", "brand", *[pl.col(k).alias(v) for k, v in USER_BRAND_FEATURES.items()]
    )
    assembled = (
        candidates.join(items, on=["as_of", "item_id"], how="left", maintain_order="left")
        .join(users, on=["as_of", "user_id"], how="left", maintain_order="left")
        .join(user_items, on=["as_of", "user_id", "item_id"], how="left", maintain_order="left")
        .join(
            user_categories,
            on=["as_of", "user_id", "category_id"],
            how="left",
            maintain_order="left",
        )
        .join(user_brands, on=["as_of", "user_id", "brand"], how="left", maintain_order="left")
        .with_columns(
            (pl.col("item_price") / pl.col("mean_price")).alias("price_to_user_mean"),
        )
        .drop("mean_price", "category_id", "brand")
    )
    return assembled.with_columns([pl.col(name).cast(pl.Float32) for name in FEATURE_COLUMNS])


def feature_matrix(assembled: pl.DataFrame) -> np.ndarray:
    """The `FEATURE_COLUMNS` of assembled rows as a float32 matrix (nulls become NaN)."""
    return assembled.select(FEATURE_COLUMNS).to_numpy().astype(np.float32, copy=False)


def feature_set_id(names: Sequence[str] = FEATURE_COLUMNS) -> str:
    """A short fingerprint of a feature list (its names, in order).

    The service's sampled feature rows carry it (`shelfwise.contracts.FEATURE_SAMPLES_SCHEMA`),
    so that the drift check recognises rows logged by a release with another feature list and
    leaves them out, rather than comparing them column by column with the wrong features.

    Args:
        names: The feature names, in the order of the vectors.

    Returns:
        16 hexadecimal characters.
    """
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
