import dataclasses
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from models.features import (
    CANDIDATE_FEATURES,
    FEATURE_COLUMNS,
    assemble_features,
    feature_matrix,
)
from models.marts import Marts
from models.metrics import ranking_metrics, top_k
from models.ranker import RankerParams, train_ranker, train_ranker_with_validation_model

AS_OF = datetime(2026, 1, 8, tzinfo=UTC)


def tables():
    items = pl.DataFrame(
        {
            "as_of": [AS_OF] * 2,
            "item_id": ["a", "b"],
            "category_id": ["c1", "c2"],
            "brand": ["acme", "zenith"],
            "popularity": [5.0, 1.0],
            "popularity_rank": [1, 2],
            "views_1d": [1, 0],
            "views_7d": [3, 1],
            "views_30d": [9, 2],
            "purchases_7d": [1, 0],
            "purchases_30d": [2, 0],
            "users_30d": [4, 1],
            "trend": [1.2, 0.8],
            "view_to_cart_rate": [0.1, 0.05],
            "cart_to_purchase_rate": [0.5, 0.25],
            "price": [10.0, 40.0],
            "age_days": [30.0, 2.0],
            "buyers": [3, 0],
            "rebuyer_share": [1 / 3, None],
            "repurchase_interval_days": [14.0, None],
        }
    )
    users = pl.DataFrame(
        {
            "as_of": [AS_OF],
            "user_id": ["u1"],
            "mean_price": [20.0],
            "events": [5],
            "views": [4],
            "carts": [1],
            "purchases": [0],
            "spend": [0.0],
            "events_1d": [0],
            "events_7d": [5],
            "sessions": [2],
            "session_conversion_rate": [0.0],
            "days_since_last_event": [1.5],
            "repeat_purchase_share": [None],
        }
    )
    user_items = pl.DataFrame(
        {
            "as_of": [AS_OF],
            "user_id": ["u1"],
            "item_id": ["b"],
            "views": [2],
            "carts": [1],
            "purchases": [0],
            "days_since_last": [1.5],
            "interest": [2.5],
            "purchases_decayed_7d": [0.0],
            "purchases_decayed_30d": [0.0],
            "purchases_decayed_90d": [0.0],
            "days_since_last_purchase": [None],
            "purchase_occasions": [0],
            "purchase_basket_share": [None],
            "own_repurchase_interval_days": [None],
            "repurchase_due_ratio": [None],
        }
    )
    user_categories = pl.DataFrame(
        {
            "as_of": [AS_OF],
            "user_id": ["u1"],
            "category_id": ["c2"],
            "affinity": [1.0],
            "purchases": [0],
            "days_since_last": [1.5],
        }
    )
    user_brands = pl.DataFrame(
        {
            "as_of": [AS_OF],
            "user_id": ["u1"],
            "brand": ["acme"],
            "affinity": [0.25],
            "purchases": [1],
            "days_since_last": [4.0],
        }
    )
    return Marts(items, users, user_items, user_categories, user_brands)


def candidates(users, items):
    n = len(users)
    scores = {name: [0.0] * n for name in CANDIDATE_FEATURES}
    scores["popular_score"] = [1.0] * n
    return pl.DataFrame(
        {
            "as_of": [AS_OF] * n,
            "user_id": users,
            "item_id": items,
            **scores,
            "candidate_rank": list(range(1, n + 1)),
        }
    )


def test_assembly_keeps_candidate_order_and_joins_each_table_on_its_key():
    assembled = assemble_features(candidates(["u1", "u1", "new"], ["b", "a", "a"]), tables())
    assert assembled.select("user_id", "item_id").rows() == [("u1", "b"), ("u1", "a"), ("new", "a")]
    row_b, row_a, row_new = assembled.iter_rows(named=True)
    assert row_b["user_item_carts"] == 1 and row_b["user_category_affinity"] == 1.0
    assert row_b["user_brand_affinity"] is None and row_a["user_brand_affinity"] == 0.25
    assert row_a["user_item_carts"] is None and row_a["user_category_affinity"] is None
    assert row_b["price_to_user_mean"] == pytest.approx(2.0)
    assert row_new["user_events"] is None and row_new["item_popularity"] == 5.0
    assert set(FEATURE_COLUMNS) <= set(assembled.columns)
    matrix = feature_matrix(assembled)
    assert matrix.shape == (3, len(FEATURE_COLUMNS)) and matrix.dtype == np.float32
    assert np.isnan(matrix[2, FEATURE_COLUMNS.index("user_events")])


