"""Importers: turn a shop's own files into contract-valid Parquet files in the lake's landing area.

`import_file` (or `import_files`) reads a source file in one of four formats and writes what it
holds to `landing/`, where ingestion (`shelfwise.intake.ingest.ingest_landing`) validates and
publishes it:

- `generic`: a CSV (delimiter sniffed from the header: `,`, tab, `;` or `|`) or Parquet file with a
  column mapping `canonical=source`; unmapped canonical columns fall back to a source column of
  the same name. Timestamps are epoch seconds, epoch milliseconds or ISO text (`timestamp_unit`),
  or text in a strftime pattern (`timestamp_format`); naive times are read in `timezone`
  (default UTC; an explicit offset, `Z` or ` UTC` wins). The event type comes from a column or
  is given for every row (`event_type`, e.g. "purchase" for order lines).
- `retailrocket`: the Kaggle RetailRocket `events.csv`, optionally with its
  `item_properties_part*.csv` and `category_tree.csv` (recognised by their header).
- `rees46`: the REES46 multi-category store CSVs (`2019-Oct.csv`, …).
- `yoochoose`: the tab-separated `SessionId ItemId Time` files of the RecSys 2015 sample.

Beside the events of any format, `import_catalog` (`shelfwise import --catalog FILE`) reads a
products file (CSV or Parquet, one row per item) as the catalog, with its own mapping
`canonical=source` (`item_id`, `title`, `category_id`, `category_path`, `brand`, `price`,
`is_in_stock`, `is_recommendable`); `category_path` may name several columns
(`department,product_category,product_type`), joined from the broadest as "a > b > c" with empty
levels left out.

Decisions:

- **Event ids.** A source id is used when the generic mapping names one. Otherwise an event id is
  `<format>-<blake2b-80 hex>` of the format, the row's position (0-based, among the rows the CSV
  parser could read) and the row's identifying source fields (as text). Re-importing a file gives
  the same ids, exact duplicate rows at different positions stay distinct events (nothing is
  silently collapsed), and the same row at the same position of a renamed copy gets the same id.
  A row removed or added in the middle of a file shifts the ids of the rows after it.
- **Landing names.** `landing/events/import-<format>-<file stem>-<path tag>-b<batch>.parquet`, the
  path tag being 8 hex digits of a hash of the file's absolute path: the same file always maps to
  the same names, so a re-import overwrites (and stale higher batches of an earlier run are
  removed), and two different files called `events.csv` never overwrite each other (ingestion
  names published partitions after the landing file, so a collision would lose events).
- **Streaming.** CSV files are read with `pyarrow.csv.open_csv` (gzip/bz2 detected from the
  extension) and Parquet with `iter_batches`, re-cut to exactly `batch_rows` rows, one landing
  file per batch, so the batches depend on `batch_rows` only. Every source value is read as text
  and converted by the importer, so one odd value never changes a column's type.
- **Sessions.** Sources without sessions (RetailRocket; generic without a `session_id` mapping)
  get one per user by a 30-minute inactivity gap: a new session starts when more than 30 minutes
  passed since the user's previous event (events ordered by time, then position). Its id is
  `<user_id>@<session start, UTC, YYYYmmddTHHMMSS>`, stable when later data is appended. The gap
  needs each user's events in time order across the whole file, which a stream cannot promise,
  so the batches are staged as Parquet in a temporary folder and DuckDB (a project dependency)
  computes the sessions with a window function, spilling to disk when the data exceeds memory.
- **Identifiers** are trimmed text; a whole number written as a float (`17850.0`, what a
  spreadsheet or pandas writes for an integer column with gaps, as text or as a Parquet float)
  becomes `17850`, in every format, so the shop's own ids reach the service unchanged.
- **Bad input.** A file that cannot be read as CSV/Parquet, or that lacks a required source
  column, raises `ContractError` naming the file and the column; so does a generic file with no
  event type (neither a mapped column nor `event_type` for every row: there is no silent
  default). Rows with the wrong number of fields cannot be mapped to any column: they are
  skipped and reported (count and first texts). Every other row lands: values that cannot be
  read become nulls (counted per column in the report), unknown event types keep their raw
  value, and ingestion quarantines those rows with a reason (and holds a whole batch whose
  invalid share exceeds its threshold). A generic timestamp column none of whose first batch's
  values can be read raises `ContractError` (most likely a wrong `timestamp_unit` or
  `timestamp_format`).
- **A dry run of ingestion.** Each landing batch is validated at import time with ingestion's own
  rules (`shelfwise.intake.validation.validate_events`), so the report says per file what will land,
  what will be set aside (guests, returns) and what is invalid, by reason, and which batches the
  default threshold will hold (`SourceCheck`).
- **Catalog.** Items and users are kept per key (bounded by the number of items/users, not of
  rows) and written once per imported file: `landing/items/<prefix>-items.parquet` and
  `landing/users/<prefix>-users.parquet`. Only rows that will land describe them: a rejected or
  set-aside row (a guest's stock adjustment titled "damaged") never sets an attribute. Attributes
  the source has (REES46 category, brand, price; RetailRocket `categoryid`/`available`
  properties; generic mapped `title`, `category_id`, `category_path`, `brand`, `is_in_stock`,
  `is_recommendable`, `country`, `device`) take their latest value by time, but a title its most
  frequent value (ties: the latest) and a price its latest positive one; the time of the stock
  value becomes the item's `stock_updated_at` (empty when the source says nothing of stock:
  ingestion then dates it by the delivery). Items named in `not_recommendable` get
  `is_recommendable` false. A catalog file (`import_catalog`) is its own delivery,
  `landing/items/import-catalog-<stem>-<tag>-items.parquet`, dated at the import (an
  `is_in_stock` column dates `stock_updated_at` then); it is read before the events of the same
  command, so its items get no placeholders. Where the event rows carry an item attribute too (a
  mapped title or price), ingestion merges the two deliveries as it merges any (attribute by
  attribute, later delivery first, a null never erases): map each attribute from one file.
  Every item and user seen in the events gets a row so downstream
  joins work:
  without catalog attributes an item is a placeholder with `category_id` "unknown", in stock
  (nothing says otherwise, and serving only recommends in-stock items), and the latest event
  price if any; a user is a placeholder with only `user_id`. Placeholders are written only for
  keys the lake does not know yet (its catalog or other landing files), so they never overwrite
  a real catalog row. `created_at` and `signed_up_at` stay null: no source has them, and a
  first-seen time would be overwritten by each later import (null means "always existed" to the
  features).
- **Time zones.** Epoch values are UTC. The YooChoose sample's epochs were computed in the
  preprocessing machine's local time (see its PROVENANCE.md), so they may carry a constant
  offset; they are taken as they are.
"""

import csv
import hashlib
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shelfwise import lake as paths
from shelfwise.contracts import (
    EVENT_TYPES,
    EVENTS_SCHEMA,
    IS_RECOMMENDABLE,
    ITEMS_SCHEMA,
    STOCK_UPDATED_AT,
    UNKNOWN_CATEGORY,
    USERS_SCHEMA,
    ContractError,
    conform,
)
from shelfwise.intake.ingest import (
    DEFAULT_MAX_INVALID_SHARE,
    HeldBatch,
    held_batch,
    reason_counts,
)
from shelfwise.intake.validation import validate_events
from shelfwise.lake import Lake

FORMATS = ("generic", "retailrocket", "rees46", "yoochoose")
TIMESTAMP_UNITS = ("s", "ms", "iso")
DEFAULT_BATCH_ROWS = 1_000_000
SESSION_GAP = timedelta(minutes=30)

# Raw event type (lower case) -> contract event type, for the generic format; `event_types`
# entries override these.
GENERIC_EVENT_TYPES: dict[str, str] = {
    **{name: name for name in EVENT_TYPES},
    "click": "view",
    "detail": "view",
    "pageview": "view",
    "page_view": "view",
    "cart": "add_to_cart",
    "addtocart": "add_to_cart",
    "add-to-cart": "add_to_cart",
    "remove": "remove_from_cart",
    "removefromcart": "remove_from_cart",
    "buy": "purchase",
    "order": "purchase",
    "transaction": "purchase",
}
RETAILROCKET_EVENT_TYPES = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}
REES46_EVENT_TYPES = {
    "view": "view",
    "cart": "add_to_cart",
    "remove_from_cart": "remove_from_cart",
    "purchase": "purchase",
}

