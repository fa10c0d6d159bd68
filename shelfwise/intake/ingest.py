"""Ingestion: validate what arrived in the lake's landing area and publish it.

`shelfwise generate`, `shelfwise import` and the service all drop files into `landing/`. Ingestion
conforms each file to its contract, validates its rows with Great Expectations
(`shelfwise.intake.validation`), publishes the valid rows (events partitioned by date, catalog rows
upserted by key) and writes rejected rows with a reason per row to `quarantine/`.

Rows every real export holds (guest checkouts, returns) are set aside to quarantine with their
reason and do not count as invalid (`shelfwise.intake.validation.set_aside_rows`). A batch whose
share of invalid rows exceeds `max_invalid_share` is held: its rejected rows still go to quarantine
for inspection, but nothing of it is published and the file stays in landing, so a broken delivery
never feeds features, also not in a later run. A delivery is all or nothing: the catalog files of
a delivery whose events are held stay in landing too. `HeldBatch.message` says why and how to go
on: fix the source and import again (the same landing name is overwritten), or raise the
threshold to accept it (`make pipeline MAX_INVALID_SHARE=…`).

A delivery is the landing files that share a name up to `-b<batch>`, `-<YYYY-MM-DD>`, `-items` or
`-users` (what `shelfwise import` and `shelfwise generate` write for one source).

A landing file is removed only after everything it held is published, and output names derive from
the landing file's name, so an interrupted ingestion can simply run again.
"""

import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime

import polars as pl
import pyarrow as pa

from shelfwise import lake as paths
from shelfwise.contracts import (
    DEFAULT_EARLIEST_EVENT_AT,
    EVENTS_SCHEMA,
    IMPRESSIONS_SCHEMA,
    ITEMS_KEY,
    ITEMS_SCHEMA,
    ROW_REASON,
    STOCK_UPDATED_AT,
    UNKNOWN_CATEGORY,
    USERS_KEY,
    USERS_SCHEMA,
    conform,
)
from shelfwise.intake.validation import EventValidation, validate_events
from shelfwise.lake import Lake
from shelfwise.runtime.feedback import OUTPUT_PREFIX as FEEDBACK_FILE_PREFIX  # noqa: F401 (re-exported)
from shelfwise.runtime.feedback import feedback_event_files, latest_stock_updates

DEFAULT_MAX_INVALID_SHARE = 0.01


_DELIVERY_SUFFIX = re.compile(r"-(b\d+|\d{4}-\d{2}-\d{2}|items|users)$")
_EXAMPLE_CHARS = 80  # per value of an example row


@dataclass(frozen=True)
class ReasonCount:
    """How many rows of a batch failed for one reason, with the first such row as an example."""

    reason: str
    rows: int
    example: dict[str, str]


