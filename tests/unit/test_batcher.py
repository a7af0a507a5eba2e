"""Group commit: records gathered into one write, results and failures back to each caller."""

from __future__ import annotations

import asyncio

import pytest

from asyncsat.batcher import Batcher


class _Writes:
    """A write that records each batch it is given, refuses any batch holding a record of
    `refuse`, and is held while `gate` is cleared."""

    def __init__(self, refuse: frozenset[int] = frozenset()) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self._refuse = refuse

    async def __call__(self, records: list[int]) -> list[int]:
        self.batches.append(records)
        self.started.set()
        await self.gate.wait()
        if self._refuse & set(records):
            raise RuntimeError("the database said no")
        return [r * 10 for r in records]


async def test_records_put_within_the_window_are_written_together() -> None:
    writes = _Writes()
    batcher = Batcher(writes, window=0.05, most=100)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.put(i) for i in range(7))), 5)
    assert results == [i * 10 for i in range(7)]  # each caller gets its own result
    assert writes.batches == [list(range(7))]


async def test_a_full_batch_is_written_without_waiting_for_the_window() -> None:
    writes = _Writes()
    batcher = Batcher(writes, window=3600, most=3)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.put(i) for i in range(3))), 5)
    assert results == [0, 10, 20]
    assert writes.batches == [[0, 1, 2]]


async def test_records_put_while_a_write_runs_go_in_the_next_one() -> None:
    writes = _Writes()
    writes.gate.clear()
    batcher = Batcher(writes, window=0.01, most=100)
    first = asyncio.ensure_future(batcher.put(1))
    await asyncio.wait_for(writes.started.wait(), 5)
    later = [asyncio.ensure_future(batcher.put(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.05)  # (several windows: the write still runs)
    assert writes.batches == [[1]]
    writes.gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, *later), 5) == [10, 20, 30, 40]
    assert writes.batches == [[1], [2, 3, 4]]


async def test_a_record_the_write_refuses_fails_alone() -> None:
    """A batch that fails is written again one record at a time: only the record the
    write refuses fails (one bad row must not fail the files that ended with it)."""
    writes = _Writes(refuse=frozenset({2}))
    batcher = Batcher(writes, window=0.05, most=100)
    callers = [asyncio.ensure_future(batcher.put(i)) for i in (1, 2, 3)]
    done = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    assert done[0] == 10 and done[2] == 30
    assert isinstance(done[1], RuntimeError) and "said no" in str(done[1])
    assert writes.batches == [[1, 2, 3], [1], [2], [3]]


async def test_a_write_that_always_fails_fails_every_caller() -> None:
    writes = _Writes(refuse=frozenset({1, 2}))
    batcher = Batcher(writes, window=0.05, most=100)
    callers = [asyncio.ensure_future(batcher.put(i)) for i in (1, 2)]
    for caller in callers:
        with pytest.raises(RuntimeError, match="the database said no"):
            await asyncio.wait_for(caller, 5)
    assert await asyncio.wait_for(batcher.put(4), 5) == 40  # the next batch goes on


async def test_a_write_under_way_when_the_loop_closes_tells_its_callers() -> None:
    """The loop closing cancels the writer mid-write: what that write commits is still
    told to its callers, and a record not yet written is cancelled, not left waiting."""
    writes = _Writes()
    writes.gate.clear()
    batcher = Batcher(writes, window=0.01, most=2)
    first = [asyncio.ensure_future(batcher.put(i)) for i in (1, 2)]
    await asyncio.wait_for(writes.started.wait(), 5)
    queued = asyncio.ensure_future(batcher.put(3))
    await asyncio.sleep(0)
    runner = batcher._runner
    assert runner is not None
    runner.cancel()
    await asyncio.sleep(0.02)
    writes.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*first), 5) == [10, 20]
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queued, 5)
    assert writes.batches == [[1, 2]]


async def test_aclose_waits_for_every_record_handed_over() -> None:
    writes = _Writes()
    batcher = Batcher(writes, window=0.05, most=100)
    callers = [asyncio.ensure_future(batcher.put(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    await asyncio.wait_for(batcher.aclose(), 5)
    assert writes.batches == [[1, 2]] and all(c.done() for c in callers)


async def test_a_cancelled_caller_does_not_take_its_record_back() -> None:
    writes = _Writes()
    batcher = Batcher(writes, window=0.05, most=100)
    caller = asyncio.ensure_future(batcher.put(5))
    await asyncio.sleep(0)
    caller.cancel()
    assert await asyncio.wait_for(batcher.put(6), 5) == 60
    assert writes.batches == [[5, 6]]  # the file is at its final path: it is recorded
