"""What several assets share: the run's cutoff plan, where the ranker and the sampled queries
live in the lake, and the candidates read chunk by chunk of whole queries."""

from collections.abc import Iterator

import polars as pl

from models.cutoffs import CutoffPlan
from models.queries import whole_queries
from shelfwise.lake import CANDIDATES, FEATURES, MODELS, Lake

RANKER_FILE = f"{MODELS}/ranker/model.txt"
RANKER_INFO = f"{MODELS}/ranker/model.json"
# The early-stopped ranker that never saw the validation window, kept when the ranker was refit
# on it (`refit_with_validation`): the segment policy is chosen with it on that window.
VALIDATION_RANKER_FILE = f"{MODELS}/ranker/validation_model.txt"
# The training and evaluation queries the `candidates` asset drew (role, as_of, user_id): the
# evaluation scores the ranker and every baseline on exactly these users.
SAMPLED_QUERIES = f"{CANDIDATES}/queries.parquet"
SAMPLED_ROLES = ("training", "evaluation")
# Each cutoff's collaborative model as a neighbour table (as_of, item_id, neighbour_item_id,
# score): its strongest weights per item, which the serving snapshot exports for /similar and
# sessions.
ITEM_COLLABORATIVE = f"{CANDIDATES}/item_collaborative.parquet"
COLLABORATIVE_NEIGHBOURS = 50
# Candidate rows assembled into feature vectors at a time (training set, evaluation, serving
# snapshot): the joins' Float64 intermediates of 60 million rows would not fit in memory.
ASSEMBLY_CHUNK_ROWS = 2_000_000


def load_plan(lake: Lake) -> CutoffPlan:
    """The cutoffs of the last feature build, by role."""
    cutoffs = lake.read_frame(f"{FEATURES}/feature_cutoffs.parquet").get_column("as_of")
    return CutoffPlan.from_cutoffs(cutoffs.to_list())


def at_cutoffs(frame: pl.DataFrame, *cutoffs) -> pl.DataFrame:
    """The rows of a frame with an `as_of` column at the given cutoffs."""
    wanted = pl.Series(list(cutoffs), dtype=pl.Datetime("us", "UTC"))
    return frame.filter(pl.col("as_of").is_in(wanted.implode()))


def candidate_chunks(lake: Lake, role: str, chunk_rows: int) -> Iterator[pl.DataFrame]:
    """A role's candidates (`candidates/<role>.parquet`) in chunks of about `chunk_rows` rows,
    each holding whole queries, without loading the file."""
    batches = lake.iter_parquet(f"{CANDIDATES}/{role}.parquet", chunk_rows)
    return whole_queries(pl.from_arrow(batch) for batch in batches)


def load_ranker(lake: Lake):
    """The trained LightGBM booster."""
    import lightgbm as lgb

    return lgb.Booster(model_str=lake.read_text(RANKER_FILE))


def sampled_queries(lake: Lake, role: str) -> pl.DataFrame | None:
    """The queries (as_of, user_id) the `candidates` asset drew for a role; None when the lake's
    candidates predate sampling (then they cover every labelled query)."""
    if not lake.exists(SAMPLED_QUERIES):
        return None
    frame = lake.read_frame(SAMPLED_QUERIES)
    return frame.filter(pl.col("role") == role).select("as_of", "user_id")
