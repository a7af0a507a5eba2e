"""The daemon's handle on the database: a pool, and statements retried while it is away."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from asyncsat.db.pool import CONFLICT_ERRORS, CONNECTION_ERRORS

P = ParamSpec("P")
T = TypeVar("T")
log = structlog.get_logger("asyncsat.db")


class Store:
    """Runs query functions on the pool; connection faults are retried for `patience` seconds."""

    def __init__(self, pool: Any, *, patience: float = 300.0) -> None:
        self.pool = pool
        self.patience = patience

    async def call(
        self, fn: Callable[Concatenate[Any, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        try:  # the common case, without building a retry loop for every statement
            return await fn(self.pool, *args, **kwargs)
        except CONNECTION_ERRORS as exc:
            _log_first(exc)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(CONNECTION_ERRORS),
            wait=wait_exponential(multiplier=0.2, max=5) + wait_random(0, 0.2),
            stop=stop_after_delay(self.patience),
            reraise=True,
            before_sleep=_log_retry,
        ):
            with attempt:
                return await fn(self.pool, *args, **kwargs)
        raise AssertionError("unreachable")  # pragma: no cover

    async def transaction(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(connection)` in one transaction, again from the start after a lost
        connection or a deadlock (PostgreSQL aborts one of the transactions in a cycle of
        row locks: a resolve that asks for a running product again, and a heartbeat)."""

        async def run(pool: Any) -> T:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(CONFLICT_ERRORS),
                wait=wait_random(0.01, 0.2), stop=stop_after_attempt(5), reraise=True,
            ):
                with attempt:
                    async with pool.acquire() as conn, conn.transaction():
                        return await fn(conn)
            raise AssertionError("unreachable")  # pragma: no cover

        return await self.call(run)

    async def once(
        self, fn: Callable[Concatenate[Any, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> tuple[bool, T | None]:
        """A statement that must not be sent again after a lost connection: it may have
        committed the first time, and a second run would act on what changed since.
        (False, None) when the connection was lost under it."""
        try:
            return True, await fn(self.pool, *args, **kwargs)
        except CONNECTION_ERRORS as exc:
            log.warning("database unavailable, statement not sent again",
                        error=f"{type(exc).__name__}: {exc}")
            return False, None

    async def try_call(
        self, fn: Callable[Concatenate[Any, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T | None:
        """Best effort (progress updates): None when the database is away right now."""
        try:
            return await fn(self.pool, *args, **kwargs)
        except CONNECTION_ERRORS as exc:
            log.debug("database unavailable, update skipped", error=str(exc))
            return None


def _log_first(exc: BaseException) -> None:
    log.warning("database unavailable, retrying", error=f"{type(exc).__name__}: {exc}",
                attempt=1)


def _log_retry(state: Any) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("database unavailable, retrying", error=f"{type(exc).__name__}: {exc}",
                attempt=state.attempt_number)

