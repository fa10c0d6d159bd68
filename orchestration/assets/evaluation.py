import time as time_module
from datetime import UTC, datetime, time, timedelta

import dagster as dg
import polars as pl

from models import artifacts
from models.baselines import HISTORY_COLUMNS, Validation
from models.evaluation import EvaluationReport, evaluate, evaluated_users, score_with_ranker
from models.features import (
    ASSEMBLY_CHUNK_ROWS,
    FEATURE_COLUMNS,
    TABLE_NAMES,
    assemble_features,
)
from models.gate import DEFAULT_METRIC as GATE_METRIC
from models.marts import Marts
from models.metrics import top_k
from models.queries import at_cutoffs
from models.ranker import booster_from_text
from models.report import (
    headline_ratios,
    rebuy_shares,
    render_markdown,
    render_png,
    render_rebuy_markdown,
)
from models.training_set import label_queries
from orchestration.concurrency import MEMORY_HEAVY
from orchestration.resources import ShelfwiseResource
from shelfwise.intake.ingest import ingested_dates
from shelfwise.lake import EVALUATION_CHART, EVENTS, Lake, ground_truth_table, partition_day
from shelfwise.runtime.registry import production_ranker

# Validation users on which the blend of the strong baselines is chosen (a seeded sample).
VALIDATION_USERS = 5_000
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
        name: lake.read_frame(ground_truth_table(name))
        for name in GROUND_TRUTH_TABLES
        if lake.exists(ground_truth_table(name))
    }
    return tables if "user_category_tastes" in tables and "item_profiles" in tables else None


def _history_before(lake: Lake, cutoff: datetime) -> pl.DataFrame | None:
    """The lake's events before `cutoff` (the days up to its date; the baselines cut at the
    instant), with the columns the strong baselines read; None without events."""
    files = [
        file
        for file in lake.list_files(EVENTS)
        if (day := partition_day(file)) is None or day <= cutoff.date().isoformat()
    ]
    if not files:
        return None
    frames = [lake.read_frame(file, columns=HISTORY_COLUMNS) for file in files]
    history = pl.concat([frame.select(HISTORY_COLUMNS) for frame in frames], how="vertical_relaxed")
    return history.filter(pl.col("occurred_at") < cutoff)


def _validation(
    lake: Lake,
    labels: pl.DataFrame,
    bought_together: pl.DataFrame | None,
    cutoff: datetime,
    booster=None,
) -> Validation | None:
    """The last training cutoff's labelled users (a seeded sample), for the blend's choice;
    with the ranker's scores of their candidates and the marts at that cutoff (for the segment
    policy) when the booster is given."""
    labels = at_cutoffs(labels, cutoff)
    users = evaluated_users(labels)
    if users.height == 0:
        return None
    if users.height > VALIDATION_USERS:
        users = users.sample(VALIDATION_USERS, seed=0).sort("as_of", "user_id")
    validation = Validation(
        users=users,
        labels=labels.join(users, on=["as_of", "user_id"], how="semi"),
        bought_together=at_cutoffs(bought_together, cutoff)
        if bought_together is not None
        else pl.DataFrame(),
    )
    if booster is None:
        return validation
    tables = Marts.load(lake, [cutoff])
    scores = []
    for chunk in artifacts.candidate_chunks(lake, "training", ASSEMBLY_CHUNK_ROWS):
        chunk = at_cutoffs(chunk, cutoff).join(users, on=["as_of", "user_id"], how="semi")
        if chunk.height:
            assembled = assemble_features(chunk, tables.for_queries(chunk))
            scores.append(
                score_with_ranker(assembled, booster).select("as_of", "user_id", "item_id", "score")
            )
    if not scores:
        return validation
    validation.ranker_scores = pl.concat(scores)
    validation.item_features = tables.items
    validation.user_features = tables.users
    return validation


def _validation_ranker(lake: Lake, plan, booster):
    """The ranker that chooses the segment policy on the validation cutoff: one that never
    learned from it. The early-stopped model when the ranker was refit on that window
    (`refit_with_validation`), the ranker itself when it was not; None (the default policy)
    when there was no validation cutoff (a single training cutoff)."""
    info = artifacts.read_ranker_info(lake)
    if not plan.training or info.get("validation_cutoff") != plan.training[-1].isoformat():
        return None
    if not info.get("refit_with_validation"):
        return booster
    return artifacts.load_ranker(lake, validation=True)


def _window_middle(lake: Lake) -> datetime | None:
    """The middle of the event window: the generator's trend pivot."""
    dates = ingested_dates(lake)
    if not dates:
        return None
    first = datetime.combine(dates[0], time(), tzinfo=UTC)
    return (
        first + (datetime.combine(dates[-1], time(), tzinfo=UTC) - first) / 2 + timedelta(hours=12)
    )


