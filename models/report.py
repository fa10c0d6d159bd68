"""Human-readable renderings of an `EvaluationReport`: a Markdown summary and a PNG bar chart."""

import io

import polars as pl

from models.evaluation import NOT_BASELINES, ORACLE, RANKER, EvaluationReport

# Columns of the approaches × metrics table, in order; metrics a report lacks are skipped.
MARKDOWN_METRICS = (
    "ndcg@10",
    "recall@10",
    "recall@20",
    "map@10",
    "hit_rate@10",
    "mrr@10",
    "coverage@10",
    "novelty@10",
)
CHART_METRICS = ("ndcg@10", "recall@20")
HEADLINE = "ndcg@10"


def _format(value: float, interval: tuple[float, float] | None = None) -> str:
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _signed(value: float, interval: tuple[float, float]) -> str:
    return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _metrics_table(metrics: dict, intervals: dict, columns: list[str]) -> list[str]:
    """One row per approach: each metric with its 95% interval when known."""
    return _table(
        ["approach", *columns],
        [
            [
                name,
                *(
                    _format(values.get(column, 0.0), intervals.get(name, {}).get(column))
                    for column in columns
                ),
            ]
            for name, values in metrics.items()
        ],
    )


def _paired_table(paired: dict, intervals: dict, columns: list[str]) -> list[str]:
    """One row per approach: the ranker's paired difference to it, with its 95% interval."""
    return _table(
        ["ranker minus", *columns],
        [
            [name, *(_signed(differences[column], intervals[name][column]) for column in columns)]
            for name, differences in paired.items()
        ],
    )


def _columns(report: EvaluationReport) -> list[str]:
    present = {name for metrics in report.metrics.values() for name in metrics}
    return [name for name in MARKDOWN_METRICS if name in present]


def headline_ratios(report: EvaluationReport) -> dict[str, float | str | None]:
    """The ranker's NDCG@10 relative to the best baseline and to the oracle.

    The best baseline is the applicable baseline with the highest NDCG@10: neither the ranker,
    production nor the oracle, and never one the data cannot define (those have no metrics).

    Args:
        report: An evaluation report with a `ranker` approach.

    Returns:
        `best_baseline` (name), `ratio_to_best_baseline` and `ratio_to_oracle`; a ratio is None
        when its denominator is missing or zero.
    """
    ranker = report.metrics.get(RANKER, {}).get(HEADLINE, 0.0)
    baselines = {
        name: metrics.get(HEADLINE, 0.0)
        for name, metrics in report.metrics.items()
        if name not in NOT_BASELINES
    }
    best = max(baselines, key=lambda name: baselines[name]) if baselines else None
    best_value = baselines.get(best, 0.0) if best else 0.0
    oracle = report.metrics.get(ORACLE, {}).get(HEADLINE)
    return {
        "best_baseline": best,
        "ratio_to_best_baseline": ranker / best_value if best_value else None,
        "ratio_to_oracle": ranker / oracle if oracle else None,
    }


