"""The repeat-purchase signals of the dbt marts, checked against their definitions.

A small generated shop plus one hand-written shopper: the marts' columns are recomputed here in
polars from the raw events (the reference implementation of the definitions in README) and must
agree; the hand-written shopper pins the definitions with numbers worked out by hand.
"""

import math
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from models.artifacts import read_mart
from shelfwise.contracts import EVENTS_SCHEMA
from shelfwise.home import prepare_home
from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.intake.ingest import ingest_landing
from shelfwise.lake import EVENTS, Lake, partition_file
from shelfwise.settings import Settings
from tests.dbt_support import dbt

END = datetime(2026, 10, 22, tzinfo=UTC)
CUTOFF = END - timedelta(days=3)
SHOPPER = "repeat-shopper"
DAY = 86400.0


@pytest.fixture(scope="module")
def marts(tmp_path_factory):
    home = tmp_path_factory.mktemp("repeat")
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    config = ShopConfig(
        users=200, items=120, days=28, events=10_000, seed=5, end_date=date(2026, 10, 22)
    )
    write_shop(generate_shop(config), lake, seed=5)
    ingest_landing(lake, now=END)
    item = lake.read_frame(EVENTS).get_column("item_id").sort()[0]
    # The shopper buys `item` twice in one basket (one occasion), 10 days later, 20 days later,
    # and once more after the cutoff (invisible to it); another item once.
    start = CUTOFF - timedelta(days=35)
    rows = [
        ("s1", start, item),
        ("s1", start + timedelta(minutes=1), item),
        ("s2", start + timedelta(days=10), item),
        ("s3", start + timedelta(days=30), item),
        ("s3", start + timedelta(days=30), "other-item"),
        ("s4", CUTOFF + timedelta(hours=1), item),
    ]
    shopper = pl.DataFrame(
        {
            "event_id": [f"repeat-{n}" for n in range(len(rows))],
            "occurred_at": [at for _, at, _ in rows],
            "user_id": [SHOPPER] * len(rows),
            "session_id": [session for session, _, _ in rows],
            "item_id": [item_id for _, _, item_id in rows],
            "event_type": ["purchase"] * len(rows),
            "quantity": [1] * len(rows),
            "price": [2.0] * len(rows),
            "rec_id": [None] * len(rows),
            "source": ["test"] * len(rows),
        }
    )
    for (day,), part in shopper.with_columns(pl.col("occurred_at").dt.date().alias("day")).group_by(
        "day"
    ):
        lake.write_parquet(
            part.drop("day").to_arrow().cast(EVENTS_SCHEMA), partition_file(EVENTS, day, "shopper")
        )
    dbt(settings, ["build", "--exclude", "resource_type:test"], [CUTOFF], home / "target")
    frames = {
        name: read_mart(lake, name)
        for name in ("user_item_features", "item_features", "user_features")
    }
    return lake, item, frames


def reference(lake: Lake) -> dict[str, pl.DataFrame]:
    """The repeat-purchase columns recomputed from the raw events as of CUTOFF."""
    purchases = (
        lake.read_frame(EVENTS)
        .unique("event_id", keep="first")
        .filter((pl.col("occurred_at") < CUTOFF) & (pl.col("event_type") == "purchase"))
        .with_columns(
            ((pl.lit(CUTOFF) - pl.col("occurred_at")).dt.total_microseconds() / 1e6 / DAY).alias(
                "age"
            )
        )
    )
    occasions = (
        purchases.group_by("user_id", "item_id", "session_id")
        .agg(pl.col("occurred_at").min())
        .sort("user_id", "item_id", "occurred_at", "session_id")
        .with_columns(
            (pl.col("occurred_at").diff().dt.total_microseconds() / 1e6 / DAY)
            .over("user_id", "item_id")
            .alias("gap"),
            pl.int_range(1, pl.len() + 1).over("user_id", "item_id").alias("nth"),
        )
    )
    # Each user's baskets in time order; an item's share of those since its first purchase.
    baskets = (
        purchases.group_by("user_id", "session_id")
        .agg(pl.col("occurred_at").min())
        .sort("user_id", "occurred_at", "session_id")
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("basket_number"))
        .select("user_id", "session_id", "basket_number")
    )
    occasions = occasions.join(baskets, on=["user_id", "session_id"])
    items = occasions.group_by("item_id").agg(
        pl.col("user_id").n_unique().alias("buyers"),
        pl.col("user_id").filter(pl.col("nth") == 2).n_unique().alias("rebuyers"),
        pl.col("gap").median().alias("repurchase_interval_days"),
    )
    pairs = (
        purchases.group_by("user_id", "item_id")
        .agg(
            pl.len().alias("purchases"),
            pl.col("age").min().alias("days_since_last_purchase"),
            *[
                (pl.col("age") * (-math.log(2) / h)).exp().sum().alias(f"purchases_decayed_{h}d")
                for h in (7, 30, 90)
            ],
        )
        .join(
            occasions.group_by("user_id", "item_id").agg(
                pl.len().alias("purchase_occasions"),
                pl.col("gap").mean().alias("own_repurchase_interval_days"),
                pl.col("basket_number").min().alias("first_basket"),
            ),
            on=["user_id", "item_id"],
        )
        .join(
            baskets.group_by("user_id").agg(pl.col("basket_number").max().alias("baskets")),
            on="user_id",
        )
        .with_columns(
            (pl.col("purchase_occasions") / (pl.col("baskets") - pl.col("first_basket") + 1)).alias(
                "purchase_basket_share"
            )
        )
        .drop("first_basket", "baskets")
        .join(
            items.select("item_id", pl.col("repurchase_interval_days").alias("item_interval")),
            on="item_id",
        )
        .with_columns(
            (
                pl.col("days_since_last_purchase")
                / pl.coalesce("own_repurchase_interval_days", "item_interval")
            ).alias("repurchase_due_ratio")
        )
        .drop("item_interval")
    )
    users = occasions.group_by("user_id").agg(
        ((pl.col("nth") > 1).sum() / pl.len()).alias("repeat_purchase_share")
    )
    return {"pairs": pairs, "items": items, "users": users}


