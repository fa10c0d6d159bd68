"""Items the shop marks as not recommendable (fees, postage, gift cards) count as history in every
feature but are never proposed: by no candidate generator, by no serving rung, nor by `similar`.

A small generated shop whose most bought items (and the newest one) arrive flagged in its catalog
delivery, ingested and built by the real dbt project; the candidates and the serving snapshot are
made from those marts by the pipeline's own functions.
"""

import dataclasses
import shutil
from datetime import UTC, date, datetime

import lightgbm as lgb
import polars as pl
import pyarrow as pa
import pytest

from models.artifacts import read_mart
from models.business_rules import (
    SERVING_ITEMS,
    SERVING_PURCHASES,
    BusinessRules,
    ItemFacts,
    OnlineFacts,
    RequestFilters,
    serving_facts,
)
from models.candidates import (
    CandidateConfig,
    CandidateSources,
    generate_candidates,
    popular_items,
)
from models.features import FEATURE_COLUMNS
from models.marts import Marts
from models.recommender import (
    FALLBACK_CANDIDATE_ORDER,
    FALLBACK_NONE,
    STRATEGY_CATEGORY_TRENDING,
    STRATEGY_PERSONALIZED,
    STRATEGY_POPULAR,
    STRATEGY_SESSION,
    Recommender,
    serving_popular,
    serving_snapshot,
)
from models.session import BOUGHT_TOGETHER, COVISIT, Session
from shelfwise.home import prepare_home
from shelfwise.intake.generate import Shop, ShopConfig, generate_shop, write_shop
from shelfwise.intake.ingest import ingest_landing
from shelfwise.lake import ITEMS, SERVING_CANDIDATES, SERVING_NEIGHBOURS, SERVING_POPULAR, Lake
from shelfwise.runtime.online_state import StockChange
from shelfwise.settings import Settings
from tests.dbt_support import dbt

END = datetime(2026, 10, 22, tzinfo=UTC)
SHOP = ShopConfig(
    users=300, items=200, days=21, events=12_000, seed=13, end_date=date(2026, 10, 22)
)
# Big enough that no generator's list is cut by the merge: each keeps its own length.
CONFIG = dataclasses.replace(CandidateConfig(), max_candidates=100_000)
K = 10


def flagged_shop() -> tuple[pa.Table, Shop, set[str]]:
    """The shop's items and events, its three most bought items and its newest item flagged."""
    shop = generate_shop(SHOP)
    events = pl.from_arrow(shop.events)
    most_bought = (
        events.filter(pl.col("event_type") == "purchase")
        .group_by("item_id")
        .len()
        .sort("len", "item_id", descending=[True, False])
        .head(3)
        .get_column("item_id")
        .to_list()
    )
    items = pl.from_arrow(shop.items)
    seen = events.select("item_id").unique()
    newest = items.join(seen, on="item_id", how="semi").sort("created_at").get_column("item_id")[-1]
    flagged = {*most_bought, newest}
    # What the importer's --not-recommendable delivers: false for those, nothing for the rest.
    delivered = items.with_columns(
        pl.when(pl.col("item_id").is_in(list(flagged)))
        .then(pl.lit(False))
        .otherwise(pl.lit(None, pl.Boolean))
        .alias("is_recommendable")
    )
    return delivered.to_arrow(), shop, flagged


@pytest.fixture(scope="module")
def flagged_lake(tmp_path_factory):
    """The shop ingested (the flag through the catalog delivery) and built by dbt as of END."""
    home = tmp_path_factory.mktemp("not-recommendable")
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    items, shop, flagged = flagged_shop()
    write_shop(dataclasses.replace(shop, items=items), lake, seed=SHOP.seed)
    ingest_landing(lake, now=END)
    dbt(settings, ["build"], [END], home / "dbt-target")
    return settings, lake, flagged


def mart(lake: Lake, name: str) -> pl.DataFrame:
    return read_mart(lake, name)


def test_the_item_features_mart_carries_the_flag(flagged_lake):
    _, lake, flagged = flagged_lake
    items = mart(lake, "item_features")
    assert items.get_column("is_recommendable").null_count() == 0
    assert set(items.filter(~pl.col("is_recommendable")).get_column("item_id")) == flagged
    # Their activity is in the mart (they are real purchases) ...
    bought = items.filter(pl.col("item_id").is_in(list(flagged)) & (pl.col("purchases_30d") > 0))
    assert bought.height >= 3
    # ... but the popularity ranks put every item that may be shown first.
    shown = items.filter(pl.col("is_recommendable")).get_column("popularity_rank").sort()
    assert shown.to_list() == list(range(1, shown.len() + 1))
    # No item takes a neighbour slot it could never use; as anchors they keep their neighbours.
    for name in ("item_covisitation", "item_bought_together"):
        neighbours = mart(lake, name)
        assert not set(neighbours.get_column("neighbour_item_id")) & flagged, name
        assert set(neighbours.get_column("item_id")) & flagged, name


