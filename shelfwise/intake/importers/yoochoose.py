"""The `yoochoose` format: the tab-separated click files of the RecSys Challenge 2015."""

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
from shelfwise.intake.importers.values import _ids, _timestamps
from shelfwise.lake import Lake


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