def render_markdown(report: EvaluationReport) -> str:
    """Renders the report as Markdown.

    Seven parts: a table of approaches × metrics, each per-user metric with its 95% bootstrap
    interval (`0.183 [0.176, 0.190]`); the ranker's paired differences against every other
    approach on the same users, with their intervals; the baselines the data cannot define and
    why; a table of NDCG@10 per approach and user segment (with the number of users in each
    segment); each segment's ranker minus popularity (its fallback) with who serves it and why;
    the same approaches on new items only (the user's past items removed) with the ranker's
    paired differences; and the ranker's NDCG@10 relative to the best baseline and to the
    oracle (when present).

    Args:
        report: The evaluation report.

    Returns:
        Markdown text ending with a newline.
    """
    users = int(report.metrics.get(RANKER, next(iter(report.metrics.values()), {})).get("users", 0))
    cutoffs = ", ".join(report.evaluation_cutoffs) or "unknown cutoff"
    columns = _columns(report)
    lines = [f"## Offline evaluation ({users:,} users with a positive; cutoff {cutoffs})", ""]
    lines += _metrics_table(report.metrics, report.intervals, columns)
    lines += ["", "Intervals: 95% bootstrap over the evaluated users (coverage and novelty, which"]
    lines += ["describe all the lists together, have none)."]
    paired_columns = [
        column
        for column in columns
        if any(column in differences for differences in report.paired.values())
    ]
    if report.paired and paired_columns:
        lines += ["", "### Ranker minus each approach, on the same users (paired, 95% interval)"]
        lines += [""]
        lines += _paired_table(report.paired, report.paired_intervals, paired_columns)
    if report.notes:
        lines += ["", "### How the baselines were defined on this data", ""]
        lines += [f"- {name}: {note}" for name, note in report.notes.items()]
    if report.not_applicable:
        lines += ["", "### Not applicable (the data cannot define them; not scored)", ""]
        lines += [f"- {name}: {reason}" for name, reason in report.not_applicable.items()]
    segments = list(report.segments)
    lines += ["", f"### NDCG@10 by user segment (heavy: more than {report.heavy_threshold} events)"]
    lines += [""]
    header = [
        "approach",
        *(f"{segment} ({report.segment_users.get(segment, 0):,} users)" for segment in segments),
    ]
    lines += _table(
        header,
        [
            [
                name,
                *(
                    _format(report.segments[segment].get(name, {}).get(HEADLINE, 0.0))
                    for segment in segments
                ),
            ]
            for name in report.metrics
        ],
    )
    lines += _segments_vs_fallback(report)
    lines += _new_items_only(report, columns)
    ratios = headline_ratios(report)
    lines += ["", "### Ranker NDCG@10", ""]
    if ratios["ratio_to_best_baseline"] is not None:
        lines.append(
            f"- {ratios['ratio_to_best_baseline']:.2f}× the best baseline "
            f"({ratios['best_baseline']})"
        )
    else:
        lines.append("- no baseline with a positive NDCG@10 to compare with")
    if ratios["ratio_to_oracle"] is not None:
        lines.append(f"- {ratios['ratio_to_oracle']:.2f}× the oracle")
    elif ORACLE in report.metrics:
        lines.append("- the oracle's NDCG@10 is 0: no ratio")
    else:
        lines.append("- no oracle (no ground truth)")
    return "\n".join(lines) + "\n"


def _segments_vs_fallback(report: EvaluationReport) -> list[str]:
    """Each segment: the ranker minus popularity (its fallback), who serves it and why."""
    if not report.segment_vs_fallback:
        return []
    policy = report.segment_policy
    lines = ["", f"### Each segment against its fallback (popularity), {HEADLINE}", ""]
    rows = []
    for segment, differences in report.segment_vs_fallback.items():
        if HEADLINE not in differences:
            continue
        interval = report.segment_vs_fallback_intervals[segment][HEADLINE]
        fallback = policy is not None and policy.serves_fallback(segment)
        ranker = _signed(differences[HEADLINE], interval)
        rows.append(
            [
                segment,
                f"{report.segment_users.get(segment, 0):,}",
                "popularity" if fallback else "ranker",
                ranker,
                _signed(0.0, (0.0, 0.0)) if fallback else ranker,
                policy.reasons.get(segment, "") if policy is not None else "",
            ]
        )
    lines += _table(
        [
            "segment",
            "users",
            "served by",
            "ranker minus popularity",
            "served minus popularity",
            "why (validation cutoff)",
        ],
        rows,
    )
    lines += ["", "Paired 95% intervals on the segment's users. The segment policy is chosen on"]
    lines += ["the validation cutoff; the gate blocks a segment served worse beyond doubt."]
    return lines


def _new_items_only(report: EvaluationReport, columns: list[str]) -> list[str]:
    """Every approach on what is new to each customer, and the ranker minus each."""
    view = report.new_items_only
    if view is None:
        return []
    present = {name for metrics in view.metrics.values() for name in metrics}
    shown = [column for column in columns if column in present]
    lines = ["", f"### New items only ({view.users:,} users; {view.dropped_users:,} dropped out)"]
    lines += ["", f"Rule: {view.rule}.", ""]
    lines += _metrics_table(view.metrics, view.intervals, shown)
    if view.paired:
        lines += ["", "Ranker minus each approach, new items only (paired, 95% interval):", ""]
        lines += _paired_table(view.paired, view.paired_intervals, shown)
    return lines


