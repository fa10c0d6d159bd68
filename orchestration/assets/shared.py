"""What several assets share: the run's cutoff plan and where the ranker lives in the lake."""

import polars as pl

from models.cutoffs import CutoffPlan
from shelfwise.lake import FEATURES, MODELS, Lake

RANKER_FILE = f"{MODELS}/ranker/model.txt"
RANKER_INFO = f"{MODELS}/ranker/model.json"


def load_plan(lake: Lake) -> CutoffPlan:
    """The cutoffs of the last feature build, by role."""
    cutoffs = lake.read_frame(f"{FEATURES}/feature_cutoffs.parquet").get_column("as_of")
    return CutoffPlan.from_cutoffs(cutoffs.to_list())


def at_cutoffs(frame: pl.DataFrame, *cutoffs) -> pl.DataFrame:
    """The rows of a frame with an `as_of` column at the given cutoffs."""
    wanted = pl.Series(list(cutoffs), dtype=pl.Datetime("us", "UTC"))
    return frame.filter(pl.col("as_of").is_in(wanted.implode()))


def load_ranker(lake: Lake):
    """The trained LightGBM booster."""
    import lightgbm as lgb

    return lgb.Booster(model_str=lake.read_text(RANKER_FILE))
