"""The service's request and response models (pydantic), with examples for the OpenAPI page.

Every request model forbids unknown keys (a typo such as `filter` for `filters` is a 400, not a
silently ignored option), bounds every identifier to 200 characters and every list, and takes
integers and booleans strictly (`k: true` is not 1). `bentos.contract.RequestContract` validates a
request with the same model BentoML then uses, so the OpenAPI document and the checks are one.
BentoML's OpenAPI 3.0 schema takes the singular `example` in `json_schema_extra`.

Times: a client's time without an offset is UTC; one further in the future than `CLOCK_SKEW`, or
before the earliest plausible time (`SHELFWISE_EARLIEST_EVENT_AT`, passed as the validation
context `earliest`), or outside what a UTC time can hold, is refused with the field named.
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from models.business_rules import RequestFilters
from shelfwise.contracts import EVENT_TYPES, MAX_PRICE
from shelfwise.experiments import ARM_KINDS, MODES, STATUSES, ExperimentResults

# Clocks differ: an event up to this far in the future is accepted.
CLOCK_SKEW = timedelta(minutes=5)
MAX_SESSION_ITEMS = 50
MAX_ID_LENGTH = 200
MAX_FILTER_IDS = 1000
MAX_K = 100
MAX_EVENTS_PER_REQUEST = 1000
MAX_STOCK_UPDATES_PER_REQUEST = 10_000
MAX_HISTORY = 100
DEFAULT_HISTORY = 20

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
Price = Annotated[StrictFloat, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)]


class FeatureContribution(BaseModel):
    feature: str = Field(description="A feature of the ranker, e.g. user_item_purchases.")
    value: float | None = Field(description="Its value for this item; null when missing.")
    contribution: float = Field(
        description="What it added to the score (LightGBM's contribution; negative lowers it)."
    )
    text: str = Field(description='The value in words, e.g. "bought 3 times, last 12 days ago".')


class ItemExplanation(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "generators": ["history", "buy_again"],
                "contributions": [
                    {
                        "feature": "user_item_purchases",
                        "value": 3.0,
                        "contribution": 0.82,
                        "text": "bought 3 times, last 12 days ago",
                    }
                ],
                "bias": 0.0,
                "rest": 0.41,
            }
        }
    )

    generators: list[str] = Field(
        description="Every candidate generator that proposed the item (the source alone on the "
        "rungs without candidates, and for popular items topping a list up)."
    )
    contributions: list[FeatureContribution] = Field(
        description="The ranker's three largest feature contributions, largest |contribution| "
        "first; empty when the ranker did not score the item (fallback level 1, no ranker, or "
        "a rung other than personalized)."
    )
    bias: float | None = Field(
        None, description="The ranker's bias term; null without contributions."
    )
    rest: float | None = Field(
        None,
        description="The summed contributions of the features not listed: bias + the listed "
        "contributions + rest is the item's score. Null without contributions.",
    )


class RecommendedItem(BaseModel):
    item_id: str = Field(description="The recommended item.")
    score: float = Field(description="Higher is better; comparable only within one response.")
    source: str = Field(
        description="What proposed the item: a candidate generator (history, buy_again, covisit, "
        "bought_together, collaborative, category_popular, content, trending, popular)."
    )
    arm: str | None = Field(
        None,
        description="When two arms of an experiment are interleaved: the arm that drafted this "
        "item; else null.",
    )
    explanation: ItemExplanation | None = Field(
        None, description="Why it is recommended, when the request asked (`explain`); else null."
    )


class RecommendFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category_ids: list[Identifier] | None = Field(
        None, max_length=MAX_FILTER_IDS, description="Only items of these categories."
    )
    exclude_item_ids: list[Identifier] = Field(
        default_factory=list, max_length=MAX_FILTER_IDS, description="Never these items."
    )
    price_max: Price | None = Field(None, description="Only items at most this expensive.")
    in_stock_only: StrictBool = Field(True, description="Only items in stock.")

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

    item_id: Identifier | None = Field(None, description="The item on the current page.")
    session_item_ids: list[Identifier] = Field(
        default_factory=list,
        max_length=MAX_SESSION_ITEMS,
        description="Items of the current session the client knows of, most recent first.",
    )


class RecommendRequest(BaseModel):
    """The body of `POST /recommend`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"user_id": "u1", "k": 10, "context": {"item_id": "i42"}}},
    )

    user_id: Identifier = Field(description='The shopper, e.g. "u1".')
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="How many items.")
    context: RecommendContext | None = None
    filters: RecommendFilters | None = None
    explain: StrictBool = Field(
        False,
        description="Explain every item: the generators that proposed it and the ranker's "
        "largest feature contributions. Costs time; off by default.",
    )


