"""A realistic order-lines export, written as a shop's back office writes it (a test fixture).

The shape of a public online-retail invoice export: `InvoiceNo, StockCode, Description, Quantity,
InvoiceDate, UnitPrice, CustomerID, Country`, one row per invoice line, with everything such an
export holds besides the customers' purchases:

- guest checkouts (no `CustomerID`), about a quarter of the rows;
- cancellations (`C` invoice numbers, negative quantities) of earlier lines;
- customer ids written as floats (`17850.0`), as a pandas export with empty cells writes them;
- US-style local times (`12/1/2026 8:26`: month first, no zero padding), in the shop's zone;
- fee lines between the products (`POST` postage, `M` manual, `DOT` dotcom postage);
- stock adjustments on guest rows with junk descriptions (`check`, `damaged`) and price 0;
- the odd line with a misspelt description or a zero price (a giveaway) for a real product.

Customers shop in themes (a few product families each), re-buy a couple of staples, and buy
what is new in their themes (products arrive over the period and sell best in their first weeks),
so "buy again", "bought together" and recency all carry signal. Deterministic for a seed.
"""

import csv
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

FEE_CODES = ("POST", "M", "DOT")
JUNK_TITLES = ("check", "damaged", "?", "wet/rusty", "found")
COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
)
TIMESTAMP_FORMAT = "%m/%d/%Y %H:%M"
ZONE = "Europe/London"


@dataclass(frozen=True)
class OrderLinesShop:
    """What the export holds.

    Attributes:
        customers: Registered customers.
        themes: Product families; each customer shops in two or three.
        products_per_theme: Products per family.
        days: Days of history, ending the day before `end`.
        end: The export's end (local midnight).
        guest_share: Guest invoices among all invoices.
        seed: Random seed.
    """

    customers: int = 500
    themes: int = 24
    products_per_theme: int = 20
    days: int = 98
    end: datetime = datetime(2026, 11, 2)
    guest_share: float = 0.27
    seed: int = 3


@dataclass(frozen=True)
class OrderLinesExport:
    """The written file and the facts a test checks against."""

    path: Path
    rows: int
    guest_rows: int
    cancellation_rows: int
    customer_ids: list[str]  # as the shop knows them ("17850"), most active first
    titles: dict[str, str]  # the products' real titles
    prices: dict[str, float]  # the products' list prices


def _products(shop: OrderLinesShop, rng: random.Random) -> list[tuple[str, str, float, int]]:
    nouns = ("MUG", "LANTERN", "BAG", "CANDLE", "TIN", "CARD", "FRAME", "CLOCK", "BOWL", "SIGN")
    adjectives = ("RED", "WHITE", "VINTAGE", "HEART", "REGENCY", "PAISLEY", "RETRO", "SPOTTY")
    products = []
    for theme in range(shop.themes):
        for number in range(shop.products_per_theme):
            code = f"{21000 + theme * 100 + number}" + ("A" if number % 5 == 4 else "")
            title = f"{rng.choice(adjectives)} {rng.choice(nouns)} {theme:02d}-{number:02d}"
            price = round(rng.choice((0.85, 1.25, 1.65, 2.1, 2.95, 3.75, 4.95, 7.95)), 2)
            products.append((code, title, price, theme))
    return products


def _launch_days(shop: OrderLinesShop, products, rng: random.Random) -> dict[str, float]:
    """A third of the range is on sale from the start; the rest arrives over the period."""
    return {
        code: 0.0 if rng.random() < 0.35 else rng.uniform(0, shop.days - 3)
        for code, _, _, _ in products
    }


