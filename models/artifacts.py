"""Typed readers and writers of the pipeline's artifacts in the lake.

The paths are named in `shelfwise.lake` (the core, so the CLI and the runtime can use them too);
this module is how the assets, the evaluation, tests and benchmarks read and write what those
paths hold: the cutoff plan, the labels, candidates by role, the sampled queries, the training
set, the ranker, the evaluation report and the serving snapshot.
"""

import dataclasses
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import polars as pl
import pyarrow as pa

from models.candidates import CandidateConfig
from models.cutoffs import CutoffPlan
from models.queries import QUERY, at_cutoffs, whole_queries
from models.ranker import booster_from_text
from shelfwise.lake import (
    CANDIDATE_CONFIG,
    EVALUATION_CHART,
    EVALUATION_MARKDOWN,
    EVALUATION_REPORT,
    FEATURE_CUTOFFS,
    ITEM_COLLABORATIVE,
    RANKER_INFO,
    RANKER_MODEL,
    SAMPLED_QUERIES,
    SERVING_CANDIDATES,
    SERVING_ITEMS,
    SERVING_NEIGHBOURS,
    SERVING_POPULAR,
    SERVING_PURCHASES,
    TRAINING_SET,
    VALIDATION_RANKER_MODEL,
    Lake,
    candidates_file,
    feature_table,
)

# The roles whose queries are sampled (the serving role covers every user with history).
SAMPLED_ROLES = ("training", "evaluation")
INTERACTION_LABELS = "interaction_labels"


def load_plan(lake: Lake) -> CutoffPlan:
    """The cutoffs of the last feature build, by role."""
    cutoffs = lake.read_frame(FEATURE_CUTOFFS).get_column("as_of")
    return CutoffPlan.from_cutoffs(cutoffs.to_list())


def read_mart(lake: Lake, name: str, *cutoffs: datetime) -> pl.DataFrame:
    """A dbt mart, at the given cutoffs (all of its rows without any)."""
    frame = lake.read_frame(feature_table(name))
    return at_cutoffs(frame, *cutoffs) if cutoffs else frame


def read_mart_if_built(lake: Lake, name: str, *cutoffs: datetime) -> pl.DataFrame | None:
    """`read_mart`, or None when the mart was never built (an older feature build)."""
    return read_mart(lake, name, *cutoffs) if lake.exists(feature_table(name)) else None


def read_labels(lake: Lake, *cutoffs: datetime) -> pl.DataFrame:
    """The graded labels (`interaction_labels`) at the given cutoffs (all without any)."""
    return read_mart(lake, INTERACTION_LABELS, *cutoffs)


def write_candidate_config(lake: Lake, config: CandidateConfig) -> None:
    """The generator sizes a `candidates` run used."""
    lake.write_json(dataclasses.asdict(config), CANDIDATE_CONFIG)


def read_candidate_config(lake: Lake) -> CandidateConfig:
    """The generator sizes of the last `candidates` run.

    Candidates made before the sizes were recorded get the defaults.
    """
    if not lake.exists(CANDIDATE_CONFIG):
        return CandidateConfig()
    known = {field.name for field in dataclasses.fields(CandidateConfig)}
    recorded = lake.read_json(CANDIDATE_CONFIG)
    return CandidateConfig(**{name: value for name, value in recorded.items() if name in known})


def write_candidates(lake: Lake, role: str, tables: Iterable[pa.Table]) -> int:
    """Streams a role's candidates into one file; returns the rows written."""
    return lake.write_parquet_tables(tables, candidates_file(role))


def candidate_chunks(lake: Lake, role: str, chunk_rows: int) -> Iterator[pl.DataFrame]:
    """A role's candidates in chunks of about `chunk_rows` rows, each of whole queries.

    The file is read batch by batch, never whole.
    """
    batches = lake.iter_parquet(candidates_file(role), chunk_rows)
    return whole_queries(pl.from_arrow(batch) for batch in batches)


def read_candidates(lake: Lake, role: str) -> pl.DataFrame:
    """A role's candidates, whole (small shops and tests; the assets read `candidate_chunks`)."""
    return lake.read_frame(candidates_file(role))


def write_sampled_queries(lake: Lake, queries: dict[str, pl.DataFrame]) -> None:
    """The queries (as_of, user_id) drawn for each sampled role."""
    rows = [queries[role].select(pl.lit(role).alias("role"), *QUERY) for role in SAMPLED_ROLES]
    lake.write_parquet(pl.concat(rows).to_arrow(), SAMPLED_QUERIES)


