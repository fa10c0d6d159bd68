"""Reads of the online state by concurrent requests, sent to Redis in one round trip.

With Redis as the online state, each `/recommend` reads the user's session, cart, purchases and
ranked list in one pipelined round trip, on the event loop. Most of that round trip's cost is
per pipeline, not per command: redis-py's pipeline, the two system calls and the wait for the
reply. Measured on this machine with the 10M-event shop (sync redis-py 8.1 with hiredis): one
request per pipeline took 200–240 µs of CPU and 320–400 µs of wall time, four per pipeline
57–90 µs of CPU and 90–120 µs of wall time each. (A single Redis' reads now skip redis-py's
pipeline, `RedisState._read_packed`, which cut their CPU by another third.)

`ReadBatcher` lets the requests waiting on one event loop share a round trip: a request's read
is queued, and the queue is read in one pipeline once the loop has passed a few times over its
ready callbacks (`PASSES`): the requests parsed from the same burst of socket reads have reached
their handlers by then. A request alone on the loop waits for no one. The read itself stays
synchronous (as before, on the loop): redis-py's asyncio client costs about twice the CPU per
command (measured: 111–134 µs per request at eight per pipeline, against 47–64), more than the
wait it would hand back to the loop.
"""

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Read = TypeVar("Read")

# Requests per round trip at most (a pipeline of about 4 commands each).
MAX_BATCH = 64
# Passes of the event loop's ready callbacks before a queue is read. A request's task takes a few
# steps (suspensions in the ASGI middlewares) from its bytes to the handler; measured at c=8 on
# the 10M-event shop, one worker: 2.6 requests per round trip after one pass, 5.5 after two, 8.0
# (all of them) after four, and 15–20% more requests per second than one round trip each. A
# request alone on the loop waits four passes over nothing: microseconds.
PASSES = 4


class ReadBatcher(Generic[Request, Read]):
    """Batches reads made by coroutines on one event loop into calls of `read_many`.

    Args:
        read_many: Reads several requests at once, returning one result per request, in order
            (e.g. `RedisState.read_requests`); a result that is an exception is raised to its
            request alone. When it raises, every request of that batch gets the exception.
        max_batch: Requests per call at most; a longer queue is read in several calls.
        passes: Passes of the loop's ready callbacks between the first read queued and the call.
        on_batch: Called with each call's number of requests (the service's metrics).
    """

    def __init__(
        self,
        read_many: Callable[[Sequence[Request]], Sequence[Read | Exception]],
        max_batch: int = MAX_BATCH,
        passes: int = PASSES,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._read_many = read_many
        self._max_batch = max_batch
        self._passes = passes
        self._on_batch = on_batch
        self._queued: list[tuple[Request, asyncio.Future[Read]]] = []

    async def read(self, request: Request) -> Read:
        """The result of `read_many` for `request`, read together with the loop's other reads.

        Raises:
            Exception: Whatever `read_many` raised for this request's batch.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Read] = loop.create_future()
        self._queued.append((request, future))
        if len(self._queued) == 1:
            loop.call_soon(self._after_passes, loop, self._passes)
        return await future

    def _after_passes(self, loop: asyncio.AbstractEventLoop, passes: int) -> None:
        if passes <= 1:
            self._flush()
        else:
            loop.call_soon(self._after_passes, loop, passes - 1)

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), self._max_batch):
            batch = queued[start : start + self._max_batch]
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                results = self._read_many([request for request, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to each waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # cancelled meanwhile (its request timed out)
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
