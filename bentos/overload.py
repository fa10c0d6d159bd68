"""Load shedding: a per-worker limit on the requests in progress, above which a request is answered
at once with 429 and `Retry-After` instead of waiting in the event loop's queue (issue 14, item 3).

Why not BentoML's own `traffic.max_concurrency` (`MaxConcurrencyMiddleware` in BentoML 1.4.40):
it counts requests holding its semaphore, and `/recommend` runs on the event loop from start to
answer without awaiting anything (see `_run` in `bentos/service.py`). Each request therefore takes
and releases the semaphore before the next one is looked at, the count never exceeds 1 and nothing
is ever refused, while the queue builds up in front of the loop (measured at 256 connections with
`max_concurrency` 2: 0 refused, p50 ~250 ms; `benchmarks/overload_benchmark.py`). Its 429 also has
no `Retry-After`.

How this limit sees the queue: every request that arrived in one event-loop round is a task in
that round's ready queue. An admitted request counts itself in progress and then yields once
(`asyncio.sleep(0)`) before its work, so the tasks behind it in the same round find it in progress;
past `limit` they are refused, and a round runs the work of at most `limit` requests. That bounds
the round's length, hence the latency of the admitted requests and of everything else on the loop
(`/livez`, `/readyz`, `/metrics`). The refusals are cheap (no body is read, nothing is computed),
though not free: a client that ignores `Retry-After` and resends at once still costs the loop a
little per refusal.

Health and metrics routes are never counted nor refused: an orchestrator must see a busy worker as
alive and ready. BentoML's traffic metrics (outside this middleware) count the 429s by endpoint.
"""

import asyncio
import json
from typing import Any

from shelfwise.settings import Settings

# Never refused: probes and metrics must answer while the worker sheds load.
NEVER_SHED = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
# Seconds a refused client should wait (HTTP allows whole seconds only). Overload at this scale is
# a matter of milliseconds, so the shortest wait the header can say.
RETRY_AFTER_S = 1
STATUS = 429  # not 503: a valid request never gets a 5xx (ARCHITECTURE.md §6), as BentoML's own


class ConcurrencyLimit:
    """Refuses requests (429 + `Retry-After`) while `limit` others are in progress in this worker.

    Args:
        app: The ASGI app it guards.
        limit: Requests in progress at most; `None` reads `SHELFWISE_MAX_CONCURRENCY` (when the
            worker builds its app, at start-up); 0 turns the limit off.
    """

    def __init__(self, app: Any, limit: int | None = None) -> None:
        self.app = app
        self.limit = Settings.from_env().max_concurrency if limit is None else limit
        self.in_progress = 0
        self._refusal = json.dumps(
            {
                "error": f"the service is at its limit of {self.limit} requests in progress per "
                f"worker; retry after {RETRY_AFTER_S} s",
                "reason": "overloaded",
            }
        ).encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.limit or scope["path"] in NEVER_SHED:
            return await self.app(scope, receive, send)
        if self.in_progress >= self.limit:
            return await self._refuse(send)
        self.in_progress += 1
        try:
            # Let the requests queued behind this one in the same loop round see it in progress
            # (without this yield an inline request would finish before the next is looked at).
            await asyncio.sleep(0)
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1

    async def _refuse(self, send: Any) -> None:
        """Answers 429 with `Retry-After` and a JSON body naming the reason; reads no body."""
        await send(
            {
                "type": "http.response.start",
                "status": STATUS,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._refusal)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._refusal})
