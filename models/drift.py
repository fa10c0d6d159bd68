"""Drift: does what the ranker sees now still look like what it was trained on?

The population stability index (PSI) of every feature compares a current sample (the feature rows
of live requests, or the serving snapshot) with a reference (the ranker's training rows):

    PSI = sum over bins b of (current_b - reference_b) * ln(current_b / reference_b)

where `x_b` is the share of a sample's rows in bin b. The bins are cut at the reference's
quantiles (deciles by default), so each holds about a tenth of the training rows; a value equal
to an edge falls in the bin below it (right-closed bins), so a point mass such as "0: the
generator did not propose it" keeps a bin of its own instead of being split. Missing values
(null or NaN: the ranker's "no history") are a bin of their own, so a feature that goes missing
more often shows up. An empty bin's share counts as `PSI_EPSILON`, or the logarithm would be
infinite. Rules of thumb: below 0.1 no shift, 0.1–0.2 moderate, above 0.2 significant
(`DEFAULT_PSI_THRESHOLD`).

Reading the samples stays fast at scale: a large Parquet file (the training set, 10 million rows;
the snapshot, 72 million at the 10-million-event shop) is sampled by whole row groups spread
evenly over the file, then by a seeded uniform draw of rows among them (`sample_parquet_rows`),
so only a few row groups are decoded. The live samples are read by whole files (one per log
segment and day), a seeded choice of them when they hold more rows than needed.
"""

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from models.features import feature_set_id
from shelfwise.lake import FEATURE_SAMPLES, SERVING_CANDIDATES, TRAINING_SET, Lake, partition_day

DEFAULT_BINS = 10
# The usual reading of the PSI: above 0.2 a significant shift.
DEFAULT_PSI_THRESHOLD = 0.2
# The share an empty bin counts as (on either side), so that ln(current / reference) is finite.
PSI_EPSILON = 1e-4
# Rows a sample is cut to: with 10 bins the PSI of two samples of the same distribution is
# about (bins - 1) * (1/n + 1/m) ≈ 1e-4 at this size, far below any threshold.
DEFAULT_MAX_ROWS = 100_000
# Row groups decoded at most to draw a sample of a large file (about 1 million rows each).
MAX_ROW_GROUPS = 4
# The sampled feature rows' columns besides the features (shelfwise.contracts).
FEATURES_COLUMN = "features"
FEATURE_SET_COLUMN = "feature_set"


