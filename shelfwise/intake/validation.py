"""Row-level validation of event batches with Great Expectations.

Each landing batch is checked against one expectation suite. Expectations that judge single rows
(nulls, the `event_type` domain, signs, timestamps in the future or before the earliest plausible
time, prices that are not finite or above `MAX_PRICE`, unique `event_id`) return the
failing rows' positions, which become a reason per rejected row; expectations about whole columns
(types) reject the whole batch. Great Expectations validates pandas, so the batch is converted.

Before the suite, rows that every real shop export holds are set aside (`set_aside_rows`): guest
checkouts without a user and returns (a purchase with a negative quantity). They go to quarantine
with their reason like rejected rows, but they are not corruption, so they do not count toward a
batch's invalid share; only what the suite rejects does.
"""

from dataclasses import dataclass, field
from datetime import datetime
from functools import cache

import polars as pl

from shelfwise.contracts import (
    DEFAULT_EARLIEST_EVENT_AT,
    EVENT_TYPES,
    EVENTS_SCHEMA,
    GUEST_REASON,
    MAX_PRICE,
    NEGATIVE_PRICE_REASON,
    PRICE_REASON,
    RETURN_REASON,
    ROW_REASON,
    earliest_reason,
)


@dataclass
class EventValidation:
    """The verdict on one batch of events.

    Attributes:
        valid: Rows that passed every row expectation.
        rejected: Rows that failed, with the event columns plus `reason`.
        set_aside: Guest checkouts and returns, with the event columns plus `reason`; not
            judged, so not counted in `invalid_share`.
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
    set_aside: pl.DataFrame = field(default_factory=pl.DataFrame)

    @property
    def invalid_share(self) -> float:
        """Share of rejected rows among the rows judged (set-aside rows are not judged)."""
        total = self.valid.height + self.rejected.height
        return self.rejected.height / total if total else 0.0

    @property
    def quarantined(self) -> pl.DataFrame:
        """The set-aside and the rejected rows, each with its `reason`."""
        if not self.set_aside.height:
            return self.rejected
        return pl.concat([self.set_aside, self.rejected], how="vertical_relaxed")


def set_aside_rows(events: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Splits off the rows that real exports always hold: guest checkouts and returns.

    Args:
        events: Events conformed to `EVENTS_SCHEMA`.

    Returns:
        `(kept, set_aside)`: the rows to validate, and the others with a `reason` column
        (`GUEST_REASON` or `RETURN_REASON`).
    """
    reason = (
        pl.when(pl.col("user_id").is_null())
        .then(pl.lit(GUEST_REASON))
        .when((pl.col("event_type") == "purchase") & (pl.col("quantity") < 0))
        .then(pl.lit(RETURN_REASON))
    )
    marked = events.with_columns(reason.alias(ROW_REASON))
    kept = marked.filter(pl.col(ROW_REASON).is_null()).drop(ROW_REASON)
    return kept, marked.filter(pl.col(ROW_REASON).is_not_null())


def _expectations(now: datetime, earliest: datetime) -> list[object]:
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
            column="price", min_value=0, meta={ROW_REASON: NEGATIVE_PRICE_REASON}
        ),
        # NaN and ±inf prices reach Great Expectations as +inf (`validate_events`): pandas would
        # take a NaN for a missing value, which every expectation skips.
        expect.ExpectColumnValuesToBeBetween(
            column="price", max_value=MAX_PRICE, meta={ROW_REASON: PRICE_REASON}
        ),
        expect.ExpectColumnValuesToBeBetween(
            column="occurred_at",
            max_value=pd.Timestamp(now),
            meta={ROW_REASON: "occurred_at is in the future"},
        ),
        expect.ExpectColumnValuesToBeBetween(
            column="occurred_at",
            min_value=pd.Timestamp(earliest),
            meta={ROW_REASON: earliest_reason("occurred_at", earliest)},
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


def validate_events(
    events: pl.DataFrame, now: datetime, earliest: datetime = DEFAULT_EARLIEST_EVENT_AT
) -> EventValidation:
    """Validates a batch of contract-typed events with Great Expectations.

    Args:
        events: Events conformed to `EVENTS_SCHEMA`.
        now: The ingestion time; events after it are rejected.
        earliest: Events before it are rejected (a default date such as year 1 or the epoch, or
            a typo; time-zone aware).

    Returns:
        The valid rows, the set-aside and the rejected rows with a reason each, and the suite's
        results.
    """
    import great_expectations as gx

    unique_rows = events.unique(maintain_order=True)
    collapsed = events.height - unique_rows.height
    batch_rows, set_aside = set_aside_rows(unique_rows)
    if not batch_rows.height:  # nothing left to judge
        empty = batch_rows.with_columns(pl.lit(None, dtype=pl.String).alias(ROW_REASON))
        return EventValidation(batch_rows, empty, collapsed, set_aside=set_aside)
    price = pl.col("price")
    judged = batch_rows.with_columns(  # only for the suite: the published rows keep their values
        pl.when(price.is_finite() | price.is_null()).then(price).otherwise(float("inf"))
    )
    frame = judged.to_pandas()
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name="landing_events", expectations=_expectations(now, earliest))
    outcome = batch.validate(suite, result_format={"result_format": "COMPLETE"})

    reasons: dict[int, list[str]] = {}
    batch_errors: list[str] = []
    summary: dict[str, dict[str, object]] = {}
    for result in outcome.results:
        config = result.expectation_config
        reason = config.meta[ROW_REASON]
        failed_rows = result.result.get("unexpected_index_list") or []
        name = f"{config.type}({config.kwargs.get('column')})"
        if name in summary:  # a second expectation of the type on the column: named by reason
            name = f"{name}: {reason}"
        summary[name] = {
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
    return EventValidation(valid, rejected, collapsed, batch_errors, summary, set_aside)
