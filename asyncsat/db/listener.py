"""LISTEN on a dedicated connection.

The connection is checked with `SELECT 1` after `ping` seconds of silence. When it is
lost, the listener reconnects with backoff, listens again and calls `on_reconnect` so that
the daemon re-scans: notifications sent meanwhile are not lost.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from asyncsat.db.pool import CONNECTION_ERRORS, connect
from asyncsat.errors import DatabaseError

CHANNEL = "asyncsat"
_LOST: tuple[type[BaseException], ...] = (DatabaseError, *CONNECTION_ERRORS)
log = structlog.get_logger("asyncsat.listener")


class Listener:
    """Calls `on_notify(payload)` for every NOTIFY on the asyncsat channel."""

    def __init__(
        self, dsn: str, on_notify: Callable[[dict[str, Any]], None],
        on_reconnect: Callable[[], None], *, ping: float = 10.0,
        revive: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`revive()`: called before each try to connect again (the embedded server, which
        the daemon starts again if it stopped)."""
        self._dsn = dsn
        self._revive = revive
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._ping = ping
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._activity = asyncio.Event()

    async def start(self) -> None:
        """Connect and LISTEN."""
        conn = await connect(self._dsn, name="asyncsat listener")
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(lambda _c: self._lost.set())
        self._conn = conn
        self._lost.clear()

    async def run(self) -> None:
        """Watch the connection forever (cancel to stop); reconnect when it is lost."""
        try:
            while True:
                await self._watch()
                log.warning("database connection lost, reconnecting")
                await self._close()
                await self._reconnect()
                log.info("database connection restored", rescan=True)
                self._on_reconnect()
        finally:
            await self._close()

    async def _watch(self) -> None:
        while True:
            self._activity.clear()
            lost = asyncio.ensure_future(self._lost.wait())
            active = asyncio.ensure_future(self._activity.wait())
            try:
                done, _ = await asyncio.wait({lost, active}, timeout=self._ping,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                active.cancel()
            if self._lost.is_set():
                return
            if not done:
                try:
                    await self._conn.fetchval("SELECT 1", timeout=min(5.0, self._ping))
                except _LOST:
                    return

    async def _reconnect(self) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_LOST),
            wait=wait_exponential(multiplier=0.2, max=10) + wait_random(0, 0.2),
        ):
            with attempt:
                if self._revive is not None:
                    try:
                        await self._revive()
                    except Exception as exc:  # (told; the connection is tried anyway)
                        log.warning("database not started again",
                                    error=exc.message if isinstance(exc, DatabaseError)
                                    else f"{type(exc).__name__}: {exc}")
                await self.start()

    async def aclose(self) -> None:
        """Close the connection of a listener that was started but will not run."""
        await self._close()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._activity.set()
        try:
            data = json.loads(payload) if payload else {}
        except ValueError:
            data = {}
        self._on_notify(data if isinstance(data, dict) else {})

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except CONNECTION_ERRORS:
                conn.terminate()
            except asyncio.CancelledError:
                conn.terminate()
                raise
