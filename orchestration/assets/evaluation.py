from datetime import UTC, datetime, time, timedelta

import dagster as dg

from models.evaluation import evaluate
from models.features import FEATURE_COLUMNS, TABLE_NAMES, FeatureTables, assemble_features
from models.report import headline_ratios, render_markdown, render_png
from orchestration.assets.shared import at_cutoffs, load_plan, load_ranker
from orchestration.resources import ShelfwiseResource
from shelfwise.ingest import ingested_dates
from shelfwise.lake import CANDIDATES, EVALUATION, FEATURES, GROUND_TRUTH, Lake
from shelfwise.registry import production_ranker

# The approach name under which the current production model's metrics are reported.
PRODUCTION = "production"
GROUND_TRUTH_TABLES = (
    "user_category_tastes",
    "user_brand_affinities",
    "user_profiles",
    "item_profiles",
    "categories",
)


def _ground_truth(lake: Lake) -> dict | None:
    """The generator's ground truth, when the lake holds a generated shop (never real data)."""
    tables = {
        name: lake.read_frame(f"{GROUND_TRUTH}/{name}.parquet")
        for name in GROUND_TRUTH_TABLES
        if lake.exists(f"{GROUND_TRUTH}/{name}.parquet")
    }
    return tables if "user_category_tastes" in tables and "item_profiles" in tables else None


def _window_middle(lake: Lake) -> datetime | None:
    """The middle of the event window: the generator's trend pivot."""
    dates = ingested_dates(lake)
    if not dates:
        return None
    first = datetime.combine(dates[0], time(), tzinfo=UTC)
    return (
        first + (datetime.combine(dates[-1], time(), tzinfo=UTC) - first) / 2 + timedelta(hours=12)
    )


@dg.asset(deps=["ranker", "candidates", "interaction_labels", *TABLE_NAMES], group_name="ranking")
def evaluation(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """Offline quality on the held-out week after the evaluation cutoff (a time split), computed
    by our own metric code over users with at least one positive: NDCG@10, Recall@10/20, MAP@10,
    HitRate@10, MRR, catalog coverage and novelty of the ranker against popularity, trending,
    co-visitation alone, buy-again, the candidate order without the ranker and, on generated
    data, the oracle ranking from the ground-truth tastes; sliced by new / light / heavy users.
    The model currently in production is scored on the same candidates when its features match.
    The report (a table and a chart) is in the metadata and in the lake under evaluation/."""
    lake = shelfwise.lake()
    plan = load_plan(lake)
    labels = at_cutoffs(lake.read_frame(f"{FEATURES}/interaction_labels.parquet"), plan.evaluation)
    tables = FeatureTables.load(lake, [plan.evaluation])
    assembled = assemble_features(lake.read_frame(f"{CANDIDATES}/evaluation.parquet"), tables)
    ground_truth = _ground_truth(lake)
    report = evaluate(
        assembled,
        load_ranker(lake),
        labels,
        tables.items,
        tables.users,
        tables.user_items,
        ground_truth=ground_truth,
        trend_pivot=_window_middle(lake) if ground_truth else None,
    )
    results = report.to_dict()
    # The model in production, scored on the same candidates, for the gate's second comparison.
    current = production_ranker(shelfwise.settings().bentoml_home)
    if current is not None and current[1].get("features") == FEATURE_COLUMNS:
        import lightgbm as lgb

        production_report = evaluate(
            assembled,
            lgb.Booster(model_str=current[0]),
            labels,
            tables.items,
            tables.users,
            tables.user_items,
        )
        results["metrics"][PRODUCTION] = production_report.to_dict()["metrics"]["ranker"]
    lake.write_json(
        {"evaluation_cutoff": plan.evaluation.isoformat(), **results},
        f"{EVALUATION}/metrics.json",
    )
    markdown = render_markdown(report)
    lake.write_text(markdown, f"{EVALUATION}/report.md")
    png = render_png(report)
    lake.fs.pipe_file(lake.path(f"{EVALUATION}/report.png"), png)
    ratios = headline_ratios(report)
    metrics = results["metrics"]
    return dg.MaterializeResult(
        metadata={
            "evaluated_users": int(metrics["ranker"]["users"]),
            **{
                f"{approach}_{metric}": float(value)
                for approach, values in metrics.items()
                for metric, value in values.items()
                if metric != "users"
            },
            **{
                f"ranker_ndcg@10_{name}": float(value)
                for name, value in ratios.items()
                if isinstance(value, float)
            },
            "best_baseline": str(ratios.get("best_baseline")),
            "report": dg.MetadataValue.md(markdown),
            "chart": dg.MetadataValue.path(lake.uri(f"{EVALUATION}/report.png")),
        }
    )
