"""Online experiments measured: every experiment of the book, its arms compared on what shoppers
did with what each arm showed them."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl

from models.experiment_results import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_USERS,
    MART_COLUMNS,
    analyse,
    arm_metadata,
    results_markdown,
)
from orchestration.resources import ShelfwiseResource
from shelfwise.experiments import ExperimentError, read_experiments, write_results
from shelfwise.lake import EXPERIMENT_RESULTS, feature_table

OUTCOMES_MART = "experiment_outcomes"


class ExperimentResultsConfig(dg.Config):
    """The decision rule's error rate and minimum sample (see models/experiment_results.py)."""

    # The chance that an experiment whose arms are alike names a winner; the intervals are at
    # 1 - alpha (95% by default).
    alpha: float = DEFAULT_ALPHA
    # Users every arm of a split experiment needs before a winner may be named.
    min_users_per_arm: int = DEFAULT_MIN_USERS
    # Experiments stopped longer ago than this keep their table and their results in the lake,
    # but no longer add numbers to each materialization (the chart of the UI).
    chart_days: int = 14


@dg.asset(deps=[OUTCOMES_MART], group_name="experiments")
def experiment_results(
    context: dg.AssetExecutionContext, shelfwise: ShelfwiseResource, config: ExperimentResultsConfig
) -> dg.MaterializeResult:
    """Every online experiment of the book (`shelfwise experiments`) measured from the
    impressions it served and the events that carried their rec_id (the `experiment_outcomes`
    mart). Split: per arm impressions, clicks, carts, purchases, CTR, cart and purchase rate and
    revenue per impression, each with a 95% interval over users (the delta method on per-user
    sums: users are what the experiment randomised), and each arm's relative lift against the
    control (the first arm) with its interval. The primary metric is the CTR: the winner is the
    arm with the largest CTR lift whose interval lies above 0 and whose purchase rate and
    revenue per impression are not significantly lower (the control, when every other arm is
    significantly worse); with more than two arms the lift intervals are Bonferroni-corrected,
    so a null experiment names a winner about 5% of the time. Interleave: per
    list, the arm whose drafted items were clicked, carted or bought more often wins it; the
    winner is the arm with more wins when the two-sided sign test gives p < 0.05.
    The results are written to the lake (experiments/results.json), which the service shows
    and `shelfwise models promote --winner-of` reads; each experiment's table is in the
    metadata, and its numbers per arm plot across materializations in the UI."""
    lake = shelfwise.lake()
    try:
        experiments = read_experiments(lake)
    except ExperimentError as error:
        raise dg.Failure(str(error)) from error
    now = datetime.now(UTC)
    if not experiments:
        write_results(lake, {})
        return dg.MaterializeResult(
            metadata={"experiments": 0, "results": dg.MetadataValue.md("No experiments yet.")}
        )
    mart = feature_table(OUTCOMES_MART)
    if lake.exists(mart):
        # dbt-duckdb exports an empty result as one row of nulls: not an impression.
        outcomes = lake.read_frame(mart, columns=MART_COLUMNS).filter(
            pl.col("rec_id").is_not_null()
        )
    else:  # a build before the mart existed
        context.log.warning(f"No {lake.uri(mart)}: every experiment counts no impressions.")
        outcomes = pl.DataFrame()
    results, tables, numbers = {}, [], {}
    recent = now - timedelta(days=config.chart_days)
    for experiment in experiments:  # the book's order: oldest first
        if experiment.started_at > now:
            continue  # scheduled, not started: nothing to measure
        analysis = analyse(experiment, outcomes, config.alpha, config.min_users_per_arm)
        results[experiment.name] = analysis.to_results(now)
        tables.append(results_markdown(experiment, analysis))
        if experiment.stopped_at is None or experiment.stopped_at >= recent:
            numbers.update(arm_metadata(analysis))
            numbers[f"{experiment.name}/winner"] = analysis.winner or "none"
    write_results(lake, results)
    tables.reverse()  # newest first: the running experiment's table on top
    return dg.MaterializeResult(
        metadata={
            "experiments": len(results),
            "running": ", ".join(e.name for e in experiments if e.is_running(now)) or "none",
            "winners": dg.MetadataValue.json({name: r.winner for name, r in results.items()}),
            "results": dg.MetadataValue.md("\n\n".join(tables)),
            **numbers,
            "path": dg.MetadataValue.path(lake.uri(EXPERIMENT_RESULTS)),
        }
    )
