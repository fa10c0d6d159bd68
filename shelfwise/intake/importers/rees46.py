"""The `rees46` format: the REES46 multi-category store CSVs (`2019-Oct.csv`, …)."""

from collections.abc import Sequence

import polars as pl

from shelfwise.intake.importers.columns import _ORDINAL
from shelfwise.intake.importers.events import _import_events, _Plan
from shelfwise.intake.importers.items_and_users import _Unit
from shelfwise.intake.importers.reading import (
    DEFAULT_BATCH_ROWS,
    _check_batch_rows,
    _open_source,
    _require,
)
from shelfwise.intake.importers.report import ImportReport
from shelfwise.intake.importers.values import _floats, _ids, _texts, _timestamps
from shelfwise.lake import Lake

REES46_EVENT_TYPES = {
    "view": "view",
    "cart": "add_to_cart",
    "remove_from_cart": "remove_from_cart",
    "purchase": "purchase",
}


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
