"""The pipeline at scale: query samples, chunked candidates and snapshot, streamed Parquet.

Chunking must not change a single row (candidates and the serving snapshot are per query), and a
sample of queries must be evaluated the same for the ranker, every baseline and the oracle.
"""

import shutil
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from models.artifacts import (
    candidate_chunks,
    load_plan,
    read_candidates,
    read_evaluation_report,
    read_labels,
    read_training_set,
    sampled_queries,
)
from models.candidates import (
    CandidateConfig,
    CandidateSources,
    generate_candidates,
    generate_candidates_in_chunks,
    generator_recall,
    generator_recall_per_user,
    mean_recall,
)
from models.evaluation import evaluate
from models.marts import Marts
from models.queries import query_chunks, sample_queries, whole_queries
from models.recommender import serving_snapshot
from shelfwise.lake import SERVING_CANDIDATES, TRAINING_SET, Lake, candidates_file
from tests import test_candidates as hand_made
from tests import test_evaluation as small_evaluation

T1 = datetime(2026, 1, 8, tzinfo=UTC)
T2 = T1 + timedelta(days=7)


def queries_of(cutoffs_and_users):
    return pl.DataFrame(
        cutoffs_and_users,
        schema={"as_of": pl.Datetime("us", "UTC"), "user_id": pl.String},
        orient="row",
    )


def many_queries(n1, n2):
    return queries_of(
        [(T1, f"u{i:04d}") for i in range(n1)] + [(T2, f"u{i:04d}") for i in range(n2)]
    )


# --- sampling -----------------------------------------------------------------------------------


def test_a_cutoff_with_fewer_queries_than_the_limit_is_not_sampled():
    queries = many_queries(30, 10).sample(fraction=1.0, shuffle=True, seed=1)
    sampled = sample_queries(queries, 30, seed=7)
    assert_frame_equal(sampled, queries.sort("as_of", "user_id"))
    assert_frame_equal(sample_queries(queries, None, seed=7), sampled)


def test_sampling_is_per_cutoff_seeded_and_independent_of_other_cutoffs():
    queries = many_queries(500, 50)
    sampled = sample_queries(queries, 40, seed=7)
    counts = dict(sampled.group_by("as_of").len().rows())
    assert counts == {T1: 40, T2: 40}
    assert (
        sampled.is_unique().all()
        and sampled.join(queries, on=["as_of", "user_id"], how="anti").is_empty()
    )
    assert_frame_equal(sampled, sample_queries(queries.reverse(), 40, seed=7))
    assert not sampled.equals(sample_queries(queries, 40, seed=8))
    # The first cutoff's sample does not depend on the second cutoff being there.
    alone = sample_queries(queries.filter(pl.col("as_of") == T1), 40, seed=7)
    assert_frame_equal(alone, sampled.filter(pl.col("as_of") == T1))


def test_query_chunks_are_contiguous_and_cover_every_query_once():
    queries = many_queries(25, 12)
    chunks = query_chunks(pl.concat([queries, queries]), 10)
    assert [chunk.height for chunk in chunks] == [10, 10, 10, 7]
    assert_frame_equal(pl.concat(chunks), queries.sort("as_of", "user_id"))
    [empty] = query_chunks(queries.head(0), 10)
    assert empty.is_empty() and empty.columns == ["as_of", "user_id"]
    with pytest.raises(ValueError, match="at least 1"):
        query_chunks(queries, 0)


def test_whole_queries_regroups_batches_cut_inside_a_query():
    rows = queries_of([(T1, "a")] * 3 + [(T1, "b")] * 5 + [(T2, "a")] * 2 + [(T2, "c")])
    rows = rows.with_row_index("row")
    batches = [rows.slice(start, 4) for start in range(0, rows.height, 4)]
    regrouped = list(whole_queries(batches))
    assert_frame_equal(pl.concat(regrouped), rows)
    for frame in regrouped:
        keys = frame.select("as_of", "user_id").unique()
        assert rows.join(keys, on=["as_of", "user_id"], how="semi").height == frame.height
    with pytest.raises(ValueError, match="not grouped"):
        list(whole_queries([queries_of([(T1, "a"), (T1, "b"), (T1, "a")])]))
    # No rows: one empty frame, so that the consumer still sees the columns.
    [empty] = whole_queries([rows.head(0), rows.head(0)])
    assert empty.is_empty() and empty.columns == rows.columns
    assert list(whole_queries([])) == []


