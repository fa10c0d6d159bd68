"""A products file (one row per item) imported as the catalog (`import_catalog`)."""

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import polars as pl

from shelfwise.contracts import ContractError
from shelfwise.intake.importers.columns import _BOOLEAN_ATTRIBUTES, _ITEM_ATTRIBUTES
from shelfwise.intake.importers.items_and_users import _Unit
from shelfwise.intake.importers.reading import DEFAULT_BATCH_ROWS, _check_batch_rows, _open_source
from shelfwise.intake.importers.report import ImportReport
from shelfwise.intake.importers.values import _booleans, _floats, _ids, _texts
from shelfwise.lake import Lake

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
