"""The training set: candidates at past cutoffs, their features, and graded labels."""

import polars as pl

from models.features import assemble_features
from models.marts import Marts
from models.ranker import QUERY, keep_queries_with_positives

ROW_KEY = [*QUERY, "item_id"]


def label_queries(labels: pl.DataFrame) -> pl.DataFrame:
    """The (as_of, user_id) pairs with at least one positive label: the queries worth ranking."""
    return labels.filter(pl.col("label") > 0).select(QUERY).unique().sort(QUERY)


def attach_labels(candidates: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Adds each candidate's graded label (0 when the user did nothing with it)."""
    return candidates.join(
        labels.select(*ROW_KEY, "label"), on=ROW_KEY, how="left", maintain_order="left"
    ).with_columns(pl.col("label").fill_null(0).cast(pl.Int32))


def build_training_set(
    candidates: pl.DataFrame, labels: pl.DataFrame, tables: Marts
) -> pl.DataFrame:
    """Assembles labelled feature rows for ranking, one query per (cutoff, user).

    Args:
        candidates: Candidates at training cutoffs (see `models.candidates`).
        labels: The `interaction_labels` mart for the same cutoffs.
        tables: Feature marts for the same cutoffs.

    Returns:
        Rows sorted by (as_of, user_id) with the feature columns and `label`; queries in which
        no candidate has a positive label are dropped (they teach a ranker nothing).
    """
    assembled = assemble_features(attach_labels(candidates, labels), tables)
    return keep_queries_with_positives(assembled).sort(QUERY, maintain_order=True)
