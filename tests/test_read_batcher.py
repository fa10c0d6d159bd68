"""The read batcher: reads made by coroutines on one event loop share calls of `read_many`."""

import asyncio

import pytest

from shelfwise.runtime.read_batcher import ReadBatcher


class Reads:
    """A `read_many` that records its calls and answers each request with its square."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail

    def __call__(self, requests):
        self.calls.append(list(requests))
        if self.fail is not None:
            raise self.fail
        return [request * request for request in requests]


def test_concurrent_reads_share_one_call_and_each_gets_its_own_result():
    reads, sizes = Reads(), []
    batcher = ReadBatcher(reads, on_batch=sizes.append)

    async def main():
        return await asyncio.gather(*(batcher.read(n) for n in range(1, 9)))

    assert asyncio.run(main()) == [n * n for n in range(1, 9)]
    assert reads.calls == [list(range(1, 9))]
    assert sizes == [8]


def test_reads_that_reach_the_batcher_a_few_steps_later_still_join():
    """A request suspends a few times on its way to the handler (the ASGI middlewares)."""
    reads = Reads()
    batcher = ReadBatcher(reads)

    async def request(n: int, steps: int) -> int:
        for _ in range(steps):
            await asyncio.sleep(0)
        return await batcher.read(n)

    async def main():
        return await asyncio.gather(*(request(n, n % 3) for n in range(6)))

    assert asyncio.run(main()) == [n * n for n in range(6)]
    assert reads.calls == [[0, 3, 1, 4, 2, 5]]


def test_a_read_alone_and_reads_one_after_another_each_get_their_call():
    reads = Reads()
    batcher = ReadBatcher(reads)

    async def main():
        return [await batcher.read(2), await batcher.read(3)]

    assert asyncio.run(main()) == [4, 9]
    assert reads.calls == [[2], [3]]


def test_a_long_queue_is_read_in_calls_of_at_most_max_batch():
    reads = Reads()
    batcher = ReadBatcher(reads, max_batch=3)

    async def main():
        return await asyncio.gather(*(batcher.read(n) for n in range(7)))

    assert asyncio.run(main()) == [n * n for n in range(7)]
    assert reads.calls == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_failed_call_fails_every_read_of_its_batch_and_the_next_batch_is_read_again():
    reads = Reads(fail=ConnectionError("redis is down"))
    batcher = ReadBatcher(reads)

    async def main():
        failed = await asyncio.gather(*(batcher.read(n) for n in range(3)), return_exceptions=True)
        reads.fail = None
        return failed, await batcher.read(5)

    failed, after = asyncio.run(main())
    assert [type(error) for error in failed] == [ConnectionError] * 3
    assert after == 25


def test_an_error_returned_for_one_request_fails_that_request_alone():
    """As `RedisState.read_requests` does when one node of a cluster fails."""

    def read_many(requests):
        return [LookupError(n) if n == 2 else n for n in requests]

    batcher = ReadBatcher(read_many)

    async def main():
        return await asyncio.gather(*(batcher.read(n) for n in range(4)), return_exceptions=True)

    done = asyncio.run(main())
    assert done[:2] == [0, 1] and done[3] == 3 and isinstance(done[2], LookupError)


def test_a_cancelled_read_leaves_the_others_answered():
    reads = Reads()
    batcher = ReadBatcher(reads)

    async def main():
        tasks = [asyncio.create_task(batcher.read(n)) for n in range(4)]
        await asyncio.sleep(0)  # every task has queued its read
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return done

    done = asyncio.run(main())
    assert isinstance(done[1], asyncio.CancelledError)
    assert [done[0], done[2], done[3]] == [0, 4, 9]
    assert reads.calls == [[0, 1, 2, 3]]


def test_a_read_outside_a_running_loop_is_refused():
    with pytest.raises(RuntimeError):
        ReadBatcher(Reads()).read(1).send(None)