def quantile_edges(reference: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """The bin edges of a feature: its reference's quantiles, without repeats.

    Args:
        reference: The reference values (NaN for missing; missing values are ignored here).
        bins: How many quantile bins (10: deciles).

    Returns:
        The sorted, distinct values at the quantiles 1/bins, ..., (bins-1)/bins of the present
        values (observed values, so a point mass lands on an edge); empty when none is present.
    """
    present = reference[~np.isnan(reference)]
    if not present.size:
        return np.empty(0)
    levels = np.arange(1, bins) / bins
    return np.unique(np.quantile(present, levels, method="inverted_cdf"))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The share of values in each bin: `len(edges) + 1` value bins, then the missing bin.

    Bin i holds the values v with edges[i-1] < v <= edges[i] (the first from minus infinity, the
    last to plus infinity).

    Args:
        values: The values (NaN for missing).
        edges: Sorted bin edges (`quantile_edges`).

    Returns:
        Shares summing to 1 (all zeros for no values), the missing bin last.
    """
    missing = np.isnan(values)
    index = np.searchsorted(edges, values[~missing], side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(np.float64)
    counts = np.append(counts, missing.sum())
    return counts / values.size if values.size else counts


def psi_of_shares(
    reference: np.ndarray, current: np.ndarray, epsilon: float = PSI_EPSILON
) -> float:
    """The PSI of two share vectors over the same bins.

    Args:
        reference: The reference's shares per bin.
        current: The current sample's shares per bin.
        epsilon: The share an empty bin counts as.

    Returns:
        sum((current - reference) * ln(current / reference)), never negative.
    """
    ref = np.maximum(reference, epsilon)
    cur = np.maximum(current, epsilon)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def population_stability_index(
    reference: np.ndarray,
    current: np.ndarray,
    bins: int = DEFAULT_BINS,
    epsilon: float = PSI_EPSILON,
) -> float:
    """The PSI of one feature: bins from the reference's quantiles, missing as its own bin.

    Args:
        reference: The reference sample (training rows), NaN for missing.
        current: The sample to compare (live or snapshot rows), NaN for missing.
        bins: Quantile bins of the reference.
        epsilon: The share an empty bin counts as.

    Returns:
        The PSI; 0 for identical distributions.
    """
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    edges = quantile_edges(reference, bins)
    return psi_of_shares(bin_shares(reference, edges), bin_shares(current, edges), epsilon)


def feature_psi(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    features: Sequence[str],
    bins: int = DEFAULT_BINS,
) -> pl.DataFrame:
    """The PSI of every feature, largest first.

    Args:
        reference: The reference rows (training), one column per feature; nulls are missing.
        current: The rows to compare, with the same feature columns.
        features: The features to compare.
        bins: Quantile bins of the reference.

    Returns:
        feature, psi, reference_missing and current_missing (the shares of missing values),
        sorted by psi descending (then by name).
    """
    records = []
    for name in features:
        ref = _values(reference, name)
        cur = _values(current, name)
        records.append(
            {
                "feature": name,
                "psi": population_stability_index(ref, cur, bins),
                "reference_missing": float(np.isnan(ref).mean()) if ref.size else math.nan,
                "current_missing": float(np.isnan(cur).mean()) if cur.size else math.nan,
            }
        )
    schema = {
        "feature": pl.String,
        "psi": pl.Float64,
        "reference_missing": pl.Float64,
        "current_missing": pl.Float64,
    }
    return pl.DataFrame(records, schema=schema).sort(["psi", "feature"], descending=[True, False])


def _values(frame: pl.DataFrame, name: str) -> np.ndarray:
    """A feature column as float64 with NaN for null."""
    return frame.get_column(name).cast(pl.Float64).fill_null(math.nan).to_numpy()


@dataclass(frozen=True)
class Comparison:
    """The PSI of every feature of one sample against the reference.

    Attributes:
        name: What was compared (`live`, `snapshot`).
        rows: The compared sample's rows.
        psi: `feature_psi`'s table, largest first.
        requests: For live samples, the sampled requests the rows came from.
    """

    name: str
    rows: int
    psi: pl.DataFrame
    requests: int | None = None

    def drifted(self, threshold: float) -> list[str]:
        """The features whose PSI is above the threshold, largest first."""
        return self.psi.filter(pl.col("psi") > threshold).get_column("feature").to_list()

    @property
    def max_psi(self) -> float:
        """The largest PSI of any feature (0 without features)."""
        return float(self.psi.get_column("psi").max() or 0.0)


def psi_markdown(
    comparisons: Sequence[Comparison],
    threshold: float,
    top: int = 15,
    spread: Comparison | None = None,
) -> str:
    """The worst features of the comparisons as one Markdown table (for Dagster metadata).

    Args:
        comparisons: The judged comparisons, one PSI column each.
        threshold: The warning threshold (a PSI above it is marked "⚠").
        top: How many features to list, in the order of their largest PSI in any comparison.
        spread: The training spread (`DriftReport.training_spread`), shown in a column of its
            own for reading the others, never marked.

    Returns:
        A table: feature, each comparison's PSI, the training spread's, then the share of
        missing values in training and in each comparison.
    """
    if not comparisons:
        return "nothing compared"
    names = [comparison.name for comparison in comparisons]
    joined = comparisons[0].psi.select(
        "feature", pl.col("reference_missing").alias("missing_training")
    )
    for comparison in [*comparisons, *([spread] if spread else [])]:
        joined = joined.join(
            comparison.psi.select(
                "feature",
                pl.col("psi").alias(f"psi_{comparison.name}"),
                pl.col("current_missing").alias(f"missing_{comparison.name}"),
            ),
            on="feature",
            how="left",
        )
    worst = pl.max_horizontal(*(pl.col(f"psi_{name}") for name in names))
    joined = joined.with_columns(worst.alias("_worst")).sort(
        ["_worst", "feature"], descending=[True, False], nulls_last=True
    )
    header = ["feature", *(f"PSI {name}" for name in names)]
    header += ["PSI within training"] if spread else []
    header += ["missing training", *(f"missing {name}" for name in names)]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in joined.head(top).iter_rows(named=True):
        cells = [f"`{row['feature']}`"]
        for name in names:
            value = row[f"psi_{name}"]
            mark = " ⚠" if value is not None and value > threshold else ""
            cells.append("–" if value is None else f"{value:.3f}{mark}")
        if spread:
            value = row[f"psi_{spread.name}"]
            cells.append("–" if value is None else f"{value:.3f}")
        cells.append(_share(row["missing_training"]))
        cells += [_share(row[f"missing_{name}"]) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1%}"


def sample_parquet_rows(
    lake: Lake,
    relpath: str,
    columns: Sequence[str],
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> pl.DataFrame:
    """A seeded sample of at most `max_rows` rows of a Parquet file, decoding few row groups.

    A file of at most `max_rows` rows is read whole. Otherwise up to `MAX_ROW_GROUPS` row
    groups spread evenly over the file (first, last and between; at least as many as hold
    `max_rows` rows) are read, and `max_rows` of their rows drawn uniformly. The pipeline writes
    its files chunk by chunk of sorted queries, so evenly spread row groups cover the early and
    the late cutoffs and users from across the id range.

    Args:
        lake: The lake.
        relpath: A Parquet file in it.
        columns: The columns to read.
        max_rows: The most rows returned.
        seed: Seed of the draw.

    Returns:
        The sampled rows (in file order), only `columns`.
    """
    with lake.fs.open(lake.path(relpath), "rb") as handle:
        parquet = pq.ParquetFile(handle)
        metadata = parquet.metadata
        if metadata.num_rows <= max_rows:
            table = parquet.read(columns=list(columns), use_threads=False)
            return _frame(table)
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        needed = 1
        while needed < len(sizes) and sum(sorted(sizes)[-needed:]) < max_rows:
            needed += 1
        count = min(len(sizes), max(needed, MAX_ROW_GROUPS))
        groups = sorted({round(i) for i in np.linspace(0, len(sizes) - 1, count)})
        table = parquet.read_row_groups(groups, columns=list(columns), use_threads=False)
    frame = _frame(table)
    if frame.height <= max_rows:
        return frame
    chosen = np.sort(np.random.default_rng(seed).choice(frame.height, max_rows, replace=False))
    return frame[chosen]


def _frame(table: object) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


@dataclass(frozen=True)
class LiveSample:
    """The sampled feature rows of live requests, one column per feature.

    Attributes:
        rows: The rows of the current feature set: rec_id, sampled_at, model_version, item_id
            and one column per feature.
        requests: The sampled requests they came from.
        other_feature_set_rows: Rows logged with another feature list (another code version),
            left out.
        days: The days read (`date=` partitions), oldest first.
    """

    rows: pl.DataFrame
    requests: int
    other_feature_set_rows: int
    days: list[str]


def read_live_samples(
    lake: Lake,
    features: Sequence[str],
    today: date,
    days: int,
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> LiveSample:
    """The sampled feature rows of the last `days` days (`today` included).

    Args:
        lake: The lake (`feature_samples/date=YYYY-MM-DD/`).
        features: The feature list the rows should have been logged with (`FEATURE_COLUMNS`).
        today: The last day read (UTC).
        days: How many days back, `today` included.
        max_rows: When the files hold more rows, a seeded choice of whole files holding at
            least this many is read (every file is a log segment's slice of a day, so the
            choice spreads over the days).
        seed: Seed of that choice.

    Returns:
        The rows with one column per feature (missing as null).
    """
    first = today - timedelta(days=days - 1)
    files = [
        relpath
        for relpath in lake.list_files(FEATURE_SAMPLES)
        if (day := partition_day(relpath)) is not None
        and first.isoformat() <= day <= today.isoformat()
    ]
    rows_per_file = {relpath: lake.parquet_rows(relpath) for relpath in files}
    if sum(rows_per_file.values()) > max_rows:
        shuffled = random.Random(seed).sample(files, len(files))
        chosen, total = [], 0
        for relpath in shuffled:
            if total >= max_rows:
                break
            chosen.append(relpath)
            total += rows_per_file[relpath]
        files = sorted(chosen)
    columns = [
        "rec_id",
        "sampled_at",
        "model_version",
        "item_id",
        FEATURE_SET_COLUMN,
        FEATURES_COLUMN,
    ]
    frames = [_frame(lake.read_table(relpath, columns=columns)) for relpath in files]
    empty = pl.DataFrame(
        schema={
            "rec_id": pl.String,
            "sampled_at": pl.Datetime("us", "UTC"),
            "model_version": pl.String,
            "item_id": pl.String,
            FEATURE_SET_COLUMN: pl.String,
            FEATURES_COLUMN: pl.List(pl.Float32),
        }
    )
    logged = pl.concat([empty, *(frame.cast(empty.schema) for frame in frames)])
    current = logged.filter(pl.col(FEATURE_SET_COLUMN) == feature_set_id(features))
    wide = current.select(
        "rec_id",
        "sampled_at",
        "model_version",
        "item_id",
        *(
            # NaN is how the service's matrix says "missing": null, as in the training set.
            pl.col(FEATURES_COLUMN).list.get(index).fill_nan(None).alias(name)
            for index, name in enumerate(features)
        ),
    )
    days_read = sorted({day for relpath in files if (day := partition_day(relpath))})
    return LiveSample(
        rows=wide,
        requests=wide.get_column("rec_id").n_unique(),
        other_feature_set_rows=logged.height - current.height,
        days=days_read,
    )


@dataclass(frozen=True)
class DriftReport:
    """Live requests and the serving snapshot against the ranker's training rows.

    Attributes:
        comparisons: The judged comparisons: `live` (when enough requests were sampled), then
            `snapshot` (when the lake holds one).
        threshold: A live feature whose PSI is above it has drifted.
        snapshot_threshold: The same for the snapshot; None (the default) reports the snapshot's
            PSI without judging it. The snapshot holds every known user, the training rows only
            the users active in the week after each cutoff, so recency and activity features
            differ by construction (PSI 0.26-0.36 on the 10M-event shop for features that move
            0.01-0.05 between training cutoffs): judged, it would warn on every run.
        live: The live sample read (also when too small to be judged).
        reference_rows: The training rows compared against (a sample of them at scale).
        training_spread: For reading the others: the PSI of the training rows at the last
            training cutoff against those at the first (how much the features move between
            cutoffs the ranker learned from); never judged. None with one cutoff.
        notes: What was left out and why (no live samples yet, too few, another feature set).
    """

    comparisons: list[Comparison]
    threshold: float
    live: LiveSample
    reference_rows: int
    training_spread: Comparison | None
    notes: list[str]
    snapshot_threshold: float | None = None

    def threshold_of(self, comparison: Comparison) -> float | None:
        """The threshold a comparison is judged by; None when it is only reported."""
        return self.snapshot_threshold if comparison.name == "snapshot" else self.threshold

    def drifted(self) -> dict[str, list[str]]:
        """Per judged comparison, its features above its threshold (largest PSI first)."""
        return {
            c.name: c.drifted(limit)
            for c in self.comparisons
            if (limit := self.threshold_of(c)) is not None
        }

    @property
    def passed(self) -> bool:
        """Whether no feature of a judged comparison is above its threshold."""
        return not any(self.drifted().values())

    def description(self) -> str:
        """One paragraph for the check's result."""
        parts = []
        for comparison in self.comparisons:
            limit = self.threshold_of(comparison)
            if limit is None:
                parts.append(
                    f"{comparison.name}: largest PSI {comparison.max_psi:.3f} "
                    f"({comparison.psi.row(0)[0] if comparison.psi.height else '-'}), reported "
                    "only: it holds every known user, the training rows only recently active ones"
                )
                continue
            drifted = comparison.drifted(limit)
            if drifted:
                listed = ", ".join(drifted[:5]) + (" …" if len(drifted) > 5 else "")
                parts.append(
                    f"{comparison.name}: {len(drifted)} feature(s) with PSI above "
                    f"{limit:g} ({listed})"
                )
            else:
                parts.append(
                    f"{comparison.name}: no feature above {limit:g} "
                    f"(largest PSI {comparison.max_psi:.3f})"
                )
        return "; ".join(parts + self.notes) or "nothing to compare"

    def markdown(self, top: int = 15) -> str:
        """The worst features as a Markdown table, the training spread beside them."""
        return psi_markdown(self.comparisons, self.threshold, top, self.training_spread)


def compare_to_training(
    lake: Lake,
    features: Sequence[str],
    today: date,
    *,
    live_days: int = 7,
    threshold: float = DEFAULT_PSI_THRESHOLD,
    snapshot_threshold: float | None = None,
    bins: int = DEFAULT_BINS,
    max_rows: int = DEFAULT_MAX_ROWS,
    min_live_requests: int = 100,
    seed: int = 0,
) -> DriftReport:
    """The PSI of every feature of live requests and of the serving snapshot against training.

    Args:
        lake: The lake: the training set, the serving snapshot and the sampled live rows.
        features: The ranker's features (`FEATURE_COLUMNS`).
        today: The last day of live samples read (UTC).
        live_days: How many days of live samples, `today` included.
        threshold: The PSI above which a live feature has drifted.
        snapshot_threshold: The same for the snapshot; None reports it without judging it.
        bins: Quantile bins of the training distribution.
        max_rows: Rows sampled from each side at most (`sample_parquet_rows`).
        min_live_requests: Fewer sampled requests than this are not judged (every row of a
            request shares its user's features: the PSI of a few requests is noise).
        seed: Seed of the samples.

    Returns:
        The report; `passed` when no feature's PSI is above the threshold.
    """
    reference = sample_parquet_rows(lake, TRAINING_SET, [*features, "as_of"], max_rows, seed)
    notes: list[str] = []
    comparisons: list[Comparison] = []
    live = read_live_samples(lake, features, today, live_days, max_rows, seed)
    if live.requests >= min_live_requests:
        psi = feature_psi(reference, live.rows, features, bins)
        comparisons.append(Comparison("live", live.rows.height, psi, live.requests))
    elif live.requests:
        notes.append(
            f"live: only {live.requests} sampled request(s) in the last {live_days} day(s), "
            f"fewer than {min_live_requests}: not judged"
        )
    else:
        notes.append(
            f"live: no sampled requests in the last {live_days} day(s) yet "
            "(SHELFWISE_FEATURE_SAMPLE_RATE): only the snapshot is compared"
        )
    if live.other_feature_set_rows:
        notes.append(
            f"live: {live.other_feature_set_rows} row(s) logged with another feature list left out"
        )
    if lake.exists(SERVING_CANDIDATES):
        snapshot = sample_parquet_rows(lake, SERVING_CANDIDATES, features, max_rows, seed)
        psi = feature_psi(reference, snapshot, features, bins)
        comparisons.append(Comparison("snapshot", snapshot.height, psi))
    else:
        notes.append("snapshot: no serving snapshot in the lake yet")
    cutoffs = reference.get_column("as_of").unique().sort()
    spread = None
    if len(cutoffs) > 1:
        first = reference.filter(pl.col("as_of") == cutoffs[0])
        last = reference.filter(pl.col("as_of") == cutoffs[-1])
        spread = Comparison(
            "training_spread", last.height, feature_psi(first, last, features, bins)
        )
    return DriftReport(
        comparisons, threshold, live, reference.height, spread, notes, snapshot_threshold
    )


# The fallback levels of `models.recommender` (0 as intended ... 3 the segment's fallback).
FALLBACK_LEVELS = (0, 1, 2, 3)


def fallback_shares(daily: pl.DataFrame, endpoint: str = "recommend") -> pl.DataFrame:
    """The share of an endpoint's responses per fallback level, one row per day.

    Args:
        daily: The `fallback_levels` mart (shown_on, endpoint, fallback_level, responses,
            response_share).
        endpoint: Which endpoint's responses.

    Returns:
        shown_on, responses (that day's), and `level_<n>` for every level of `FALLBACK_LEVELS`
        (and any other level found): its share of the day's responses, 0 when none; oldest day
        first.
    """
    rows = daily.filter(pl.col("endpoint") == endpoint)
    levels = sorted(set(FALLBACK_LEVELS) | set(rows.get_column("fallback_level").to_list()))
    totals = rows.group_by("shown_on").agg(pl.col("responses").sum())
    shares = totals.select("shown_on", pl.col("responses").cast(pl.Int64))
    for level in levels:
        share = rows.filter(pl.col("fallback_level") == level).select(
            "shown_on", pl.col("response_share").cast(pl.Float64).alias(f"level_{level}")
        )
        shares = shares.join(share, on="shown_on", how="left")
    return shares.with_columns(pl.col("^level_.*$").fill_null(0.0)).sort("shown_on")


def fallback_markdown(shares: pl.DataFrame, days: int = 14) -> str:
    """The last days of `fallback_shares` as a Markdown table (for Dagster metadata)."""
    levels = [name for name in shares.columns if name.startswith("level_")]
    header = ["day", "responses", *(f"level {name.removeprefix('level_')}" for name in levels)]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in shares.tail(days).iter_rows(named=True):
        cells = [str(row["shown_on"]), f"{row['responses']:,}"]
        cells += [f"{row[name]:.1%}" for name in levels]
        lines.append("| " + " | ".join(cells) + " |")
    if shares.is_empty():
        lines.append("| no responses logged yet |" + " |" * (len(header) - 1))
    return "\n".join(lines)
