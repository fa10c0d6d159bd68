"""Row-level validation of event batches with Great Expectations.

Each landing batch is checked against one expectation suite. Expectations that judge single rows
(nulls, the `event_type` domain, signs, timestamps in the future, unique `event_id`) return the
failing rows' positions, which become a reason per rejected row; expectations about whole columns
(types) reject the whole batch. Great Expectations validates pandas, so the batch is converted.
"""

from dataclasses import dataclass, field
from datetime import datetime
from functools import cache

import polars as pl

from shelfwise.contracts import EVENT_TYPES, EVENTS_SCHEMA

ROW_REASON = "reason"


@dataclass
class EventValidation:
    """The verdict on one batch of events.

    Attributes:
        valid: Rows that passed every row expectation.
        rejected: Rows that failed, with the event columns plus `reason`.
        duplicates_collapsed: Exact repeats of a row in the batch (at-least-once delivery),
            kept once; they lose no information and are not counted as invalid.
        batch_errors: Failed expectations about whole columns; the batch must not be published.
        expectations: Per expectation, whether it passed and how many rows it rejected.
    """

    valid: pl.DataFrame
    rejected: pl.DataFrame
    duplicates_collapsed: int = 0
    batch_errors: list[str] = field(default_factory=list)
    expectations: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def invalid_share(self) -> float:
        """Share of rejected rows among the rows judged."""
        total = self.valid.height + self.rejected.height
        return self.rejected.height / total if total else 0.0


def _expectations(now: datetime) -> list[object]:
    import great_expectations as gx
    import pandas as pd

    expect = gx.expectations
    required = [f.name for f in EVENTS_SCHEMA if not f.nullable]
    identifiers = ["event_id", "user_id", "session_id", "item_id", "event_type", "source"]
    return [
        *[
            expect.ExpectColumnValuesToNotBeNull(column=name, meta={ROW_REASON: f"{name} is null"})
            for name in required
        ],
        *[
            expect.ExpectColumnValuesToBeOfType(
                column=name, type_="str", meta={ROW_REASON: f"{name} is not text"}
            )
            for name in identifiers
        ],
        expect.ExpectColumnValuesToBeInSet(
            column="event_type",
            value_set=list(EVENT_TYPES),
            meta={ROW_REASON: f"event_type not in {list(EVENT_TYPES)}"},
        ),
        expect.ExpectColumnValuesToBeBetween(
            column="quantity", min_value=0, meta={ROW_REASON: "quantity is negative"}
        ),
        expect.ExpectColumnValuesToBeBetween(
            column="price", min_value=0, meta={ROW_REASON: "price is negative"}
        ),
        expect.ExpectColumnValuesToBeBetween(
            column="occurred_at",
            max_value=pd.Timestamp(now),
            meta={ROW_REASON: "occurred_at is in the future"},
        ),
        expect.ExpectColumnValuesToBeUnique(
            column="event_id", meta={ROW_REASON: "event_id shared by different rows in the batch"}
        ),
    ]


@cache
def _batch_definition():  # noqa: ANN202 - Great Expectations' own type
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    source = context.data_sources.add_pandas("landing")
    return source.add_dataframe_asset("events").add_batch_definition_whole_dataframe("batch")


def validate_events(events: pl.DataFrame, now: datetime) -> EventValidation:
    """Validates a batch of contract-typed events with Great Expectations.

    Args:
        events: Events conformed to `EVENTS_SCHEMA`.
        now: The ingestion time; events after it are rejected.

    Returns:
        The valid rows, the rejected rows with a reason each, and the suite's results.
    """
    import great_expectations as gx

    batch_rows = events.unique(maintain_order=True)
    collapsed = events.height - batch_rows.height
    frame = batch_rows.to_pandas()
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name="landing_events", expectations=_expectations(now))
    outcome = batch.validate(suite, result_format={"result_format": "COMPLETE"})

    reasons: dict[int, list[str]] = {}
    batch_errors: list[str] = []
    summary: dict[str, dict[str, object]] = {}
    for result in outcome.results:
        config = result.expectation_config
        reason = config.meta[ROW_REASON]
        failed_rows = result.result.get("unexpected_index_list") or []
        summary[f"{config.type}({config.kwargs.get('column')})"] = {
            "success": bool(result.success),
            "rejected_rows": len(failed_rows),
        }
        if result.success:
            continue
        if failed_rows:
            for position in failed_rows:
                reasons.setdefault(int(position), []).append(reason)
        else:
            batch_errors.append(reason)

    positions = pl.Series("position", sorted(reasons), dtype=pl.UInt32)
    indexed = batch_rows.with_row_index("position")
    rejected = indexed.join(
        pl.DataFrame(
            {"position": positions, ROW_REASON: ["; ".join(reasons[p]) for p in positions]}
        ),
        on="position",
        how="inner",
    ).drop("position")
    valid = indexed.filter(~pl.col("position").is_in(positions.implode())).drop("position")
    return EventValidation(valid, rejected, collapsed, batch_errors, summary)