def write_order_lines(folder: Path, shop: OrderLinesShop = OrderLinesShop()) -> OrderLinesExport:
    """Writes `orders.csv` into `folder`.

    Args:
        folder: Where to write.
        shop: What to write.

    Returns:
        The file and its facts.
    """
    rng = random.Random(shop.seed)
    zone = ZoneInfo(ZONE)
    products = _products(shop, rng)
    launched = _launch_days(shop, products, rng)
    by_theme: dict[int, list[tuple[str, str, float, int]]] = {}
    for product in products:
        by_theme.setdefault(product[3], []).append(product)
    start = shop.end - timedelta(days=shop.days)
    rows: list[dict[str, str]] = []
    invoice = 536_365
    guest_rows = cancellation_rows = 0
    orders_per_customer: dict[str, int] = {}

    def when(day: float) -> str:
        moment = (start + timedelta(days=day)).replace(tzinfo=zone)
        text = moment.strftime(TIMESTAMP_FORMAT)
        # No zero padding, as the shop's spreadsheet writes it: 1/5/2026 8:05.
        month, rest = text.split("/", 1)
        day_text, rest = rest.split("/", 1)
        year, clock = rest.split(" ")
        hour, minute = clock.split(":")
        return f"{int(month)}/{int(day_text)}/{year} {int(hour)}:{minute}"

    def line(number: str, product, quantity: int, stamp: str, customer: str, country: str):
        code, title, price, _ = product
        if rng.random() < 0.03:  # a misspelt description on the odd line
            title = title.lower()
        if customer and rng.random() < 0.01:  # a giveaway
            price = 0.0
        rows.append(
            {
                "InvoiceNo": number,
                "StockCode": code,
                "Description": title,
                "Quantity": str(quantity),
                "InvoiceDate": stamp,
                "UnitPrice": f"{price:.2f}",
                "CustomerID": customer,
                "Country": country,
            }
        )

    fees = {
        "POST": ("POST", "POSTAGE", 18.0, -1),
        "M": ("M", "Manual", 2.55, -1),
        "DOT": ("DOT", "DOTCOM POSTAGE", 11.5, -1),
    }
    customers = []
    for index in range(shop.customers):
        customer_id = f"{12346 + index * 7}.0"
        themes = rng.sample(range(shop.themes), rng.choice((2, 2, 3)))
        pool = [p for theme in themes for p in by_theme[theme]]
        staples = rng.sample([p for p in pool if launched[p[0]] == 0.0] or pool, 2)
        country = "United Kingdom" if rng.random() < 0.8 else rng.choice(("France", "Germany"))
        cadence = rng.uniform(4.0, 12.0)
        first = rng.uniform(0, cadence)
        customers.append((customer_id, themes, pool, staples, country, cadence, first))

    for customer_id, _themes, pool, staples, country, cadence, first in customers:
        day = first
        bought: list[tuple[str, str, float, int]] = []
        while day < shop.days - 0.05:
            stamp = when(day + rng.uniform(0.35, 0.7))
            number = str(invoice)
            invoice += 1
            lines = set()
            for staple in staples:
                if rng.random() < 0.5:
                    lines.add(staple)
            for earlier in bought[-10:]:
                if rng.random() < 0.06:
                    lines.add(earlier)
            # New arrivals sell best in their first weeks: what the customer has not seen yet.
            on_sale = [p for p in pool if launched[p[0]] <= day]
            weights = [2.0 ** (-(day - launched[p[0]]) / 12.0) + 0.05 for p in on_sale]
            wanted = rng.randint(4, 8)
            while len(lines) < min(wanted, len(on_sale)):
                lines.add(rng.choices(on_sale, weights=weights)[0])
            for product in sorted(lines):
                line(number, product, rng.choice((1, 2, 3, 4, 6, 12)), stamp, customer_id, country)
                bought.append(product)
            if country != "United Kingdom":
                line(number, fees["POST"], rng.choice((1, 2)), stamp, customer_id, country)
            elif rng.random() < 0.05:
                line(number, fees["M"], 1, stamp, customer_id, country)
            orders_per_customer[customer_id] = orders_per_customer.get(customer_id, 0) + 1
            if rng.random() < 0.06:  # a later cancellation of one line
                product = rng.choice(sorted(lines))
                rows.append(
                    {
                        **rows[-1],
                        "InvoiceNo": f"C{invoice}",
                        "StockCode": product[0],
                        "Description": product[1],
                        "Quantity": str(-rng.choice((1, 2))),
                        "InvoiceDate": when(min(day + 1.2, shop.days - 0.01)),
                        "UnitPrice": f"{product[2]:.2f}",
                    }
                )
                invoice += 1
                cancellation_rows += 1
            day += rng.expovariate(1.0 / cadence)

    customer_orders = sum(orders_per_customer.values())
    guest_orders = int(customer_orders * shop.guest_share / (1 - shop.guest_share))
    for _ in range(guest_orders):
        day = rng.uniform(0, shop.days - 0.05)
        stamp = when(day)
        number = str(invoice)
        invoice += 1
        on_sale = [p for p in products if launched[p[0]] <= day]
        for product in rng.sample(on_sale, rng.randint(3, 9)):
            line(number, product, rng.choice((1, 2, 3)), stamp, "", "United Kingdom")
            guest_rows += 1
        line(number, fees["DOT"], 1, stamp, "", "United Kingdom")
        guest_rows += 1
        if rng.random() < 0.15:  # a stock adjustment typed into the same export
            code, _, _, _ = rng.choice(products)
            rows.append(
                {
                    "InvoiceNo": str(invoice),
                    "StockCode": code,
                    "Description": rng.choice(JUNK_TITLES),
                    "Quantity": str(-rng.randint(1, 30)),
                    "InvoiceDate": stamp,
                    "UnitPrice": "0.00",
                    "CustomerID": "",
                    "Country": "United Kingdom",
                }
            )
            invoice += 1
            guest_rows += 1

    rows.sort(key=lambda row: datetime.strptime(row["InvoiceDate"], TIMESTAMP_FORMAT))
    path = folder / "orders.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    ranked = sorted(orders_per_customer, key=lambda c: (-orders_per_customer[c], c))
    return OrderLinesExport(
        path=path,
        rows=len(rows),
        guest_rows=guest_rows,
        cancellation_rows=cancellation_rows,
        customer_ids=[customer.removesuffix(".0") for customer in ranked],
        titles={code: title for code, title, _, _ in products},
        prices={code: price for code, _, price, _ in products},
    )