@dataclass(frozen=True)
class HeldBatch:
    """A landing file not published because too many of its rows are invalid.

    Attributes:
        path: The landing file (lake-relative).
        invalid_share: Rejected rows among the rows judged (set-aside rows are not judged).
        reasons: Every reason that rejected rows, or the failed whole-column expectations.
        rows_judged: Rows the suite judged.
        max_invalid_share: The threshold it exceeded.
        top_reasons: The most frequent row reasons, most frequent first, each with an example.
        batch_errors: Failed whole-column expectations (no threshold lets such a batch in).
    """

    path: str
    invalid_share: float
    reasons: list[str]
    rows_judged: int = 0
    max_invalid_share: float = DEFAULT_MAX_INVALID_SHARE
    top_reasons: list[ReasonCount] = field(default_factory=list)
    batch_errors: list[str] = field(default_factory=list)

    @property
    def accepting_share(self) -> float:
        """The smallest threshold (whole percent) that would let this batch in."""
        share = math.ceil(self.invalid_share * 100 - 1e-9) / 100
        return share if share >= self.invalid_share else share + 0.01

    @property
    def command(self) -> str | None:
        """The command that ingests the batch anyway (None when a threshold cannot)."""
        if self.batch_errors:
            return None
        return f"make pipeline MAX_INVALID_SHARE={self.accepting_share:g}"

    def message(self) -> str:
        """What was held, why (top reasons with counts and an example row), and how to go on."""
        lines = [
            f"{self.path}: held, {self.invalid_share:.1%} of {self.rows_judged:,} rows invalid "
            f"(max_invalid_share {self.max_invalid_share:.1%}); nothing of its delivery "
            "(events, items, users) was published."
        ]
        lines += [f"  whole-column check failed: {error}" for error in self.batch_errors]
        for reason in self.top_reasons:
            example = ", ".join(f"{k}={v}" for k, v in reason.example.items())
            lines.append(f"  {reason.reason}: {reason.rows:,} rows, e.g. {example}")
        lines.append(
            "  Rejected rows are in quarantine/events/. Fix the source and import it again (the "
            "same landing files are overwritten)"
            + (
                f", or ingest it anyway, quarantining the invalid rows: {self.command}"
                if self.command
                else "."
            )
        )
        return "\n".join(lines)

    def to_metadata(self) -> dict[str, object]:
        """The batch as plain JSON values (Dagster metadata)."""
        return {
            "invalid_share": round(float(self.invalid_share), 6),
            "rows_judged": int(self.rows_judged),
            "top_reasons": [
                {"reason": r.reason, "rows": int(r.rows), "example": r.example}
                for r in self.top_reasons
            ],
            "batch_errors": list(self.batch_errors),
            "ingest_anyway": self.command,
        }


def delivery_of(relpath: str) -> str:
    """The delivery of a landing file: its name up to `-b<n>`, a date, `-items` or `-users`."""
    stem = posixpath.splitext(posixpath.basename(relpath))[0]
    return _DELIVERY_SUFFIX.sub("", stem)


def reason_counts(rows: pl.DataFrame, top: int | None = None) -> list[ReasonCount]:
    """Counts rows per reason (a row may have several, `; `-separated), most frequent first.

    Args:
        rows: Rows with a `reason` column.
        top: Keep only this many reasons.

    Returns:
        One entry per reason, with the first row of that reason as an example (text values).
    """
    if not rows.height:
        return []
    exploded = (
        rows.with_row_index("_row")
        .with_columns(pl.col(ROW_REASON).str.split("; "))
        .explode(ROW_REASON)
    )
    counted = (
        exploded.group_by(ROW_REASON)
        .agg(pl.len().alias("_rows"), pl.col("_row").min().alias("_first"))
        .sort(["_rows", ROW_REASON], descending=[True, False])
    )
    if top is not None:
        counted = counted.head(top)
    shown = [c for c in rows.columns if c != ROW_REASON]
    return [
        ReasonCount(
            reason=reason,
            rows=int(count),
            example={
                name: ("" if value is None else str(value))[:_EXAMPLE_CHARS]
                for name, value in rows.row(int(first), named=True).items()
                if name in shown
            },
        )
        for reason, count, first in counted.iter_rows()
    ]


def held_batch(
    relpath: str, verdict: EventValidation, max_invalid_share: float, top: int = 5
) -> HeldBatch | None:
    """The batch's hold, or None when it may be published.

    Args:
        relpath: The landing file.
        verdict: Its validation.
        max_invalid_share: The largest share of invalid rows a batch may hold.
        top: How many reasons the hold lists.
    """
    if not verdict.batch_errors and verdict.invalid_share <= max_invalid_share:
        return None
    counts = reason_counts(verdict.rejected)
    return HeldBatch(
        path=relpath,
        invalid_share=verdict.invalid_share,
        reasons=verdict.batch_errors or [c.reason for c in counts],
        rows_judged=verdict.valid.height + verdict.rejected.height,
        max_invalid_share=max_invalid_share,
        top_reasons=counts[:top],
        batch_errors=list(verdict.batch_errors),
    )


