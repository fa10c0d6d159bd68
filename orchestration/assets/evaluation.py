import dagster as dg

from models.evaluation import evaluate_against_baselines
from models.features import TABLE_NAMES, FeatureTables, assemble_features
from orchestration.assets.shared import at_cutoffs, load_plan, load_ranker
from orchestration.resources import ShelfwiseResource
from shelfwise.lake import CANDIDATES, EVALUATION, FEATURES


@dg.asset(deps=["ranker", "candidates", "interaction_labels", *TABLE_NAMES], group_name="ranking")
def evaluation(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """Offline quality on the held-out week after the evaluation cutoff (a time split): NDCG@10,
    Recall@10/20 of the ranker against popularity and the candidate order without the ranker,
    averaged over users with at least one positive, computed by our own metric code."""
    lake = shelfwise.lake()
    plan = load_plan(lake)
    labels = at_cutoffs(lake.read_frame(f"{FEATURES}/interaction_labels.parquet"), plan.evaluation)
    tables = FeatureTables.load(lake, [plan.evaluation])
    assembled = assemble_features(lake.read_frame(f"{CANDIDATES}/evaluation.parquet"), tables)
    results = evaluate_against_baselines(assembled, load_ranker(lake), labels, tables.items)
    report = {"evaluation_cutoff": plan.evaluation.isoformat(), "metrics": results}
    lake.write_json(report, f"{EVALUATION}/metrics.json")
    ranker_ndcg = results["ranker"]["ndcg@10"]
    popularity_ndcg = results["popularity"]["ndcg@10"]
    return dg.MaterializeResult(
        metadata={
            "evaluated_users": int(results["ranker"]["users"]),
            **{
                f"{approach}_{metric}": float(value)
                for approach, metrics in results.items()
                for metric, value in metrics.items()
                if metric != "users"
            },
            "ndcg@10_lift_over_popularity": float(ranker_ndcg / popularity_ndcg)
            if popularity_ndcg
            else 0.0,
            "metrics": dg.MetadataValue.json(results),
        }
    )