def sampled_queries(lake: Lake, role: str) -> pl.DataFrame | None:
    """The queries (as_of, user_id) the `candidates` asset drew for a role.

    None when the lake's candidates predate sampling (then they cover every labelled query).
    """
    if not lake.exists(SAMPLED_QUERIES):
        return None
    frame = lake.read_frame(SAMPLED_QUERIES)
    return frame.filter(pl.col("role") == role).select("as_of", "user_id")


def write_item_collaborative(lake: Lake, neighbours: pl.DataFrame) -> None:
    """Each cutoff's collaborative neighbour table (as_of, item_id, neighbour_item_id, score)."""
    lake.write_parquet(neighbours.to_arrow(), ITEM_COLLABORATIVE)


def read_item_collaborative(lake: Lake, *cutoffs: datetime) -> pl.DataFrame:
    """The collaborative neighbour tables at the given cutoffs (all without any)."""
    frame = lake.read_frame(ITEM_COLLABORATIVE)
    return at_cutoffs(frame, *cutoffs) if cutoffs else frame


def write_training_set(lake: Lake, tables: Iterable[pa.Table]) -> int:
    """Streams the labelled training rows into one file; returns the rows written."""
    return lake.write_parquet_tables(tables, TRAINING_SET)


def read_training_set(lake: Lake) -> pl.DataFrame:
    """The labelled training rows."""
    return lake.read_frame(TRAINING_SET)


def write_ranker(lake: Lake, model_text: str, info: dict[str, Any]) -> None:
    """The trained ranker (LightGBM's text format) and its info (features, cutoffs, params)."""
    lake.write_text(model_text, RANKER_MODEL)
    lake.write_json(info, RANKER_INFO)


def write_validation_ranker(lake: Lake, model_text: str) -> None:
    """The early-stopped ranker that never saw the validation window (see `load_ranker`)."""
    lake.write_text(model_text, VALIDATION_RANKER_MODEL)


def read_ranker_text(lake: Lake) -> str:
    """The trained ranker in LightGBM's text format (what the registry stores)."""
    return lake.read_text(RANKER_MODEL)


def read_ranker_info(lake: Lake) -> dict[str, Any]:
    """The trained ranker's info: features, params, training and validation cutoffs."""
    return lake.read_json(RANKER_INFO)


def load_ranker(lake: Lake, *, validation: bool = False) -> Any | None:
    """The trained LightGBM booster.

    With `validation`, the early-stopped one kept when the ranker was refit on the validation
    window (None when there is none).
    """
    path = VALIDATION_RANKER_MODEL if validation else RANKER_MODEL
    if validation and not lake.exists(path):
        return None
    return booster_from_text(lake.read_text(path))


def write_evaluation_report(
    lake: Lake, report: dict[str, Any], markdown: str, chart_png: bytes
) -> None:
    """The evaluation: its numbers (JSON), the table (Markdown) and the chart (PNG)."""
    lake.write_json(report, EVALUATION_REPORT)
    lake.write_text(markdown, EVALUATION_MARKDOWN)
    lake.fs.pipe_file(lake.path(EVALUATION_CHART), chart_png)


def read_evaluation_report(lake: Lake) -> dict[str, Any]:
    """The evaluation's numbers (`metrics`, `paired`, `segments_vs_fallback`, ...)."""
    return lake.read_json(EVALUATION_REPORT)


def write_serving_snapshot(
    lake: Lake,
    candidates: Iterable[pa.Table],
    *,
    popular: pl.DataFrame,
    neighbours: pl.DataFrame,
    items: pl.DataFrame,
    purchases: pl.DataFrame,
) -> int:
    """Writes the serving snapshot; returns the candidate rows written.

    The candidate feature vectors (streamed), the popular items, the neighbours and the business
    rules' facts.
    """
    rows = lake.write_parquet_tables(candidates, SERVING_CANDIDATES)
    lake.write_parquet(popular.to_arrow(), SERVING_POPULAR)
    lake.write_parquet(neighbours.to_arrow(), SERVING_NEIGHBOURS)
    lake.write_parquet(items.to_arrow(), SERVING_ITEMS)
    lake.write_parquet(purchases.to_arrow(), SERVING_PURCHASES)
    return rows


def read_serving_candidates(lake: Lake, columns: list[str] | None = None) -> pl.DataFrame:
    """The serving snapshot's candidate rows (optionally some columns only)."""
    return lake.read_frame(SERVING_CANDIDATES, columns=columns)