def test_a_catalog_from_before_the_flag_builds(flagged_lake, tmp_path):
    settings, lake, _ = flagged_lake
    home = tmp_path / "home"
    shutil.copytree(settings.home, home)
    old = Settings.from_env({"SHELFWISE_HOME": str(home)})
    old_lake = Lake(old.lake_url)
    [catalog] = old_lake.list_files(ITEMS)
    old_lake.write_parquet(old_lake.read_table(catalog).drop(["is_recommendable"]), catalog)
    # The staging model and its not_null test on is_recommendable (every item recommendable).
    dbt(old, ["build", "--select", "stg_lake__items"], [END], tmp_path / "target")


def test_candidates_never_contain_them_yet_they_count_in_history(flagged_lake):
    _, lake, flagged = flagged_lake
    sources = CandidateSources.from_lake(lake)
    users = mart(lake, "user_features").select("as_of", "user_id")
    candidates = generate_candidates(users, sources, CONFIG)
    assert candidates.height > 0
    assert not set(candidates.get_column("item_id")) & flagged
    # Each generator drops them before its own cut: every user still gets all popular items.
    popular = candidates.filter(pl.col("popular_score") > 0).group_by("user_id").len()
    assert popular.get_column("len").unique().to_list() == [CONFIG.popular_items]
    assert popular_items(sources.items, 5).height == 5

    # The users who bought them keep those purchases in their history features.
    user_items = mart(lake, "user_item_features")
    buyers = user_items.filter(pl.col("item_id").is_in(list(flagged)) & (pl.col("purchases") > 0))
    assert buyers.height > 0
    user = buyers.get_column("user_id")[0]
    counted = user_items.filter(pl.col("user_id") == user).get_column("purchases").sum()
    per_user = mart(lake, "user_features").filter(pl.col("user_id") == user)
    assert per_user.get_column("purchases")[0] >= counted > 0
    assert candidates.filter(pl.col("user_id") == user).height > 0

    # The same marts without the flag (as before it existed) would have proposed them.
    unflagged = dataclasses.replace(sources, items=sources.items.drop("is_recommendable"))
    assert set(generate_candidates(users, unflagged, CONFIG).get_column("item_id")) >= flagged


def write_serving_snapshot(lake: Lake, stale: bool) -> None:
    """The serving artifacts as `serving_features` writes them as of END.

    `stale`: built by a pipeline that did not know the flag, so the snapshot, the popular list
    and the neighbours all hold the flagged items (the business rules alone keep them out).
    """
    sources = CandidateSources.from_lake(lake)
    tables = Marts.load(lake, [END])
    items = tables.items.drop("is_recommendable") if stale else tables.items
    known = sources.users.select("as_of", "user_id")
    candidates = generate_candidates(
        known, dataclasses.replace(sources, items=items), CandidateConfig()
    )
    lake.write_parquet(serving_snapshot(candidates, tables).to_arrow(), SERVING_CANDIDATES)
    lake.write_parquet(serving_popular(items, 200).to_arrow(), SERVING_POPULAR)
    facts, purchases = serving_facts(
        tables.items, sources.repurchase_rates, tables.user_items, CandidateConfig().min_repeat_rate
    )
    lake.write_parquet(facts.to_arrow(), SERVING_ITEMS)
    lake.write_parquet(purchases.to_arrow(), SERVING_PURCHASES)
    neighbours = pl.concat(
        [
            mart(lake, name).select(
                pl.lit(kind).alias("kind"), "item_id", "neighbour_item_id", pl.col("score")
            )
            for kind, name in (
                (COVISIT, "item_covisitation"),
                (BOUGHT_TOGETHER, "item_bought_together"),
            )
        ]
    ).with_columns(pl.col("score").cast(pl.Float64))
    if stale:  # the flagged items as every item's strongest neighbours
        anchors = neighbours.select("kind", "item_id").unique()
        strongest = anchors.join(
            pl.DataFrame({"neighbour_item_id": sorted(flagged_ids(lake))}), how="cross"
        ).with_columns(pl.lit(1e9).alias("score"))
        neighbours = pl.concat([neighbours, strongest])
    lake.write_parquet(neighbours.to_arrow(), SERVING_NEIGHBOURS)


def flagged_ids(lake: Lake) -> set[str]:
    items = mart(lake, "item_features")
    return set(items.filter(~pl.col("is_recommendable")).get_column("item_id"))


def booster_preferring(snapshot: pl.DataFrame, flagged: set[str]) -> lgb.Booster:
    """A ranker that puts the flagged items first (as one trained on their purchases might)."""
    rows = snapshot.sort("user_id", "candidate_rank")
    labels = rows.get_column("item_id").is_in(list(flagged)).cast(pl.Int32) * 3
    groups = rows.group_by("user_id", maintain_order=True).len().get_column("len").to_list()
    data = lgb.Dataset(
        rows.select(FEATURE_COLUMNS).to_numpy(), label=labels.to_numpy(), group=groups
    )
    params = {"objective": "lambdarank", "min_data_in_leaf": 1, "verbosity": -1, "num_threads": 1}
    return lgb.train(params, data, num_boost_round=10)