def _rebuy_shares(
    scored: pl.DataFrame,
    labels: pl.DataFrame,
    queries: pl.DataFrame | None,
    user_items: pl.DataFrame,
) -> dict[str, float | None]:
    """The share of re-buy items in the ranker's top 10 and in the truth, over the evaluated
    users (those of the sample with a positive label), as `evaluate` scores them."""
    if queries is not None:
        labels = labels.join(
            queries.select("as_of", "user_id").unique(), on=["as_of", "user_id"], how="semi"
        )
    users = evaluated_users(labels)
    ranked = top_k(scored.join(users, on=["as_of", "user_id"], how="semi"), "score", 10)
    return rebuy_shares(ranked, labels.join(users, on=["as_of", "user_id"], how="semi"), user_items)


def _new_items_metadata(report: EvaluationReport) -> dict[str, float | int]:
    """The `new_items_only` view's headline numbers as flat metadata."""
    view = report.new_items_only
    if view is None:
        return {}
    values: dict[str, float | int] = {
        "new_items_users": view.users,
        "new_items_dropped_users": int(view.dropped_users),
    }
    for approach, metrics in view.metrics.items():
        for metric in (GATE_METRIC, "recall@20"):
            if metric in metrics:
                values[f"new_items_{approach}_{metric}"] = float(metrics[metric])
    for approach, differences in view.paired.items():
        if GATE_METRIC in differences:
            low, high = view.paired_intervals[approach][GATE_METRIC]
            values[f"new_items_paired_{approach}_{GATE_METRIC}_diff"] = float(
                differences[GATE_METRIC]
            )
            values[f"new_items_paired_{approach}_{GATE_METRIC}_diff_lower"] = float(low)
            values[f"new_items_paired_{approach}_{GATE_METRIC}_diff_upper"] = float(high)
    return values


def _segment_metadata(results: dict) -> dict[str, float | int | str]:
    """Each segment's users, who serves it, and the ranker minus popularity on NDCG@10."""
    values: dict[str, float | int | str] = {}
    for segment, entry in results["segments_vs_fallback"]["segments"].items():
        ranker = entry["ranker_minus_fallback"]
        low, high = ranker[f"{GATE_METRIC}_diff_ci95"]
        values[f"segment_{segment}_users"] = int(entry["users"])
        values[f"segment_{segment}_served_by"] = str(entry["served_by"])
        values[f"segment_{segment}_ranker_minus_popularity_{GATE_METRIC}"] = float(
            ranker[f"{GATE_METRIC}_diff"]
        )
        values[f"segment_{segment}_ranker_minus_popularity_{GATE_METRIC}_lower"] = float(low)
        values[f"segment_{segment}_ranker_minus_popularity_{GATE_METRIC}_upper"] = float(high)
    return values


