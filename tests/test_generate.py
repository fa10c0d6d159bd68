"""Tests of the synthetic shop generator: determinism, contracts and the behaviour it models."""

import dataclasses
import datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from shelfwise.contracts import EVENT_TYPES, EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, conform
from shelfwise.intake.generate import Shop, ShopConfig, generate_shop, write_shop
from shelfwise.lake import (
    LANDING_EVENTS,
    LANDING_ITEMS,
    LANDING_USERS,
    Lake,
    dataset_file,
    ground_truth_table,
)

END = datetime.date(2024, 3, 1)
CONFIG = ShopConfig(users=500, items=300, days=21, events=20_000, seed=11, end_date=END)
START = datetime.datetime.combine(
    END - datetime.timedelta(days=CONFIG.days), datetime.time(), tzinfo=datetime.UTC
)
STOP = datetime.datetime.combine(END, datetime.time(), tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def shop() -> Shop:
    return generate_shop(CONFIG)


@pytest.fixture(scope="module")
def events(shop: Shop) -> pl.DataFrame:
    """Events with their item's category, creation and stock-out time and the user's signup."""
    items = pl.from_arrow(shop.items).select("item_id", "category_id", "created_at")
    profiles = pl.from_arrow(shop.ground_truth["item_profiles"])
    categories = pl.from_arrow(shop.ground_truth["categories"])
    users = pl.from_arrow(shop.users).select("user_id", "signed_up_at")
    return (
        pl.from_arrow(shop.events)
        .join(items, on="item_id", how="left")
        .join(profiles.select("item_id", "out_of_stock_at"), on="item_id", how="left")
        .join(categories.select("category_id", "is_consumable"), on="category_id", how="left")
        .join(users, on="user_id", how="left")
    )


def _count(events: pl.DataFrame, event_type: str) -> int:
    return events.filter(pl.col("event_type") == event_type).height


def test_same_config_gives_identical_tables(shop: Shop) -> None:
    again = generate_shop(CONFIG)
    assert again.events.equals(shop.events)
    assert again.items.equals(shop.items)
    assert again.users.equals(shop.users)
    assert again.ground_truth.keys() == shop.ground_truth.keys()
    for name, table in shop.ground_truth.items():
        assert again.ground_truth[name].equals(table), name


def test_another_seed_gives_another_shop(shop: Shop) -> None:
    other = generate_shop(dataclasses.replace(CONFIG, seed=CONFIG.seed + 1))
    assert not other.events.equals(shop.events)
    assert not other.items.equals(shop.items)
    assert other.events.column("event_id")[0].as_py() == f"e{CONFIG.seed + 1}-0"


def test_end_date_only_shifts_the_timestamps(shop: Shop) -> None:
    shift = datetime.timedelta(days=3)
    later = generate_shop(dataclasses.replace(CONFIG, end_date=END + shift))
    for table, other, time_column in (
        (shop.events, later.events, "occurred_at"),
        (shop.items, later.items, "created_at"),
        (shop.users, later.users, "signed_up_at"),
    ):
        assert other.drop_columns([time_column]).equals(table.drop_columns([time_column]))
        before = pl.from_arrow(table.column(time_column))
        after = pl.from_arrow(other.column(time_column))
        assert (after - before).unique().to_list() == [shift]


def test_tables_conform_to_the_contracts(shop: Shop) -> None:
    for table, schema in (
        (shop.events, EVENTS_SCHEMA),
        (shop.items, ITEMS_SCHEMA),
        (shop.users, USERS_SCHEMA),
    ):
        assert table.schema.equals(schema)
        assert conform(table, schema, "test").equals(table)
    events = pl.from_arrow(shop.events)
    assert events["event_id"].n_unique() == events.height
    assert events["event_id"][0] == f"e{CONFIG.seed}-0"
    assert set(events["event_type"].unique()) == set(EVENT_TYPES)
    assert events["source"].unique().to_list() == ["generator"]
    assert events["rec_id"].null_count() == events.height
    assert (events["price"] > 0).all()
    items = pl.from_arrow(shop.items)
    users = pl.from_arrow(shop.users)
    assert items["item_id"].n_unique() == CONFIG.items
    assert users["user_id"].n_unique() == CONFIG.users
    assert users["user_id"].str.starts_with("u").all()


def test_event_total_is_near_the_target(shop: Shop) -> None:
    assert abs(shop.events.num_rows / CONFIG.events - 1) <= 0.10
    longer = ShopConfig(users=300, items=150, days=90, events=8_000, seed=3, end_date=END)
    assert abs(generate_shop(longer).events.num_rows / longer.events - 1) <= 0.10


def test_events_are_sorted_and_inside_the_window(events: pl.DataFrame) -> None:
    assert events["occurred_at"].is_sorted()
    assert events["occurred_at"].min() >= START
    assert events["occurred_at"].max() < STOP
    assert events.filter(pl.col("occurred_at") < pl.col("signed_up_at")).is_empty()
    assert events.filter(pl.col("occurred_at") < pl.col("created_at")).is_empty()
    assert events["category_id"].null_count() == 0
    assert events["signed_up_at"].null_count() == 0


def test_no_cart_or_purchase_after_an_item_went_out_of_stock(
    shop: Shop, events: pl.DataFrame
) -> None:
    profiles = pl.from_arrow(shop.ground_truth["item_profiles"])
    items = pl.from_arrow(shop.items).join(profiles, on="item_id")
    out = items.filter(pl.col("out_of_stock_at").is_not_null())
    assert 0.03 <= out.height / items.height <= 0.07
    assert (~out["is_in_stock"]).all()
    assert items.filter(pl.col("out_of_stock_at").is_null())["is_in_stock"].all()
    assert out["out_of_stock_at"].min() >= START
    assert out["out_of_stock_at"].max() < STOP
    late = events.filter(
        pl.col("event_type").is_in(["add_to_cart", "purchase"])
        & (pl.col("occurred_at") >= pl.col("out_of_stock_at"))
    )
    assert late.is_empty()
    # Out-of-stock items were bought before they ran out.
    bought = events.filter(
        (pl.col("event_type") == "purchase") & pl.col("out_of_stock_at").is_not_null()
    )
    assert bought.height > 0


def test_items_and_quantities_follow_the_funnel(events: pl.DataFrame) -> None:
    views, carts = _count(events, "view"), _count(events, "add_to_cart")
    purchases, removals = _count(events, "purchase"), _count(events, "remove_from_cart")
    assert 0 < purchases < carts < views
    assert 0 < removals < carts
    assert 0.03 < carts / views < 0.2
    assert events.filter(pl.col("event_type") == "view")["quantity"].unique().to_list() == [1]
    quantities = events.filter(pl.col("event_type") != "view")["quantity"]
    assert set(quantities.unique()) == {1, 2, 3}
    # Every purchase and removal follows a cart of the same item in the same session.
    carts_first = (
        events.filter(pl.col("event_type") == "add_to_cart")
        .group_by("session_id", "item_id")
        .agg(pl.col("occurred_at").min().alias("carted_at"))
    )
    after_cart = events.filter(pl.col("event_type").is_in(["purchase", "remove_from_cart"])).join(
        carts_first, on=["session_id", "item_id"], how="left"
    )
    assert after_cart["carted_at"].null_count() == 0
    assert (after_cart["carted_at"] <= after_cart["occurred_at"]).all()


def test_sessions_concentrate_on_one_category(events: pl.DataFrame) -> None:
    views = events.filter(pl.col("event_type") == "view")
    share = (
        views.group_by("session_id", "category_id")
        .len()
        .group_by("session_id")
        .agg((pl.col("len").max() / pl.col("len").sum()).alias("share"))
    )
    assert share["share"].median() >= 0.6
    spans = events.group_by("session_id").agg(
        (pl.col("occurred_at").max() - pl.col("occurred_at").min()).alias("span"),
        pl.col("user_id").n_unique().alias("users"),
    )
    assert (spans["users"] == 1).all()
    assert spans["span"].max() < datetime.timedelta(hours=3)


def test_views_follow_the_ground_truth_tastes(shop: Shop, events: pl.DataFrame) -> None:
    tastes = pl.from_arrow(shop.ground_truth["user_category_tastes"])
    totals = tastes.group_by("user_id").agg(pl.col("weight").sum())
    assert totals.height == CONFIG.users
    assert ((totals["weight"] - 1).abs() < 1e-9).all()
    assert tastes.group_by("user_id").len()["len"].is_between(2, 4).all()
    views = events.filter(pl.col("event_type") == "view")
    in_taste = views.join(tastes, on=["user_id", "category_id"], how="left")["weight"]
    assert in_taste.is_not_null().mean() > 0.7
    # Brand affinities show: favourite brands are over-represented in the user's views.
    affinities = pl.from_arrow(shop.ground_truth["user_brand_affinities"])
    brands = pl.from_arrow(shop.items).select("item_id", "brand")
    viewed = views.join(brands, on="item_id").join(affinities, on=["user_id", "brand"], how="left")
    favourite_share = viewed["affinity"].is_not_null().mean()
    per_user = affinities.group_by("user_id").len()["len"].mean()
    assert favourite_share > 3 * per_user / pl.from_arrow(shop.items)["brand"].n_unique()


def test_price_levels_shape_what_users_view(shop: Shop, events: pl.DataFrame) -> None:
    profiles = pl.from_arrow(shop.ground_truth["user_profiles"])
    assert profiles.height == CONFIG.users
    assert abs(profiles["activity"].mean() - 1) < 1e-9
    categories = pl.from_arrow(shop.ground_truth["categories"])
    relative = (
        events.filter(pl.col("event_type") == "view")
        .join(categories.select("category_id", "price_median"), on="category_id")
        .join(profiles, on="user_id")
        .with_columns((pl.col("price") / pl.col("price_median")).log().alias("relative"))
    )
    assert relative.select(pl.corr("relative", "price_level")).item() > 0.2


def test_repeat_purchases_are_common_for_consumables_only(events: pl.DataFrame) -> None:
    pairs = (
        events.filter(pl.col("event_type") == "purchase")
        .group_by("user_id", "item_id", "is_consumable")
        .len()
    )
    rates = pairs.group_by("is_consumable").agg((pl.col("len") > 1).mean().alias("rate"))
    rate = dict(zip(rates["is_consumable"], rates["rate"], strict=True))
    assert rate[True] >= 0.1
    assert rate[True] > 3 * rate[False]


def test_new_items_and_users_arrive_inside_the_window(shop: Shop, events: pl.DataFrame) -> None:
    items = pl.from_arrow(shop.items)
    users = pl.from_arrow(shop.users)
    new_items = items.filter(pl.col("created_at") >= START)
    new_users = users.filter(pl.col("signed_up_at") >= START)
    assert 0.2 <= new_items.height / items.height <= 0.4
    assert 0.3 <= new_users.height / users.height <= 0.5
    assert new_items["created_at"].max() < STOP
    assert new_users["signed_up_at"].max() < STOP
    assert new_items["created_at"].dt.date().n_unique() == CONFIG.days
    assert new_users["signed_up_at"].dt.date().n_unique() == CONFIG.days
    assert events.filter(pl.col("item_id").is_in(new_items["item_id"].implode())).height > 0
    assert events.filter(pl.col("user_id").is_in(new_users["user_id"].implode())).height > 0


def test_trends_move_popularity(shop: Shop, events: pl.DataFrame) -> None:
    profiles = pl.from_arrow(shop.ground_truth["item_profiles"]).select("item_id", "trend")
    third = datetime.timedelta(days=CONFIG.days / 3)
    views = events.filter(pl.col("event_type") == "view").join(profiles, on="item_id")
    early = views.filter(pl.col("occurred_at") < START + third)
    late = views.filter(pl.col("occurred_at") >= STOP - third)

    def share(frame: pl.DataFrame, trend: str) -> float:
        return frame.filter(pl.col("trend") == trend).height / frame.height

    assert share(late, "rising") > 1.15 * share(early, "rising")
    assert share(late, "falling") < share(early, "falling") / 1.15


def test_catalog_has_a_category_tree_and_brands(shop: Shop) -> None:
    items = pl.from_arrow(shop.items)
    categories = pl.from_arrow(shop.ground_truth["categories"])
    brands = pl.from_arrow(shop.ground_truth["brands"])
    leaves = categories.group_by("top_category_id").len()
    assert leaves.height == 8
    assert leaves["len"].is_between(3, 6).all()
    assert 0.1 <= categories["is_consumable"].mean() <= 0.45
    assert (
        categories["category_path"]
        == categories["top_category_name"] + " > " + categories["category_name"]
    ).all()
    assert 100 <= brands.height <= 200
    assert brands["top_category_ids"].list.len().is_between(1, 3).all()
    checked = items.join(categories, on="category_id").join(brands, on="brand")
    assert checked.height == items.height
    assert checked.select(
        pl.col("top_category_ids").list.contains(pl.col("top_category_id")).all()
    ).item()
    assert (
        checked["title"].str.starts_with(checked["brand"] + " " + checked["category_name"] + " ")
    ).all()
    assert (checked["price"] > 0).all()


def test_too_small_a_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="items"):
        generate_shop(ShopConfig(items=10, end_date=END))


