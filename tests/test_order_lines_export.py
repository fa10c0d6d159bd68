"""A real shop's order-lines export, end to end, as a new user runs it (README, "Bring your own
data"): the documented `shelfwise import` command, `make pipeline` with its defaults, then
`bentoml serve` of the bento it built (see tests/order_lines.py for what the export holds)."""

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest

from models.artifacts import read_evaluation_report
from shelfwise.contracts import GUEST_REASON, RETURN_REASON
from shelfwise.lake import EVENTS, ITEMS, Lake
from shelfwise.settings import Settings
from tests.order_lines import FEE_CODES, JUNK_TITLES, OrderLinesExport, write_order_lines
from tests.support import PROJECT_ROOT, VENV_BIN, bentoml_server

pytestmark = pytest.mark.slow

IMPORT_COMMAND = [
    "import",
    "--format",
    "generic",
    "{orders}",
    "--event-type",
    "purchase",
    "--map",
    "occurred_at=InvoiceDate",
    "--timestamp-format",
    "%m/%d/%Y %H:%M",
    "--timezone",
    "Europe/London",
    "--map",
    "user_id=CustomerID",
    "--map",
    "item_id=StockCode",
    "--map",
    "session_id=InvoiceNo",
    "--map",
    "quantity=Quantity",
    "--map",
    "price=UnitPrice",
    "--map",
    "title=Description",
    "--not-recommendable",
    "POST,M,DOT",
]


@dataclass(frozen=True)
class ImportedShop:
    export: OrderLinesExport
    settings: Settings
    import_output: str
    pipeline_output: str

    @property
    def lake(self) -> Lake:
        return Lake(self.settings.lake_url)


def _environment(home: Path) -> dict[str, str]:
    """The caller's environment without its Shelfwise settings, on a fresh home."""
    kept = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SHELFWISE_", "DAGSTER_", "BENTOML_"))
    }
    return {**kept, "SHELFWISE_HOME": str(home)}


@pytest.fixture(scope="module")
def imported_shop(tmp_path_factory) -> ImportedShop:
    folder = tmp_path_factory.mktemp("order-lines")
    home = folder / "home"
    export = write_order_lines(folder)
    env = _environment(home)
    command = [arg.format(orders=export.path) for arg in IMPORT_COMMAND]
    imported = subprocess.run(
        [str(VENV_BIN / "shelfwise"), *command], env=env, capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr
    pipeline = subprocess.run(
        ["make", "pipeline"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert pipeline.returncode == 0, (pipeline.stdout + pipeline.stderr)[-5000:]
    settings = Settings.from_env({"SHELFWISE_HOME": str(home)})
    return ImportedShop(export, settings, imported.stdout, pipeline.stdout + pipeline.stderr)


@pytest.fixture(scope="module")
def served_shop(imported_shop: ImportedShop, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("order-lines-server")
    with bentoml_server(
        "shelfwise:latest", imported_shop.settings, cwd=folder, log_path=folder / "bentoml.log"
    ) as url:
        yield url


def test_the_import_says_what_will_land_and_what_is_set_aside(imported_shop):
    export, out = imported_shop.export, imported_shop.import_output
    customer_rows = export.rows - export.guest_rows - export.cancellation_rows
    assert f"{export.rows:,} event rows; {customer_rows:,} will land" in out
    assert f"set aside: {GUEST_REASON}: {export.guest_rows:,}" in out
    assert f"set aside: {RETURN_REASON}: {export.cancellation_rows:,}" in out
    assert "0 invalid" in out


def test_guests_and_returns_are_quarantined_with_their_reason_and_block_nothing(imported_shop):
    lake, export = imported_shop.lake, imported_shop.export
    quarantined = lake.read_frame("quarantine/events")
    reasons = quarantined.get_column("reason").value_counts().rows()
    assert sorted(reasons) == sorted(
        [(GUEST_REASON, export.guest_rows), (RETURN_REASON, export.cancellation_rows)]
    )
    events = lake.read_frame(EVENTS)
    assert events.height == export.rows - export.guest_rows - export.cancellation_rows
    assert set(events.get_column("event_type")) == {"purchase"}
    # Customer ids as the shop knows them: `17850.0` in the file, `17850` in the lake.
    assert set(export.customer_ids) == set(events.get_column("user_id"))
    assert lake.list_files("landing") == []


def test_the_catalog_takes_prices_and_titles_from_valid_rows_only(imported_shop):
    lake, export = imported_shop.lake, imported_shop.export
    items = lake.read_frame(ITEMS)
    sold = set(lake.read_frame(EVENTS).get_column("item_id"))
    products = items.filter(pl.col("item_id").is_in(sorted(sold - set(FEE_CODES))))
    assert products.height == len(sold - set(FEE_CODES))
    # No zero price (a giveaway line or a stock adjustment) and no junk or misspelt title.
    assert products.filter(pl.col("price").is_null() | (pl.col("price") <= 0)).height == 0
    assert not set(products.get_column("title")) & set(JUNK_TITLES)
    titles = dict(products.select("item_id", "title").iter_rows())
    assert titles == {code: export.titles[code] for code in titles}
    fees = items.filter(pl.col("item_id").is_in(list(FEE_CODES)))
    assert fees.get_column("is_recommendable").to_list() == [False] * len(FEE_CODES)


def test_the_evaluation_carries_intervals_and_the_gate_promoted_with_confidence(imported_shop):
    report = read_evaluation_report(imported_shop.lake)
    ranker = report["metrics"]["ranker"]
    low, high = ranker["ndcg@10_ci95"]
    assert low <= ranker["ndcg@10"] <= high
    assert "trending" in report["not_applicable"]  # purchases only: no views to trend on
    paired = report["paired"]["buy_again"]
    assert paired["ndcg@10_diff_ci95"][0] > 0
    assert "promotion_gate" in imported_shop.pipeline_output


def test_a_customer_as_written_in_the_file_gets_a_personalized_list_without_fees(
    served_shop, imported_shop
):
    export = imported_shop.export
    for customer in export.customer_ids[:40]:
        answer = httpx.post(
            f"{served_shop}/recommend", json={"user_id": customer, "k": 20}, timeout=10
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["strategy"], body["fallback_level"]) == ("personalized", 0), customer
        assert len(body["items"]) == 20
        assert not {item["item_id"] for item in body["items"]} & set(FEE_CODES)
    unknown = httpx.post(f"{served_shop}/recommend", json={"user_id": "nobody", "k": 50})
    assert not {item["item_id"] for item in unknown.json()["items"]} & set(FEE_CODES)
    for item in (*FEE_CODES, next(iter(export.titles))):
        similar = httpx.post(f"{served_shop}/similar", json={"item_id": item, "k": 20})
        assert similar.status_code == 200, similar.text
        assert not {row["item_id"] for row in similar.json()["items"]} & set(FEE_CODES)
