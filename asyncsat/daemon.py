"""The composition root: database, listener, engine, drivers and signals, wired together.

Signals only set the stop event; the engine then stops claiming, cancels transfers
(each puts its row back in the queue, its `.part` kept) and returns.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from asyncsat import __version__, sdnotify
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.embedded import ensure_server, revive
from asyncsat.db.listener import Listener
from asyncsat.db.pool import (
    CONNECTION_ERRORS,
    alive,
    apply_schema,
    check_schema,
    connect,
    create_pool,
)
from asyncsat.db.store import Store
from asyncsat.errors import DatabaseUnavailable
from asyncsat.logs import Redactor
from asyncsat.metrics import Metrics, Recorder
from asyncsat.models import TERMINAL
from asyncsat.tasks import wait_any

if TYPE_CHECKING:
    from aiohttp import web

    from asyncsat.engine import Engine, ProgressSink

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
    """
    stop = asyncio.Event()
    async with _signals(stop):  # from the start: systemd may stop a daemon still starting
        await _serve(settings, redactor, stop, exit_when_idle=exit_when_idle, until=until,
                     sink=sink, metrics_at=metrics_at)


async def _serve(
    settings: Settings, redactor: Redactor, stop: asyncio.Event, *, exit_when_idle: bool,
    until: Callable[[], Awaitable[bool]] | None, sink: ProgressSink | None,
    metrics_at: tuple[str, int] | None,
) -> None:
    systemd = sdnotify.from_env()
    dsn = await resolve_dsn(settings)
    redactor.add_dsn(dsn)
    # an external server may come up later; the embedded one is ours, and up by now
    patient = settings.dsn is not None and until is None and not exit_when_idle
    pool = await _open_pool(dsn, systemd, stop, patient=patient,
                            lease_timeout=settings.lease_timeout)
    if pool is None:
        log.info("daemon stopped")
        return
    # (here, not at the top: the other commands need no HTTP client, no engine)
    from asyncsat.engine import Engine
    from asyncsat.transfer.registry import Drivers

    drivers = Drivers()
    served: web.AppRunner | None = None
    try:
        async with pool.acquire() as conn:
            await check_schema(conn)  # (a schema of an earlier release lacks functions)
        store = Store(pool)
        me = await _register(store, settings)
        metrics = Metrics() if metrics_at is not None else Recorder()
        engine = Engine(store, settings, drivers, redactor, owner=me, sink=sink,
                        metrics=metrics)
        metrics.watch_slots(engine.slot_figures)

        def reconnected() -> None:
            metrics.listener_reconnected()
            engine.rescan()

        listener = Listener(dsn, engine.notify, reconnected, ping=settings.listener_ping,
                            revive=None if settings.dsn else
                            lambda: _alone(lambda: revive(settings.home), REVIVE_MOST))
        await listener.start()
        if isinstance(metrics, Metrics) and metrics_at is not None:  # after the lock
            try:
                served = await metrics.serve(*metrics_at)
            except BaseException:
                await listener.aclose()
                raise
            log.info("metrics served", url=f"http://{_host(metrics_at[0])}:{metrics_at[1]}"
                     "/metrics")
        log.info("daemon started", exit_when_idle=exit_when_idle, database=settings.database,
                 daemon_id=me)
        try:
            async with asyncio.TaskGroup() as group:
                listening = group.create_task(listener.run(), name="listener")
                alive = group.create_task(systemd.keep_alive(), name="watchdog")
                # only now that SIGTERM sets `stop`: systemd may stop us as soon as it reads it
                systemd.send("READY=1")
                reporting = group.create_task(systemd.report(
                    lambda: _queue_status(store), settings.status_interval), name="status")
                ended = asyncio.Event()
                renewing = group.create_task(engine.keep_leases(ended), name="leases")
                watching = group.create_task(
                    _watch_host(store, engine, me, settings.lease_timeout / 3), name="host")
                try:
                    await engine.run(stop, exit_when_idle=exit_when_idle, until=until)
                finally:
                    systemd.send("STOPPING=1")
                    ended.set()
                    listening.cancel()
                    alive.cancel()
                    reporting.cancel()
                    renewing.cancel()
                    watching.cancel()
            # the transfers are parked: this daemon's slots are free for the others now
            await store.try_call(queries.daemon_gone, me)
            await store.try_call(queries.request_resolved_by, me)
        except BaseExceptionGroup as group_error:
            # one side task failed and stopped the other: report the first cause
            raise group_error.exceptions[0] from None
        log.info("daemon stopped")
    finally:
        if served is not None:
            await served.cleanup()
        await drivers.aclose()
        await pool.close()


