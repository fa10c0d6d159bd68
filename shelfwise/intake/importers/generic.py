"""The `generic` format: a CSV or Parquet file of events described by a column mapping."""

from collections.abc import Mapping, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from shelfwise.contracts import EVENT_TYPES, ContractError
from shelfwise.intake.importers.columns import (
    _BOOLEAN_ATTRIBUTES,
    _EVENT_COLUMNS,
    _ITEM_ATTRIBUTES,
    _ORDINAL,
    _USER_ATTRIBUTES,
)
from shelfwise.intake.importers.events import _import_events, _Plan
from shelfwise.intake.importers.items_and_users import _Unit
from shelfwise.intake.importers.reading import DEFAULT_BATCH_ROWS, _check_batch_rows, _open_source
from shelfwise.intake.importers.report import ImportReport
from shelfwise.intake.importers.values import (
    _booleans,
    _check_timestamps,
    _floats,
    _ids,
    _quantities,
    _texts,
    _timestamps,
)
from shelfwise.lake import Lake

TIMESTAMP_UNITS = ("s", "ms", "iso")

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

GENERIC_TARGETS = (*_EVENT_COLUMNS, *_ITEM_ATTRIBUTES, *_USER_ATTRIBUTES)
_GENERIC_REQUIRED = ("occurred_at", "user_id", "item_id")


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
    silent default. Defaults for the others: `event_id` derived (see the package docstring),
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