def test_write_shop_lands_files_that_read_back_equal(shop: Shop, tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    counts = write_shop(shop, lake, seed=CONFIG.seed)
    event_files = lake.list_files(LANDING_EVENTS)
    dates = [START.date() + datetime.timedelta(days=day) for day in range(CONFIG.days)]
    assert event_files == [
        dataset_file(LANDING_EVENTS, f"generated-seed{CONFIG.seed}-{date.isoformat()}")
        for date in dates
    ]
    assert counts == {
        "events": shop.events.num_rows,
        "items": CONFIG.items,
        "users": CONFIG.users,
        "files": len(event_files) + 2 + len(shop.ground_truth),
    }
    parts = [lake.read_table(path) for path in event_files]
    for path, part in zip(event_files, parts, strict=True):
        day = pl.from_arrow(part.column("occurred_at")).dt.date().unique().to_list()
        assert [date.isoformat() for date in day] == [path[-len("YYYY-MM-DD.parquet") : -8]]
    assert pa.concat_tables(parts).equals(shop.events)
    seeded = f"generated-seed{CONFIG.seed}"
    assert lake.read_table(dataset_file(LANDING_ITEMS, seeded)).equals(shop.items)
    assert lake.read_table(dataset_file(LANDING_USERS, seeded)).equals(shop.users)
    for name, table in shop.ground_truth.items():
        assert lake.read_table(ground_truth_table(name)).equals(table), name