async def _register(store: Store, settings: Settings) -> str:
    """Enter this daemon in the daemon table, after clearing the ones of this host whose
    process is gone (a crash, a SIGKILL): their downloads are taken over at once instead
    of after `lease_timeout`."""
    host, here = socket.gethostname(), machine()
    await _clear_gone(store, host, here)
    me = uuid.uuid4().hex[:16]
    await store.call(queries.daemon_register, me, host=host, pid=os.getpid(),
                     version=__version__, lease_timeout=settings.lease_timeout, machine=here)
    return me


async def _clear_gone(store: Store, host: str, here: str, me: str | None = None) -> int:
    """End the daemons of this host (and pid namespace) whose process is gone: their leases
    end and their downloads may be taken over at once. How many there were."""
    gone = 0
    for other, pid in await store.call(queries.daemons_on_host, host, here):
        if other != me and not process_alive(pid):
            left = await store.call(queries.daemon_gone, other)
            await store.call(queries.request_resolved_by, other)
            log.info("a daemon of this host is gone: its downloads are taken over",
                     daemon_id=other, pid=pid, downloads=left)
            gone += 1
    return gone


async def _watch_host(store: Store, engine: Engine, me: str, every: float) -> None:
    """Look for daemons of this host that died while this one runs (a SIGKILL, the OOM
    killer), every `every` seconds: their downloads are taken over then, not only once
    their leases lapse. (A daemon paused by SIGSTOP still has a process: its leases lapse.)"""
    host, here = socket.gethostname(), machine()
    while True:
        await asyncio.sleep(every)
        try:
            if await _clear_gone(store, host, here, me):
                engine.rescan()
        except Exception as exc:  # (the database away: the next look, or the leases)
            log.warning("the daemons of this host were not looked at",
                        error=f"{type(exc).__name__}: {exc}")


