"""The `retailrocket` format: Kaggle RetailRocket `events.csv` and its catalog files."""

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
from shelfwise.intake.importers.values import _ids, _texts, _timestamps
from shelfwise.lake import Lake

RETAILROCKET_EVENT_TYPES = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}


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
