"""Online results of the shown recommendations, summarised from the `feedback_attribution` mart."""

import polars as pl

GROUPING = ["model_version", "strategy", "experiment", "arm"]


def attribution_totals(daily: pl.DataFrame) -> pl.DataFrame:
    """Totals over all days per model version, strategy, experiment and arm.

    Args:
        daily: The `feedback_attribution` mart (one row per day and grouping).

    Returns:
        model_version, strategy, experiment, arm, impressions, clicks, carts, purchases, ctr and
        conversion_rate, most impressions first.
    """
    return (
        daily.group_by(GROUPING)
        .agg(pl.col("impressions", "clicks", "carts", "purchases").sum())
        .with_columns(
            (pl.col("clicks") / pl.col("impressions")).alias("ctr"),
            (pl.col("purchases") / pl.col("impressions")).alias("conversion_rate"),
        )
        .sort("impressions", *GROUPING, descending=[True, False, False, False, False])
    )


def attribution_markdown(totals: pl.DataFrame) -> str:
    """The totals as a Markdown table (for Dagster metadata)."""
    columns = (
        "model_version strategy experiment arm impressions clicks carts purchases CTR conversion"
    )
    lines = [
        "| " + " | ".join(columns.split()) + " |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in totals.iter_rows(named=True):
        lines.append(
            f"| {row['model_version']} | {row['strategy']} | {row['experiment']} "
            f"| {row['arm']} "
            f"| {row['impressions']} | {row['clicks']} | {row['carts']} | {row['purchases']} "
            f"| {row['ctr']:.2%} | {row['conversion_rate']:.2%} |"
        )
    return "\n".join(lines)
