"""Group commit: records gathered into one write, results and failures back to each caller."""

from __future__ import annotations

import asyncio

import pytest

from asyncsat.batcher import Batcher


class _Writes:
    """A write that records each batch it is given; `gate` holds it while cleared."""

    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self._fail_first = fail_first

    async def __call__(self, records: list[int]) -> list[int]:
        self.batches.append(records)
        self.started.set()
        await self.gate.wait()
        if self._fail_first and len(self.batches) == 1:
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


async def test_a_failed_write_fails_each_of_its_callers_and_the_next_batch_goes_on() -> None:
    writes = _Writes(fail_first=True)
    writes.gate.clear()
    batcher = Batcher(writes, window=0.01, most=100)
    failing = [asyncio.ensure_future(batcher.put(i)) for i in (1, 2)]
    await asyncio.wait_for(writes.started.wait(), 5)
    after = asyncio.ensure_future(batcher.put(3))
    writes.gate.set()
    for caller in failing:
        with pytest.raises(RuntimeError, match="the database said no"):
            await asyncio.wait_for(caller, 5)
    assert await asyncio.wait_for(after, 5) == 30
    assert writes.batches == [[1, 2], [3]]


async def test_a_cancelled_caller_does_not_take_its_record_back() -> None:
    writes = _Writes()
    batcher = Batcher(writes, window=0.05, most=100)
    caller = asyncio.ensure_future(batcher.put(5))
    await asyncio.sleep(0)
    caller.cancel()
    assert await asyncio.wait_for(batcher.put(6), 5) == 60
    assert writes.batches == [[5, 6]]  # the file is at its final path: it is recorded
