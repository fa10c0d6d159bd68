"""Drift: the PSI against numbers worked out by hand, the real `feature_drift` check on a real lake
(live samples through the real feedback log and compactor), and a real service whose sampled
feature rows reach the lake equal to the rows it ranked."""

import math
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import httpx
import numpy as np
import polars as pl
import pytest

from bentos.feature_samples import FeatureSampler
from bentos.impressions import ImpressionLog
from models.artifacts import read_mart
from models.drift import (
    PSI_EPSILON,
    bin_shares,
    fallback_shares,
    feature_psi,
    population_stability_index,
    quantile_edges,
    read_live_samples,
    sample_parquet_rows,
)
from models.features import FEATURE_COLUMNS, feature_set_id
from models.recommender import ScoredRows
from orchestration.assets.drift import FEATURE_DRIFT_CHECK, feature_drift
from orchestration.assets.features import _fallback_metadata
from orchestration.resources import ShelfwiseResource
from shelfwise.home import prepare_home
from shelfwise.lake import FEATURE_SAMPLES, IMPRESSIONS, SERVING_CANDIDATES, TRAINING_SET, Lake
from shelfwise.runtime.feedback import FeedbackLog, compact_feedback
from shelfwise.settings import Settings
from tests.dbt_support import dbt
from tests.support import served_copy
from tests.test_feedback_log import make_impressions


def psi_by_hand(reference: list[float], current: list[float]) -> float:
    """The PSI formula written out, on shares worked out by the caller."""
    total = 0.0
    for ref, cur in zip(reference, current, strict=True):
        ref, cur = max(ref, PSI_EPSILON), max(cur, PSI_EPSILON)
        total += (cur - ref) * math.log(cur / ref)
    return total


# --- the index ---------------------------------------------------------------------------------


def test_a_sample_against_itself_or_a_resample_of_its_distribution_has_a_psi_near_zero():
    rng = np.random.default_rng(1)
    values = rng.lognormal(size=20_000)
    values[rng.random(values.size) < 0.2] = np.nan  # a fifth missing
    assert population_stability_index(values, values) == 0.0
    again = rng.lognormal(size=20_000)
    again[rng.random(again.size) < 0.2] = np.nan
    # Two samples of one distribution: about (bins - 1) * (1/n + 1/m) ≈ 0.001.
    assert population_stability_index(values, again) < 0.01


def test_the_psi_of_a_shifted_sample_is_the_hand_computed_one_above_the_threshold():
    reference = np.arange(1000, dtype=float)  # 0..999
    # Deciles of 0..999 (observed values): 99, 199, ..., 899; each bin holds 100 values.
    assert quantile_edges(reference).tolist() == [99 + 100 * n for n in range(9)]
    shifted = reference + 500  # 500..1499
    # Bins (-inf,99] .. (399,499] hold nothing of it; (499,599] .. (799,899] 100 values each;
    # (899, inf) the 600 values 900..1499; no missing value on either side.
    expected = psi_by_hand([0.1] * 10 + [0.0], [0.0] * 5 + [0.1] * 4 + [0.6] + [0.0])
    assert expected == pytest.approx(4.3463, abs=1e-3)
    assert population_stability_index(reference, shifted) == pytest.approx(expected, rel=1e-12)
    assert population_stability_index(reference, shifted) > 0.2


def test_missing_values_are_a_bin_of_their_own():
    present = np.arange(900, dtype=float)
    reference = np.concatenate([present, np.full(100, np.nan)])  # 10% missing
    current = np.concatenate([present, np.full(900, np.nan)])  # 50% missing
    # Deciles of the 900 present values: 89, 179, ..., 809, 90 values per bin: 9% of the
    # reference's rows each, 5% of the current's.
    assert quantile_edges(reference).tolist() == [89 + 90 * n for n in range(9)]
    expected = psi_by_hand([0.09] * 10 + [0.1], [0.05] * 10 + [0.5])
    assert population_stability_index(reference, current) == pytest.approx(expected, rel=1e-9)
    assert bin_shares(current, quantile_edges(reference))[-1] == 0.5


