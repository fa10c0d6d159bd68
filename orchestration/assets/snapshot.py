"""The serving snapshot: what the service loads, as of the end of the data."""

from collections.abc import Iterator

import dagster as dg
import polars as pl
import pyarrow as pa

from models import artifacts
from models.business_rules import serving_facts
from models.features import ASSEMBLY_CHUNK_ROWS, TABLE_NAMES
from models.marts import Marts
from models.queries import QUERY
from models.recommender import serving_popular, serving_snapshot
from models.session import BOUGHT_TOGETHER, COLLABORATIVE, COVISIT
from models.snapshot import write_user_states
from orchestration.concurrency import MEMORY_HEAVY
from orchestration.resources import ShelfwiseResource

SERVING_POPULAR_ITEMS = 200


class ServingFeaturesConfig(dg.Config):
    """How much of the snapshot is assembled at a time."""

    # Candidate rows read and assembled at a time (rounded to whole users): memory holds one
    # chunk's feature vectors, not the snapshot's (60 million rows at 300,000 users).
    chunk_rows: int = ASSEMBLY_CHUNK_ROWS


@dg.asset(
    deps=[
        "candidates",
        "category_repurchase_rates",
        "item_covisitation",
        "item_bought_together",
        *TABLE_NAMES,
    ],
    group_name="serving",
    op_tags=MEMORY_HEAVY,
)
def serving_features(
    shelfwise: ShelfwiseResource, config: ServingFeaturesConfig
) -> dg.MaterializeResult:
    """The serving snapshot as of the end of the data: every known user's candidates with feature
    vectors assembled exactly as for training, the item neighbours (co-visitation, bought
    together, collaborative) that sessions and `/similar` use, the popular in-stock items for
    everyone else (never an item the catalog marks as not recommendable), and the facts the
    business rules read
    (catalog stock, price, whether an item may be recommended, repeatable categories, purchases).
    The snapshot is assembled chunk by chunk of users and streamed into one file; then each
    user's rows are encoded into the compact state the service holds (item codes, the user's own
    features, and only the pair features the shared item table cannot predict), losslessly."""
    lake = shelfwise.lake()
    plan = artifacts.load_plan(lake)
    tables = Marts.load(lake, [plan.serving])
    users = 0

    def snapshot_chunks() -> Iterator[pa.Table]:
        nonlocal users
        for chunk in artifacts.candidate_chunks(lake, "serving", config.chunk_rows):
            users += chunk.select(QUERY).n_unique()
            yield serving_snapshot(chunk, tables.for_queries(chunk)).to_arrow()

    popular = serving_popular(tables.items, SERVING_POPULAR_ITEMS)
    rates = artifacts.read_mart(lake, "category_repurchase_rates", plan.serving)
    # The re-buy rule's threshold is the one the run's buy-again generator used.
    min_repeat_rate = artifacts.read_candidate_config(lake).min_repeat_rate
    items, purchases = serving_facts(tables.items, rates, tables.user_items, min_repeat_rate)
    neighbours = pl.concat(
        [
            table.select(
                pl.lit(kind).alias("kind"),
                "item_id",
                "neighbour_item_id",
                pl.col("score").cast(pl.Float64),
            )
            for kind, table in (
                (COVISIT, artifacts.read_mart(lake, "item_covisitation", plan.serving)),
                (BOUGHT_TOGETHER, artifacts.read_mart(lake, "item_bought_together", plan.serving)),
                (COLLABORATIVE, artifacts.read_item_collaborative(lake, plan.serving)),
            )
        ]
    )
    rows = artifacts.write_serving_snapshot(
        lake,
        snapshot_chunks(),
        popular=popular,
        neighbours=neighbours,
        items=items,
        purchases=purchases,
    )
    # What the service holds: each user's compact state, exactly these rows once decoded.
    states = write_user_states(lake, tables.users.select("user_id", "mean_price"))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "users": users,
            "state_bytes_per_user": round(states.bytes / max(states.known_users, 1)),
            "popular_items": popular.height,
            "as_of": plan.serving.isoformat(),
        }
    )