# Canonical names a generic mapping may target.
_EVENT_COLUMNS = tuple(f.name for f in EVENTS_SCHEMA)
_ITEM_ATTRIBUTES = (
    "title",
    "category_id",
    "category_path",
    "brand",
    "is_in_stock",
    IS_RECOMMENDABLE,
)
_BOOLEAN_ATTRIBUTES = ("is_in_stock", IS_RECOMMENDABLE)
_USER_ATTRIBUTES = ("country", "device")
GENERIC_TARGETS = (*_EVENT_COLUMNS, *_ITEM_ATTRIBUTES, *_USER_ATTRIBUTES)
_GENERIC_REQUIRED = ("occurred_at", "user_id", "item_id")

_MALFORMED_KEPT = 10  # malformed row texts kept in a report
_UNKNOWN_TYPES_KEPT = 20  # distinct unknown event types counted by name in a report
_OTHER_TYPES = "(other values)"
_HEADER_BYTES = 1 << 16
_CSV_BLOCK_BYTES = 1 << 20
_PARQUET_READ_ROWS = 65_536
_TIMESTAMP_CHECK_ROWS = 1_000

# Helper columns of the normalized frames.
_ORDINAL = "_ordinal"
_TS = "_ts"


@dataclass
class ImportReport:
    """What one import did.

    Attributes:
        format: The source format.
        sources: The files read.
        rows_read: Data rows read from the files (events, properties, tree), malformed included.
        rows_malformed: Rows skipped because they do not have the header's number of fields.
        malformed_rows: The first of them, as `file: text`.
        events_written: Event rows written to `landing/events`.
        items_written: Item rows written to `landing/items`.
        users_written: User rows written to `landing/users`.
        files_written: Lake-relative paths of every file written.
        unknown_event_types: Raw event types outside the mapping, with their counts (these rows
            land with the raw value and ingestion quarantines them); after 20 distinct values
            the rest are counted as "(other values)".
        unreadable_values: Per canonical column, how many non-empty source values could not be
            read (they land as nulls; ingestion quarantines rows missing a required value).
        sessions_derived: Whether session ids were derived by the inactivity gap.
        checks: Per source file, a dry run of ingestion's validation of its events.
    """

    format: str
    sources: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_malformed: int = 0
    malformed_rows: list[str] = field(default_factory=list)
    events_written: int = 0
    items_written: int = 0
    users_written: int = 0
    files_written: list[str] = field(default_factory=list)
    unknown_event_types: dict[str, int] = field(default_factory=dict)
    unreadable_values: dict[str, int] = field(default_factory=dict)
    sessions_derived: bool = False
    checks: list["SourceCheck"] = field(default_factory=list)

    def merge(self, other: "ImportReport") -> None:
        """Adds another report's counts and files to this one."""
        self.checks += other.checks
        self.sources += other.sources
        self.rows_read += other.rows_read
        self.rows_malformed += other.rows_malformed
        room = _MALFORMED_KEPT - len(self.malformed_rows)
        self.malformed_rows += other.malformed_rows[: max(room, 0)]
        self.events_written += other.events_written
        self.items_written += other.items_written
        self.users_written += other.users_written
        self.files_written += other.files_written
        for target, counts in (
            (self.unknown_event_types, other.unknown_event_types),
            (self.unreadable_values, other.unreadable_values),
        ):
            for key, count in counts.items():
                target[key] = target.get(key, 0) + count
        self.sessions_derived = self.sessions_derived or other.sessions_derived


@dataclass
class SourceCheck:
    """What ingestion will do with one source file's events: a dry run of its validation.

    The same rules as ingestion (`shelfwise.intake.validation.validate_events`), applied per landing
    batch at import time, so `shelfwise import` can say what will land before the pipeline runs.

    Attributes:
        source: The source file.
        rows: Event rows written to landing.
        rows_to_land: Rows that pass validation.
        set_aside: Guest checkouts and returns by reason (quarantined, never counted invalid).
        rejected: Invalid rows by reason (a row may have several reasons).
        holds: Batches whose invalid share is above the default threshold: ingestion will hold
            them (and their delivery's catalog rows) unless the threshold is raised.
    """

    source: str
    rows: int = 0
    rows_to_land: int = 0
    set_aside: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    holds: list[HeldBatch] = field(default_factory=list)

    @property
    def rows_rejected(self) -> int:
        """Rows ingestion will reject."""
        return self.rows - self.rows_to_land - sum(self.set_aside.values())


# ---------------------------------------------------------------------------------------------
# Public API