def test_a_point_mass_keeps_its_own_bin_and_an_unchanged_one_does_not_drift():
    # 80% zeros (the generator did not propose the item), the rest 1..200.
    reference = np.concatenate([np.zeros(800), np.linspace(1, 200, 200)])
    edges = quantile_edges(reference)
    # The 10%..80% quantiles are all 0, the 90% the 100th of the rest: 100.
    assert edges.tolist() == [0.0, 100.0]
    assert bin_shares(reference, edges)[0] == 0.8
    assert population_stability_index(reference, reference[::-1].copy()) == 0.0
    # Half as many zeros live: bins (-inf, 0], (0, 100], (100, inf), missing go from
    # 80%, 10%, 10%, 0 to 4/6, 1/6, 1/6, 0: a moderate shift.
    current = np.concatenate([np.zeros(400), np.linspace(1, 200, 200)])
    expected = psi_by_hand([0.8, 0.1, 0.1, 0.0], [4 / 6, 1 / 6, 1 / 6, 0.0])
    assert population_stability_index(reference, current) == pytest.approx(expected, rel=1e-9)
    assert 0.05 < expected < 0.2


def test_feature_psi_lists_the_features_worst_first():
    rng = np.random.default_rng(2)
    reference = pl.DataFrame({"steady": rng.normal(size=5000), "moved": rng.normal(size=5000)})
    current = pl.DataFrame(
        {"steady": rng.normal(size=5000), "moved": rng.normal(loc=1.0, size=5000)}
    )
    psi = feature_psi(reference, current, ["steady", "moved"])
    assert psi.get_column("feature").to_list() == ["moved", "steady"]
    assert psi.get_column("psi")[0] > 0.2 > psi.get_column("psi")[1]


def test_fallback_shares_are_per_day_with_every_level():
    daily = pl.DataFrame(
        {
            "shown_on": [date(2026, 11, 1)] * 3 + [date(2026, 11, 2)],
            "endpoint": ["recommend", "recommend", "similar", "recommend"],
            "fallback_level": [0, 2, 0, 0],
            "responses": [3, 1, 5, 2],
            "response_share": [0.75, 0.25, 1.0, 1.0],
        }
    )
    shares = fallback_shares(daily)
    assert shares.to_dicts() == [
        {
            "shown_on": date(2026, 11, 1),
            "responses": 4,
            "level_0": 0.75,
            "level_1": 0.0,
            "level_2": 0.25,
            "level_3": 0.0,
        },
        {
            "shown_on": date(2026, 11, 2),
            "responses": 2,
            "level_0": 1.0,
            "level_1": 0.0,
            "level_2": 0.0,
            "level_3": 0.0,
        },
    ]


# --- the service's sampler -----------------------------------------------------------------------


def test_the_sampler_logs_a_share_of_requests_a_bounded_draw_of_their_ranked_rows(tmp_path):
    rng = np.random.default_rng(4)
    rows = ScoredRows(
        matrix=rng.normal(size=(50, len(FEATURE_COLUMNS))).astype(np.float32),
        item_ids=np.array([f"i{n}" for n in range(50)]),
        scores=rng.normal(size=50),
    )
    now = datetime.now(UTC)
    lake = Lake(str(tmp_path / "lake"))
    with FeedbackLog(tmp_path / "wal") as log:
        sampler = FeatureSampler(log, rate=0.25, max_rows=8, seed=1)
        picked = [
            sampler.maybe_add(
                rows,
                rec_id=f"r{n}",
                sampled_at=now,
                user_id="u1",
                model_version="m",
                fallback_level=0,
            )
            for n in range(400)
        ]
        # Nothing to sample on the other rungs; nothing at rate 0.
        other = dict(rec_id="x", sampled_at=now, user_id="u", model_version=None, fallback_level=2)
        assert not sampler.maybe_add(None, **other)
        assert not FeatureSampler(log, rate=0.0, max_rows=8).maybe_add(rows, **other)
        sampler.close()
    assert 70 < sum(picked) < 130  # 100 expected
    compact_feedback(tmp_path / "wal", lake)
    logged = lake.read_frame(FEATURE_SAMPLES)
    assert logged.height == sum(picked) * 8
    per_request = logged.group_by("rec_id").agg(pl.col("item_id").n_unique())
    assert per_request.get_column("item_id").to_list() == [8] * sum(picked)
    # Each row is the candidate's own vector, score and place in the ranked order.
    order = {f"i{n}": place for place, n in enumerate(np.argsort(-rows.scores), start=1)}
    for row in logged.head(20).iter_rows(named=True):
        index = int(row["item_id"][1:])
        assert row["features"] == rows.matrix[index].tolist()
        assert row["score"] == rows.scores[index] and row["score_rank"] == order[row["item_id"]]


