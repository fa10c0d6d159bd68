"""The same dbt models on an S3 lake (moto's server) give the same feature tables as locally."""

from datetime import UTC, datetime, timedelta

from polars.testing import assert_frame_equal

from shelfwise.home import prepare_home
from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.intake.ingest import ingest_landing
from shelfwise.lake import FEATURE_CUTOFFS, FEATURES, Lake, feature_table
from shelfwise.settings import Settings
from tests.dbt_support import dbt

END = datetime(2026, 10, 15, tzinfo=UTC)
MARTS = (
    "user_features",
    "item_features",
    "user_item_features",
    "user_category_features",
    "user_brand_features",
    "item_covisitation",
    "item_bought_together",
    "interaction_labels",
    "feature_cutoffs",
)


def build(settings: Settings, target) -> Lake:
    lake = Lake(settings.lake_url)
    shop = ShopConfig(users=150, items=120, days=14, events=5_000, seed=9, end_date=END.date())
    write_shop(generate_shop(shop), lake, seed=9)
    ingest_landing(lake, now=END)
    dbt(settings, ["build"], [END - timedelta(days=7), END], target)
    return lake


def test_local_and_s3_lakes_give_identical_feature_tables(s3_lake_url, tmp_path):
    local_settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path / "local")})
    s3_settings = Settings.from_env(
        {"SHELFWISE_HOME": str(tmp_path / "s3"), "SHELFWISE_LAKE": s3_lake_url}
    )
    for settings in (local_settings, s3_settings):
        prepare_home(settings)
    local = build(local_settings, tmp_path / "target-local")
    s3 = build(s3_settings, tmp_path / "target-s3")
    assert s3.list_files(FEATURES) == local.list_files(FEATURES)
    for mart in MARTS:
        left = s3.read_frame(feature_table(mart))
        right = local.read_frame(feature_table(mart))
        assert left.height > 0, mart
        if "stock_updated_at" in left.columns:
            # When each catalog landed (the lake's modification time, also on S3): the two
            # deliveries were seconds apart.
            assert left["stock_updated_at"].null_count() == 0, mart
            left, right = left.drop("stock_updated_at"), right.drop("stock_updated_at")
        assert_frame_equal(
            left.sort(left.columns), right.sort(right.columns), check_exact=False, rel_tol=1e-9
        )
    assert not list((tmp_path / "s3").rglob("*.parquet")), "the S3 build wrote local Parquet"
    cutoffs = s3.read_frame(FEATURE_CUTOFFS).get_column("as_of").to_list()
    assert cutoffs == [END - timedelta(days=7), END]
