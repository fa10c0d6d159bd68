"""A no-op BentoML service with the recommendation service's set-up, for latency comparisons.

`POST /noop` takes a body shaped like `/recommend`'s (`{"user_id": "u1", "k": 10}`) and returns a
tiny pydantic model, in a service set up exactly like `bentos/service.py`: `SERVICE_CONFIG` in the
decorator, the timer-cancelling shim installed at import, `settle_heap()` at the end of
`__init__`, and an `async` endpoint that answers on the event loop (as `/recommend` does with the
online state in process).

`SHELFWISE_NOOP_VARIANT` (read at import, so in every worker) builds the variants the no-op
benchmark compares, each adding one change to the previous:

- `default`: BentoML's defaults (60 s traffic timeout, tracing on), a `dict` return;
- `shim`: + the timer-cancelling shim and a 10 s timeout;
- `shim_gc`: + `settle_heap()` at the end of `__init__`;
- `shim_gc_tracing`: + tracing off for the hot routes (the whole `SERVICE_CONFIG`);
- `full_sync`: + a pydantic model returned instead of a `dict` (a sync endpoint, run in
  BentoML's thread pool: the set-up until `/recommend` became `async`);
- `full` (the default): + an `async` endpoint and the service's HTTP protocol
  (`bentos/protocol.py`: load shedding, off in the benchmarks, the header timeout and recycled
  keep-alive connections) and the cached API callers: the real set-up;
- `full_noshim`: `full` without the shim, to see what the shim alone buys.

Serve from the project root: `bentoml serve benchmarks/noop_service.py:NoopService`.
"""

import os
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, Field

from bentos.compat import (
    SERVICE_CONFIG,
    install_api_method_cache,
    install_http_protocol,
    install_timeout_timer_fix,
    settle_heap,
)

VARIANTS = (
    "default",
    "shim",
    "shim_gc",
    "shim_gc_tracing",
    "full_sync",
    "full",
    "full_noshim",
)
VARIANT = os.environ.get("SHELFWISE_NOOP_VARIANT", "full")
if VARIANT not in VARIANTS:
    raise ValueError(f"SHELFWISE_NOOP_VARIANT={VARIANT!r}: expected one of {VARIANTS}")

_SHIM = VARIANT not in ("default", "full_noshim")
_SETTLE = VARIANT not in ("default", "shim")
if VARIANT == "default":
    _CONFIG: dict[str, Any] = {}
elif VARIANT in ("shim", "shim_gc"):
    _CONFIG = {"traffic": SERVICE_CONFIG["traffic"]}
else:
    _CONFIG = SERVICE_CONFIG

if _SHIM:
    install_timeout_timer_fix()
if VARIANT in ("full", "full_noshim"):
    install_http_protocol()
    install_api_method_cache()


class NoopResponse(BaseModel):
    ok: bool = Field(description="Always true.")
    k: int = Field(description="The k of the request.")


# BentoML reads the endpoint's signature (its return annotation, sync or async) to build the
# route, so each kind of endpoint is written out.
UserId = Annotated[str, Field(min_length=1)]
K = Annotated[int, Field(ge=1, le=100)]


@bentoml.service(name="noop", **_CONFIG)
class NoopService:
    def __init__(self) -> None:
        if _SETTLE:
            settle_heap()

    if VARIANT in ("full", "full_noshim"):

        @bentoml.api(route="/noop")
        async def noop(self, user_id: UserId, k: K = 10) -> NoopResponse:
            return NoopResponse(ok=True, k=k)

    elif VARIANT == "full_sync":

        @bentoml.api(route="/noop")
        def noop(self, user_id: UserId, k: K = 10) -> NoopResponse:
            return NoopResponse(ok=True, k=k)

    else:

        @bentoml.api(route="/noop")
        def noop(self, user_id: UserId, k: K = 10) -> dict:
            return {"ok": True, "k": k}
