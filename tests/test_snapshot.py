"""The serving snapshot is loaded batch by batch into its factorised arrays, equal to building it
from the whole file in memory; a file in another order is loaded whole instead."""

import logging

import numpy as np
import polars as pl
import pytest

from models.features import FEATURE_COLUMNS
from models.recommender import Recommender
from models.snapshot import (
    SNAPSHOT_ORDER,
    CandidateSnapshot,
    SnapshotFeaturesError,
    SnapshotOrderError,
    load_snapshot,
)
from shelfwise.lake import SERVING, SERVING_CANDIDATES, dataset_file


def assert_same(streamed: CandidateSnapshot, whole: CandidateSnapshot) -> None:
    assert streamed.spans == whole.spans
    for name in ("pairs", "item_codes", "ranks", "items", "item_part", "user_part"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(whole, name), err_msg=name)


def test_the_pipelines_snapshot_streams_in_batches_equal_to_the_whole_file(pipeline_run, caplog):
    lake = pipeline_run.lake
    whole_file = lake.read_frame(SERVING_CANDIDATES)
    assert whole_file.height > 1_000
    # serving_features writes it in the order streaming needs.
    assert whole_file.select(SNAPSHOT_ORDER).equals(whole_file.select(SNAPSHOT_ORDER).sort("*"))
    with caplog.at_level(logging.WARNING, logger="models.snapshot"):
        # An odd batch size: many users' rows span two batches.
        streamed = load_snapshot(lake, FEATURE_COLUMNS, batch_rows=997)
    assert not caplog.records
    whole = CandidateSnapshot.from_frame(whole_file)
    assert_same(streamed, whole)
    user = next(iter(whole.spans))
    matrix, items = streamed.rows_of(streamed.spans[user])
    expected = whole_file.filter(pl.col("user_id") == user).sort("candidate_rank")
    np.testing.assert_array_equal(items, expected["item_id"].to_numpy())
    np.testing.assert_array_equal(
        matrix, expected.select(FEATURE_COLUMNS).to_numpy().astype(np.float32)
    )


def test_a_snapshot_in_another_order_is_loaded_whole(pipeline_run, tmp_path, caplog):
    lake = pipeline_run.lake
    whole_file = lake.read_frame(SERVING_CANDIDATES)
    shuffled = whole_file.sample(fraction=1.0, shuffle=True, seed=7)
    relpath = dataset_file(SERVING, "shuffled")
    lake.write_parquet(shuffled.to_arrow(), relpath)
    try:
        with caplog.at_level(logging.WARNING, logger="models.snapshot"):
            loaded = load_snapshot(lake, FEATURE_COLUMNS, relpath=relpath, batch_rows=997)
        assert "loading it whole" in caplog.text
        assert_same(loaded, CandidateSnapshot.from_frame(whole_file))
    finally:
        lake.remove([relpath])


def rows(users: list[str], ranks: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": users, "item_id": [f"i{n}" for n in range(len(users))], "candidate_rank": ranks}
    )


def test_streaming_rejects_rows_out_of_order_and_wrong_counts():
    with pytest.raises(SnapshotOrderError, match="'u1'.* not contiguous"):
        CandidateSnapshot.from_batches([rows(["u1", "u2"], [1, 1]), rows(["u1"], [2])], 3)
    with pytest.raises(SnapshotOrderError, match="candidate_rank order"):
        CandidateSnapshot.from_batches([rows(["u1"], [2]), rows(["u1"], [1])], 2)
    with pytest.raises(SnapshotOrderError, match="not the 3 announced"):
        CandidateSnapshot.from_batches([rows(["u1", "u1"], [1, 2])], 3)
    # A user continuing into the next batch is one user.
    snapshot = CandidateSnapshot.from_batches([rows(["u1"], [1]), rows(["u1", "u2"], [2, 1])], 3)
    assert snapshot.spans == {"u1": (0, 2, 0), "u2": (2, 3, 1)}
    assert snapshot.user_part.shape[0] == 2


def test_a_snapshot_built_for_another_ranker_is_refused_not_served_empty(pipeline_run):
    lake = pipeline_run.lake
    with pytest.raises(SnapshotFeaturesError, match="not_a_feature"):
        Recommender.from_lake(lake, None, [*FEATURE_COLUMNS, "not_a_feature"])
    # Without that ranker the same snapshot serves its users.
    assert Recommender.from_lake(lake, None).known_users > 0
