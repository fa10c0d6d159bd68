"""The service's request and response models (pydantic), with examples for the OpenAPI page.

BentoML's OpenAPI 3.0 schema takes the singular `example` in `json_schema_extra`.
"""

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.business_rules import RequestFilters
from shelfwise.contracts import EVENT_TYPES

# Clocks differ: an event up to this far in the future is accepted.
CLOCK_SKEW = timedelta(minutes=5)
MAX_SESSION_ITEMS = 50


class RecommendedItem(BaseModel):
    item_id: str = Field(description="The recommended item.")
    score: float = Field(description="Higher is better; comparable only within one response.")
    source: str = Field(
        description="What proposed the item: a candidate generator (history, buy_again, covisit, "
        "bought_together, category_popular, content, trending, popular)."
    )


class RecommendFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category_ids: list[str] | None = Field(None, description="Only items of these categories.")
    exclude_item_ids: list[str] = Field(default_factory=list, description="Never these items.")
    price_max: float | None = Field(None, ge=0, description="Only items at most this expensive.")
    in_stock_only: bool = Field(True, description="Only items in stock.")

    def to_rules(self, exclude: str | None = None) -> RequestFilters:
        excluded = {*self.exclude_item_ids, *([exclude] if exclude else [])}
        return RequestFilters(
            category_ids=frozenset(self.category_ids) if self.category_ids is not None else None,
            exclude_item_ids=frozenset(excluded),
            price_max=self.price_max,
            in_stock_only=self.in_stock_only,
        )


class RecommendContext(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"item_id": "i42"}})

    item_id: str | None = Field(None, min_length=1, description="The item on the current page.")
    session_item_ids: list[str] = Field(
        default_factory=list,
        max_length=MAX_SESSION_ITEMS,
        description="Items of the current session the client knows of, most recent first.",
    )


class RecommendResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "rec_id": "3f1c9a0e6b5d4c7e8f90a1b2c3d4e5f6",
                "items": [{"item_id": "i42", "score": 1.73, "source": "covisit"}],
                "strategy": "personalized",
                "fallback_level": 0,
                "model_version": "shelfwise_ranker:abc123",
            }
        }
    )

    rec_id: str = Field(description="Identifies this response (send it back with feedback).")
    items: list[RecommendedItem]
    strategy: str = Field(
        description="The cold-start rung: personalized (known user), session (new user with a "
        "session or context item), category_trending (the context item's category) or popular."
    )
    fallback_level: int = Field(
        description="0 as intended; 1 the ranker was unavailable, failed or late (candidate "
        "order); 2 the candidates were unavailable (popular items)."
    )
    model_version: str | None = Field(description="The ranker's tag; null when none is loaded.")


class SimilarResponse(RecommendResponse):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "rec_id": "9d2e4b7a1c3f5e6d8a0b2c4d6e8f0a1b",
                "items": [{"item_id": "i7", "score": 1.0, "source": "covisit"}],
                "strategy": "neighbours",
                "fallback_level": 0,
                "model_version": "shelfwise_ranker:abc123",
            }
        }
    )

    strategy: str = Field(
        description="neighbours (viewed or bought together), content (a new item: same "
        "category, close price) or popular (an unknown item)."
    )


class EventIn(BaseModel):
    """One event in the lake contract (`shelfwise.contracts.EVENTS_SCHEMA`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "event_id": "e-2026-11-26-000001",
                "occurred_at": "2026-11-26T10:15:00Z",
                "user_id": "u1",
                "item_id": "i42",
                "event_type": "view",
                "rec_id": "3f1c9a0e6b5d4c7e8f90a1b2c3d4e5f6",
            }
        },
    )

    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The idempotency key; without one the service assigns a random id, and a "
        "re-sent event can no longer be recognised.",
    )
    occurred_at: datetime | None = Field(
        None, description="When it happened (UTC when no offset is given; now when omitted)."
    )
    user_id: str = Field(min_length=1, max_length=200)
    session_id: str | None = Field(None, min_length=1, max_length=200)
    item_id: str = Field(min_length=1, max_length=200)
    event_type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    quantity: int = Field(1, ge=0, le=1_000_000)
    price: float | None = Field(None, ge=0)
    rec_id: str | None = Field(
        None, max_length=200, description="The recommendation this came from."
    )
    source: str = Field("api", min_length=1, max_length=100)

    @field_validator("occurred_at")
    @classmethod
    def _not_in_the_future(cls, value: datetime | None) -> datetime | None:
        return utc_not_in_the_future(value)


class StockUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=200)
    is_in_stock: bool
    updated_at: datetime | None = Field(
        None,
        description="When the stock changed (UTC when no offset is given; now when omitted). "
        "Of an item's stock the newest word wins, so a late or re-sent update changes nothing.",
    )

    @field_validator("updated_at")
    @classmethod
    def _not_in_the_future(cls, value: datetime | None) -> datetime | None:
        return utc_not_in_the_future(value)


def utc_not_in_the_future(value: datetime | None) -> datetime | None:
    """A client's time in UTC (naive means UTC); refused when past now plus `CLOCK_SKEW`."""
    if value is None:
        return None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if value > datetime.now(UTC) + CLOCK_SKEW:
        raise ValueError("is in the future")
    return value


class RejectedEvent(BaseModel):
    index: int = Field(description="Position of the event in the request's `events`.")
    field: str = Field(description="The field that failed validation.")
    message: str


class EventsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"accepted": 99, "duplicates": 0, "rejected": [], "stock_updates": 0}
        }
    )

    accepted: int = Field(description="New events, durable in the write-ahead log.")
    duplicates: int = Field(description="Events already received (same event_id): ignored.")
    rejected: list[RejectedEvent] = Field(description="Invalid events, not kept.")
    stock_updates: int = Field(description="Stock changes applied.")


class ReloadResponse(BaseModel):
    reloaded: bool = Field(description="Whether a newly promoted model was swapped in.")
    model_version: str | None = Field(description="The ranker served from now on.")
