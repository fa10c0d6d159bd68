"""Bootstrap intervals: seeded, paired across series, and of the right width."""

import numpy as np
import pytest

from models.confidence import bootstrap_means, percentile_interval


def test_the_same_seed_gives_the_same_resamples_and_another_seed_others():
    values = np.random.default_rng(1).random((500, 3))
    first = bootstrap_means(values, resamples=200, seed=7)
    assert first.shape == (200, 3)
    np.testing.assert_array_equal(first, bootstrap_means(values, resamples=200, seed=7))
    assert not np.array_equal(first, bootstrap_means(values, resamples=200, seed=8))


def test_a_mean_of_hits_gets_about_the_normal_interval():
    # 2,000 users, 30% hits: the standard error is sqrt(0.3 * 0.7 / 2000) = 0.0102.
    hits = (np.random.default_rng(3).random(2_000) < 0.3).astype(float)[:, None]
    lower, upper = percentile_interval(bootstrap_means(hits))
    mean = hits.mean()
    assert lower[0] < mean < upper[0]
    assert upper[0] - lower[0] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 2_000), rel=0.15)


def test_series_are_resampled_with_the_same_users_so_differences_are_paired():
    rng = np.random.default_rng(4)
    # Users differ a lot (shared difficulty), the two approaches differ by a constant 0.01.
    difficulty = rng.random(1_000)
    values = np.column_stack([difficulty + 0.01, difficulty])
    means = bootstrap_means(values, resamples=300)
    lower, upper = percentile_interval(means[:, 0] - means[:, 1])
    assert lower == pytest.approx(0.01) and upper == pytest.approx(0.01)
    # Unpaired, each interval is far wider than the difference.
    each_lower, each_upper = percentile_interval(means)
    assert (each_upper - each_lower).min() > 0.02


def test_identical_series_have_a_zero_paired_difference_and_no_users_give_zeros():
    values = np.random.default_rng(5).random((50, 1))
    means = bootstrap_means(np.column_stack([values, values]), resamples=100)
    assert np.all(means[:, 0] - means[:, 1] == 0.0)
    assert np.all(bootstrap_means(np.zeros((0, 2)), resamples=10) == 0.0)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="2-dimensional"):
        bootstrap_means(np.zeros(3))
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_means(np.zeros((3, 1)), resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(np.zeros((3, 1)), confidence=1.0)
