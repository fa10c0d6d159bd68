import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl

from models.features import TABLE_NAMES, FeatureTables
from models.serving import serving_snapshot
from orchestration.assets.shared import RANKER_FILE, RANKER_INFO, load_plan
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import CANDIDATES, EVALUATION, SERVING_CANDIDATES, SERVING_POPULAR
from shelfwise.registry import register_ranker

SERVING_POPULAR_ITEMS = 200
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENTOFILE = PROJECT_ROOT / "bentos" / "bentofile.yaml"
# The bentoml of this virtual environment, also when it is not activated.
BENTOML_EXECUTABLE = str(Path(sys.executable).with_name("bentoml"))


@dg.asset(
    deps=["candidates", *TABLE_NAMES],
    group_name="serving",
)
def serving_features(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """The serving snapshot as of the end of the data: every known user's candidates with feature
    vectors assembled exactly as for training, and the popular in-stock items for everyone else."""
    lake = shelfwise.lake()
    plan = load_plan(lake)
    tables = FeatureTables.load(lake, [plan.serving])
    snapshot = serving_snapshot(lake.read_frame(f"{CANDIDATES}/serving.parquet"), tables)
    lake.write_parquet(snapshot.to_arrow(), SERVING_CANDIDATES)
    popular = (
        tables.items.filter(pl.col("is_in_stock"))
        .sort("popularity_rank")
        .head(SERVING_POPULAR_ITEMS)
        .select("item_id", "popularity")
    )
    lake.write_parquet(popular.to_arrow(), SERVING_POPULAR)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": snapshot.height,
            "users": snapshot.get_column("user_id").n_unique(),
            "popular_items": popular.height,
            "as_of": plan.serving.isoformat(),
        }
    )


@dg.asset(deps=["ranker", "evaluation"], group_name="serving")
def registered_model(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """The ranker in the BentoML model store, with its metrics, feature list and training window
    in the model's metadata (`bentoml models get shelfwise_ranker:latest`)."""
    settings = shelfwise.settings()
    lake = shelfwise.lake()
    info = lake.read_json(RANKER_INFO)
    report = lake.read_json(f"{EVALUATION}/metrics.json")
    metrics = report["metrics"]
    metadata = {
        "ndcg@10": metrics["ranker"]["ndcg@10"],
        "recall@20": metrics["ranker"]["recall@20"],
        "popularity_ndcg@10": metrics["popularity"]["ndcg@10"],
        "evaluation_cutoff": report["evaluation_cutoff"],
        "training_cutoffs": info["training_cutoffs"],
        "validation_cutoff": info["validation_cutoff"],
        "features": info["features"],
        "best_iteration": info["best_iteration"],
    }
    tag = register_ranker(settings.bentoml_home, lake.read_text(RANKER_FILE), info, metadata)
    return dg.MaterializeResult(
        metadata={"tag": tag, "store": dg.MetadataValue.path(str(settings.bentoml_home / "models"))}
    )


@dg.asset(deps=["registered_model", "serving_features"], group_name="serving")
def bento(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """The deployable bento (`shelfwise:<version>`): the service code, the core and ML packages and
    the latest registered ranker, built offline from bentos/bentofile.yaml."""
    settings = shelfwise.settings()
    env = {**os.environ, "BENTOML_HOME": str(settings.bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    # A subprocess: BentoML binds its home when first used, and this run's home must win.
    result = subprocess.run(
        [BENTOML_EXECUTABLE, "build", "-f", str(BENTOFILE), "-o", "tag", str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        check=False,
    )
    if result.returncode != 0:
        raise dg.Failure(f"bentoml build failed:\n{result.stderr[-4000:]}")
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    return dg.MaterializeResult(metadata={"tag": tag})