@dataclass
class IngestReport:
    """What one ingestion run did."""

    files: int = 0
    events_checked: int = 0
    events_landed: int = 0
    events_quarantined: int = 0
    events_set_aside: int = 0
    set_aside_by_reason: dict[str, int] = field(default_factory=dict)
    catalog_files_held: int = 0
    duplicates_collapsed: int = 0
    items_upserted: int = 0
    stock_overrides: int = 0
    users_upserted: int = 0
    catalog_rows_quarantined: int = 0
    rows_by_date: dict[str, int] = field(default_factory=dict)
    held: list[HeldBatch] = field(default_factory=list)
    expectations: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def quarantined_share(self) -> float:
        """Share of the event rows checked in this run that were rejected (0 when none arrived)."""
        return self.events_quarantined / self.events_checked if self.events_checked else 0.0


def ingest_landing(
    lake: Lake,
    now: datetime,
    max_invalid_share: float = DEFAULT_MAX_INVALID_SHARE,
    earliest: datetime = DEFAULT_EARLIEST_EVENT_AT,
) -> IngestReport:
    """Validates and publishes every file in the landing area.

    Then applies the stock updates the service received (`stock_updates/`, the latest per item)
    to the catalog where they are newer than its `is_in_stock`: the newest word on an item's stock
    wins, an update's `updated_at` against the `stock_updated_at` of the catalog row (when a
    delivery leaves it empty: the time the file landed), in the features as in serving.

    Also makes sure the impressions dataset exists (a zero-row file until the service logged
    some), so that the feature layer can read it from the first run on.

    Args:
        lake: The lake to ingest into.
        now: Ingestion time; events after it are quarantined.
        max_invalid_share: A file with a larger share of invalid rows is held (not published).
        earliest: Events before it are rejected (quarantined with their reason).

    Returns:
        Counts of what was landed and quarantined.

    Raises:
        ContractError: A landing file misses a required column or cannot be cast; the message
            names the file and the column. The file stays in landing.
    """
    report = IngestReport()
    for relpath in lake.list_files(paths.LANDING_EVENTS):
        _ingest_events_file(lake, relpath, now, max_invalid_share, earliest, report)
    # A delivery is all or nothing: a held delivery's catalog rows wait with its events, and
    # events of it still waiting from an earlier run hold them too.
    held = {delivery_of(relpath) for relpath in lake.list_files(paths.LANDING_EVENTS)}
    for landing, target, schema, key in (
        (paths.LANDING_ITEMS, paths.ITEMS, ITEMS_SCHEMA, ITEMS_KEY),
        (paths.LANDING_USERS, paths.USERS, USERS_SCHEMA, USERS_KEY),
    ):
        waiting = lake.list_files(landing)
        files = [relpath for relpath in waiting if delivery_of(relpath) not in held]
        report.catalog_files_held += len(waiting) - len(files)
        if files:
            delivered_at = lake.list_modified(landing) if target == paths.ITEMS else {}
            upserted = _upsert_catalog(lake, files, target, schema, key, report, delivered_at)
            if target == paths.ITEMS:
                report.items_upserted += upserted
            else:
                report.users_upserted += upserted
    report.stock_overrides = _apply_stock_updates(lake)
    report.rows_by_date = dict(sorted(report.rows_by_date.items()))
    # An empty file of the contract, so that dbt finds every column even before the first
    # impression (and after the contract gained columns: rewritten when it lacks one).
    empty = paths.EMPTY_IMPRESSIONS
    if not lake.list_files(paths.IMPRESSIONS) or (
        lake.exists(empty)
        and not set(IMPRESSIONS_SCHEMA.names) <= set(lake.parquet_schema(empty).names)
    ):
        lake.write_parquet(IMPRESSIONS_SCHEMA.empty_table(), empty)
    return report