def machine() -> str:
    """This boot of this machine and this pid namespace: where a pid names one process
    (containers sharing a host name have their own namespaces)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        space = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}/{space}"


def process_alive(pid: int) -> bool:
    """Whether a process of this host runs (for a daemon row of this host)."""
    if pid == os.getpid():
        return False  # a process of an earlier life of ours (a container restarted)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a killed process nobody reaped yet (a container's init may not) is dead too
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _open_pool(
    dsn: str, systemd: sdnotify.Notifier, stop: asyncio.Event, *, patient: bool,
    lease_timeout: float,
) -> Any | None:
    """The pool, once the database answers; None when stopped before.

    With `patient`, a server that cannot be reached or is starting up is waited for (a
    service started before its database, a database restarted meanwhile), and systemd is
    asked for more time to start; otherwise, and for a refusal, DatabaseError.
    """
    delay = 1.0
    while True:
        try:
            return await create_pool(dsn, idle_in_transaction=lease_timeout)
        except DatabaseUnavailable as exc:
            if not patient:
                raise
            log.warning("database not ready, waiting", error=exc.message, retry_in=delay)
            # until the next message: this wait, then at most one connection timeout (10 s)
            systemd.extend_timeout(delay + 15, "waiting for the database")
        await wait_any(stop, timeout=delay)
        if stop.is_set():
            return None
        delay = min(delay * 2, 10.0)


async def _queue_status(store: Store) -> str | None:
    """`3 running, 12 queued, 40 done` (and failed, offline); None if the database is away."""
    counts = await store.try_call(queries.download_counts)
    if counts is None:
        return None
    figures = [f"{counts.get(status, 0)} {status}" for status in ("running", "queued", "done")]
    figures += [f"{counts[status]} {status}" for status in ("failed", "offline")
                if counts.get(status)]
    return ", ".join(figures)


REVIVE_MOST = 60.0
"""Seconds a start of the embedded server is waited for (the wheel may wait for ever)."""
_reviving: threading.Thread | None = None


async def _alone(step: Callable[[], None], timeout: float) -> None:
    """A blocking step on a thread of its own, one at a time, waited for `timeout` seconds
    at most (a daemon thread: one stuck never holds the daemon's exit up)."""
    global _reviving
    if _reviving is not None and _reviving.is_alive():
        raise TimeoutError("the last start of the embedded server has not ended")
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not ended.done():
            if error is None:
                ended.set_result(None)
            else:
                ended.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            step()
        except BaseException as exc:
            error = exc
        with suppress(RuntimeError):  # (the loop closed meanwhile)
            loop.call_soon_threadsafe(settle, error)

    _reviving = threading.Thread(target=run, name="revive", daemon=True)
    _reviving.start()
    await asyncio.wait_for(asyncio.shield(ended), timeout)


ALONE_GRACE = 3.0
"""Seconds `get --wait` sees no daemon before it does the work itself: a daemon restarted
(`systemctl restart`) is back within them."""
LOOK_GAP = 0.05
"""Seconds at least between two looks of `get --wait` at its request while a daemon works
it: every download's change sends a NOTIFY (hundreds a second with small files), and each
look is a query the daemon's own statements wait behind."""


async def wait_for_request(
    settings: Settings, request_id: int, *,
    tick: Callable[[Any], Awaitable[None]] | None = None,
    note: Callable[[str], None] | None = None,
    served: Callable[[Any], Awaitable[bool]] | None = None,
) -> bool:
    """Wait until every download of a request is final (served by a running daemon):
    True; or, with `served(connection)`, False once it has said for `ALONE_GRACE` seconds
    that no daemon serves the database any more (asked once a second: the caller may do
    the work itself; a daemon restarted meanwhile is waited for).
    `tick(connection)` meanwhile, every `progress_interval` seconds (to show progress). A
    database that goes away (restarted, out of reach) is waited for, as the daemons wait
    for it, and `note(text)` tells why and when it is back; one that refuses (a login, a
    database gone) ends the wait with DatabaseError."""
    dsn = await resolve_dsn(settings)
    told: str | None = None

    def tell(text: str) -> None:
        nonlocal told
        if note is not None and text != told:
            note(text)
        told = text

    while True:
        try:
            conn = await connect(dsn)
        except DatabaseUnavailable as exc:
            tell(f"the database is out of reach ({exc.message}): waiting for it")
            await asyncio.sleep(1.0)
            continue
        try:
            if told is not None:
                tell("the database is back")
            return await _watch_request(conn, settings, request_id, tick, served)
        except CONNECTION_ERRORS as exc:
            if await alive(conn):  # (an error of the client's on a live connection)
                raise
            tell(f"the database went away ({type(exc).__name__}: {exc}): waiting for it")
            await asyncio.sleep(1.0)
        finally:
            with suppress(Exception):
                await conn.close()


async def _watch_request(conn: Any, settings: Settings, request_id: int,
                         tick: Callable[[Any], Awaitable[None]] | None,
                         served: Callable[[Any], Awaitable[bool]] | None) -> bool:
    changed = asyncio.Event()
    await conn.add_listener("asyncsat_status", lambda *_a: changed.set())
    ticked = asked = float("-inf")
    alone: float | None = None
    """Since when no daemon has served the database."""
    while True:
        changed.clear()
        looked = time.monotonic()
        if await queries.request_settled(conn, request_id, sorted(TERMINAL)):
            return True
        if served is not None and looked - asked >= 0.9:  # (about once a second)
            asked = looked
            if await served(conn):
                alone = None
            elif alone is None:
                alone = looked
            elif looked - alone >= ALONE_GRACE:
                return False
        if tick is not None and looked - ticked >= settings.progress_interval:
            await tick(conn)
            ticked = time.monotonic()  # (a slow one does not make the next one sooner)
        # the timeout is a safety net for a lost notification, not the wake-up path
        await wait_any(changed, timeout=5.0 if tick is None else
                       min(5.0, max(0.0, ticked + settings.progress_interval -
                                    time.monotonic())))
        await asyncio.sleep(max(0.0, looked + LOOK_GAP - time.monotonic()))


__all__ = ["connection", "serve", "wait_for_request"]