@pytest.fixture(scope="module", params=["current", "stale"])
def served(flagged_lake, tmp_path_factory, request):
    settings, _, flagged = flagged_lake
    home = tmp_path_factory.mktemp(f"served-{request.param}") / "home"
    shutil.copytree(settings.home, home)
    lake = Lake(Settings.from_env({"SHELFWISE_HOME": str(home)}).lake_url)
    write_serving_snapshot(lake, stale=request.param == "stale")
    snapshot = lake.read_frame(SERVING_CANDIDATES)
    return lake, flagged, snapshot, booster_preferring(snapshot, flagged)


def test_no_rung_of_the_recommender_ever_serves_them(served):
    lake, flagged, snapshot, booster = served
    ranked = Recommender.from_lake(lake, booster, FEATURE_COLUMNS)
    in_order = Recommender.from_lake(lake, None)
    buyers = lake.read_frame(SERVING_PURCHASES).filter(pl.col("item_id").is_in(list(flagged)))
    users = (
        sorted(set(snapshot.get_column("user_id")))[:60]
        + buyers.get_column("user_id")[:20].to_list()
    )
    shown: list = []
    for user in users:
        # Their own session holds the flagged items too: the page, the cart, a purchase.
        session = Session(tuple(sorted(flagged)), frozenset(flagged), frozenset(flagged))
        for recommender, level in ((ranked, FALLBACK_NONE), (in_order, FALLBACK_CANDIDATE_ORDER)):
            for answer in (
                recommender.recommend(user, K),
                recommender.recommend(user, K, session=session),
                recommender.recommend(user, K, RequestFilters(in_stock_only=False)),
            ):
                assert answer.strategy == STRATEGY_PERSONALIZED
                assert answer.fallback_level == level
                assert len(answer.items) == K
                shown.append(answer)
    # Unknown users: a session with them and other items, only them, nothing at all.
    neighboured = lake.read_frame(SERVING_NEIGHBOURS).get_column("item_id").unique().sort()
    others = [item for item in neighboured.to_list() if item not in flagged][:3]
    for item_ids, strategy in (
        ((*sorted(flagged), *others), STRATEGY_SESSION),
        (tuple(sorted(flagged)), STRATEGY_CATEGORY_TRENDING),
        ((), STRATEGY_POPULAR),
    ):
        for flag in sorted(flagged):
            answer = ranked.recommend(
                "someone-new",
                K,
                session=Session(item_ids),
                context_item_id=flag if item_ids else None,
            )
            assert answer.strategy == strategy, (item_ids, flag)
            assert len(answer.items) == K
            shown.append(answer)
    served_ids = {item.item_id for answer in shown for item in answer.items}
    assert served_ids and not served_ids & flagged


def test_similar_never_serves_them(served):
    lake, flagged, _, booster = served
    recommender = Recommender.from_lake(lake, booster, FEATURE_COLUMNS)
    neighbours = lake.read_frame(SERVING_NEIGHBOURS)
    shown = []
    # A flagged item's page: its own neighbours, minus any flagged one.
    for item in sorted(flagged):
        answer = recommender.similar(item, K)
        assert answer.strategy == "neighbours" and len(answer.items) == K
        shown.append(answer)
    # Items whose neighbours include flagged ones, and an unknown item (popular items).
    anchors = neighbours.filter(pl.col("neighbour_item_id").is_in(list(flagged)))
    for item in [*anchors.get_column("item_id").unique().sort().head(20), "unknown-item"]:
        answer = recommender.similar(item, K)
        assert len(answer.items) == K
        shown.append(answer)
    assert shown[-1].strategy == STRATEGY_POPULAR
    served_ids = {item.item_id for answer in shown for item in answer.items}
    assert served_ids and not served_ids & flagged


def test_the_rule_is_always_on():
    items = {
        "shoe": ItemFacts("shoes", 80.0, True, False),
        "postage": ItemFacts("fees", 4.0, True, True, is_recommendable=False),
        "gift-card": ItemFacts("gifts", 25.0, False, False, is_recommendable=False),
    }
    rules = BusinessRules(items, {"u1": {"postage"}})
    ranked = [("postage", 1), ("gift-card", 2), ("shoe", 3)]
    anything = RequestFilters(in_stock_only=False)
    assert rules.select("u1", ranked, anything, 3) == [("shoe", 3)]
    assert rules.violated("u2", "postage", anything) == ["not_recommendable"]
    # An online stock update changes its stock, never whether it may be recommended.
    restocked = OnlineFacts(stock={"gift-card": StockChange(True, 1)})
    assert rules.facts("gift-card", restocked).is_recommendable is False
    assert rules.select("u2", ranked, RequestFilters(), 3, online=restocked) == [("shoe", 3)]