def synthetic_ranking_rows(seed, queries=300, per_query=20):
    """Rows where the label follows one feature noisily: a ranker must find it."""
    rng = np.random.default_rng(seed)
    n = queries * per_query
    data = {name: rng.normal(size=n).astype(np.float32) for name in FEATURE_COLUMNS}
    signal = data["user_item_interest"]
    noisy = signal + rng.normal(scale=0.5, size=n)
    label = np.digitize(noisy, [0.8, 1.5, 2.2]).astype(np.int32)
    return pl.DataFrame(
        {
            "as_of": [AS_OF] * n,
            "user_id": np.repeat([f"u{q:04d}" for q in range(queries)], per_query),
            "item_id": [f"i{i}" for i in range(n)],
            "label": label,
            **data,
        }
    )


def test_ranker_learns_the_signal_and_beats_a_random_order():
    train, valid, test = (synthetic_ranking_rows(seed) for seed in (1, 2, 3))
    params = RankerParams(num_boost_round=60, min_data_in_leaf=20)
    booster = train_ranker(train, valid, params)
    scored = test.with_columns(pl.Series("score", booster.predict(feature_matrix(test))))
    random = test.with_columns(pl.Series("score", np.random.default_rng(0).random(test.height)))
    labels = test.select("as_of", "user_id", "item_id", "label")
    ranker_ndcg = ranking_metrics(top_k(scored, "score", 10), labels)["ndcg@10"]
    random_ndcg = ranking_metrics(top_k(random, "score", 10), labels)["ndcg@10"]
    assert ranker_ndcg > random_ndcg + 0.3


def test_training_is_deterministic_for_a_seed_and_thread_count():
    rows = synthetic_ranking_rows(4, queries=100)
    params = RankerParams(num_boost_round=20, min_data_in_leaf=20)
    first = train_ranker(rows, None, params).predict(feature_matrix(rows))
    second = train_ranker(rows, None, params).predict(feature_matrix(rows))
    np.testing.assert_array_equal(first, second)


def test_the_ranker_is_refit_on_the_validation_window_with_the_rounds_early_stopping_chose():
    train, valid = synthetic_ranking_rows(5, queries=150), synthetic_ranking_rows(6, queries=150)
    params = RankerParams(num_boost_round=80, min_data_in_leaf=20, early_stopping_rounds=5)
    stopped = train_ranker(train, valid, dataclasses.replace(params, refit_with_validation=False))
    refit = train_ranker(train, valid, params)
    rounds = stopped.best_iteration
    assert 0 < rounds and refit.current_iteration() == rounds
    # The refit model is the one trained on both windows with those rounds, not the stopped one.
    both = pl.concat([train, valid])
    same = train_ranker(both, None, dataclasses.replace(params, num_boost_round=rounds))
    matrix = feature_matrix(valid)
    np.testing.assert_array_equal(refit.predict(matrix), same.predict(matrix))
    assert not np.allclose(refit.predict(matrix), stopped.predict(matrix, num_iteration=rounds))


def test_the_early_stopped_model_that_never_saw_the_validation_window_is_kept_on_a_refit():
    train, valid = synthetic_ranking_rows(5, queries=150), synthetic_ranking_rows(6, queries=150)
    params = RankerParams(num_boost_round=80, min_data_in_leaf=20, early_stopping_rounds=5)
    final, unseen = train_ranker_with_validation_model(train, valid, params)
    stopped = train_ranker(train, valid, dataclasses.replace(params, refit_with_validation=False))
    matrix = feature_matrix(valid)
    rounds = stopped.best_iteration
    np.testing.assert_array_equal(
        unseen.predict(matrix, num_iteration=rounds), stopped.predict(matrix, num_iteration=rounds)
    )
    np.testing.assert_array_equal(
        final.predict(matrix), train_ranker(train, valid, params).predict(matrix)
    )
    # Without a refit (or without validation) there is no second model.
    no_refit = dataclasses.replace(params, refit_with_validation=False)
    assert train_ranker_with_validation_model(train, valid, no_refit)[1] is None
    assert train_ranker_with_validation_model(train, None, params)[1] is None