def test_an_empty_parquet_file_is_read_as_one_empty_batch(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    schema = queries_of([]).to_arrow().schema
    relpath = candidates_file("serving")
    lake.write_parquet_tables([], relpath, schema=schema)
    [batch] = lake.iter_parquet(relpath, batch_rows=10)
    assert batch.num_rows == 0 and batch.schema == schema
    [only] = lake.iter_parquet(relpath, batch_rows=10, columns=["user_id"])
    assert only.column_names == ["user_id"]


# --- chunked candidates -------------------------------------------------------------------------


def test_chunked_candidates_equal_one_pass_on_hand_made_marts():
    users = hand_made.make([("u1",), ("u2",), ("nobody",)], ["user_id"])
    whole = generate_candidates(users, hand_made.SOURCES, hand_made.CONFIG)
    chunks = list(generate_candidates_in_chunks(users, hand_made.SOURCES, hand_made.CONFIG, 1))
    assert len(chunks) == 3
    assert_frame_equal(pl.concat(chunks), whole)
    [empty] = generate_candidates_in_chunks(users.head(0), hand_made.SOURCES, hand_made.CONFIG, 5)
    assert empty.is_empty() and empty.columns == whole.columns


def pipeline_sources(lake):
    return CandidateSources.from_lake(lake)


def test_chunked_candidates_equal_one_pass_on_a_generated_shop(pipeline_run):
    lake = pipeline_run.lake
    sources = pipeline_sources(lake)
    # Every user at every cutoff: several cutoffs and chunks that cut across them.
    users = sources.users.select("as_of", "user_id")
    config = CandidateConfig()
    whole = generate_candidates(users, sources, config)
    chunked = pl.concat(list(generate_candidates_in_chunks(users, sources, config, 173)))
    assert whole.height > 100_000
    assert_frame_equal(chunked, whole)
    # What the asset wrote for serving is the same rows.
    serving = whole.filter(pl.col("as_of") == load_plan(lake).serving)
    assert_frame_equal(read_candidates(lake, "serving"), serving)


def test_recall_of_chunks_averages_to_the_recall_of_all_users(pipeline_run):
    lake = pipeline_run.lake
    plan = load_plan(lake)
    candidates = read_candidates(lake, "evaluation")
    labels = read_labels(lake, plan.evaluation)
    users = candidates.get_column("user_id").unique().sort()
    parts = []
    for start in range(0, users.len(), 50):
        chunk = candidates.filter(pl.col("user_id").is_in(users.slice(start, 50).implode()))
        chunk_labels = labels.join(
            chunk.select("as_of", "user_id"), on=["as_of", "user_id"], how="semi"
        )
        parts.append(generator_recall_per_user(chunk, chunk_labels))
    expected = generator_recall(candidates, labels)
    assert mean_recall(pl.concat(parts)) == pytest.approx(expected, rel=1e-12)


# --- chunked serving snapshot -------------------------------------------------------------------


def test_chunked_snapshot_equals_the_snapshot_of_all_users(pipeline_run, tmp_path):
    lake = pipeline_run.lake
    plan = load_plan(lake)
    tables = Marts.load(lake, [plan.serving])
    candidates = read_candidates(lake, "serving")
    whole = serving_snapshot(candidates, tables)
    # What the asset wrote (streamed in chunks) is the snapshot of all users at once.
    assert_frame_equal(lake.read_frame(SERVING_CANDIDATES), whole)
    # Small batches cut users in two; regrouped, each chunk is assembled against its users only.
    chunks = [
        serving_snapshot(chunk, tables.for_queries(chunk))
        for chunk in candidate_chunks(lake, "serving", 997)
    ]
    assert len(chunks) > 5
    assert_frame_equal(pl.concat(chunks), whole)
    copy = Lake(str(tmp_path / "lake"))
    copy.write_parquet_tables((chunk.to_arrow() for chunk in chunks), SERVING_CANDIDATES)
    assert_frame_equal(copy.read_frame(SERVING_CANDIDATES), whole)


# --- sampled evaluation -------------------------------------------------------------------------


def test_a_sample_evaluates_the_ranker_and_every_baseline_on_the_same_users():
    assembled = small_evaluation.candidates()
    scores = small_evaluation.perfect_scores(assembled)
    sample = small_evaluation.users_frame("u1", "u3")
    report = evaluate(
        assembled,
        scores,
        small_evaluation.labels(),
        small_evaluation.items(),
        small_evaluation.user_features(),
        small_evaluation.user_items(),
        ground_truth=small_evaluation.ground_truth(),
        queries=sample,
    )
    assert set(report.approaches) >= {"ranker", "buy_again", "popularity", "trending", "oracle"}
    assert {name: metrics["users"] for name, metrics in report.metrics.items()} == {
        name: 2 for name in report.approaches
    }
    assert report.segment_users == {"new": 1, "light": 0, "heavy": 1}
    # The same as evaluating only the sampled users' candidates and labels.
    kept = assembled.with_columns(pl.Series("s", scores)).join(
        sample, on=["as_of", "user_id"], how="semi"
    )
    alone = evaluate(
        kept.drop("s"),
        kept.get_column("s").to_numpy(),
        small_evaluation.labels().join(sample, on=["as_of", "user_id"], how="semi"),
        small_evaluation.items(),
        small_evaluation.user_features(),
        small_evaluation.user_items(),
        ground_truth=small_evaluation.ground_truth(),
    )
    assert report.to_dict() == alone.to_dict()


def materialize(asset, settings, config):
    import dagster as dg

    from orchestration.definitions import defs
    from orchestration.resources import ShelfwiseResource

    resources = {
        **defs.resources,
        "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url),
    }
    run_config = {"ops": {asset.key.to_user_string(): {"config": config}}} if config else None
    result = dg.materialize([asset], resources=resources, run_config=run_config)
    assert result.success
    [event] = result.get_asset_materialization_events()
    return {
        key: getattr(value, "value", value) for key, value in event.materialization.metadata.items()
    }


def test_assets_in_small_chunks_write_the_same_files_and_sampling_is_consistent(
    pipeline_run, tmp_path
):
    from orchestration.assets.evaluation import evaluation
    from orchestration.assets.ranking import candidates, training_set
    from orchestration.assets.snapshot import serving_features
    from shelfwise.settings import Settings

    assert pipeline_run.result.success, pipeline_run.failures
    original = pipeline_run.lake
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path / "home")})
    shutil.copytree(original.path(), settings.lake_url)
    lake = Lake(settings.lake_url)

    # Chunks of 97 queries and 5,000 rows: the same files as the pipeline's single chunk.
    materialize(candidates, settings, {"chunk_queries": 97})
    materialize(serving_features, settings, {"chunk_rows": 5_000})
    metadata = materialize(training_set, settings, {"chunk_rows": 5_000})
    paths = [candidates_file(role) for role in ("training", "evaluation", "serving")]
    for path in [*paths, SERVING_CANDIDATES, TRAINING_SET]:
        assert_frame_equal(lake.read_frame(path), original.read_frame(path))
    assert metadata["dagster/row_count"] == original.parquet_rows(TRAINING_SET)
    assert metadata["queries"] == (
        read_training_set(original).select("as_of", "user_id").n_unique()
    )

    # Sampled: at most 60 training queries per cutoff and 40 evaluation queries.
    metadata = materialize(
        candidates,
        settings,
        {"chunk_queries": 25, "max_training_queries_per_cutoff": 60, "max_evaluation_queries": 40},
    )
    evaluation_queries = sampled_queries(lake, "evaluation")
    assert evaluation_queries.height == metadata["evaluation_users"] == 40
    assert metadata["evaluation_labelled_queries"] > 40
    assert metadata["training_users"] == 60 * len(load_plan(lake).training)
    for role in ("training", "evaluation"):
        drawn = sampled_queries(lake, role).sort("as_of", "user_id")
        generated = read_candidates(lake, role).select("as_of", "user_id").unique()
        assert_frame_equal(generated.sort("as_of", "user_id"), drawn)
    # Every approach, the oracle too, is scored on the 40 sampled users (all have a positive).
    metadata = materialize(evaluation, settings, None)
    report = read_evaluation_report(lake)
    assert report["sample"] == {
        "evaluation_queries": 40,
        "labelled_queries": metadata["labelled_queries"],
    }
    assert metadata["sampled"] is True
    assert {name: values["users"] for name, values in report["metrics"].items()} == {
        name: 40 for name in report["metrics"]
    }
    assert "oracle" in report["metrics"] and "popularity" in report["metrics"]
    assert sum(report["segment_users"].values()) == 40
