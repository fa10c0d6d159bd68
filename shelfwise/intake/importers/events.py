"""The event pipeline every format shares: map, identify, dry-validate and land the events."""

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from shelfwise import lake as paths
from shelfwise.contracts import EVENTS_SCHEMA
from shelfwise.intake.importers.columns import _ORDINAL
from shelfwise.intake.importers.items_and_users import _Unit
from shelfwise.intake.importers.landing import _EventSink, _landing_table
from shelfwise.intake.importers.reading import _Source
from shelfwise.intake.importers.report import ImportReport, SourceCheck
from shelfwise.intake.ingest import DEFAULT_MAX_INVALID_SHARE, held_batch, reason_counts
from shelfwise.intake.validation import validate_events

_UNKNOWN_TYPES_KEPT = 20  # distinct unknown event types counted by name in a report
_OTHER_TYPES = "(other values)"


@dataclass(frozen=True)
class _Plan:
    """How one format turns a raw batch into canonical events.

    `normalize` returns the event columns it knows (`event_type` still raw; `event_id` only
    when the source has one) plus `_ordinal`, and item/user attributes as `item:<name>` and
    `user:<name>`. `unreadable` maps canonical columns to the source columns they are read from,
    to count values that could not be read.
    """

    fmt: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    id_columns: tuple[str, ...]
    normalize: Callable[[pl.DataFrame], pl.DataFrame]
    event_types: Mapping[str, str]
    derive_sessions: bool
    unreadable: Mapping[str, str]


def _import_events(unit: _Unit, source: _Source, plan: _Plan, batch_rows: int) -> None:
    report = unit.report
    report.sessions_derived = report.sessions_derived or plan.derive_sessions
    sink = _EventSink(unit.lake, unit.prefix, batch_rows, plan.derive_sessions)
    check = SourceCheck(source=source.path)
    now = datetime.now(UTC)
    try:
        batches = source.batches((*plan.required, *plan.optional), batch_rows, report)
        for index, raw in enumerate(batches):
            frame = plan.normalize(raw)
            _count_unreadable(raw, frame, plan.unreadable, report)
            frame = _finish_events(raw, frame, plan, report)
            # The sink cuts the same batches, so this is the landing file ingestion will judge.
            landing = paths.dataset_file(paths.LANDING_EVENTS, f"{unit.prefix}-b{index:05d}")
            valid = _dry_validation(frame, landing, plan.derive_sessions, now, check)
            unit.observe(frame.filter(valid))  # a rejected row never sets an attribute
            sink.add(frame)
        written = sink.close()
    finally:
        sink.cleanup()
    report.events_written += sum(rows for _, rows in written)
    report.files_written += [relpath for relpath, _ in written]
    report.checks.append(check)


def _dry_validation(
    frame: pl.DataFrame, landing: str, sessions_pending: bool, now: datetime, check: SourceCheck
) -> pl.Series:
    """Validates a batch as ingestion will, counts the verdict, returns which rows will land.

    Derived sessions are computed only when the whole file is read; every row with a user and
    a time gets one, so such rows count here as having a session.
    """
    events = frame
    if sessions_pending:
        placeholder = pl.when(pl.col("user_id").is_not_null() & pl.col("occurred_at").is_not_null())
        events = frame.with_columns(placeholder.then(pl.lit("pending")).alias("session_id"))
    table = _landing_table(events, EVENTS_SCHEMA, landing)
    verdict = validate_events(pl.from_arrow(table), now)
    will_land = frame.get_column("event_id").is_in(verdict.valid.get_column("event_id").implode())
    check.rows += frame.height
    check.rows_to_land += int(will_land.sum())
    for target, rows in ((check.set_aside, verdict.set_aside), (check.rejected, verdict.rejected)):
        for reason in reason_counts(rows):
            target[reason.reason] = target.get(reason.reason, 0) + reason.rows
    hold = held_batch(landing, verdict, DEFAULT_MAX_INVALID_SHARE)
    if hold is not None:
        check.holds.append(hold)
    return will_land


def _count_unreadable(
    raw: pl.DataFrame, frame: pl.DataFrame, columns: Mapping[str, str], report: ImportReport
) -> None:
    for canonical, column in columns.items():
        if column not in raw.columns or canonical not in frame.columns:
            continue
        present = raw.get_column(column).is_not_null()
        if raw.get_column(column).dtype == pl.String:
            present = present & (raw.get_column(column).str.strip_chars() != "")
        count = int((present & frame.get_column(canonical).is_null()).sum())
        if count:
            report.unreadable_values[canonical] = report.unreadable_values.get(canonical, 0) + count


def _finish_events(
    raw: pl.DataFrame, frame: pl.DataFrame, plan: _Plan, report: ImportReport
) -> pl.DataFrame:
    """Maps event types, derives event ids and adds the columns a format does not produce."""
    lowered = frame.get_column("event_type").str.to_lowercase()
    mapped = lowered.replace_strict(dict(plan.event_types), default=None, return_dtype=pl.String)
    unknown = frame.get_column("event_type").filter(mapped.is_null()).drop_nulls()
    known = report.unknown_event_types
    for value, count in unknown.value_counts(sort=True).iter_rows():
        key = value if value in known or len(known) < _UNKNOWN_TYPES_KEPT else _OTHER_TYPES
        known[key] = known.get(key, 0) + count
    frame = frame.with_columns(mapped.fill_null(frame.get_column("event_type")).alias("event_type"))
    hashed = _event_ids(plan.fmt, raw, [c for c in plan.id_columns if c in raw.columns])
    if "event_id" in frame.columns:
        frame = frame.with_columns(pl.col("event_id").fill_null(hashed))
    else:
        frame = frame.with_columns(hashed.alias("event_id"))
    for name, dtype in (("session_id", pl.String), ("price", pl.Float64), ("rec_id", pl.String)):
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
    return frame


def _event_ids(fmt: str, raw: pl.DataFrame, columns: Sequence[str]) -> pl.Series:
    """`<fmt>-<hash>` of the format, the row position and the row's identifying fields."""
    keys = raw.select(
        pl.concat_str(
            [
                pl.lit(fmt),
                pl.col(_ORDINAL).cast(pl.String),
                *[pl.col(c).cast(pl.String).fill_null("\x00") for c in columns],
            ],
            separator="\x1f",
        )
    ).to_series()
    return pl.Series(
        "event_id",
        [f"{fmt}-{hashlib.blake2b(key.encode(), digest_size=10).hexdigest()}" for key in keys],
        dtype=pl.String,
    )