def test_the_sampler_draws_at_most_its_bound_per_second_whatever_the_share(tmp_path):
    now = [100.0]
    with FeedbackLog(tmp_path / "wal") as log:
        sampler = FeatureSampler(
            log, rate=1.0, max_rows=8, seed=1, max_per_s=2.0, clock=lambda: now[0]
        )
        assert [sampler.draw() for _ in range(5)] == [True, True, False, False, False]  # a burst
        now[0] += 0.5  # half a second: one more
        assert [sampler.draw() for _ in range(3)] == [True, False, False]
        now[0] += 10.0  # a quiet while fills the bucket to a second's worth, not more
        assert sum(sampler.draw() for _ in range(10)) == 2
        unbounded = FeatureSampler(log, rate=1.0, max_rows=8)  # max_per_s 0: no bound
        assert sum(unbounded.draw() for _ in range(50)) == 50
        half = FeatureSampler(log, rate=0.5, max_rows=8, seed=1, max_per_s=1000.0)
        assert 400 < sum(half.draw() for _ in range(1000)) < 600  # the share still applies
        for made in (sampler, unbounded, half):
            made.close()


def test_rows_that_cannot_be_built_are_dropped_and_the_writer_goes_on(tmp_path):
    class Unbuildable(Sequence):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> dict:
            raise RuntimeError("a bug in building rows")

    lake = Lake(str(tmp_path / "lake"))
    with FeedbackLog(tmp_path / "wal") as log:
        writer = ImpressionLog(log)
        assert writer.add(Unbuildable())
        assert writer.add(make_impressions("r1", 2))
        writer.close()
    assert writer.dropped == 3
    compact_feedback(tmp_path / "wal", lake)
    assert lake.read_frame(IMPRESSIONS).height == 2


# --- the check on a real lake -------------------------------------------------------------------


