"""The composition root: database, listener, engine, drivers and signals, wired together.

Signals only set the stop event; the engine then stops claiming, cancels transfers
(each puts its row back in the queue, its `.part` kept) and returns.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import structlog

from asyncsat import sdnotify
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.embedded import ensure_server
from asyncsat.db.listener import DaemonLocked, Listener
from asyncsat.db.pool import apply_schema, connect, create_pool
from asyncsat.db.store import Store
from asyncsat.engine import Engine, ProgressSink, wait_any
from asyncsat.logs import Redactor
from asyncsat.metrics import Metrics, Recorder
from asyncsat.models import TERMINAL
from asyncsat.transfer.registry import Drivers

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger("asyncsat")


async def resolve_dsn(settings: Settings) -> str:
    """The configured DSN, else the embedded server's (started when needed)."""
    if settings.dsn:
        return settings.dsn
    return await asyncio.to_thread(ensure_server, settings.home)


@asynccontextmanager
async def connection(settings: Settings, *, init: bool = False) -> AsyncIterator[Any]:
    """One connection for a CLI command; the schema is applied to an empty database."""
    conn = await connect(await resolve_dsn(settings))
    try:
        await apply_schema(conn, always=init)
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def _signals(stop: asyncio.Event) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("stop requested", signal=sig.name)
    stop.set()


async def serve(
    settings: Settings, redactor: Redactor, *, exit_when_idle: bool = False,
    until: Callable[[], Awaitable[bool]] | None = None, sink: ProgressSink | None = None,
    metrics_at: tuple[str, int] | None = None,
) -> None:
    """Run the daemon until SIGTERM/SIGINT, a drained queue (`exit_when_idle`) or `until()`.

    With `metrics_at` (host, port), Prometheus metrics are served there meanwhile.
    Raises DaemonLocked when another daemon serves the same database.
    """
    dsn = await resolve_dsn(settings)
    redactor.add_dsn(dsn)
    pool = await create_pool(dsn)
    drivers = Drivers()
    served: web.AppRunner | None = None
    try:
        async with pool.acquire() as conn:
            await apply_schema(conn, always=False)
        metrics = Metrics() if metrics_at is not None else Recorder()
        engine = Engine(Store(pool), settings, drivers, redactor, sink=sink, metrics=metrics)
        metrics.watch_slots(engine.slot_figures)

        def reconnected() -> None:
            metrics.listener_reconnected()
            engine.rescan()

        listener = Listener(dsn, engine.notify, reconnected, ping=settings.listener_ping)
        await listener.start()
        if isinstance(metrics, Metrics) and metrics_at is not None:  # after the lock
            try:
                served = await metrics.serve(*metrics_at)
            except BaseException:
                await listener.aclose()
                raise
            log.info("metrics served", url=f"http://{_host(metrics_at[0])}:{metrics_at[1]}"
                     "/metrics")
        stop = asyncio.Event()
        log.info("daemon started", exit_when_idle=exit_when_idle, database=settings.database)
        systemd = sdnotify.from_env()
        systemd.send("READY=1")
        try:
            async with _signals(stop), asyncio.TaskGroup() as group:
                listening = group.create_task(listener.run(), name="listener")
                alive = group.create_task(systemd.keep_alive(), name="watchdog")
                try:
                    await engine.run(stop, exit_when_idle=exit_when_idle, until=until)
                finally:
                    systemd.send("STOPPING=1")
                    listening.cancel()
                    alive.cancel()
        except BaseExceptionGroup as group_error:
            # one side task failed and stopped the other: report the first cause
            raise group_error.exceptions[0] from None
        log.info("daemon stopped")
    finally:
        if served is not None:
            await served.cleanup()
        await drivers.aclose()
        await pool.close()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def wait_for_request(
    settings: Settings, request_id: int, *, tick: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """Wait until every download of a request is final (served by a running daemon);
    `tick()` meanwhile, every `progress_interval` seconds (to show progress)."""
    changed = asyncio.Event()
    conn = await connect(await resolve_dsn(settings))
    try:
        await conn.add_listener("asyncsat_status", lambda *_a: changed.set())
        while True:
            changed.clear()
            status, _error, counts = await queries.request_state(conn, request_id)
            if status != "queued" and not set(counts) - TERMINAL:
                return counts
            if tick is not None:
                await tick()
            # the timeout is a safety net for a lost notification, not the wake-up path
            await wait_any(changed, timeout=5.0 if tick is None else
                           min(5.0, settings.progress_interval))
    finally:
        with suppress(Exception):
            await conn.close()


__all__ = ["DaemonLocked", "connection", "serve", "wait_for_request"]