class SimilarRequest(BaseModel):
    """The body of `POST /similar`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"item_id": "i42", "k": 10}}
    )

    item_id: Identifier = Field(description='The item, e.g. "i42".')
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="How many items.")
    user_id: Identifier | None = Field(None, description="The shopper, when known (for logging).")
    filters: RecommendFilters | None = None


class HistoryRequest(BaseModel):
    """The body of `POST /history`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"user_id": "u1", "limit": 20}}
    )

    user_id: Identifier = Field(description='The shopper, e.g. "u1".')
    limit: StrictInt = Field(
        DEFAULT_HISTORY, ge=1, le=MAX_HISTORY, description="At most this many entries."
    )


class HistoryItem(BaseModel):
    item_id: str = Field(description="The item.")
    event: Literal["view", "cart", "purchase", "history"] = Field(
        description="What happened: view, cart, purchase, or history (one of the user's recent "
        "items in the snapshot, whose counts say no more)."
    )
    live: bool = Field(
        description="From the session since the snapshot (the online state); else as of the "
        "serving snapshot."
    )
    days_before_snapshot: float | None = Field(
        None,
        description="A snapshot entry's days between the user's last interaction with the item "
        "and the snapshot's cutoff, when known; null for live entries.",
    )
    category_id: str | None = Field(None, description="The item's category, when known.")
    price: float | None = Field(None, description="The item's price, when known.")


class HistoryResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "user_id": "u1",
                "known": True,
                "complete": True,
                "items": [
                    {
                        "item_id": "i42",
                        "event": "cart",
                        "live": True,
                        "days_before_snapshot": None,
                        "category_id": "c3",
                        "price": 12.5,
                    },
                    {
                        "item_id": "i7",
                        "event": "purchase",
                        "live": False,
                        "days_before_snapshot": 4.0,
                        "category_id": "c1",
                        "price": 3.99,
                    },
                ],
            }
        }
    )

    user_id: str
    known: bool = Field(
        description="Whether the serving snapshot holds a state for the user (a known user); "
        "false also when the service could not tell (`complete` false)."
    )
    complete: bool = Field(
        True,
        description="False when the online store (Redis) could not be read: `items` holds what "
        "the service could still see (possibly nothing), not the whole history, and `known` "
        "is not an answer.",
    )
    items: list[HistoryItem] = Field(
        description="Most recent first: the live session (views and carts most recent first, "
        "then purchases since the snapshot), then the snapshot's recent and bought items."
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
        "order); 2 the candidates were unavailable (popular items); 3 the model serves this "
        "user's segment its fallback, as for an unknown user (chosen on validation because the "
        "ranker did not beat popularity there)."
    )
    model_version: str | None = Field(
        description="The ranker's tag; null when none is loaded (or the experiment's arm uses "
        "none). Under an experiment, the arm's ranker; when interleaving, the control arm's."
    )
    experiment: str | None = Field(
        None, description="The running experiment this answer belongs to; null outside one."
    )
    arm: str | None = Field(
        None,
        description="The experiment's arm that answered (split), or `interleaved` (each item "
        "names its drafting arm); null outside an experiment.",
    )


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

    event_id: Identifier | None = Field(
        None,
        description="The idempotency key; without one the service assigns a random id, and a "
        "re-sent event can no longer be recognised.",
    )
    occurred_at: datetime | None = Field(
        None,
        description="When it happened (UTC when no offset is given; now when omitted); not "
        "before SHELFWISE_EARLIEST_EVENT_AT (default 2000-01-01) nor in the future.",
    )
    user_id: Identifier
    session_id: Identifier | None = None
    item_id: Identifier
    event_type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    quantity: StrictInt = Field(1, ge=0, le=1_000_000)
    price: Price | None = None
    rec_id: Identifier | None = Field(None, description="The recommendation this came from.")
    source: str = Field("api", min_length=1, max_length=100)

    @field_validator("occurred_at")
    @classmethod
    def _plausible_time(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        return plausible_utc(value, info)


class StockUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Identifier
    is_in_stock: StrictBool
    updated_at: datetime | None = Field(
        None,
        description="When the stock changed (UTC when no offset is given; now when omitted). "
        "Of an item's stock the newest word wins, so a late or re-sent update changes nothing.",
    )

    @field_validator("updated_at")
    @classmethod
    def _plausible_time(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        return plausible_utc(value, info)


class EventsRequest(BaseModel):
    """The body of `POST /events`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"events": []}})

    # Objects here, so that one invalid event does not refuse the others (the service validates
    # each with EventIn); the OpenAPI document shows them as EventIn (bentos/contract.py).
    events: list[dict] = Field(
        default_factory=list,
        max_length=MAX_EVENTS_PER_REQUEST,
        description="Events in the lake contract (EventIn); each is validated on its own: "
        "valid ones are kept, invalid ones are listed in `rejected`.",
    )
    stock: list[StockUpdate] = Field(
        default_factory=list, max_length=MAX_STOCK_UPDATES_PER_REQUEST, description="Stock changes."
    )


class ReloadRequest(BaseModel):
    """The body of `POST /admin/reload`: an empty object."""

    model_config = ConfigDict(extra="forbid")


class ExperimentsRequest(BaseModel):
    """The body of `POST /experiments`: an empty object."""

    model_config = ConfigDict(extra="forbid")


def plausible_utc(value: datetime | None, info: ValidationInfo | None = None) -> datetime | None:
    """A client's time in UTC (naive means UTC), refused when implausible.

    Refused (a `ValueError`, so a 400 naming the field): a time UTC cannot hold (year 1 at
    +05:00), one past now plus `CLOCK_SKEW`, and one before the validation context's `earliest`
    (the service passes `SHELFWISE_EARLIEST_EVENT_AT`; without a context that bound is not
    applied).
    """
    if value is None:
        return None
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError as error:  # e.g. 0001-01-01T00:00+05:00, 9999-12-31T23:59-05:00
        raise ValueError("is out of the range of UTC times") from error
    if value > datetime.now(UTC) + CLOCK_SKEW:
        raise ValueError("is in the future")
    earliest = (info.context or {}).get("earliest") if info is not None else None
    if earliest is not None and value < earliest:
        raise ValueError(f"is before the earliest accepted time {earliest.isoformat()}")
    return value


class ErrorResponse(BaseModel):
    """Every client error the service answers itself (4xx, and 429/503 under overload)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {"error": "String should have at most 200 characters", "field": "user_id"}
        }
    )

    error: str = Field(description="What is wrong, or what to do.")
    field: str | None = Field(
        None, description="The field, header or part of the request it is about (dotted path)."
    )


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


class ExperimentArmOut(BaseModel):
    name: str = Field(description="The arm's name; the first arm is the control.")
    kind: Literal[ARM_KINDS] = Field(  # type: ignore[valid-type]
        description="production (the served ranker), ranker (a registered version), candidates "
        "(the candidate order, no ranker) or popular (popular items)."
    )
    model: str | None = Field(description="A ranker arm's model tag; null for the other kinds.")
    share: float = Field(description="Relative share of users in split mode.")


class ExperimentOut(BaseModel):
    name: str
    mode: Literal[MODES] = Field(  # type: ignore[valid-type]
        description="split (each user sees one arm) or interleave (team draft of two arms)."
    )
    status: Literal[STATUSES] = Field(  # type: ignore[valid-type]
        description="scheduled (starts later), running or stopped."
    )
    started_at: datetime
    stopped_at: datetime | None
    arms: list[ExperimentArmOut]
    results: ExperimentResults | None = Field(
        description="The latest results the pipeline computed (`experiment_results`); null "
        "before any."
    )


class ExperimentsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "experiments": [
                    {
                        "name": "ranker-v2",
                        "mode": "split",
                        "status": "running",
                        "started_at": "2026-11-26T10:00:00Z",
                        "stopped_at": None,
                        "arms": [
                            {"name": "control", "kind": "production", "model": None, "share": 1},
                            {
                                "name": "challenger",
                                "kind": "ranker",
                                "model": "shelfwise_ranker:abc123",
                                "share": 1,
                            },
                        ],
                        "results": None,
                    }
                ]
            }
        }
    )

    experiments: list[ExperimentOut] = Field(description="Every experiment, oldest first.")