def render_png(report: EvaluationReport, dpi: int = 100) -> bytes:
    """Renders NDCG@10 and Recall@20 per approach as a grouped bar chart.

    The 95% intervals are the error bars. matplotlib is imported here (with the
    non-interactive Agg backend), so importing this module stays cheap.

    Args:
        report: The evaluation report.
        dpi: Resolution of the image.

    Returns:
        The PNG file's bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = report.approaches
    figure = Figure(figsize=(max(6.0, 1.1 * len(names) + 2.0), 4.0), dpi=dpi)
    axes = figure.subplots()
    width = 0.8 / len(CHART_METRICS)
    for index, metric in enumerate(CHART_METRICS):
        values = [report.metrics[name].get(metric, 0.0) for name in names]
        bounds = [
            report.intervals.get(name, {}).get(metric, (v, v))
            for name, v in zip(names, values, strict=True)
        ]
        errors = [
            [max(v - low, 0.0) for v, (low, _) in zip(values, bounds, strict=True)],
            [max(high - v, 0.0) for v, (_, high) in zip(values, bounds, strict=True)],
        ]
        positions = [i + (index - (len(CHART_METRICS) - 1) / 2) * width for i in range(len(names))]
        bars = axes.bar(positions, values, width=width, label=metric, yerr=errors, capsize=2)
        axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("mean over users with a positive")
    axes.set_title("Offline evaluation: " + ", ".join(CHART_METRICS))
    axes.legend()
    axes.margins(y=0.15)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def rebuy_shares(
    ranked: pl.DataFrame, labels: pl.DataFrame, user_items: pl.DataFrame, k: int = 10
) -> dict[str, float | None]:
    """The share of re-buy items in the ranker's top k beside the share in the truth.

    A re-buy item is one the user bought before the cutoff (`user_items.purchases > 0`). The
    shares are over slots: of all the top-k slots of the evaluated users, of all their purchased
    (label 3) and of all their positive (label > 0) items in the label window.

    Args:
        ranked: The ranker's lists of the evaluated users (as_of, user_id, item_id, rank).
        labels: Their labels (as_of, user_id, item_id, label).
        user_items: `user_item_features` at the cutoff.
        k: The list length.

    Returns:
        `ranker_top{k}`, `truth_purchases` and `truth_positives`; None where there is no row.
    """
    bought = (
        user_items.filter(pl.col("purchases") > 0)
        .select("as_of", "user_id", "item_id")
        .with_columns(pl.lit(True).alias("_bought"))
    )

    def share(rows: pl.DataFrame) -> float | None:
        if rows.height == 0:
            return None
        joined = rows.select("as_of", "user_id", "item_id").join(
            bought, on=["as_of", "user_id", "item_id"], how="left"
        )
        return float(joined.get_column("_bought").is_not_null().mean())

    return {
        f"ranker_top{k}": share(ranked.filter(pl.col("rank") <= k)),
        "truth_purchases": share(labels.filter(pl.col("label") == 3)),
        "truth_positives": share(labels.filter(pl.col("label") > 0)),
    }


def render_rebuy_markdown(shares: dict[str, float | None]) -> str:
    """The re-buy shares of `rebuy_shares` as a Markdown section."""

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    top = next(name for name in shares if name.startswith("ranker_top"))
    lines = ["", "### Re-buy items (bought by the user before the cutoff)", ""]
    lines += _table(
        ["of", "re-buy share"],
        [
            [f"ranker top {top.removeprefix('ranker_top')} slots", percent(shares[top])],
            ["truth: purchases in the label window", percent(shares["truth_purchases"])],
            ["truth: any positive in the label window", percent(shares["truth_positives"])],
        ],
    )
    return "\n".join(lines) + "\n"