def test_the_marts_agree_with_the_definitions(marts):
    lake, _, frames = marts
    expected = reference(lake)
    at_cutoff = {name: frame.filter(pl.col("as_of") == CUTOFF) for name, frame in frames.items()}

    pairs = expected["pairs"]
    got = at_cutoff["user_item_features"].filter(pl.col("purchases") > 0)
    assert got.height == pairs.height > 100
    joined = got.join(pairs, on=["user_id", "item_id"], suffix="_ref")
    assert joined.height == pairs.height
    for column in pairs.columns:
        if column in {"user_id", "item_id"}:
            continue
        a, b = joined.get_column(column), joined.get_column(f"{column}_ref")
        assert (a.is_null() == b.is_null()).all(), column
        assert ((a - b).abs().fill_null(0.0) < 1e-6).all(), column
    never_bought = at_cutoff["user_item_features"].filter(pl.col("purchases") == 0)
    assert never_bought.height > 0
    assert never_bought.select(
        (pl.col("purchases_decayed_30d") == 0.0).all(),
        (pl.col("purchase_occasions") == 0).all(),
        pl.col("days_since_last_purchase").is_null().all(),
        pl.col("repurchase_due_ratio").is_null().all(),
        pl.col("purchase_basket_share").is_null().all(),
    ).row(0) == (True, True, True, True, True)
    # Somebody re-bought something: the signals are not vacuous.
    assert pairs.get_column("own_repurchase_interval_days").drop_nulls().len() > 0
    assert (pairs.get_column("purchase_basket_share") < 0.5).any()

    items = at_cutoff["item_features"].join(expected["items"], on="item_id", how="left")
    bought = items.filter(pl.col("buyers_right").is_not_null())
    assert (bought.get_column("buyers") == bought.get_column("buyers_right")).all()
    share = bought.get_column("rebuyers") / bought.get_column("buyers_right")
    assert ((bought.get_column("rebuyer_share") - share).abs() < 1e-9).all()
    interval = bought.get_column("repurchase_interval_days")
    interval_ref = bought.get_column("repurchase_interval_days_right")
    assert (interval.is_null() == interval_ref.is_null()).all()
    assert ((interval - interval_ref).abs().fill_null(0.0) < 1e-6).all()
    unbought = items.filter(pl.col("buyers_right").is_null())
    assert (unbought.get_column("buyers") == 0).all()
    assert unbought.get_column("rebuyer_share").is_null().all()

    users = at_cutoff["user_features"].join(expected["users"], on="user_id", how="left")
    a, b = (
        users.get_column("repeat_purchase_share"),
        users.get_column("repeat_purchase_share_right"),
    )
    assert (a.is_null() == b.is_null()).all()
    assert ((a - b).abs().fill_null(0.0) < 1e-9).all()


def test_a_hand_worked_shopper(marts):
    _, item, frames = marts
    row = (
        frames["user_item_features"]
        .filter((pl.col("user_id") == SHOPPER) & (pl.col("item_id") == item))
        .row(0, named=True)
    )
    # Four purchase lines before the cutoff, three occasions (one basket held two lines): gaps of
    # 10 and 20 days, a mean of 15; the last purchase 5 days before the cutoff.
    assert row["purchases"] == 4 and row["purchase_occasions"] == 3
    assert row["own_repurchase_interval_days"] == pytest.approx(15.0)
    # In each of the shopper's three baskets since its first purchase (the fourth is later).
    assert row["purchase_basket_share"] == pytest.approx(1.0)
    assert row["days_since_last_purchase"] == pytest.approx(5.0)
    assert row["repurchase_due_ratio"] == pytest.approx(5.0 / 15.0)
    assert row["purchases_decayed_7d"] == pytest.approx(
        2 ** (-5 / 7) + 2 ** (-25 / 7) + 2 ** (-35 / 7) + 2 ** (-(35 - 1 / 1440) / 7), rel=1e-6
    )
    user = frames["user_features"].filter(pl.col("user_id") == SHOPPER).row(0, named=True)
    # Four occasions (three of the item, one of another item); two re-bought the item.
    assert user["repeat_purchase_share"] == pytest.approx(2 / 4)
