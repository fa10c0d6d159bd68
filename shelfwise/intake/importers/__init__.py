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

from collections.abc import Mapping, Sequence

from shelfwise.intake.importers.catalog import CATALOG_TARGETS, import_catalog
from shelfwise.intake.importers.generic import GENERIC_EVENT_TYPES, import_generic
from shelfwise.intake.importers.generic import GENERIC_TARGETS as GENERIC_TARGETS
from shelfwise.intake.importers.generic import TIMESTAMP_UNITS as TIMESTAMP_UNITS
from shelfwise.intake.importers.landing import SESSION_GAP
from shelfwise.intake.importers.reading import DEFAULT_BATCH_ROWS
from shelfwise.intake.importers.rees46 import REES46_EVENT_TYPES as REES46_EVENT_TYPES
from shelfwise.intake.importers.rees46 import import_rees46
from shelfwise.intake.importers.report import ImportReport
from shelfwise.intake.importers.report import SourceCheck as SourceCheck
from shelfwise.intake.importers.retailrocket import (
    RETAILROCKET_EVENT_TYPES as RETAILROCKET_EVENT_TYPES,
)
from shelfwise.intake.importers.retailrocket import _import_retailrocket_files, import_retailrocket
from shelfwise.intake.importers.values import normalize_ids
from shelfwise.intake.importers.yoochoose import import_yoochoose
from shelfwise.lake import Lake

FORMATS = ("generic", "retailrocket", "rees46", "yoochoose")


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