def _ingest_events_file(
    lake: Lake,
    relpath: str,
    now: datetime,
    max_invalid_share: float,
    earliest: datetime,
    report: IngestReport,
) -> None:
    stem = posixpath.splitext(posixpath.basename(relpath))[0]
    events = conform(lake.read_table(relpath), EVENTS_SCHEMA, source=lake.uri(relpath))
    verdict = validate_events(pl.from_arrow(events), now, earliest)
    report.duplicates_collapsed += verdict.duplicates_collapsed
    for name, outcome in verdict.expectations.items():
        merged = report.expectations.setdefault(name, {"success": True, "rejected_rows": 0})
        merged["success"] = bool(merged["success"] and outcome["success"])
        merged["rejected_rows"] = int(merged["rejected_rows"]) + int(outcome["rejected_rows"])
    quarantined = verdict.quarantined
    if quarantined.height:
        lake.write_parquet(quarantined.to_arrow(), paths.quarantine_file(paths.EVENTS, stem))
    report.events_quarantined += verdict.rejected.height
    report.events_checked += verdict.valid.height + verdict.rejected.height
    for reason in reason_counts(verdict.set_aside):
        report.set_aside_by_reason[reason.reason] = (
            report.set_aside_by_reason.get(reason.reason, 0) + reason.rows
        )
        report.events_set_aside += reason.rows
    hold = held_batch(relpath, verdict, max_invalid_share)
    if hold is not None:
        report.held.append(hold)
        return
    dated = verdict.valid.with_columns(
        pl.col("occurred_at").dt.date().cast(pl.String).alias("_date")
    )
    for (day,), rows in dated.partition_by("_date", as_dict=True, maintain_order=True).items():
        table = rows.drop("_date").to_arrow().cast(EVENTS_SCHEMA)
        lake.write_parquet(table, paths.partition_file(paths.EVENTS, day, stem))
        report.rows_by_date[str(day)] = report.rows_by_date.get(str(day), 0) + rows.height
    lake.remove([relpath])
    report.files += 1
    report.events_landed += verdict.valid.height


def _upsert_catalog(
    lake: Lake,
    files: list[str],
    target: str,
    schema: pa.Schema,
    key: str,
    report: IngestReport,
    delivered_at: Mapping[str, datetime],
) -> int:
    arrivals = []
    for relpath in files:
        rows = pl.from_arrow(conform(lake.read_table(relpath), schema, source=lake.uri(relpath)))
        if relpath in delivered_at:  # the catalog's stock is as of the delivery, unless it says
            rows = rows.with_columns(
                pl.col(STOCK_UPDATED_AT).fill_null(
                    pl.lit(delivered_at[relpath], dtype=pl.Datetime("us", "UTC"))
                )
            )
        missing_key = rows.filter(pl.col(key).is_null())
        if missing_key.height:
            stem = posixpath.splitext(posixpath.basename(relpath))[0]
            quarantined = missing_key.with_columns(pl.lit(f"{key} is null").alias("reason"))
            lake.write_parquet(quarantined.to_arrow(), paths.quarantine_file(target, stem))
            report.catalog_rows_quarantined += missing_key.height
        arrivals.append(rows.filter(pl.col(key).is_not_null()))
    current_path = paths.catalog_file(target)
    current = [_read_catalog(lake, current_path, schema)[0]] if lake.exists(current_path) else []
    # Later deliveries win: the newest row of each key is the catalog's truth, attribute by
    # attribute. What a delivery leaves empty (null, or an importer's placeholder category) it
    # says nothing about, so the catalog keeps the earlier value: an events-only import or a
    # `--not-recommendable` list never erases a title, a category or a flag.
    stacked = pl.concat([*current, *arrivals])
    said = [f.name for f in schema if f.nullable]
    if "category_id" in stacked.columns:
        stacked = stacked.with_columns(
            pl.col("category_id").replace(UNKNOWN_CATEGORY, None).alias("category_id")
        )
        said.append("category_id")
    stacked = stacked.with_columns(pl.col(name).forward_fill().over(key) for name in said)
    if "category_id" in stacked.columns:
        stacked = stacked.with_columns(pl.col("category_id").fill_null(UNKNOWN_CATEGORY))
    merged = stacked.unique(subset=key, keep="last", maintain_order=True)
    lake.write_parquet(merged.sort(key).to_arrow().cast(schema), current_path)
    lake.remove(files)
    report.files += len(files)
    return sum(frame.height for frame in arrivals)