@dg.asset(
    deps=["ranker", "candidates", "interaction_labels", *TABLE_NAMES],
    group_name="ranking",
    op_tags=MEMORY_HEAVY,
)
def evaluation(shelfwise: ShelfwiseResource) -> dg.MaterializeResult:
    """Offline quality on the held-out label window after the evaluation cutoff (a time split;
    `label_window_days` of the `dbt_feature_tables` config, 7 by default), computed by our own
    metric code over users with at least one positive: NDCG@10, Recall@10/20, MAP@10,
    HitRate@10, MRR, catalog coverage and novelty of the ranker against popularity, trending,
    co-visitation alone, buy-again, the candidate order without the ranker, the strong baselines
    of `models.baselines` (buy-again with recency decay, basket co-occurrence, item-kNN, EASE and
    a blend of buy-again with one of them chosen on the last training cutoff; read from the
    lake's events before the cutoff) and, on generated data, the oracle ranking from the
    ground-truth tastes; sliced by new / light / heavy users.
    Every per-user metric has a 95% bootstrap interval over the users, and the ranker a paired
    difference (same resampled users) against every other approach: the promotion gate reads
    the one against the best baseline. A baseline the data cannot define (trending without
    views, buy-again without repeat purchases, co-visitation without co-visited candidates) is
    listed as not applicable rather than scored 0.
    The model currently in production is scored on the same candidates when its features match.
    In a large shop all of them are scored on the same seeded sample of users (`candidates`
    config `max_evaluation_queries`; sizes in the metadata and in metrics.json). The report (a
    table and a chart) is in the metadata and in the lake under evaluation/.

    Choosing the label window: it should match the shop's buying rhythm (7 to 14 days for a
    weekly grocer, 28 or more for a fashion shop or a wholesaler with monthly orders), hold
    enough purchases per evaluated user, and stay short relative to the data's length."""
    lake = shelfwise.lake()
    plan = artifacts.load_plan(lake)
    all_labels = artifacts.read_labels(lake)
    labels = at_cutoffs(all_labels, plan.evaluation)
    # The users the `candidates` asset drew (all labelled users of a small shop): every approach
    # is scored on these, never the baselines on all users and the ranker on the sample.
    queries = artifacts.sampled_queries(lake, "evaluation")
    labelled = label_queries(labels).height
    sample = {
        "evaluation_queries": queries.height if queries is not None else labelled,
        "labelled_queries": labelled,
    }
    tables = Marts.load(lake, [plan.evaluation])
    # Assembled chunk by chunk of users (the same rows): the joins' intermediates of all the
    # sampled users' candidates at once would be several times the result.
    assembled = pl.concat(
        [
            assemble_features(chunk, tables.for_queries(chunk))
            for chunk in artifacts.candidate_chunks(lake, "evaluation", ASSEMBLY_CHUNK_ROWS)
        ]
    )
    ground_truth = _ground_truth(lake)
    # The model in production, scored on the same candidates and users (paired with the ranker)
    # for the gate's second comparison, when its features match.
    current = production_ranker(shelfwise.settings().bentoml_home)
    production = None
    if current is not None and current[1].get("features") == FEATURE_COLUMNS:
        production = booster_from_text(current[0])
    # Scored once here: the report's re-buy shares need the ranker's lists too.
    booster = artifacts.load_ranker(lake)
    scored = score_with_ranker(assembled, booster)
    # The strong baselines (models.baselines) read the raw history before the cutoff.
    started = time_module.monotonic()
    history = _history_before(lake, plan.evaluation)
    together = artifacts.read_mart_if_built(lake, "item_bought_together")
    validation = (
        _validation(
            lake, all_labels, together, plan.training[-1], _validation_ranker(lake, plan, booster)
        )
        if plan.training
        else None
    )
    report = evaluate(
        assembled,
        scored.get_column("score"),
        labels,
        tables.items,
        tables.users,
        tables.user_items,
        ground_truth=ground_truth,
        trend_pivot=_window_middle(lake) if ground_truth else None,
        queries=queries,
        production=production,
        history=history,
        bought_together=at_cutoffs(together, plan.evaluation) if together is not None else None,
        validation=validation,
    )
    seconds = time_module.monotonic() - started
    results = report.to_dict()
    shares = _rebuy_shares(scored, labels, queries, tables.user_items)
    markdown = render_markdown(report) + render_rebuy_markdown(shares)
    artifacts.write_evaluation_report(
        lake,
        {
            "evaluation_cutoff": plan.evaluation.isoformat(),
            "sample": sample,
            **results,
            "rebuy_shares": shares,
        },
        markdown,
        render_png(report),
    )
    ratios = headline_ratios(report)
    metrics = report.metrics
    return dg.MaterializeResult(
        metadata={
            "evaluated_users": int(metrics["ranker"]["users"]),
            **sample,
            "sampled": sample["evaluation_queries"] < sample["labelled_queries"],
            **{
                f"{approach}_{metric}": float(value)
                for approach, values in metrics.items()
                for metric, value in values.items()
                if metric != "users"
            },
            # The gate's numbers: the ranker minus each approach on NDCG@10, with the interval.
            **{
                f"paired_{approach}_{GATE_METRIC}_{key}": float(value)
                for approach, differences in report.paired.items()
                for key, value in zip(
                    ("diff", "diff_lower", "diff_upper"),
                    (differences[GATE_METRIC], *report.paired_intervals[approach][GATE_METRIC]),
                    strict=True,
                )
                if GATE_METRIC in differences
            },
            # What is new to each customer: every approach, and the ranker minus each.
            **_new_items_metadata(report),
            # Each segment against its fallback (popularity), and who serves it.
            **_segment_metadata(results),
            "segment_policy": dg.MetadataValue.json(results.get("segment_policy", {})),
            "not_applicable": dg.MetadataValue.json(dict(report.not_applicable)),
            "baseline_notes": dg.MetadataValue.json(dict(report.notes)),
            "evaluate_seconds": float(seconds),
            **{
                f"ranker_ndcg@10_{name}": float(value)
                for name, value in ratios.items()
                if isinstance(value, float)
            },
            "best_baseline": str(ratios.get("best_baseline")),
            **{f"rebuy_share_{name}": float(v) for name, v in shares.items() if v is not None},
            "report": dg.MetadataValue.md(markdown),
            "chart": dg.MetadataValue.path(lake.uri(EVALUATION_CHART)),
        }
    )
