"""Data contracts of the lake (ARCHITECTURE.md §4) as Arrow schemas, and the checks enforcing them.

Identifiers are strings; timestamps are UTC with microsecond precision. The generator, the
importers, the ingestion and the service all conform their data with `conform`, so a column that
is missing or cannot be cast fails with its name in the message.
"""

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

TIMESTAMP = pa.timestamp("us", tz="UTC")
STOCK_UPDATED_AT = "stock_updated_at"
IS_RECOMMENDABLE = "is_recommendable"
# The category of an item nothing has described yet (an importer's placeholder row).
UNKNOWN_CATEGORY = "unknown"

EVENT_TYPES = ("view", "add_to_cart", "remove_from_cart", "purchase")

# Plausibility bounds of an event, in the API and in landing validation alike. An event before
# the earliest time is a default date (year 1, the epoch) or a typo, never a shop's history;
# configurable where the service and ingestion are configured. A price is finite, not negative
# and below MAX_PRICE (a billion in any currency: above it, a price is a mistyped code or 1e308).
DEFAULT_EARLIEST_EVENT_AT = datetime(2000, 1, 1, tzinfo=UTC)
MAX_PRICE = 1e9


def parse_earliest(text: str) -> datetime:
    """An earliest event time from configuration: an ISO date or date-time, UTC when naive.

    Args:
        text: E.g. `2000-01-01` or `2015-06-01T00:00:00+02:00`.

    Returns:
        A time-zone aware datetime.

    Raises:
        ValueError: The text is not an ISO date or date-time.
    """
    earliest = datetime.fromisoformat(text.strip())
    return earliest if earliest.tzinfo else earliest.replace(tzinfo=UTC)


EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("occurred_at", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("session_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("quantity", pa.int32(), nullable=False),
        pa.field("price", pa.float64(), nullable=True),
        pa.field("rec_id", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ]
)

IMPRESSIONS_SCHEMA = pa.schema(
    [
        pa.field("rec_id", pa.string(), nullable=False),
        pa.field("shown_at", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("model_version", pa.string(), nullable=True),
        pa.field("strategy", pa.string(), nullable=False),
        # The cold-start ladder's fallback level of the response (drift: its share over time).
        pa.field("fallback_level", pa.int8(), nullable=True),
        # The experiment the response belongs to and its arm (null outside experiments); when two
        # arms are interleaved, the arm that drafted this item.
        pa.field("experiment", pa.string(), nullable=True),
        pa.field("arm", pa.string(), nullable=True),
        pa.field("drafted_by", pa.string(), nullable=True),
    ]
)

# The feature rows of a sample of personalised /recommend responses (drift checks): one row per
# (sampled response, ranked candidate). The vector is a list column, not one column per feature:
# the core knows no feature names (they belong to `models.features`, above it), and a new
# feature list in a later release must not make older log segments unreadable; `feature_set`
# (a fingerprint of the names in order, `models.drift.feature_set_id`) tells which list a row
# holds. NaN in `features` is a missing value (the ranker's "no history").
FEATURE_SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("rec_id", pa.string(), nullable=False),
        pa.field("sampled_at", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=True),
        pa.field("fallback_level", pa.int8(), nullable=True),
        pa.field("item_id", pa.string(), nullable=False),
        # The candidate's place in the ranked order of all the request's candidates (1: the
        # highest score), before the business rules chose what was shown; and that score.
        pa.field("score_rank", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=True),
        pa.field("feature_set", pa.string(), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
    ]
)

# Stock changes the shop sends to the service's /events: per item the newest one overrides the
# catalog's `is_in_stock` where it is newer than the row's `stock_updated_at`.
STOCK_UPDATES_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("is_in_stock", pa.bool_(), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ]
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=True),
        pa.field("category_id", pa.string(), nullable=False),
        pa.field("category_path", pa.string(), nullable=True),
        pa.field("brand", pa.string(), nullable=True),
        pa.field("price", pa.float64(), nullable=True),
        pa.field("is_in_stock", pa.bool_(), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=True),
        # When `is_in_stock` was last set; ingestion fills an empty one with the delivery's time,
        # so that the newest word on an item's stock wins (catalog or `/events` stock update).
        pa.field(STOCK_UPDATED_AT, TIMESTAMP, nullable=True),
        # False for items that may be bought and counted as history but are never recommended
        # (fees, postage, gift cards). Null: the delivery says nothing, and the catalog keeps what
        # an earlier delivery said (recommendable when nothing ever did).
        pa.field(IS_RECOMMENDABLE, pa.bool_(), nullable=True),
    ]
)

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("signed_up_at", TIMESTAMP, nullable=True),
        pa.field("country", pa.string(), nullable=True),
        pa.field("device", pa.string(), nullable=True),
    ]
)

# Columns that identify a row of each dataset (unique within the dataset).
ITEMS_KEY = "item_id"
USERS_KEY = "user_id"


class ContractError(ValueError):
    """Input that does not fit a contract; the message names the source and the column."""


def conform(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    """Selects and casts a table's columns to a contract schema.

    Optional (nullable) columns that are missing are added as nulls; extra columns are dropped.

    Args:
        table: The input rows.
        schema: The contract to conform to.
        source: Where the rows came from (a file name), used in error messages.

    Returns:
        A table with exactly the contract's columns, in order, with its types.

    Raises:
        ContractError: A required column is missing or a column cannot be cast.
    """
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise ContractError(f"{source}: required column '{field.name}' is missing")
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            if pa.types.is_timestamp(field.type) and pa.types.is_timestamp(column.type):
                if column.type.tz is None:
                    column = pc.assume_timezone(column, "UTC")
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ContractError(
                f"{source}: column '{field.name}' cannot be read as {field.type}: {error}"
            ) from error
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(None).remove_metadata())


# Why a row is quarantined: the `reason` column of every quarantined row, whoever set it aside
# (ingestion's suite, the feedback log's plausibility check).
ROW_REASON = "reason"
GUEST_REASON = "guest checkout: user_id is null"
RETURN_REASON = "return: purchase with a negative quantity"
NEGATIVE_PRICE_REASON = "price is negative"
PRICE_REASON = f"price is not a finite number at most {MAX_PRICE:,.0f}"
# Rows every real export holds, by reason, in the order they are tested (a guest's return is a
# guest row).
SET_ASIDE_REASONS = (GUEST_REASON, RETURN_REASON)


def earliest_reason(column: str, earliest: datetime) -> str:
    """The reason of a row whose `column` is before the earliest plausible time."""
    return f"{column} is before {earliest.isoformat()}"
