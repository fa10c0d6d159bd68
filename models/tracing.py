"""Spans for the stages of a recommendation request (OpenTelemetry), and none when tracing is off.

The service creates an OpenTelemetry tracer only when tracing is configured
(`SHELFWISE_OTLP_ENDPOINT`, see `bentos/tracing.py`) and hands it to the recommender; without one
the tracer is None and `stage` returns one shared do-nothing context manager: no span object, no
context switch, no clock read. So this module needs only the OpenTelemetry API's types, and only
for type checking; the tracer passed in does the work.

The stages, each a child of the request's span:

- `state`: the user's online state read (session activity, stock updates; Redis or in process);
- `candidates`: the user's candidate state read from the candidate store and decoded;
- `features`: the user's feature rows assembled, with the live session applied;
- `rank`: the ranker's prediction;
- `rules`: the business rules choosing the answer from a ranked list (one span per list tried:
  the personalised one, session neighbours, trending or popular items);
- `neighbours`: for users without a personalised answer, the session's neighbours.
"""

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

STAGE_STATE = "state"
STAGE_CANDIDATES = "candidates"
STAGE_FEATURES = "features"
STAGE_RANK = "rank"
STAGE_RULES = "rules"
STAGE_NEIGHBOURS = "neighbours"

# Attribute names of the spans (OpenTelemetry's convention: namespaced, lower case, dotted).
ATTR_USER_KNOWN = "shelfwise.user.known"
ATTR_CANDIDATES = "shelfwise.candidates"
ATTR_SESSION_ITEMS = "shelfwise.session.items"
ATTR_ROWS = "shelfwise.rows"
ATTR_SOURCE = "shelfwise.source"
ATTR_PICKED = "shelfwise.picked"
# The request was answered from the user's precomputed ranked list (`models.ranked_lists`).
ATTR_RANKED = "shelfwise.ranked_list"

# What `stage` returns without a tracer: shared (a nullcontext holds no state), so tracing off
# allocates nothing per request.
_OFF: AbstractContextManager[None] = nullcontext()


def stage(tracer: "Tracer | None", name: str) -> "AbstractContextManager[Span | None]":
    """A span for one stage of a request, current while the block runs; nothing without a tracer.

    Args:
        tracer: The service's tracer, or None when tracing is off.
        name: The stage (`STAGE_*`).

    Returns:
        A context manager yielding the span, or None when tracing is off: callers set attributes
        under `if span is not None:`, so that tracing off does not even build them.
    """
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name)
