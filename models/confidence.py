"""Bootstrap confidence intervals of per-user means, and of paired differences between them.

An offline metric is a mean over the evaluated users (queries: a user at a cutoff), so its
uncertainty is that of a sample of users: which users happened to shop in the label window.
The bootstrap resamples the users with replacement and recomputes every mean on each
resample; the 2.5th and 97.5th percentiles of those means are the 95% interval (the
percentile bootstrap, which needs no normality and suits bounded, skewed metrics like NDCG).

Every approach is resampled with the same users in each resample, so the difference of two
approaches' means on one resample is a *paired* difference: the spread that both share (a
resample with many easy users lifts every approach) cancels, and the interval of the
difference is much narrower than the two intervals suggest. That is what the promotion gate
reads.

The resamples are drawn from a seeded generator (deterministic) as counts per user, chunk by
chunk, and the means are a matrix product: at 50,000 users and 1,000 resamples the counts are
never all in memory at once (a chunk of 100 resamples is 40 MB).
"""

import numpy as np

DEFAULT_RESAMPLES = 1_000
DEFAULT_SEED = 20_251
CONFIDENCE = 0.95
_CHUNK = 100


def bootstrap_means(
    values: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> np.ndarray:
    """The column means of `values` on each bootstrap resample of its rows.

    Args:
        values: Shape (users, series): one row per user, one column per series (an
            approach's metric); every series is resampled with the same users.
        resamples: How many resamples.
        seed: Seed of the generator; the same seed, users and resamples give the same means.

    Returns:
        Shape (resamples, series). With no users, all zeros.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-dimensional (users, series), got {values.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    users, series = values.shape
    means = np.zeros((resamples, series), dtype=np.float64)
    if users == 0:
        return means
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        drawn = rng.integers(0, users, size=(size, users))
        # How often each user was drawn in each resample: one bincount over the whole chunk.
        offsets = (np.arange(size) * users)[:, None]
        counts = np.bincount((drawn + offsets).ravel(), minlength=size * users)
        means[start : start + size] = counts.reshape(size, users).astype(np.float64) @ values
    return means / users


def percentile_interval(
    samples: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of each column of bootstrap samples.

    Args:
        samples: Shape (resamples, series), e.g. from `bootstrap_means`.
        confidence: Coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns:
        Lower and upper bounds, each of shape (series,).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(samples, [tail, 1.0 - tail], axis=0)
    return lower, upper