def import_file(
    lake: Lake,
    path: str,
    fmt: str,
    *,
    mapping: Mapping[str, str] | None = None,
    event_types: Mapping[str, str] | None = None,
    event_type: str | None = None,
    timestamp_unit: str | None = None,
    timestamp_format: str | None = None,
    timezone: str | None = None,
    not_recommendable: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ImportReport:
    """Imports one file into the lake's landing area.

    Args:
        lake: The lake to write to.
        path: The source file (CSV, optionally gzip/bz2 compressed, or Parquet for `generic`).
        fmt: One of `FORMATS`.
        mapping: `generic` only: canonical column -> source column.
        event_types: `generic` only: raw event type -> contract event type (overrides
            `GENERIC_EVENT_TYPES`).
        event_type: `generic` only: the event type of every row of a file without an event
            type column (e.g. "purchase" for order lines).
        timestamp_unit: `generic` only: "s", "ms" or "iso" (default "iso").
        timestamp_format: `generic` only: a strftime pattern of the timestamps, e.g.
            "%m/%d/%Y %H:%M" (naive times are read in `timezone`).
        timezone: `generic` only: the time zone of naive times (default "UTC").
        not_recommendable: Item ids that may be bought and counted as history but are never
            recommended (fees, postage): their catalog rows get `is_recommendable` false.
        batch_rows: Rows per landing file.

    Returns:
        What was read and written.

    Raises:
        ContractError: The file cannot be parsed or lacks a required column (the message names
            the file and the column).
        ValueError: An unknown format or an option that does not apply to it.
        FileNotFoundError: The file does not exist.
    """
    return import_files(
        lake,
        [path],
        fmt,
        mapping=mapping,
        event_types=event_types,
        event_type=event_type,
        timestamp_unit=timestamp_unit,
        timestamp_format=timestamp_format,
        timezone=timezone,
        not_recommendable=not_recommendable,
        batch_rows=batch_rows,
    )


def import_files(
    lake: Lake,
    paths_: Sequence[str],
    fmt: str,
    *,
    mapping: Mapping[str, str] | None = None,
    event_types: Mapping[str, str] | None = None,
    event_type: str | None = None,
    timestamp_unit: str | None = None,
    timestamp_format: str | None = None,
    timezone: str | None = None,
    not_recommendable: Sequence[str] = (),
    catalog: str | None = None,
    catalog_mapping: Mapping[str, str | Sequence[str]] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ImportReport:
    """Imports several files of one format (RetailRocket: events plus its catalog files).

    For `retailrocket` the files are told apart by their header: at most one events file, any
    number of item properties files and at most one category tree. Other formats import each
    file in turn, as `import_file` would. A `catalog` file (any format) is imported first, by
    `import_catalog`; `paths_` may then be empty.

    Args:
        lake: The lake to write to.
        paths_: The source files.
        fmt: One of `FORMATS`.
        mapping: See `import_file`.
        event_types: See `import_file`.
        event_type: See `import_file`.
        timestamp_unit: See `import_file`.
        timestamp_format: See `import_file`.
        timezone: See `import_file`.
        not_recommendable: See `import_file`.
        catalog: A products file to import as the catalog (see `import_catalog`).
        catalog_mapping: The catalog file's mapping (see `import_catalog`).
        batch_rows: Rows per landing file.

    Returns:
        The combined report.

    Raises:
        ContractError: A file cannot be parsed or lacks a required column.
        ValueError: An unknown format, an option that does not apply to it, or several
            RetailRocket events files.
        FileNotFoundError: A file does not exist.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; expected one of {', '.join(FORMATS)}")
    generic_options = {
        "mapping": mapping,
        "event_types": event_types,
        "event_type": event_type,
        "timestamp_unit": timestamp_unit,
        "timestamp_format": timestamp_format,
        "timezone": timezone,
    }
    if fmt != "generic":
        given = [name for name, value in generic_options.items() if value]
        if given:
            raise ValueError(f"{', '.join(given)} apply to the generic format only, not to {fmt}")
    hidden = normalize_ids(not_recommendable)
    if catalog_mapping and not catalog:
        raise ValueError("a catalog mapping needs a catalog file (--catalog FILE)")
    if not paths_ and not catalog:
        raise ValueError("nothing to import: give event files, a catalog file or both")
    report = ImportReport(format=fmt)
    if catalog:  # first: the events' import then knows its items and writes no placeholders
        report.merge(
            import_catalog(
                lake,
                catalog,
                mapping=catalog_mapping,
                # With events, their import says it (one delivery, not the same row twice).
                not_recommendable=() if paths_ else hidden,
                batch_rows=batch_rows,
            )
        )
    if not paths_:
        return report
    if fmt == "retailrocket":
        report.merge(_import_retailrocket_files(lake, list(paths_), batch_rows, hidden))
        return report
    for path in paths_:
        if fmt == "generic":
            part = import_generic(
                lake,
                path,
                mapping=mapping,
                event_types=event_types,
                event_type=event_type,
                timestamp_unit=timestamp_unit or "iso",
                timestamp_format=timestamp_format,
                timezone=timezone or "UTC",
                not_recommendable=hidden,
                batch_rows=batch_rows,
            )
        elif fmt == "rees46":
            part = import_rees46(lake, path, not_recommendable=hidden, batch_rows=batch_rows)
        else:
            part = import_yoochoose(lake, path, not_recommendable=hidden, batch_rows=batch_rows)
        report.merge(part)
    return report


def import_generic(
    lake: Lake,
    path: str,
    *,
    mapping: Mapping[str, str] | None = None,
    event_types: Mapping[str, str] | None = None,
    event_type: str | None = None,
    timestamp_unit: str = "iso",
    timestamp_format: str | None = None,
    timezone: str = "UTC",
    delimiter: str | None = None,
    not_recommendable: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ImportReport:
    """Imports a CSV or Parquet file whose columns are described by a mapping.

    Required canonical columns: `occurred_at`, `user_id`, `item_id`, and an event type: a
    mapped (or same-named) `event_type` column or one `event_type` for every row; there is no
    silent default. Defaults for the others: `event_id` derived (see the module docstring),
    `session_id` derived by a 30-minute gap, `quantity` 1, `price` and `rec_id` null, `source`
    "import:generic". Mapped `title`, `category_id`, `category_path`, `brand`, `is_in_stock`,
    `is_recommendable` describe items and `country`, `device` users.

    Args:
        lake: The lake to write to.
        path: A `.parquet`/`.pq` file, or a CSV file (optionally `.gz`/`.bz2`).
        mapping: Canonical column -> source column, e.g. `{"user_id": "visitor"}`.
        event_types: Raw event type -> contract event type, e.g. `{"click": "view"}`; matched
            case-insensitively, on top of `GENERIC_EVENT_TYPES`.
        event_type: The contract event type of every row, for files without an event column.
        timestamp_unit: "s" or "ms" (epoch, fractions allowed) or "iso" (ISO 8601 text).
        timestamp_format: A strftime pattern (e.g. "%m/%d/%Y %H:%M") instead of ISO text;
            times without `%z` are read in `timezone`.
        timezone: IANA time zone of naive times (ISO text, patterns, naive Parquet timestamps).
        delimiter: The CSV delimiter; sniffed from the header when omitted.
        not_recommendable: Item ids never to recommend (`is_recommendable` false).
        batch_rows: Rows per landing file.

    Returns:
        What was read and written.

    Raises:
        ContractError: The file cannot be parsed, lacks a mapped or required column, has no
            event type, or none of the first timestamps can be read.
        ValueError: An unknown canonical column, event type, unit or time zone, or options
            that contradict each other.
        FileNotFoundError: The file does not exist.
    """
    _check_batch_rows(batch_rows)
    if timestamp_unit not in TIMESTAMP_UNITS:
        raise ValueError(f"timestamp_unit must be one of {TIMESTAMP_UNITS}, not {timestamp_unit!r}")
    if timestamp_format and timestamp_unit != "iso":
        raise ValueError(
            "timestamp_format reads text; it does not go with timestamp_unit "
            f"{timestamp_unit!r} (epoch numbers)"
        )
    if event_type is not None and event_type not in EVENT_TYPES:
        raise ValueError(f"event_type {event_type!r} is not one of {EVENT_TYPES}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"unknown time zone {timezone!r}") from error
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(GENERIC_TARGETS))
    if unknown:
        raise ValueError(
            f"unknown canonical column(s) {', '.join(unknown)} in the mapping; "
            f"expected some of {', '.join(GENERIC_TARGETS)}"
        )
    types = dict(GENERIC_EVENT_TYPES)
    for raw, canonical in (event_types or {}).items():
        if canonical not in EVENT_TYPES:
            raise ValueError(
                f"event type mapping {raw}={canonical}: {canonical!r} is not one of {EVENT_TYPES}"
            )
        types[raw.strip().lower()] = canonical

    source = _open_source(path, delimiter)
    resolved: dict[str, str] = {}
    for canonical in GENERIC_TARGETS:
        column = mapping.get(canonical) or (canonical if canonical in source.columns else None)
        if column is None:
            continue
        if column not in source.columns:
            raise ContractError(
                f"{path}: required column '{column}' (mapped to {canonical}) is missing; "
                f"the file has {', '.join(source.columns)}"
            )
        resolved[canonical] = column
    for canonical in _GENERIC_REQUIRED:
        if canonical not in resolved:
            raise ContractError(
                f"{path}: required column '{canonical}' is missing and not mapped "
                f"(--map {canonical}=<column>); the file has {', '.join(source.columns)}"
            )
    if event_type is not None and "event_type" in resolved:
        raise ValueError(
            f"{path}: give the event type either as a column (--map event_type=<column>, here "
            f"'{resolved['event_type']}') or for every row (--event-type {event_type}), not both"
        )
    if event_type is None and "event_type" not in resolved:
        raise ContractError(
            f"{path}: no event type: the file has no 'event_type' column and none is mapped. "
            "Map the column that holds it (--map event_type=<column>), or give every row one "
            "(--event-type purchase for order lines, --event-type view for page views); the "
            f"file has {', '.join(source.columns)}"
        )

    checked = {"timestamps": False}

    def normalize(raw: pl.DataFrame) -> pl.DataFrame:
        stamps = raw.get_column(resolved["occurred_at"])
        occurred = _timestamps(stamps, timestamp_unit, timezone, timestamp_format)
        if not checked["timestamps"]:
            checked["timestamps"] = True
            _check_timestamps(
                path, resolved["occurred_at"], stamps, occurred, timestamp_unit, timestamp_format
            )
        columns: dict[str, pl.Series] = {"occurred_at": occurred}
        for name in ("user_id", "item_id", "session_id", "rec_id", "event_id", "category_id"):
            if name in resolved:
                columns[name] = _ids(raw.get_column(resolved[name]))
        if "event_type" in resolved:
            columns["event_type"] = _texts(raw.get_column(resolved["event_type"]))
        else:
            columns["event_type"] = pl.repeat(event_type, raw.height, eager=True, dtype=pl.String)
        quantity = raw.get_column(resolved["quantity"]) if "quantity" in resolved else None
        columns["quantity"] = _quantities(quantity, raw.height)
        if "price" in resolved:
            columns["price"] = _floats(raw.get_column(resolved["price"]))
        if "source" in resolved:
            columns["source"] = _texts(raw.get_column(resolved["source"])).fill_null(
                "import:generic"
            )
        else:
            columns["source"] = pl.repeat("import:generic", raw.height, eager=True)
        for name in ("title", "category_path", "brand", "country", "device"):
            if name in resolved:
                columns[name] = _texts(raw.get_column(resolved[name]))
        for name in _BOOLEAN_ATTRIBUTES:
            if name in resolved:
                columns[name] = _booleans(raw.get_column(resolved[name])).alias(name)
        frame = pl.DataFrame(columns).with_columns(raw.get_column(_ORDINAL))
        if "price" in frame.columns:  # the event keeps its price; the catalog gets a copy
            frame = frame.with_columns(pl.col("price").alias("item:price"))
        renames = {name: f"item:{name}" for name in _ITEM_ATTRIBUTES if name in frame.columns}
        renames |= {name: f"user:{name}" for name in _USER_ATTRIBUTES if name in frame.columns}
        return frame.rename(renames)

    plan = _Plan(
        fmt="generic",
        required=tuple(resolved[name] for name in _GENERIC_REQUIRED),
        optional=tuple(v for k, v in resolved.items() if k not in _GENERIC_REQUIRED),
        id_columns=tuple(
            resolved[name]
            for name in (
                "occurred_at",
                "user_id",
                "session_id",
                "item_id",
                "event_type",
                "quantity",
                "price",
                "rec_id",
            )
            if name in resolved
        ),
        normalize=normalize,
        event_types=types,
        derive_sessions="session_id" not in resolved,
        unreadable={k: v for k, v in resolved.items() if k in _EVENT_COLUMNS and k != "event_type"},
    )
    report = ImportReport(format="generic", sources=[path])
    unit = _Unit(lake, "generic", path, report, not_recommendable)
    _import_events(unit, source, plan, batch_rows)
    unit.write_catalog()
    return report


CATALOG_TARGETS = ("item_id", *_ITEM_ATTRIBUTES, "price")


def import_catalog(
    lake: Lake,
    path: str,
    *,
    mapping: Mapping[str, str | Sequence[str]] | None = None,
    delimiter: str | None = None,
    not_recommendable: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ImportReport:
    """Imports a products file (one row per item) as the catalog.

    Writes `landing/items/import-catalog-<file stem>-<path tag>-items.parquet`, which ingestion
    merges into `catalog/items` like any importer's items. Unmapped canonical columns fall back
    to a source column of the same name; `item_id` is required. Ids are normalised as in the
    events (`17850.0` -> `17850`), so the catalog joins the events of any format. Attributes are
    dated at the import time (the shop's current word); a row without an item id is skipped and
    counted in `unreadable_values["item_id"]`; when an item has several rows, the last one's
    non-empty values win (a title: its most frequent).

    Args:
        lake: The lake to write to.
        path: A `.parquet`/`.pq` file, or a CSV file (optionally `.gz`/`.bz2`).
        mapping: Canonical column -> source column, e.g. `{"item_id": "product_id"}`;
            `category_path` may map to several columns (a list, or one text with commas),
            joined from the broadest as "department > category > type".
        delimiter: The CSV delimiter; sniffed from the header when omitted.
        not_recommendable: Item ids never to recommend (`is_recommendable` false).
        batch_rows: Rows read at a time.

    Returns:
        What was read and written (`items_written`; no events, no users).

    Raises:
        ContractError: The file cannot be parsed or lacks a mapped or required column.
        ValueError: An unknown canonical column in the mapping.
        FileNotFoundError: The file does not exist.
    """
    _check_batch_rows(batch_rows)
    columns: dict[str, list[str]] = {}
    for canonical, source_columns in (mapping or {}).items():
        names = source_columns.split(",") if isinstance(source_columns, str) else source_columns
        columns[canonical] = [name.strip() for name in names if name.strip()]
    unknown = sorted(set(columns) - set(CATALOG_TARGETS))
    if unknown:
        raise ValueError(
            f"unknown catalog column(s) {', '.join(unknown)} in the catalog mapping; "
            f"expected some of {', '.join(CATALOG_TARGETS)}"
        )
    several = sorted(k for k, v in columns.items() if len(v) > 1 and k != "category_path")
    if several:
        raise ValueError(f"only category_path may join several columns, not {', '.join(several)}")
    source = _open_source(path, delimiter)
    resolved: dict[str, list[str]] = {}
    for canonical in CATALOG_TARGETS:
        names = columns.get(canonical) or ([canonical] if canonical in source.columns else [])
        for name in names:
            if name not in source.columns:
                raise ContractError(
                    f"{path}: catalog column '{name}' (mapped to {canonical}) is missing; "
                    f"the file has {', '.join(source.columns)}"
                )
        if names:
            resolved[canonical] = names
    if "item_id" not in resolved:
        raise ContractError(
            f"{path}: required catalog column 'item_id' is missing and not mapped "
            f"(--catalog-map item_id=<column>); the file has {', '.join(source.columns)}"
        )
    report = ImportReport(format="catalog", sources=[path])
    unit = _Unit(lake, "catalog", path, report, not_recommendable)
    at = int(datetime.now(UTC).timestamp() * 1_000_000)
    wanted = [name for names in resolved.values() for name in names]
    for raw in source.batches(wanted, batch_rows, report):
        values: dict[str, pl.Series] = {"key": _ids(raw.get_column(resolved["item_id"][0]))}
        for canonical, names in resolved.items():
            if canonical == "item_id":
                continue
            if canonical == "category_path":
                levels = pl.DataFrame(
                    [_texts(raw.get_column(name)).alias(f"l{n}") for n, name in enumerate(names)]
                )
                values[canonical] = levels.select(
                    pl.concat_list(pl.all()).list.drop_nulls().list.join(" > ")
                ).to_series()
                values[canonical] = _texts(values[canonical])
            elif canonical == "category_id":
                values[canonical] = _ids(raw.get_column(names[0]))
            elif canonical == "price":  # a price is an attribute only when positive
                price = _floats(raw.get_column(names[0]))
                values[canonical] = (
                    price.to_frame("p")
                    .select(pl.when(pl.col("p") > 0).then(pl.col("p")).cast(pl.String))
                    .to_series()
                )
            elif canonical in _BOOLEAN_ATTRIBUTES:
                flags = _booleans(raw.get_column(names[0]))
                values[canonical] = flags.cast(pl.String).str.to_lowercase()
            else:
                values[canonical] = _texts(raw.get_column(names[0]))
        frame = pl.DataFrame(values)
        missing = int(frame.get_column("key").is_null().sum())
        if missing:
            report.unreadable_values["item_id"] = (
                report.unreadable_values.get("item_id", 0) + missing
            )
        frame = frame.filter(pl.col("key").is_not_null())
        unit.items.see(frame.get_column("key"))
        attributes = [name for name in frame.columns if name != "key"]
        if attributes:
            unit.items.update(
                frame.with_columns(pl.lit(at, dtype=pl.Int64).alias("at"))
                .unpivot(index=["key", "at"], variable_name="attribute", value_name="value")
                .drop_nulls(["key", "value"])
            )
    unit.write_catalog()
    return report


def import_retailrocket(
    lake: Lake,
    events_path: str | None,
    *,
    item_properties: Sequence[str] = (),
    category_tree: str | None = None,
    not_recommendable: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ImportReport:
    """Imports the RetailRocket dataset: events and, optionally, its catalog files.

    `events.csv` (timestamp in ms, visitorid, event ∈ view/addtocart/transaction, itemid,
    transactionid) becomes events; the visitor is the user and sessions are derived by a
    30-minute inactivity gap. `item_properties_part*.csv` (timestamp, itemid, property, value)
    give each item's latest `categoryid` (-> category_id) and `available` (-> is_in_stock);
    `category_tree.csv` (categoryid, parentid) gives `category_path` as "root > … > leaf" ids.
    Transaction ids have no place in the contract and are only part of the event id.

    Args:
        lake: The lake to write to.
        events_path: The events file, or None to import catalog files only.
        item_properties: Item properties files.
        category_tree: The category tree file.
        not_recommendable: Item ids never to recommend (`is_recommendable` false).
        batch_rows: Rows per landing file.

    Returns:
        What was read and written.

    Raises:
        ContractError: A file cannot be parsed or lacks a required column.
        FileNotFoundError: A file does not exist.
    """
    _check_batch_rows(batch_rows)
    sources = [p for p in (events_path, *item_properties, category_tree) if p]
    if not sources:
        raise ValueError("no RetailRocket file given")
    report = ImportReport(format="retailrocket", sources=sources)
    unit = _Unit(lake, "retailrocket", events_path or sources[0], report, not_recommendable)
    tree = _read_category_tree(category_tree, report) if category_tree else {}
    for path in item_properties:
        _read_item_properties(path, unit, batch_rows)
    if events_path:
        source = _open_source(events_path, ",")
        _require(source, ("timestamp", "visitorid", "event", "itemid"))

        def normalize(raw: pl.DataFrame) -> pl.DataFrame:
            return pl.DataFrame(
                {
                    "occurred_at": _timestamps(raw.get_column("timestamp"), "ms", "UTC"),
                    "user_id": _ids(raw.get_column("visitorid")),
                    "item_id": _ids(raw.get_column("itemid")),
                    "event_type": _texts(raw.get_column("event")),
                    "quantity": pl.repeat(1, raw.height, eager=True, dtype=pl.Int32),
                    "source": pl.repeat("import:retailrocket", raw.height, eager=True),
                    _ORDINAL: raw.get_column(_ORDINAL),
                }
            )

        plan = _Plan(
            fmt="retailrocket",
            required=("timestamp", "visitorid", "event", "itemid"),
            optional=("transactionid",),
            id_columns=("timestamp", "visitorid", "event", "itemid", "transactionid"),
            normalize=normalize,
            event_types=RETAILROCKET_EVENT_TYPES,
            derive_sessions=True,
            unreadable={"occurred_at": "timestamp", "user_id": "visitorid", "item_id": "itemid"},
        )
        _import_events(unit, source, plan, batch_rows)
    unit.write_catalog(category_paths=tree)
    return report


def import_rees46(
    lake: Lake,
    path: str,
    *,
    not_recommendable: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ImportReport:
    """Imports a REES46 multi-category store file (e.g. `2019-Oct.csv`).

    event_time ("2019-10-01 00:00:00 UTC") -> occurred_at; event_type view/cart/
    remove_from_cart/purchase -> view/add_to_cart/remove_from_cart/purchase; product_id ->
    item_id; user_session -> session_id (when empty: `<user_id>@<YYYYmmdd>` of the event's UTC
    day); price -> the event price. Items get category_id, category_path (category_code with
    " > " for "."), brand and their latest price.

    Args:
        lake: The lake to write to.
        path: The CSV file (optionally `.gz`/`.bz2`).
        not_recommendable: Item ids never to recommend (`is_recommendable` false).
        batch_rows: Rows per landing file.

    Returns:
        What was read and written.

    Raises:
        ContractError: The file cannot be parsed or lacks a required column.
        FileNotFoundError: The file does not exist.
    """
    _check_batch_rows(batch_rows)
    source = _open_source(path, ",")
    required = ("event_time", "event_type", "product_id", "user_id")
    _require(source, required)
    optional = ("category_id", "category_code", "brand", "price", "user_session")

    def normalize(raw: pl.DataFrame) -> pl.DataFrame:
        def column(name: str) -> pl.Series:
            if name in raw.columns:
                return raw.get_column(name)
            return pl.Series(name, [None] * raw.height, dtype=pl.String)

        occurred = _timestamps(raw.get_column("event_time"), "iso", "UTC")
        user = _ids(raw.get_column("user_id"))
        price = _floats(column("price"))
        frame = pl.DataFrame(
            {
                "occurred_at": occurred,
                "user_id": user,
                "session_id": _ids(column("user_session")),
                "item_id": _ids(raw.get_column("product_id")),
                "event_type": _texts(raw.get_column("event_type")),
                "quantity": pl.repeat(1, raw.height, eager=True, dtype=pl.Int32),
                "price": price,
                "source": pl.repeat("import:rees46", raw.height, eager=True),
                "item:category_id": _ids(column("category_id")),
                "item:category_path": _texts(column("category_code")).str.replace_all(
                    ".", " > ", literal=True
                ),
                "item:brand": _texts(column("brand")),
                "item:price": price,
                _ORDINAL: raw.get_column(_ORDINAL),
            }
        )
        fallback = pl.col("user_id") + "@" + pl.col("occurred_at").dt.strftime("%Y%m%d")
        return frame.with_columns(pl.col("session_id").fill_null(fallback))

    plan = _Plan(
        fmt="rees46",
        required=required,
        optional=optional,
        id_columns=(*required, "user_session", "price"),
        normalize=normalize,
        event_types=REES46_EVENT_TYPES,
        derive_sessions=False,
        unreadable={
            "occurred_at": "event_time",
            "user_id": "user_id",
            "item_id": "product_id",
            "price": "price",
        },
    )
    report = ImportReport(format="rees46", sources=[path])
    unit = _Unit(lake, "rees46", path, report, not_recommendable)
    _import_events(unit, source, plan, batch_rows)
    unit.write_catalog()
    return report


def import_yoochoose(
    lake: Lake,
    path: str,
    *,
    not_recommendable: Sequence[str] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ImportReport:
    """Imports a YooChoose (RecSys Challenge 2015) prepared click file.

    Tab-separated `SessionId ItemId Time` (epoch seconds with fractions). There are no users:
    the session plays the user (`user_id` = `session_id` = "s<SessionId>"), and every event is a
    view.

    Args:
        lake: The lake to write to.
        path: The file (e.g. `yoochoose-clicks-100k_test.txt`).
        not_recommendable: Item ids never to recommend (`is_recommendable` false).
        batch_rows: Rows per landing file.

    Returns:
        What was read and written.

    Raises:
        ContractError: The file cannot be parsed or lacks a required column.
        FileNotFoundError: The file does not exist.
    """
    _check_batch_rows(batch_rows)
    source = _open_source(path, "\t")
    required = ("SessionId", "ItemId", "Time")
    _require(source, required)

    def normalize(raw: pl.DataFrame) -> pl.DataFrame:
        session = "s" + _ids(raw.get_column("SessionId"))
        return pl.DataFrame(
            {
                "occurred_at": _timestamps(raw.get_column("Time"), "s", "UTC"),
                "user_id": session,
                "session_id": session,
                "item_id": _ids(raw.get_column("ItemId")),
                "event_type": pl.repeat("view", raw.height, eager=True, dtype=pl.String),
                "quantity": pl.repeat(1, raw.height, eager=True, dtype=pl.Int32),
                "source": pl.repeat("import:yoochoose", raw.height, eager=True),
                _ORDINAL: raw.get_column(_ORDINAL),
            }
        )

    plan = _Plan(
        fmt="yoochoose",
        required=required,
        optional=(),
        id_columns=required,
        normalize=normalize,
        event_types={"view": "view"},
        derive_sessions=False,
        unreadable={"occurred_at": "Time", "user_id": "SessionId", "item_id": "ItemId"},
    )
    report = ImportReport(format="yoochoose", sources=[path])
    unit = _Unit(lake, "yoochoose", path, report, not_recommendable)
    _import_events(unit, source, plan, batch_rows)
    unit.write_catalog()
    return report


# ---------------------------------------------------------------------------------------------
# Reading sources


@dataclass
class _Source:
    """An opened source file: its columns and how to read it in batches."""

    path: str
    columns: list[str]
    delimiter: str | None  # None: Parquet

    def batches(
        self, include: Sequence[str], batch_rows: int, report: ImportReport
    ) -> Iterator[pl.DataFrame]:
        """Yields frames of exactly `batch_rows` rows (the last one shorter) with `_ordinal`."""
        include = [c for c in dict.fromkeys(include) if c in self.columns]
        tables = self._csv(include, report) if self.delimiter else self._parquet(include)
        ordinal = 0
        for table in _rebatch(tables, batch_rows):
            frame = pl.from_arrow(table)
            assert isinstance(frame, pl.DataFrame)
            frame = frame.with_columns(
                pl.int_range(ordinal, ordinal + frame.height, dtype=pl.Int64).alias(_ORDINAL)
            )
            ordinal += frame.height
            report.rows_read += frame.height
            yield frame

    def _csv(self, include: list[str], report: ImportReport) -> Iterator[pa.RecordBatch]:
        malformed: list[str] = []

        def skip(row: pacsv.InvalidRow) -> str:
            malformed.append(row.text)
            return "skip"

        good = 0
        try:
            reader = pacsv.open_csv(
                pa.input_stream(self.path, compression="detect"),
                read_options=pacsv.ReadOptions(
                    column_names=self.columns, skip_rows=1, block_size=_CSV_BLOCK_BYTES
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=self.delimiter, invalid_row_handler=skip
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in include},
                    include_columns=include,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                    null_values=[""],
                ),
            )
            for batch in reader:
                good += batch.num_rows
                yield batch
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            raise ContractError(self._explain(error)) from error
        report.rows_read += len(malformed)
        report.rows_malformed += len(malformed)
        room = _MALFORMED_KEPT - len(report.malformed_rows)
        report.malformed_rows += [f"{self.path}: {text[:200]}" for text in malformed[:room]]
        if malformed and not good:
            raise ContractError(
                f"{self.path}: no row has the header's {len(self.columns)} fields "
                f"({', '.join(self.columns)}); first row: {malformed[0][:200]!r}"
            )

    def _parquet(self, include: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            handle = pq.ParquetFile(self.path)
            yield from handle.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=include)
        except (pa.ArrowInvalid, OSError) as error:
            raise ContractError(f"{self.path}: cannot be read as Parquet: {error}") from error

    def _explain(self, error: Exception) -> str:
        text = str(error)
        match = re.search(r"column #(\d+)", text)
        if match and int(match.group(1)) < len(self.columns):
            name = self.columns[int(match.group(1))]
            return f"{self.path}: column '{name}' cannot be parsed: {text}"
        return f"{self.path}: cannot be parsed as CSV: {text}"


def _open_source(path: str, delimiter: str | None) -> _Source:
    """Opens a source file and reads its column names (CSV header or Parquet schema)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.lower().endswith((".parquet", ".pq")):
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as error:
            raise ContractError(f"{path}: cannot be read as Parquet: {error}") from error
        return _Source(path=path, columns=names, delimiter=None)
    try:
        with pa.input_stream(path, compression="detect") as stream:
            head = stream.read(_HEADER_BYTES)
    except (pa.ArrowInvalid, OSError) as error:
        raise ContractError(f"{path}: cannot be read: {error}") from error
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        line = first.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ContractError(f"{path}: the header is not UTF-8 text: {error}") from error
    if not line.strip():
        raise ContractError(f"{path}: the file is empty or has no header line")
    if delimiter is None:
        delimiter = max([",", "\t", ";", "|"], key=line.count)
    names = [name.strip() for name in next(csv.reader([line], delimiter=delimiter))]
    return _Source(path=path, columns=names, delimiter=delimiter)


def _require(source: _Source, columns: Iterable[str]) -> None:
    for column in columns:
        if column not in source.columns:
            raise ContractError(
                f"{source.path}: required column '{column}' is missing; "
                f"the file has {', '.join(source.columns)}"
            )


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Re-cuts a stream of record batches into tables of exactly `rows` rows (last shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    schema = None
    for batch in batches:
        schema = batch.schema
        while batch.num_rows:
            take = min(rows - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == rows:
                yield pa.Table.from_batches(pending, schema=schema)
                pending, count = [], 0
    if count:
        yield pa.Table.from_batches(pending, schema=schema)


# ---------------------------------------------------------------------------------------------
# Value conversion (every source value arrives as text from CSV, typed from Parquet)


def _texts(values: pl.Series) -> pl.Series:
    """Text, stripped; empty becomes null."""
    text = values.cast(pl.String).str.strip_chars()
    return text.to_frame("t").select(pl.when(pl.col("t") != "").then(pl.col("t"))).to_series()


_FLOAT_WRITTEN_ID = r"^([+-]?\d+)\.0*$"


def _ids(values: pl.Series) -> pl.Series:
    """Identifiers as trimmed text; a whole number written as a float (`17850.0`) loses `.0`.

    Spreadsheets and pandas exports write numeric ids with missing values as floats, as text
    (CSV) or typed (Parquet); the shop's own systems know them as `17850`. Each value is
    normalised on its own, so one non-integral value does not change the others.
    """
    if values.dtype.is_float():
        frame = values.to_frame("v")
        whole = pl.col("v").is_finite() & (pl.col("v") == pl.col("v").round(0))
        values = frame.select(
            pl.when(whole)
            .then(pl.col("v").cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(pl.col("v").cast(pl.String))
        ).to_series()
    return _texts(values).str.replace(_FLOAT_WRITTEN_ID, "${1}")


def normalize_ids(ids: Iterable[str]) -> list[str]:
    """Identifiers normalised as every importer does (trimmed, `17850.0` -> `17850`), unique.

    Args:
        ids: Identifiers as given (a command line list, a file's lines).

    Returns:
        The non-empty ones, normalised, in first-seen order.
    """
    normalized = _ids(pl.Series("id", list(ids), dtype=pl.String)).drop_nulls()
    return list(dict.fromkeys(normalized.to_list()))


def _floats(values: pl.Series) -> pl.Series:
    if values.dtype.is_numeric():
        return values.cast(pl.Float64)
    return _texts(values).cast(pl.Float64, strict=False)


def _quantities(values: pl.Series | None, height: int) -> pl.Series:
    """Quantities: a missing value is 1; a value that is not a whole number becomes null."""
    if values is None:
        return pl.repeat(1, height, eager=True, dtype=pl.Int32)
    raw = values if values.dtype.is_numeric() else _texts(values)
    frame = pl.DataFrame({"raw": raw, "number": raw.cast(pl.Float64, strict=False)})
    whole = pl.when(pl.col("number") == pl.col("number").round(0)).then(pl.col("number"))
    quantity = pl.when(pl.col("raw").is_null()).then(pl.lit(1.0)).otherwise(whole)
    return frame.select(quantity.cast(pl.Int32, strict=False).alias("quantity")).to_series()


def _booleans(values: pl.Series) -> pl.Series:
    if values.dtype == pl.Boolean:
        return values
    text = _texts(values).str.to_lowercase()
    truthy = text.is_in(["1", "true", "t", "yes", "y"])
    falsy = text.is_in(["0", "false", "f", "no", "n"])
    frame = pl.DataFrame({"truthy": truthy, "falsy": falsy})
    value = pl.when("truthy").then(pl.lit(True)).when("falsy").then(pl.lit(False))
    return frame.select(value.alias("is_in_stock")).to_series()


_UTC_US = pl.Datetime("us", "UTC")
_LAST_WORD = 2**62  # an attribute time later than any event's


def _timestamps(
    values: pl.Series, unit: str, timezone: str, pattern: str | None = None
) -> pl.Series:
    """Source timestamps as UTC microseconds; what cannot be read becomes null.

    Args:
        values: Epoch numbers, ISO text, text in `pattern`, or (Parquet) temporal values.
        unit: "s", "ms" or "iso"; temporal values ignore it.
        timezone: The zone of naive text and naive temporal values.
        pattern: A strftime pattern of the text (instead of ISO 8601); with `%z` the text
            carries its offset, otherwise it is read in `timezone`.
    """
    if values.dtype == pl.Date:
        values = values.cast(pl.Datetime("us"))
    if isinstance(values.dtype, pl.Datetime):
        if values.dtype.time_zone is None:
            values = values.dt.replace_time_zone(
                timezone, ambiguous="earliest", non_existent="null"
            )
        return values.dt.convert_time_zone("UTC").cast(_UTC_US)
    if unit in ("s", "ms"):
        factor = 1_000_000 if unit == "s" else 1_000
        if values.dtype.is_integer():
            micros = values.cast(pl.Int64) * factor
        else:
            text = values if values.dtype.is_float() else _texts(values)
            whole = text.cast(pl.Int64, strict=False) if text.dtype == pl.String else None
            fractional = (text.cast(pl.Float64, strict=False) * factor).round(0).cast(pl.Int64)
            micros = fractional if whole is None else (whole * factor).fill_null(fractional)
        return micros.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if pattern:
        text = _texts(values.cast(pl.String))
        if "%z" in pattern or "%:z" in pattern:
            aware = text.str.to_datetime(pattern, strict=False, time_unit="us")
            return aware.cast(_UTC_US).alias(values.name)
        local = text.str.to_datetime(pattern, strict=False, time_unit="us").dt.replace_time_zone(
            timezone, ambiguous="earliest", non_existent="null"
        )
        return local.dt.convert_time_zone("UTC").cast(_UTC_US).alias(values.name)
    text = (
        _texts(values.cast(pl.String))
        .str.replace(r"^(\d{4}-\d{2}-\d{2})[T ]", "${1} ")
        .str.replace(r"(?i)\s*(Z|UTC)$", "+00:00")
    )
    frame = pl.DataFrame({"t": text})
    aware = pl.coalesce(
        [
            pl.col("t").str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC")
            for f in ("%Y-%m-%d %H:%M:%S%.f%z", "%Y-%m-%d %H:%M%z")
        ]
    )
    naive = pl.coalesce(
        [
            pl.col("t").str.to_datetime(f, strict=False, time_unit="us")
            for f in ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M")
        ]
        + [pl.col("t").str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us"))]
    )
    local = naive.dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null")
    has_offset = pl.col("t").str.contains(r"[+-]\d{2}:?\d{2}$")
    parsed = pl.when(has_offset).then(aware).otherwise(local.dt.convert_time_zone("UTC"))
    return frame.select(parsed.cast(_UTC_US).alias(values.name)).to_series()


def _check_timestamps(
    path: str,
    column: str,
    raw: pl.Series,
    parsed: pl.Series,
    unit: str,
    pattern: str | None = None,
) -> None:
    """Fails when none of the first timestamps can be read: the unit or pattern is wrong."""
    head_raw, head = raw.head(_TIMESTAMP_CHECK_ROWS), parsed.head(_TIMESTAMP_CHECK_ROWS)
    present = head_raw.is_not_null()
    if unit == "iso" and not head_raw.dtype.is_temporal():
        present = present & (head_raw.cast(pl.String).str.strip_chars() != "")
    if int(present.sum()) and not int((present & head.is_not_null()).sum()):
        example = head_raw.filter(present)[0]
        if pattern:
            raise ContractError(
                f"{path}: column '{column}' cannot be read with --timestamp-format {pattern!r} "
                f"(e.g. {example!r}); check the pattern (strftime codes, e.g. '%m/%d/%Y %H:%M')"
            )
        hint = {"iso": "ISO 8601 text", "s": "epoch seconds", "ms": "epoch milliseconds"}[unit]
        raise ContractError(
            f"{path}: column '{column}' cannot be read as {hint} (e.g. {example!r}); "
            "check timestamp_unit (--timestamp-unit s|ms|iso) or give a --timestamp-format"
        )


# ---------------------------------------------------------------------------------------------
# Events


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


def _import_events(unit: "_Unit", source: _Source, plan: _Plan, batch_rows: int) -> None:
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


class _EventSink:
    """Writes canonical event batches to landing, deriving sessions through DuckDB if asked."""

    def __init__(self, lake: Lake, prefix: str, batch_rows: int, derive_sessions: bool) -> None:
        self.lake = lake
        self.prefix = prefix
        self.batch_rows = batch_rows
        self.derive_sessions = derive_sessions
        self.written: list[tuple[str, int]] = []
        self._staging: tempfile.TemporaryDirectory[str] | None = None
        self._parts = 0

    def add(self, frame: pl.DataFrame) -> None:
        if not self.derive_sessions:
            self._write(frame)
            return
        if self._staging is None:
            self._staging = tempfile.TemporaryDirectory(prefix="shelfwise-import-")
        staged = frame.select(
            *[c for c in _EVENT_COLUMNS if c not in ("occurred_at", "session_id")],
            pl.col("occurred_at").dt.epoch("us").alias(_TS),
            pl.col(_ORDINAL),
        )
        staged.write_parquet(posixpath.join(self._staging.name, f"part-{self._parts:06d}.parquet"))
        self._parts += 1

    def close(self) -> list[tuple[str, int]]:
        if self.derive_sessions and self._staging is not None:
            for table in _rebatch(self._sessions(self._staging.name), self.batch_rows):
                frame = pl.from_arrow(table)
                assert isinstance(frame, pl.DataFrame)
                start = pl.from_epoch(pl.col("_start"), time_unit="us").dt.strftime("%Y%m%dT%H%M%S")
                session = (
                    pl.when(pl.col("user_id").is_not_null() & pl.col(_TS).is_not_null())
                    .then(pl.col("user_id") + "@" + start)
                    .otherwise(None)
                )
                occurred = pl.from_epoch(pl.col(_TS), time_unit="us").dt.replace_time_zone("UTC")
                self._write(
                    frame.with_columns(session.alias("session_id"), occurred.alias("occurred_at"))
                )
        stale = [
            relpath
            for relpath in self.lake.list_files(paths.LANDING_EVENTS)
            if (match := re.fullmatch(re.escape(self.prefix) + r"-b(\d+)\.parquet", _name(relpath)))
            and int(match.group(1)) >= len(self.written)
        ]
        self.lake.remove(stale)
        return self.written

    def cleanup(self) -> None:
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None

    def _sessions(self, folder: str) -> Iterator[pa.RecordBatch]:
        import duckdb

        gap = int(SESSION_GAP.total_seconds() * 1_000_000)
        files = posixpath.join(folder, "*.parquet").replace("'", "''")
        # DuckDB spills the sort and the windows to `temp_directory` beyond its memory limit.
        connection = duckdb.connect(config={"temp_directory": posixpath.join(folder, "spill")})
        try:
            connection.execute("SET enable_progress_bar = false")
            query = f"""
                SELECT * EXCLUDE (_prev, _mark), max(_mark) OVER running AS _start
                FROM (
                    SELECT *, CASE WHEN _prev IS NULL OR {_TS} - _prev > {gap}
                                   THEN {_TS} END AS _mark
                    FROM (
                        SELECT *, lag({_TS}) OVER (
                            PARTITION BY user_id ORDER BY {_TS}, {_ORDINAL}
                        ) AS _prev
                        FROM read_parquet('{files}')
                    )
                )
                WINDOW running AS (
                    PARTITION BY user_id ORDER BY {_TS}, {_ORDINAL}
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
                )
                ORDER BY {_ORDINAL}
            """
            yield from connection.sql(query).to_arrow_reader(min(self.batch_rows, 1 << 17))
        finally:
            connection.close()

    def _write(self, frame: pl.DataFrame) -> None:
        relpath = paths.dataset_file(
            paths.LANDING_EVENTS, f"{self.prefix}-b{len(self.written):05d}"
        )
        table = _landing_table(frame, EVENTS_SCHEMA, relpath)
        self.lake.write_parquet(table, relpath)
        self.written.append((relpath, table.num_rows))


def _landing_table(frame: pl.DataFrame, schema: pa.Schema, source: str) -> pa.Table:
    """Conforms rows to a contract for a landing file.

    Required columns are declared nullable only when they hold nulls (rows ingestion will
    quarantine), since Parquet refuses nulls in a non-nullable column.
    """
    table = conform(frame.to_arrow(), schema, source=source)
    if any(table.column(f.name).null_count for f in schema if not f.nullable):
        relaxed = pa.schema([f.with_nullable(True) for f in schema])
        table = pa.Table.from_arrays(table.columns, schema=relaxed)
    return table


# ---------------------------------------------------------------------------------------------
# Catalog (items and users)


class _Latest:
    """The latest value of each attribute per key, and every key seen; memory grows with keys."""

    def __init__(self, most_frequent: Sequence[str] = ()) -> None:
        self.latest = pl.DataFrame(
            schema={"key": pl.String, "attribute": pl.String, "value": pl.String, "at": pl.Int64}
        )
        # Attributes that take their most frequent value (ties: the latest), counted per value.
        self.most_frequent = tuple(most_frequent)
        self.frequent = pl.DataFrame(
            schema={
                "key": pl.String,
                "attribute": pl.String,
                "value": pl.String,
                "count": pl.Int64,
                "at": pl.Int64,
            }
        )
        self.seen = pl.DataFrame(schema={"key": pl.String})

    def see(self, keys: pl.Series) -> None:
        fresh = keys.drop_nulls().unique().alias("key").to_frame()
        self.seen = pl.concat([self.seen, fresh]).unique()

    def update(self, long: pl.DataFrame) -> None:
        """Merges rows (key, attribute, value, at); later `at` wins, then later arrival."""
        long = long.select(
            pl.col("key").cast(pl.String),
            pl.col("attribute").cast(pl.String),
            pl.col("value").cast(pl.String),
            pl.col("at").cast(pl.Int64),
        ).drop_nulls(["key", "value"])
        counted = long.filter(pl.col("attribute").is_in(self.most_frequent))
        if counted.height:
            counts = counted.group_by("key", "attribute", "value").agg(
                pl.len().cast(pl.Int64).alias("count"), pl.col("at").max()
            )
            self.frequent = (
                pl.concat([self.frequent, counts])
                .group_by("key", "attribute", "value")
                .agg(pl.col("count").sum(), pl.col("at").max())
            )
            long = long.filter(~pl.col("attribute").is_in(self.most_frequent))
        merged = pl.concat([self.latest, long]).sort("at", nulls_last=False, maintain_order=True)
        self.latest = merged.unique(["key", "attribute"], keep="last", maintain_order=False)

    def wide(self, attributes: Sequence[str]) -> pl.DataFrame:
        """One row per key with attributes, a column per attribute (null when never seen)."""
        latest = self.latest
        if self.frequent.height:  # most frequent values replace the latest ones
            mode = (
                self.frequent.sort(
                    ["key", "attribute", "count", "at", "value"],
                    descending=[False, False, True, True, False],
                )
                .unique(["key", "attribute"], keep="first")
                .select("key", "attribute", "value", "at")
            )
            latest = pl.concat([latest.join(mode, on=["key", "attribute"], how="anti"), mode])
        if latest.height:
            wide = latest.pivot(on="attribute", index="key", values="value")
        else:
            wide = pl.DataFrame(schema={"key": pl.String})
        return wide.with_columns(
            pl.lit(None, dtype=pl.String).alias(name)
            for name in attributes
            if name not in wide.columns
        )


class _Unit:
    """One import's items and users, written once at the end under the events file's name."""

    def __init__(
        self,
        lake: Lake,
        fmt: str,
        path: str,
        report: ImportReport,
        not_recommendable: Sequence[str] = (),
    ) -> None:
        self.lake = lake
        self.report = report
        self.prefix = _landing_prefix(fmt, path)
        # An item's title is its most frequent one: order lines carry the title typed at each
        # sale, and a single odd line ("damaged", "check") must not rename the item.
        self.items = _Latest(most_frequent=("title",))
        self.users = _Latest()
        self.not_recommendable = normalize_ids(not_recommendable)

    def observe(self, frame: pl.DataFrame) -> None:
        """Remembers the valid rows' items and users and their attributes.

        A price is an item attribute only when positive: a zero on an order line is a
        giveaway or a correction, not the item's price.
        """
        if "item:price" in frame.columns:
            frame = frame.with_columns(
                pl.when(pl.col("item:price") > 0).then(pl.col("item:price")).alias("item:price")
            )
        at = frame.get_column("occurred_at").dt.epoch("us")
        for target, key, tag in (
            (self.items, "item_id", "item:"),
            (self.users, "user_id", "user:"),
        ):
            target.see(frame.get_column(key))
            attributes = [c for c in frame.columns if c.startswith(tag)]
            if not attributes:
                continue
            long = (
                frame.select(
                    pl.col(key).alias("key"),
                    at.alias("at"),
                    *[pl.col(c).cast(pl.String).alias(c.removeprefix(tag)) for c in attributes],
                )
                .unpivot(index=["key", "at"], variable_name="attribute", value_name="value")
                .drop_nulls(["key", "value"])
            )
            target.update(long)

    def write_catalog(self, category_paths: Mapping[str, str] | None = None) -> None:
        """Writes the items and users files (rows described in the module docstring)."""
        items_path = paths.dataset_file(paths.LANDING_ITEMS, f"{self.prefix}-items")
        if self.not_recommendable:  # the command line's word is the last one
            self.items.update(
                pl.DataFrame(
                    {
                        "key": self.not_recommendable,
                        "attribute": IS_RECOMMENDABLE,
                        "value": "false",
                        "at": _LAST_WORD,
                    }
                )
            )
        wide = self.items.wide([*_ITEM_ATTRIBUTES, "price"])
        if category_paths:
            from_tree = wide.get_column("category_id").replace_strict(
                dict(category_paths), default=None, return_dtype=pl.String
            )
            wide = wide.with_columns(pl.col("category_path").fill_null(from_tree))
        rich = wide.filter(pl.any_horizontal(pl.col(a).is_not_null() for a in _ITEM_ATTRIBUTES))
        placeholders = self._placeholders(self.items, rich, "item_id", paths.ITEMS, items_path)
        # The stock is as of the source row that said it (an `available` property, an event).
        stock_times = self.items.latest.filter(pl.col("attribute") == "is_in_stock").select(
            "key", pl.from_epoch("at", time_unit="us").dt.replace_time_zone("UTC").alias("_at")
        )
        items = (
            pl.concat([rich, placeholders.join(wide, on="key", how="left")], how="diagonal")
            .join(stock_times, on="key", how="left")
            .select(
                pl.col("key").alias("item_id"),
                pl.col("title"),
                pl.col("category_id").fill_null(UNKNOWN_CATEGORY),
                pl.col("category_path"),
                pl.col("brand"),
                pl.col("price").cast(pl.Float64, strict=False),
                (pl.col("is_in_stock") != "false").fill_null(True).alias("is_in_stock"),
                pl.col("_at").alias(STOCK_UPDATED_AT),
                (pl.col(IS_RECOMMENDABLE) != "false").alias(IS_RECOMMENDABLE),
            )
            .sort("item_id")
        )
        self.report.items_written += self._write(items, ITEMS_SCHEMA, items_path)

        users_path = paths.dataset_file(paths.LANDING_USERS, f"{self.prefix}-users")
        wide = self.users.wide(_USER_ATTRIBUTES)
        rich = wide.filter(pl.any_horizontal(pl.col(a).is_not_null() for a in _USER_ATTRIBUTES))
        placeholders = self._placeholders(self.users, rich, "user_id", paths.USERS, users_path)
        users = (
            pl.concat([rich, placeholders], how="diagonal")
            .select(pl.col("key").alias("user_id"), pl.col("country"), pl.col("device"))
            .sort("user_id")
        )
        self.report.users_written += self._write(users, USERS_SCHEMA, users_path)

    def _placeholders(
        self, latest: _Latest, rich: pl.DataFrame, key: str, catalog: str, own: str
    ) -> pl.DataFrame:
        """Keys seen without catalog attributes that the lake does not know yet."""
        landing = posixpath.dirname(own)
        known = [rich.select("key")]
        current = paths.catalog_file(catalog)
        sources = [current] if self.lake.exists(current) else []
        sources += [p for p in self.lake.list_files(landing) if p != own]
        for relpath in sources:
            try:
                frame = self.lake.read_frame(relpath, columns=[key])
            except (pa.ArrowInvalid, KeyError, FileNotFoundError):
                continue
            known.append(frame.select(pl.col(key).cast(pl.String).alias("key")))
        return latest.seen.join(pl.concat(known), on="key", how="anti")

    def _write(self, rows: pl.DataFrame, schema: pa.Schema, relpath: str) -> int:
        if not rows.height:
            self.lake.remove([relpath])
            return 0
        self.lake.write_parquet(_landing_table(rows, schema, relpath), relpath)
        self.report.files_written.append(relpath)
        return rows.height


# ---------------------------------------------------------------------------------------------
# RetailRocket catalog files


def _import_retailrocket_files(
    lake: Lake, paths_: list[str], batch_rows: int, not_recommendable: Sequence[str]
) -> ImportReport:
    events: list[str] = []
    properties: list[str] = []
    trees: list[str] = []
    for path in paths_:
        columns = set(_open_source(path, ",").columns)
        if "property" in columns:
            properties.append(path)
        elif "parentid" in columns:
            trees.append(path)
        else:  # events; a file that is none of the three fails on its missing columns
            events.append(path)
    if len(events) > 1 or len(trees) > 1:
        raise ValueError(
            "import RetailRocket files with at most one events file and one category tree "
            f"at a time (got events {events}, trees {trees})"
        )
    return import_retailrocket(
        lake,
        events[0] if events else None,
        item_properties=properties,
        category_tree=trees[0] if trees else None,
        not_recommendable=not_recommendable,
        batch_rows=batch_rows,
    )


def _read_item_properties(path: str, unit: _Unit, batch_rows: int) -> None:
    source = _open_source(path, ",")
    _require(source, ("timestamp", "itemid", "property", "value"))
    names = {"categoryid": "category_id", "available": "is_in_stock"}
    for raw in source.batches(
        ("timestamp", "itemid", "property", "value"), batch_rows, unit.report
    ):
        wanted = raw.filter(pl.col("property").str.strip_chars().is_in(list(names)))
        long = pl.DataFrame(
            {
                "key": _ids(wanted.get_column("itemid")),
                "attribute": wanted.get_column("property").str.strip_chars().replace(names),
                "value": _texts(wanted.get_column("value")),
                "at": _timestamps(wanted.get_column("timestamp"), "ms", "UTC").dt.epoch("us"),
            }
        )
        stock = pl.col("value").replace({"1": "true", "0": "false"})
        long = long.with_columns(
            pl.when(pl.col("attribute") == "is_in_stock").then(stock).otherwise(pl.col("value"))
        )
        unit.items.update(long)


def _read_category_tree(path: str, report: ImportReport) -> dict[str, str]:
    """`categoryid -> "root > … > categoryid"` from RetailRocket's `category_tree.csv`."""
    source = _open_source(path, ",")
    _require(source, ("categoryid", "parentid"))
    parents: dict[str, str | None] = {}
    for raw in source.batches(("categoryid", "parentid"), DEFAULT_BATCH_ROWS, report):
        rows = zip(
            _ids(raw.get_column("categoryid")), _ids(raw.get_column("parentid")), strict=True
        )
        parents.update((child, parent) for child, parent in rows if child is not None)
    resolved: dict[str, str] = {}
    for leaf in parents:
        chain = [leaf]
        while (parent := parents.get(chain[-1])) is not None and parent not in chain:
            chain.append(parent)
        resolved[leaf] = " > ".join(reversed(chain))
    return resolved


# ---------------------------------------------------------------------------------------------
# Names


def _landing_prefix(fmt: str, path: str) -> str:
    """`import-<format>-<file stem>-<8 hex of the absolute path>`: stable per source file."""
    name = Path(path).name
    for suffix in (".gz", ".bz2", ".zst", ".csv", ".tsv", ".txt", ".parquet", ".pq"):
        name = name.removesuffix(suffix) if name.lower().endswith(suffix) else name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "file"
    tag = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"import-{fmt}-{stem}-{tag}"


def _name(relpath: str) -> str:
    return posixpath.basename(relpath)


def _check_batch_rows(batch_rows: int) -> None:
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, not {batch_rows}")


__all__ = [
    "CATALOG_TARGETS",
    "DEFAULT_BATCH_ROWS",
    "FORMATS",
    "GENERIC_EVENT_TYPES",
    "ImportReport",
    "SESSION_GAP",
    "import_file",
    "import_catalog",
    "import_files",
    "import_generic",
    "import_rees46",
    "import_retailrocket",
    "import_yoochoose",
]