def _read_catalog(lake: Lake, relpath: str, schema: pa.Schema) -> tuple[pl.DataFrame, bool]:
    """The published catalog in its contract, and whether the file already was in it.

    A catalog written before a column was added gets the column (null).
    """
    stored = lake.read_table(relpath)
    conformed = pl.from_arrow(conform(stored, schema, source=lake.uri(relpath)))
    return conformed, stored.schema == schema


def _apply_stock_updates(lake: Lake) -> int:
    """Sets the catalog's stock to each item's latest update sent to /events, where it is newer.

    An update applies when its `updated_at` is after the row's `stock_updated_at` (or that is
    unknown); the row then takes both. So a catalog delivered after an update wins over it, and
    an update is applied once. Returns how many items changed their `is_in_stock`.
    """
    current_path = paths.catalog_file(paths.ITEMS)
    if not lake.exists(current_path):
        return 0
    updates = latest_stock_updates(lake)
    catalog, in_contract = _read_catalog(lake, current_path, ITEMS_SCHEMA)
    changes = pl.DataFrame(
        {
            ITEMS_KEY: list(updates),
            "_in_stock": [change.in_stock for change in updates.values()],
            "_updated_at": [change.updated_at_us for change in updates.values()],
        },
        schema={ITEMS_KEY: pl.String, "_in_stock": pl.Boolean, "_updated_at": pl.Int64},
    ).with_columns(pl.from_epoch("_updated_at", time_unit="us").dt.replace_time_zone("UTC"))
    joined = catalog.join(changes, on=ITEMS_KEY, how="left", maintain_order="left")
    newer = pl.col("_updated_at").is_not_null() & (
        pl.col(STOCK_UPDATED_AT).is_null() | (pl.col("_updated_at") > pl.col(STOCK_UPDATED_AT))
    )
    applied = joined.filter(newer)
    if applied.height or not in_contract:
        updated = joined.with_columns(
            pl.when(newer).then("_in_stock").otherwise("is_in_stock").alias("is_in_stock"),
            pl.when(newer).then("_updated_at").otherwise(STOCK_UPDATED_AT).alias(STOCK_UPDATED_AT),
        )
        lake.write_parquet(
            updated.drop("_in_stock", "_updated_at").to_arrow().cast(ITEMS_SCHEMA), current_path
        )
    return applied.filter(pl.col("_in_stock") != pl.col("is_in_stock")).height


def lake_has_events(lake: Lake) -> bool:
    """Whether the lake holds events, ingested or still waiting in landing."""
    return bool(lake.list_files(paths.EVENTS) or lake.list_files(paths.LANDING_EVENTS))


def ingested_dates(lake: Lake) -> list[date]:
    """The dates with ingested events, from the partition folder names (no file is read)."""
    found = {
        match.group(1)
        for relpath in lake.list_files(paths.EVENTS)
        if (match := re.search(r"/date=(\d{4}-\d{2}-\d{2})/", relpath))
    }
    return sorted(date.fromisoformat(text) for text in found)


def feedback_files(
    lake: Lake, since: datetime, known: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The feedback event files (compacted from the service's log) published after `since`.

    Cheap enough for a sensor: one listing (with modification times) and, for files not seen
    before, their Parquet footers; no data is read.

    Args:
        lake: The lake.
        since: Count files published after this time (when the production model was trained).
        known: Row counts already read (a sensor's cursor): those footers are not read again.

    Returns:
        Lake-relative path → rows, for the feedback files published after `since`.
    """
    known = known or {}
    return {
        relpath: known[relpath] if relpath in known else lake.parquet_rows(relpath)
        for relpath in feedback_event_files(lake, since)
    }
