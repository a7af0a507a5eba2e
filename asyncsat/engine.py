"""The engine: resolve requests, claim downloads into free slots, run and record transfers.

It knows the database only through `Store` + `queries` and the network only through the
transfer drivers. Signals, LISTEN and the pool are wired up by `daemon.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from asyncsat import intake
from asyncsat.auth.registry import Auths
from asyncsat.catalogs.registry import Catalogs
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.store import Store
from asyncsat.errors import (
    AuthError,
    DatabaseError,
    OfflineError,
    PermanentError,
    RetryableError,
    TransferError,
)
from asyncsat.logs import Redactor
from asyncsat.metrics import Recorder
from asyncsat.models import Download, Provider, Request
from asyncsat.progress import RateMeter, eta
from asyncsat.resolver import Resolver, settled
from asyncsat.retry import Policy, budget, decide, follow_settings, offline_delay
from asyncsat.slots import Lease, ProviderSlots, accounts_for
from asyncsat.transfer.base import Source, Validator
from asyncsat.transfer.registry import Drivers
from asyncsat.transfer.runner import Attempt, Job, Outcome, transfer

log = structlog.get_logger("asyncsat")
REQUEST_BATCH = 50


class ProgressSink(Protocol):
    """Receives progress for display (the CLI's progress bar)."""

    def progress(self, download_id: int, name: str, done: int, total: int | None) -> None: ...

    def finished(self, download_id: int, status: str) -> None: ...


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return when any event is set, or after `timeout` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Engine:
    """Runs downloads within each provider's connection slots."""

    def __init__(
        self, store: Store, settings: Settings, drivers: Drivers, redactor: Redactor,
        *, sink: ProgressSink | None = None, metrics: Recorder | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.drivers = drivers
        self.redactor = redactor
        self.sink = sink
        self.metrics = metrics or Recorder()
        self.wake = asyncio.Event()
        self._accounts_stale = True
        self._providers: dict[int, Provider] = {}
        self._slots: dict[int, ProviderSlots] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._running: dict[int, Download] = {}
        self.auths = Auths(redactor)
        self.catalogs = Catalogs(drivers)
        self.resolver = Resolver(store, settings, self.catalogs, self.auths, redactor,
                                 self._slots_for, self.wake, metrics=self.metrics)

    # -- wake-ups -----------------------------------------------------------------------------

    def notify(self, payload: dict[str, Any]) -> None:
        """A NOTIFY arrived (empty payload: re-scan everything)."""
        kind = payload.get("type")
        if kind in (None, "accounts"):
            self._accounts_stale = True
        if kind == "download" and payload.get("status") == "cancelled":
            task = self._tasks.get(int(payload.get("id", 0)))
            if task is not None:
                task.cancel("cancelled by user")
        if kind == "request" and payload.get("status") == "cancelled":
            self.resolver.cancel(int(payload.get("id", 0)))
        self.wake.set()

    def rescan(self) -> None:
        """After a lost database connection: everything may have changed."""
        self._accounts_stale = True
        self.wake.set()

    @property
    def running(self) -> int:
        return len(self._tasks)

    def slots(self, provider_id: int) -> ProviderSlots | None:
        return self._slots.get(provider_id)

    def slot_figures(self) -> list[tuple[str, int, int]]:
        """(provider, free slots, capacity) per provider, for the metrics."""
        return [(self._providers[i].name, s.free(), s.capacity)
                for i, s in self._slots.items() if i in self._providers]

    # -- the loop -----------------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event, *, exit_when_idle: bool = False,
        until: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Serve until `stop` is set, the queue is drained (`exit_when_idle`) or `until()`."""
        released = await self.store.call(queries.release_running)
        if released:
            log.info("interrupted downloads queued again", count=released)
        try:
            while not stop.is_set():
                self.wake.clear()
                if self._accounts_stale:
                    await self._refresh_accounts()
                more_requests = await self._resolve_requests()
                next_in, later = await self._dispatch()
                if until is not None and await until():
                    return
                # offline products and standing requests do not keep an idle run going
                if exit_when_idle and not self._tasks and next_in is None and \
                        not more_requests and not self.resolver.busy and await self._drained():
                    log.info("queue drained")
                    return
                if more_requests:
                    continue
                follow_in = await self.store.call(queries.next_request_due)
                timeout = min((t for t in (next_in, later, follow_in) if t is not None),
                              default=None)
                await wait_any(self.wake, stop, timeout=timeout)
        finally:
            await self._stop_transfers()
            await self.catalogs.aclose()
            await self.auths.aclose()

    async def _drained(self) -> bool:
        return not await self.store.call(queries.pending_work)

    async def _refresh_accounts(self) -> None:
        self._accounts_stale = False
        for provider, credentials in await self.store.call(queries.accounts):
            known = self._providers.get(provider.id)
            if provider.paused != (known.paused if known else False):
                # the claim leaves a paused provider's rows alone; running transfers finish
                log.info("provider paused" if provider.paused else "provider resumed",
                         provider=provider.name,
                         running=sum(1 for d in self._running.values()
                                     if d.provider_id == provider.id))
            self._providers[provider.id] = provider
            accounts = accounts_for(provider, credentials)
            for account in accounts:
                self.redactor.add_login(account.user, account.secret)
            slots = self._slots.get(provider.id)
            capacity = sum(a.limit for a in accounts)
            if slots is None:
                self._slots[provider.id] = ProviderSlots(accounts)
            else:
                slots.resize(accounts)
            log.debug("provider slots", provider=provider.name, capacity=capacity)

    async def _resolve_requests(self) -> bool:
        """Turn queued requests into downloads. True when more may be waiting."""

        by_catalog: list[Request] = []
        resolved: list[tuple[int, intake.Asked]] = []

        async def batch(conn: Any) -> int:
            by_catalog.clear()
            resolved.clear()
            requests = await queries.request_lock_queued(conn, REQUEST_BATCH,
                                                         self.resolver.busy)
            for request in requests:
                if intake.needs_catalog(request):
                    by_catalog.append(request)  # over the network, outside this transaction
                    continue
                status, error, asked = await self._resolve_one(conn, request)
                if status == "failed":
                    log.error("request failed", request_id=request.id, error=error)
                else:
                    log.info("request resolved", request_id=request.id,
                             downloads=len(asked.ids), **asked.counts())
                    resolved.append((request.id, asked))
            return len(requests)

        n = await self.store.transaction(batch)
        for request_id, asked in resolved:
            await settled(asked, request_id)
        for request in by_catalog:
            self.resolver.start(request)
        if n:
            self._accounts_stale = True  # an implicit provider may have been created
            await self._refresh_accounts()
        return n >= REQUEST_BATCH

    async def _resolve_one(self, conn: Any, request: Request) -> \
            tuple[str, str | None, intake.Asked]:
        """Resolve one request in a savepoint: a request that breaks a statement (or trips a
        bug) fails alone, with its reason, instead of taking the daemon down at every start."""
        try:
            async with conn.transaction():
                return await intake.resolve(conn, request, self.settings.default_dest)
        except DatabaseError:
            raise
        except Exception as exc:
            log.exception("request could not be resolved", request_id=request.id)
            error = _one_line(self.redactor(f"cannot queue this request: {exc}"))
            return await intake.fail(conn, request, error)

    async def _slots_for(self, provider_id: int) -> ProviderSlots:
        """The slots of a provider, reading the accounts again for a provider new to us."""
        if provider_id not in self._slots:
            await self._refresh_accounts()
        slots = self._slots.get(provider_id)
        if slots is None:
            raise DatabaseError(f"provider {provider_id} disappeared")
        return slots

    async def _dispatch(self) -> tuple[float | None, float | None]:
        """Claim due downloads into free slots. Seconds until the next queued download is
        due, and until the next offline one is to be looked at again (None: none)."""
        next_in: float | None = None
        later: float | None = None
        for provider_id, due, wait, offline_wait in \
                await self.store.call(queries.queued_providers):
            if wait is not None:
                next_in = wait if next_in is None else min(next_in, wait)
            if offline_wait is not None:
                later = offline_wait if later is None else min(later, offline_wait)
            slots = self._slots.get(provider_id)
            if slots is None:
                await self._refresh_accounts()
                slots = self._slots.get(provider_id)
            if not due or slots is None:
                continue
            # the slots first, without waiting: a listing may take one meanwhile, and this
            # loop must never block on a slot (it also watches for stops and wake-ups)
            leases: list[Lease] = []
            wanted = min(due, slots.free())
            while len(leases) < wanted:
                lease = await slots.try_acquire()
                if lease is None:
                    break
                leases.append(lease)
            if not leases:
                continue
            try:
                claimed = await self.store.call(queries.claim, provider_id, len(leases),
                                                str(self.settings.default_dest))
            except DatabaseError:
                raise
            except Exception:  # one bad row must not stop every provider
                log.exception("claim failed", provider_id=provider_id)
                claimed = []
            for download, lease in zip(claimed, leases, strict=False):
                task = asyncio.create_task(self._run_one(download, lease),
                                           name=f"download-{download.id}")
                self._tasks[download.id] = task
                self._running[download.id] = download
            for lease in leases[len(claimed):]:
                lease.release()
        return next_in, later

    async def _stop_transfers(self) -> None:
        """Cancel running transfers; each puts its row back in the queue, resumable."""
        await self.resolver.stop()
        tasks = list(self._tasks.values())
        if not tasks:
            return
        log.info("stopping transfers", count=len(tasks))
        for task in tasks:
            task.cancel()
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout)
        if pending:
            log.warning("transfers did not stop in time", count=len(pending))

    # -- one transfer -------------------------------------------------------------------------

    async def _run_one(self, d: Download, lease: Lease) -> None:
        bound = log.bind(download_id=d.id, request_id=d.request_id, provider=d.provider)
        provider = self._providers[d.provider_id]
        if d.login_user:  # the download's own login (a URL's userinfo)
            auth = self.auths.for_account(provider, f"login:{d.login_user}", d.login_user,
                                          d.login_secret)
        else:
            auth = self.auths.for_account(provider, lease.account.key, lease.account.user,
                                          lease.account.secret)
        folder = Path(d.dest or self.settings.default_dest) / d.provider
        attempt = Attempt(start_size=d.bytes_done, size=d.bytes_done)
        events = _RowEvents(self, d, bound)
        if d.claimed_from == "offline":
            bound.info("offline download looked at", checks=d.offline_checks)
        else:
            bound.info("download running", url=d.url, attempt=d.attempts,
                       **({"user": auth.user} if auth.user else {}))
        self.metrics.transfer_started(d.provider)
        try:
            with structlog.contextvars.bound_contextvars(
                    download_id=d.id, request_id=d.request_id, provider=d.provider):
                source = Source(d.url, auth)
                if d.product_id is not None and self.catalogs.prepares(provider):
                    source = await self.catalogs.for_provider(provider).prepare(d, auth)
                if provider.settings.get("allow_insecure_redirects") is True:
                    source = replace(source, allow_insecure_redirects=True)
                if d.claimed_from == "offline":
                    bound.info("download running", url=source.url, attempt=d.attempts,
                               reason="online again")
                job = Job(source, folder, d.name, d.size, d.checksum,
                          Validator(d.etag, d.last_modified), fallback_name=f"download-{d.id}",
                          size_from_server=d.size_from_server)
                outcome = await transfer(self.drivers.for_url(source.url), job, events, attempt,
                                         self.settings.chunk_size)
        except asyncio.CancelledError:
            await asyncio.shield(self._after_stop(d, attempt, bound))
            raise
        except TransferError as exc:
            refused = None
            if isinstance(exc, AuthError):  # name the login the server refused
                refused = repr(auth.user) if auth.user else "anonymous"
                bound = bound.bind(user=auth.user or "anonymous")
            await asyncio.shield(self._after_failure(d, provider, exc, attempt, bound,
                                                     refused=refused))
        except Exception as exc:  # a bug must not lose the row: retry it within the budget
            bound.exception("internal error in transfer")
            error = RetryableError(f"internal error: {type(exc).__name__}: {exc}")
            await asyncio.shield(self._after_failure(d, provider, error, attempt, bound))
        else:
            # the file is at its final path: record it even if a stop arrives meanwhile
            recording = asyncio.ensure_future(self._record_done(d, outcome, bound))
            cancelled = False
            while not recording.done():
                try:
                    await asyncio.shield(recording)
                except asyncio.CancelledError:
                    cancelled = True  # a second stop must not cut the recording either
            recording.result()
            if cancelled:
                raise asyncio.CancelledError
        finally:
            self.metrics.transfer_ended(d.provider)
            lease.release()
            self._tasks.pop(d.id, None)
            self._running.pop(d.id, None)
            self.wake.set()

    async def _record_done(self, d: Download, outcome: Outcome, bound: Any) -> None:
        await self.store.call(queries.download_done, d.id, size=outcome.size,
                              path=str(outcome.path))
        bound.info("download done", name=outcome.name, path=str(outcome.path),
                   size=outcome.size, resumed_from=outcome.resumed_from,
                   restarted=outcome.restarted)
        await self._place_copies(d, outcome, bound)
        self._finished(d, "done")

    async def _place_copies(self, d: Download, outcome: Outcome, bound: Any) -> None:
        """Put the file into the folders other requests asked for (a product is fetched
        once, into the folder of the request that queued it)."""
        owed = await self.store.call(queries.copies_owed, d.id)
        if not owed:
            return
        links = [intake.Link(d.id, outcome.path, Path(dest) / d.provider / outcome.name)
                 for _request_id, dest in owed]
        for (request_id, _dest), (link, how) in zip(
                owed, await asyncio.to_thread(intake.deliver, links), strict=True):
            report = bound.info if how in ("linked", "copied", "there") else bound.error
            report("download put in place", path=str(link.target), how=how,
                   for_request=request_id)
        await self.store.call(queries.copies_made, d.id)

    async def _after_stop(self, d: Download, attempt: Attempt, bound: Any) -> None:
        on_disk = attempt.on_disk()  # not the last progress write: what the .part holds
        status = await self.store.call(queries.download_stopped, d.id, error=d.error,
                                       failures=d.failures, bytes_done=on_disk)
        if status is None:  # its provider was removed (`provider remove --force`)
            bound.info("download removed", bytes_done=on_disk)
        elif status == "cancelled":
            bound.info("download cancelled", bytes_done=on_disk)
        else:
            bound.info("download queued", reason="stopped", bytes_done=on_disk)
        self._finished(d, status or "queued")

    async def _after_failure(
        self, d: Download, provider: Provider, exc: TransferError, attempt: Attempt, bound: Any,
        *, refused: str | None = None,
    ) -> None:
        policy = Policy.for_provider(provider)
        decision = decide(exc, d.failures, attempt.progressed, policy)
        error = _one_line(self.redactor(exc.message))
        if isinstance(exc, OfflineError):
            delay = offline_delay(d.offline_checks, follow_settings(provider), exc.retry_after)
            await self.store.call(queries.download_offline, d.id, error=error, delay=delay,
                                  bytes_done=attempt.size)
            bound.info("download offline", error=error, look_again_in=round(delay, 1))
            self._finished(d, "offline")
            return
        if refused and refused.strip("'") not in error:
            error = _one_line(self.redactor(f"{error} (login: {refused})"))
        told = budget(decision, exc, attempt.progressed, policy)
        if decision.action == "retry":
            await self.store.call(queries.download_requeue, d.id, error=error,
                                  failures=decision.failures, bytes_done=attempt.size,
                                  delay=decision.delay)
            bound.warning("download queued", reason="retry", error=error,
                          retry_in=round(decision.delay, 2), attempt=d.attempts, budget=told,
                          bytes_done=attempt.size)
            self.metrics.retried(d.provider, exc)
            return
        await self.store.call(queries.download_end, d.id, status="failed", error=error,
                              failures=decision.failures, bytes_done=attempt.size)
        bound.error("download failed", error=error, attempts=d.attempts, budget=told)
        self._finished(d, "failed")

    def _finished(self, d: Download, status: str) -> None:
        if status != "queued":  # a stop puts it back: not an end
            self.metrics.download_ended(d.provider, status)
        if self.sink is not None:
            self.sink.finished(d.id, status)


def _unique_name(name: str, download_id: int) -> str:
    """`TCI.tif` -> `TCI_17.tif`: for a product whose name another download owns."""
    path = Path(name)
    return f"{path.stem}_{download_id}{path.suffix}"


def _one_line(text: str, limit: int = 1000) -> str:
    """An error fit for a log line and a text column: printable, one line, bounded."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


class _RowEvents:
    """Transfer events recorded in the download row (progress throttled)."""

    def __init__(self, engine: Engine, download: Download, bound: Any) -> None:
        self._engine = engine
        self._download = download
        self._bound = bound
        self._name = download.name or ""
        self._last = 0.0
        self._on_disk = download.bytes_done
        started = time.monotonic()
        self._meter = RateMeter()
        self._meter.add(started, download.bytes_done)
        self._logged = (started, download.bytes_done)

    async def named(self, name: str, size: int | None, validator: Validator) -> str:
        for candidate in (name, _unique_name(name, self._download.id)):
            if await self._engine.store.call(
                    queries.download_named, self._download.id, name=candidate, size=size,
                    etag=validator.etag, last_modified=validator.last_modified):
                self._name = candidate
                return candidate
        raise PermanentError(f"another download already writes {name!r}")

    async def progress(self, done: int, total: int | None) -> None:
        # bytes written since the last call; a file that starts again from zero counts anew
        grown = done - self._on_disk if done >= self._on_disk else done
        self._on_disk = done
        self._engine.metrics.downloaded(self._download.provider, grown)
        now = time.monotonic()
        if now - self._last < self._engine.settings.progress_interval:
            return
        self._last = now
        rate = self._meter.add(now, done)
        if self._engine.sink is not None:
            self._engine.sink.progress(self._download.id, self._name, done, total)
        self._log(now, done, total)
        await self._engine.store.try_call(queries.download_progress, self._download.id, done,
                                          rate)

    def _log(self, now: float, done: int, total: int | None) -> None:
        """A `download progress` line every `progress_log_interval` seconds of a transfer:
        bytes, the rate since the last line, and the time left at that rate."""
        every = self._engine.settings.progress_log_interval
        since, before = self._logged
        if not every or now - since < every:
            return
        self._logged = (now, done)
        rate = max(0.0, (done - before) / (now - since)) if done >= before else 0.0
        left = total - done if total is not None else None
        self._bound.info(
            "download progress", bytes_done=done, size=total,
            percent=round(100 * done / total, 1) if total else None, rate=int(rate),
            eta=None if (t := eta(left, rate)) is None else round(t))
