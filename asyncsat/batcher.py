"""Group commit: many small writes of the same kind in one statement.

A record handed to `Batcher.put` waits at most `window` seconds for others, and while one
statement runs the next records gather for the following one. Many small files end in
quick succession; each `done` in its own transaction costs the database a commit and the
daemon a round trip, for a row change of a few microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from asyncsat.tasks import run_to_end

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Writes records with `write(records) -> results` (one result per record, in order)."""

    def __init__(self, write: Callable[[list[T]], Awaitable[Sequence[R]]], *,
                 window: float, most: int) -> None:
        self._write = write
        self._window = window
        self._most = most
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._full = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    async def put(self, record: T) -> R:
        """Write `record` with the others gathered meanwhile; its result, or the exception
        the write raised. A caller cancelled meanwhile does not take the record back."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if len(self._pending) >= self._most:
            self._full.set()
        if self._runner is None:
            # (it works for every caller: not in the log context of the first one)
            self._runner = asyncio.create_task(self._run(), name="batcher",
                                               context=contextvars.Context())
        return await future

    async def aclose(self) -> None:
        """Wait until every record handed over is written (or has failed)."""
        while self._runner is not None:
            await asyncio.shield(self._runner)

    async def _run(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._pending:
                if len(self._pending) < self._most:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self._window)
                self._full.clear()
                batch, self._pending = self._pending[:self._most], self._pending[self._most:]
                # a write under way ends even if this task is cancelled (the loop closes):
                # what it committed is told to its callers
                step, cancelled = await run_to_end(self._write_all(batch))
                step.result()
                batch = []
                if cancelled:
                    raise asyncio.CancelledError
        except asyncio.CancelledError:  # nobody waits for ever on what was not written
            for _, future in batch + self._pending:
                future.cancel()
            self._pending.clear()
            raise
        finally:
            self._runner = None

    async def _write_all(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Write a batch; if it fails, each of its records alone, so that a record the
        write refuses fails by itself, not with the others gathered with it."""
        try:
            results = await self._write([record for record, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} records")
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            for one in batch:
                await self._write_all([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
