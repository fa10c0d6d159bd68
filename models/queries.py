"""Ranking queries at scale: a seeded sample of them, and chunks of them.

A query is one (as_of, user_id). Candidate generation and feature assembly work query by query
(every join and every ranking is over the query's own rows), so running them on contiguous chunks
of the sorted queries and concatenating the results gives exactly the rows of one run over all
queries, in a fraction of the memory: the co-visitation neighbours of 300,000 users' recent items
alone are hundreds of millions of intermediate rows.

Training and evaluation do not need every query of a large shop: a uniform sample of a few tens
of thousands of users per cutoff trains the same ranker and measures it to a few thousandths of
NDCG. The sample is drawn per cutoff, seeded, and only when a cutoff has more queries than asked
for, so a small shop is never sampled and its results do not change.
"""

from collections.abc import Iterable, Iterator
from datetime import datetime

import numpy as np
import polars as pl

QUERY = ["as_of", "user_id"]


def _cutoff_entropy(cutoff: datetime) -> int:
    """A stable integer for a cutoff (microseconds since the epoch), to seed its sample."""
    return int(cutoff.timestamp() * 1_000_000)


def sample_queries(queries: pl.DataFrame, max_per_cutoff: int | None, seed: int) -> pl.DataFrame:
    """At most `max_per_cutoff` queries per cutoff, drawn uniformly without replacement.

    Deterministic: each cutoff's sample depends only on its own sorted queries, the cutoff and
    the seed (not on the other cutoffs present), so rebuilding one cutoff draws the same users.

    Args:
        queries: Columns as_of, user_id (duplicates are ignored; other columns are dropped).
        max_per_cutoff: The most queries to keep per cutoff; None or a cutoff with no more
            queries than this keeps them all.
        seed: The sample's seed.

    Returns:
        Unique as_of, user_id, sorted.
    """
    unique = queries.select(QUERY).unique().sort(QUERY)
    if max_per_cutoff is None:
        return unique
    if max_per_cutoff < 0:
        raise ValueError(f"max_per_cutoff must not be negative, got {max_per_cutoff}")
    kept = []
    for (cutoff,), group in unique.group_by("as_of", maintain_order=True):
        if group.height <= max_per_cutoff:
            kept.append(group)
            continue
        generator = np.random.default_rng([seed, _cutoff_entropy(cutoff)])
        chosen = np.sort(generator.choice(group.height, size=max_per_cutoff, replace=False))
        kept.append(group[chosen])
    if not kept:
        return unique
    return pl.concat(kept).sort(QUERY)


def query_chunks(queries: pl.DataFrame, size: int) -> list[pl.DataFrame]:
    """The sorted unique queries in contiguous chunks of at most `size`.

    Args:
        queries: Columns as_of, user_id (other columns are dropped).
        size: Queries per chunk (at least 1).

    Returns:
        The chunks in (as_of, user_id) order; one empty chunk when there is no query, so that a
        caller still produces its (empty) output with the right columns.
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    unique = queries.select(QUERY).unique().sort(QUERY)
    if unique.height == 0:
        return [unique]
    return [unique.slice(start, size) for start in range(0, unique.height, size)]


def restrict_to_queries(frame: pl.DataFrame, queries: pl.DataFrame) -> pl.DataFrame:
    """The rows of a per-query frame (as_of, user_id, ...) that belong to the queries.

    Keeps the frame's row order, so that order-dependent steps downstream (ordinal ranks that
    break ties by position) see the same rows in the same order as with the whole frame.
    """
    return frame.join(queries.select(QUERY), on=QUERY, how="semi", maintain_order="left")


def at_cutoffs(frame: pl.DataFrame, *cutoffs: datetime) -> pl.DataFrame:
    """The rows of a per-cutoff frame (as_of, ...) at the given cutoffs, in order."""
    wanted = pl.Series(list(cutoffs), dtype=pl.Datetime("us", "UTC"))
    return frame.filter(pl.col("as_of").is_in(wanted.implode()))


def cutoffs_of(queries: pl.DataFrame) -> list[datetime]:
    """The distinct cutoffs (as_of) of some queries."""
    return queries.get_column("as_of").unique().to_list()


def whole_queries(
    frames: Iterable[pl.DataFrame], key: tuple[str, ...] = tuple(QUERY)
) -> Iterator[pl.DataFrame]:
    """Regroups a stream of frames sorted by `key` so that every frame holds whole queries.

    A file read in batches of rows cuts a query's rows between two batches; this holds back the
    rows of each batch's last key and puts them in front of the next batch.

    Args:
        frames: Consecutive pieces of one frame sorted (at least grouped) by `key`.
        key: The columns that identify a query.

    Yields:
        Frames each holding all rows of the keys it contains, in the input order; when the input
        has no rows, its last (empty) frame, so that a consumer still sees the columns.

    Raises:
        ValueError: The stream is not grouped by `key` (a key's rows are not contiguous).
    """
    columns = list(key)
    carry: pl.DataFrame | None = None
    yielded = False
    for frame in frames:
        if carry is not None and carry.height:
            frame = pl.concat([carry, frame], how="vertical_relaxed")
        if frame.height == 0:
            carry = frame
            continue
        last = frame.select(columns).row(frame.height - 1)
        is_last = pl.all_horizontal(
            [pl.col(name).eq_missing(value) for name, value in zip(columns, last, strict=True)]
        )
        tail = int(frame.select(is_last.sum()).item())
        # The last key's rows must be the frame's suffix, or the input is not grouped by key.
        if not frame.tail(tail).select(is_last.all()).item():
            raise ValueError(f"the rows are not grouped by {columns}")
        if frame.height > tail:
            yielded = True
            yield frame.head(frame.height - tail)
        carry = frame.tail(tail)
    if carry is not None and (carry.height or not yielded):
        yield carry