def feature_rows(rng: np.random.Generator, rows: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Feature columns of one distribution: a few kinds of shapes, some missing values."""
    columns = {}
    for index, name in enumerate(FEATURE_COLUMNS):
        kind = index % 3
        if kind == 0:
            values = rng.normal(loc=index, scale=1.0, size=rows)
        elif kind == 1:  # counts, mostly zero
            values = rng.poisson(0.3, size=rows).astype(float)
        else:  # a rate with missing values
            values = rng.beta(2, 5, size=rows)
            values[rng.random(rows) < 0.3] = np.nan
        columns[name] = values.astype(np.float32)
    columns[FEATURE_COLUMNS[0]] += np.float32(shift)
    return columns


def write_reference(lake: Lake, seed: int = 3) -> None:
    """A training set at two cutoffs and a serving snapshot, of one distribution."""
    rng = np.random.default_rng(seed)
    cutoffs = [datetime(2026, 10, 18, tzinfo=UTC), datetime(2026, 10, 25, tzinfo=UTC)]
    training = pl.DataFrame(
        {
            "as_of": [cutoff for cutoff in cutoffs for _ in range(3000)],
            "user_id": [f"u{n % 300}" for n in range(6000)],
            **feature_rows(rng, 6000),
        }
    )
    snapshot = pl.DataFrame({"user_id": [f"u{n}" for n in range(4000)], **feature_rows(rng, 4000)})
    lake.write_parquet(training.to_arrow(), TRAINING_SET)
    lake.write_parquet(snapshot.to_arrow(), SERVING_CANDIDATES)


def log_live_samples(home, lake: Lake, requests: int, shift: float, seed: int) -> None:
    """Sampled rows as the service logs them: through the feedback log, then compacted."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    with FeedbackLog(home / "wal") as log:
        for request in range(requests):
            columns = feature_rows(rng, 20, shift)
            matrix = np.column_stack([columns[name] for name in FEATURE_COLUMNS])
            log.append(
                FEATURE_SAMPLES,
                [
                    {
                        "rec_id": f"r{seed}-{request}",
                        "sampled_at": now,
                        "user_id": f"u{request}",
                        "model_version": "shelfwise_ranker:test",
                        "fallback_level": 0,
                        "item_id": f"i{row}",
                        "score_rank": row + 1,
                        "score": float(-row),
                        "feature_set": feature_set_id(),
                        "features": matrix[row].tolist(),
                    }
                    for row in range(20)
                ],
            )
    assert compact_feedback(home / "wal", lake).feature_samples == requests * 20


def run_check(home, lake: Lake, **config) -> dg.AssetCheckEvaluation:
    """The real check, alone (its asset and deps already in the lake), as Dagster runs it."""
    result = dg.materialize(
        [dg.AssetSpec("serving_features"), feature_drift],
        selection=dg.AssetSelection.checks(feature_drift),
        resources={"shelfwise": ShelfwiseResource(home=str(home), lake_url=lake.url)},
        run_config={"ops": {f"serving_features_{FEATURE_DRIFT_CHECK}": {"config": config}}},
    )
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation


@pytest.fixture
def reference_lake(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_reference(lake)
    return tmp_path, lake


def test_the_check_passes_with_a_note_without_live_samples(reference_lake):
    home, lake = reference_lake
    evaluation = run_check(home, lake)
    assert evaluation.passed, evaluation.description
    assert "no sampled requests in the last 7 day(s) yet" in evaluation.description
    assert evaluation.metadata["live_requests"].value == 0
    assert evaluation.metadata["max_psi_snapshot"].value < 0.05
    assert "max_psi_live" not in evaluation.metadata


def test_the_check_passes_on_an_unshifted_live_sample(reference_lake):
    home, lake = reference_lake
    log_live_samples(home, lake, requests=150, shift=0.0, seed=5)
    evaluation = run_check(home, lake)
    assert evaluation.passed, evaluation.description
    assert evaluation.metadata["live_requests"].value == 150
    assert evaluation.metadata["live_rows"].value == 3000
    assert evaluation.metadata["max_psi_live"].value < 0.2
    assert evaluation.metadata["drifted_features_live"].value == 0


def test_the_check_warns_on_a_shifted_live_sample_naming_the_feature(reference_lake):
    home, lake = reference_lake
    log_live_samples(home, lake, requests=150, shift=2.0, seed=6)
    evaluation = run_check(home, lake)
    moved = FEATURE_COLUMNS[0]
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert f"live: 1 feature(s) with PSI above 0.2 ({moved})" in evaluation.description
    assert evaluation.metadata["worst_feature_live"].value == moved
    assert evaluation.metadata["psi_by_feature_live"].value[moved] > 1.0
    table = evaluation.metadata["psi"].value
    assert table.splitlines()[2].startswith(f"| `{moved}` |") and "⚠" in table
    # The threshold is configuration: at 5 nothing is reported.
    assert run_check(home, lake, psi_threshold=5.0).passed


def test_the_snapshot_is_reported_and_judged_only_with_its_own_threshold(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    write_reference(lake)
    moved = FEATURE_COLUMNS[0]
    rng = np.random.default_rng(11)
    shifted = pl.DataFrame(
        {"user_id": [f"u{n}" for n in range(4000)], **feature_rows(rng, 4000, 2.0)}
    )
    lake.write_parquet(shifted.to_arrow(), SERVING_CANDIDATES)
    reported = run_check(tmp_path, lake)
    assert reported.passed, reported.description
    assert reported.metadata["worst_feature_snapshot"].value == moved
    assert reported.metadata["max_psi_snapshot"].value > 1.0
    assert "reported only" in reported.description
    judged = run_check(tmp_path, lake, snapshot_psi_threshold=0.2)
    assert not judged.passed
    assert f"snapshot: 1 feature(s) with PSI above 0.2 ({moved})" in judged.description


def test_too_few_live_requests_and_other_feature_lists_are_noted_not_judged(reference_lake):
    home, lake = reference_lake
    log_live_samples(home, lake, requests=10, shift=5.0, seed=7)
    evaluation = run_check(home, lake)
    assert evaluation.passed, evaluation.description
    assert "only 10 sampled request(s)" in evaluation.description
    live = read_live_samples(lake, FEATURE_COLUMNS[:-1], datetime.now(UTC).date(), 7)
    assert live.rows.height == 0 and live.other_feature_set_rows == 200


def test_old_days_are_not_read(reference_lake):
    _, lake = reference_lake
    home = reference_lake[0]
    log_live_samples(home, lake, requests=3, shift=0.0, seed=8)
    later = datetime.now(UTC).date() + timedelta(days=30)
    assert read_live_samples(lake, FEATURE_COLUMNS, later, 7).requests == 0
    assert read_live_samples(lake, FEATURE_COLUMNS, later, 31).requests == 3


def test_a_large_file_is_sampled_from_row_groups_spread_over_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lake = Lake(str(tmp_path))
    table = pa.table({"x": np.arange(100_000, dtype=np.float32)})
    pq.write_table(table, lake.path("big.parquet"), row_group_size=10_000)
    sample = sample_parquet_rows(lake, "big.parquet", ["x"], max_rows=5_000, seed=1)
    values = sample.get_column("x").to_numpy()
    assert sample.height == 5_000 and len(np.unique(values)) == 5_000
    # Four row groups of ten: the first, the last, two between.
    groups = set((values // 10_000).astype(int).tolist())
    assert groups == {0, 3, 6, 9}
    assert sample_parquet_rows(lake, "big.parquet", ["x"], max_rows=200_000).height == 100_000


# --- the pipeline and a real service -----------------------------------------------------------


@pytest.mark.slow
def test_the_check_runs_in_the_pipeline_and_fallback_levels_are_a_mart(pipeline_run):
    result = pipeline_run.result
    assert result.success, pipeline_run.failures
    [evaluation] = [
        e for e in result.get_asset_check_evaluations() if e.check_name == FEATURE_DRIFT_CHECK
    ]
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["rows_compared_snapshot"].value > 0
    assert "no sampled requests" in evaluation.description
    assert "| feature | PSI snapshot | PSI within training |" in evaluation.metadata["psi"].value


@pytest.mark.slow
def test_a_served_request_s_ranked_rows_reach_the_lake_when_sampled(pipeline_run, tmp_path):
    assert pipeline_run.result.success, pipeline_run.failures
    lake = pipeline_run.lake
    snapshot = lake.read_frame(SERVING_CANDIDATES, columns=["user_id", "item_id", *FEATURE_COLUMNS])
    user = snapshot.get_column("user_id")[0]
    env = {
        "SHELFWISE_FEATURE_SAMPLE_RATE": "1",
        "SHELFWISE_FEATURE_SAMPLES_PER_S": "0",  # no bound
        "SHELFWISE_FEATURE_SAMPLE_ROWS": "0",  # all of them
        "SHELFWISE_COMPACT_EVERY_S": "0",  # the test compacts
        "SHELFWISE_MODEL_POLL_S": "0",
    }
    with served_copy(pipeline_run.settings, tmp_path, env) as (url, copy):
        answer = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["strategy"] == "personalized"
        cold = httpx.post(f"{url}/recommend", json={"user_id": "nobody-knows-me"}, timeout=30)
        assert cold.json()["strategy"] != "personalized"
        time.sleep(1)  # the writer flushes every 0.2 s
    copy_lake = Lake(copy.lake_url)
    result = compact_feedback(copy.wal_dir, copy_lake)
    expected = snapshot.filter(pl.col("user_id") == user).drop("user_id").sort("item_id")
    assert result.feature_samples == expected.height
    sampled = copy_lake.read_frame(FEATURE_SAMPLES)
    assert set(sampled.get_column("rec_id")) == {body["rec_id"]}  # not the cold request
    assert set(sampled.get_column("user_id")) == {user}
    assert set(sampled.get_column("model_version")) == {body["model_version"]}
    assert set(sampled.get_column("feature_set")) == {feature_set_id()}
    # Every ranked candidate, with the vector the ranker scored: the user's snapshot rows.
    vectors = sampled.sort("item_id")
    assert vectors.get_column("item_id").to_list() == expected.get_column("item_id").to_list()
    matrix = np.array(vectors.get_column("features").to_list(), dtype=np.float32)
    want = expected.select(FEATURE_COLUMNS).to_numpy().astype(np.float32)
    np.testing.assert_array_equal(matrix, want)  # NaN where the snapshot has null
    # As the check reads them: one column per feature, missing as null, like the training set.
    live = read_live_samples(copy_lake, FEATURE_COLUMNS, datetime.now(UTC).date(), 1)
    assert live.requests == 1
    assert live.rows.sort("item_id").select("item_id", *FEATURE_COLUMNS).equals(expected)
    # The shown items are scored as the response says, and the best score is ranked first.
    scores = dict(zip(sampled.get_column("item_id"), sampled.get_column("score"), strict=True))
    for item in body["items"]:
        if item["source"] != "popular":
            assert scores[item["item_id"]] == pytest.approx(item["score"], rel=1e-6)
    best = sampled.sort("score", descending=True).row(0, named=True)
    assert best["score_rank"] == 1
    assert sorted(sampled.get_column("score_rank")) == list(range(1, expected.height + 1))


@pytest.mark.slow
def test_the_fallback_levels_mart_counts_responses_per_day_endpoint_and_level(tmp_path):
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path / "home")})
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    day_one = datetime(2026, 11, 2, 9, tzinfo=UTC)
    day_two = day_one + timedelta(days=1)
    # (rec_id, shown_at, endpoint, level, items shown)
    responses = [("a", day_one, "recommend", 0, 3), ("b", day_one, "recommend", 0, 2)]
    responses += [("c", day_one, "recommend", 1, 4), ("d", day_one, "recommend", 2, 1)]
    responses += [("e", day_one, "similar", 0, 5), ("f", day_two, "recommend", 3, 2)]
    with FeedbackLog(settings.wal_dir) as log:
        for rec_id, shown_at, endpoint, level, shown in responses:
            log.append(
                IMPRESSIONS,
                [
                    {
                        "rec_id": rec_id,
                        "shown_at": shown_at,
                        "user_id": "u1",
                        "item_id": f"i{position}",
                        "position": position,
                        "model_version": "m",
                        "strategy": f"{endpoint}:personalized",
                        "fallback_level": level,
                    }
                    for position in range(1, shown + 1)
                ],
            )
    compact_feedback(settings.wal_dir, lake)
    dbt(settings, ["build", "--select", "stg_lake__impressions fallback_levels"], [], tmp_path)
    mart = read_mart(lake, "fallback_levels").sort("shown_on", "endpoint", "fallback_level")
    assert mart.select("endpoint", "fallback_level", "responses", "response_share").rows() == [
        ("recommend", 0, 2, 0.5),  # a and b of the day's 4 /recommend responses
        ("recommend", 1, 1, 0.25),
        ("recommend", 2, 1, 0.25),
        ("similar", 0, 1, 1.0),
        ("recommend", 3, 1, 1.0),
    ]
    metadata = _fallback_metadata(mart)
    assert metadata["latest_day"] == "2026-11-03" and metadata["latest_day_responses"] == 1
    assert metadata["fallback_level_3_share"] == 1.0 and metadata["fallback_level_0_share"] == 0.0
    table = metadata["fallback_shares"].value
    assert "| 2026-11-02 | 4 | 50.0% | 25.0% | 25.0% | 0.0% |" in table
