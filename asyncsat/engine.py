"""The engine: resolve requests, claim downloads into free slots, run and record transfers.

It knows the database only through `Store` + `queries` and the network only through the
transfer drivers. Signals, LISTEN and the pool are wired up by `daemon.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

from asyncsat import intake
from asyncsat.archive import Archive
from asyncsat.auth.base import ANONYMOUS, Auth
from asyncsat.auth.hosts import sends_login
from asyncsat.auth.registry import Auths
from asyncsat.batcher import Batcher
from asyncsat.catalogs.registry import Catalogs
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import CONFLICT_ERRORS
from asyncsat.db.queries import Fence
from asyncsat.db.store import Store
from asyncsat.errors import (
    AuthError,
    DatabaseError,
    LeaseLost,
    OfflineError,
    PermanentError,
    RetryableError,
    TransferError,
    VerificationError,
)
from asyncsat.leases import Accounts, Lease, Leases, Renewal
from asyncsat.logs import Redactor
from asyncsat.metrics import Recorder
from asyncsat.models import Download, Provider, Request
from asyncsat.naming import unique_name
from asyncsat.progress import RateMeter, eta
from asyncsat.resolver import Resolver, settled
from asyncsat.retry import Policy, budget, decide
from asyncsat.tasks import run_to_end, wait_any
from asyncsat.transfer.base import Source, Validator
from asyncsat.transfer.registry import Drivers
from asyncsat.transfer.runner import Attempt, Job, Naming, Outcome, transfer

log = structlog.get_logger("asyncsat")
REQUEST_BATCH = 50
REQUESTS_RECHECK = 60.0
"""Seconds after which the requests are looked at even if nothing said one waits."""
CLAIM_AGAIN = 5.0
"""Seconds after a failed claim (the database's disk full, a bad row) before the provider's
rows are claimed again: not at the next requests' recheck, a minute later."""
UNTIL_EVERY = 1.0
"""Seconds between two looks at what `get --wait` waits for, while transfers run here."""
DONE_WINDOW = 0.005
"""Seconds a finished file waits for others to be recorded done with it (its slot went on
to the next file already). 2,000 files of 64 KiB end about every millisecond."""
DONE_MOST = 100
"""Files recorded done in one statement at most."""
RUN = 16
"""Rows a slot claims at once after a small file (held whole), at most: the next one and up
to `RUN - 1` after it, taken in turn over its one connection (one hand-over statement for
them, not one each; small files come in runs). A run is as long as the pace of the file
that claims it fits in half of `RUN_WAIT` (`run_more`). 3,000 files of 64 KiB, against
runs of 4: 9 % less wall time, 22 % less CPU of PostgreSQL (A/B, 5 runs each)."""
RUN_WAIT = 1.0
"""Seconds a row claimed in a run waits for its turn at most, counted from the hand-over that
claimed the run (the rows before it in the run share them: one of them is slower than a
small file): it then goes back to the queue for any free slot, due now (behind the rows due
before it), its attempt unused."""


def run_more(took: float) -> int:
    """Rows a slot claims after its next one, when its last file took `took` seconds (from
    its request to its body in): as many as that pace takes in turn within half of
    `RUN_WAIT`, `RUN - 1` at most. (Slower files in a run as long as the fastest's would
    wait past `RUN_WAIT` and go back unused: two statements each, for nothing.)"""
    fits = int(RUN_WAIT / 2 / max(took, 1e-6)) - 1
    return max(0, min(RUN - 1, fits))


class ProgressSink(Protocol):
    """Receives progress for display (the CLI's progress bar)."""

    def progress(self, download_id: int, name: str, done: int, total: int | None) -> None: ...

    def finished(self, download_id: int, status: str) -> None: ...


class Engine:
    """Runs downloads within each provider's connection slots."""

    def __init__(
        self, store: Store, settings: Settings, drivers: Drivers, redactor: Redactor,
        *, owner: str, sink: ProgressSink | None = None, metrics: Recorder | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.drivers = drivers
        self.redactor = redactor
        self.sink = sink
        self.metrics = metrics or Recorder()
        self.wake = asyncio.Event()
        self._accounts_stale = True
        self.owner = owner
        """This daemon's id: the owner of the rows it claims."""
        self._providers: dict[int, Provider] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._lost: set[int] = set()
        self._ended: set[int] = set()
        """Transfers whose outcome is recorded (their row is no longer `running`)."""
        self._recording: set[int] = set()
        """Transfers whose file is at its final path, being recorded done (a heartbeat that
        commits meanwhile no longer finds them owned: no lease lost)."""
        self._running: dict[int, Download] = {}
        self.accounts = Accounts(redactor)
        self.slot_freed = asyncio.Event()
        self.leases = Leases(store, self.accounts, owner, settings.lease_timeout,
                             self.slot_freed)
        self.auths = Auths(redactor)
        self.catalogs = Catalogs(drivers)
        self.archive = Archive(store, self.catalogs)
        self.resolver = Resolver(store, settings, self.catalogs, self.auths, redactor,
                                 self._lease_for, self.leases.release, self.requests_changed,
                                 owner=owner, metrics=self.metrics)
        self._requests_due = True
        """Requests may wait to be resolved: looked at only then, not at every turn (a turn
        follows every transfer's end)."""
        self._follow_in: float | None = None
        self._until_at = 0.0
        self._stopping = False
        self._orphans: set[int] = set()
        """Rows owned with no transfer at the last heartbeat (`_put_back_orphans`)."""
        self._unsent: dict[int, _GiveBack] = {}
        """Give-backs of unused attempts that met a lost connection, per row: sent again
        after the next heartbeat (`_give_backs_again`)."""
        self._requests_at = 0.0
        """When the requests are looked at again at the latest (a safety net: a request
        whose resolving transaction another daemon rolled back sends no NOTIFY)."""
        self._done: Batcher[queries.Done, list[tuple[int, str]] | None] = Batcher(
            lambda done: self.store.call(queries.downloads_done, done),
            window=DONE_WINDOW, most=DONE_MOST)
        """Files at their final path, recorded done together (one statement for the files
        that end within `DONE_WINDOW` of each other)."""
        self._runs_end: dict[int, asyncio.Future[str]] = {}
        """Per provider: told (with the reason) when the rows of its runs that have not
        started are to go back unused, the provider paused or an account's cap lowered
        since their hand-over was sent (a claim would not take them now). Each run holds
        the one of its hand-over's moment; a new one is made after it is told."""
        self._seals: Batcher[queries.Seal, queries.Sealed] = Batcher(
            lambda seals: self.store.call(queries.downloads_sealed, seals),
            window=DONE_WINDOW, most=DONE_MOST)
        """Bodies in of rows of runs that hand no slot over, sealed together (their slots
        went on to the next rows already: nothing waits for the statement but the file)."""

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
        if kind in (None, "request"):
            self._requests_due = True
        if kind in (None, "slot"):  # a lease ended, here or in another daemon
            self.slot_freed.set()
        self.wake.set()

    def rescan(self) -> None:
        """After a lost database connection: everything may have changed."""
        self._accounts_stale = True
        self._requests_due = True
        self.wake.set()

    def requests_changed(self) -> None:
        """A request's search ended here: look at the requests again."""
        self._requests_due = True
        self.wake.set()

    @property
    def running(self) -> int:
        return len(self._tasks)

    def slot_figures(self) -> list[tuple[str, int, int]]:
        """(provider, slots this daemon does not hold, capacity) per provider, for the
        metrics (other daemons' leases are theirs to report)."""
        return [(p.name, max(0, self.accounts.capacity(i) - self.leases.held.get(i, 0)),
                 self.accounts.capacity(i)) for i, p in self._providers.items()]

    async def keep_leases(self, stop: asyncio.Event) -> None:
        """Renew this daemon's leases every third of `lease_timeout`. A download whose
        lease another daemon took over meanwhile (this one was paused, or cut from the
        database) is stopped here: its writes would be refused anyway."""
        renewal = Renewal(self.settings.lease_timeout, time.monotonic())
        while not stop.is_set():
            await wait_any(stop, timeout=renewal.wait(time.monotonic()))
            if stop.is_set():
                return
            # only the transfers claimed before this heartbeat: a claim committed while it
            # runs is not in its answer
            # (each with its task: a row given back meanwhile and claimed again by this
            # daemon is another transfer's, which this heartbeat's answer does not know)
            working = {i: t for i, t in self._tasks.items()
                       if i not in self._ended and i not in self._recording}
            sent = time.monotonic()
            try:
                async with asyncio.timeout(renewal.wait(sent)):
                    owned = await self.store.try_call(queries.heartbeat, self.owner,
                                                      self.settings.lease_timeout)
            except TimeoutError:
                owned = None
            if owned is None:  # the database is away: writes are fenced, but connections
                # are not; they end before the leases lapse and another daemon opens its own
                if renewal.lapsing(time.monotonic()):
                    self._let_go(set(working))
                continue
            renewal.renewed(sent)
            await self._give_backs_again()
            await self.leases.release_again()
            await self._renew_requests(renewal)
            await self._put_back_orphans(owned)
            await self._put_back_strays()
            for download_id in working.keys() - owned - self._ended:
                task = self._tasks.get(download_id)
                # (one let go meanwhile is stopping already)
                if task is working[download_id] and not task.done() and \
                        not task.cancelling():
                    log.warning("lease lost: the download is let go", download_id=download_id)
                    self._lost.add(download_id)
                    task.cancel("lease lost")

    async def _renew_requests(self, renewal: Renewal) -> None:
        """Renew the marks of the requests this daemon resolves now; within the heartbeat's
        time, and never at the cost of the heartbeat (a row locked by someone else, an
        error: the mark is renewed at the next one, or lapses)."""
        busy = self.resolver.resolving
        if not busy:
            return
        try:
            async with asyncio.timeout(renewal.wait(time.monotonic())):
                await self.store.try_call(queries.request_resolving_renew, self.owner, busy,
                                          self.settings.lease_timeout)
        except Exception as exc:  # (TimeoutError, a deadlock, ...)
            log.warning("the requests being resolved were not renewed",
                        error=f"{type(exc).__name__}: {exc}", request_ids=busy)

    async def _put_back_orphans(self, owned: set[int]) -> None:
        """Rows this daemon owns in the database that no transfer of it works, at two
        heartbeats in a row (one may be claimed just now), go back to the queue: a claim or
        a hand-over whose answer never reached its transfer (a lost connection, a cancel)
        must not keep a row `running` and an account slot for as long as the daemon runs."""
        orphans = owned - set(self._tasks)
        again = orphans & self._orphans
        self._orphans = orphans - again
        if again:
            put_back = await self.store.try_call(queries.orphans_requeue, self.owner,
                                                 sorted(again))
            if put_back:
                self.leases.forget(set(put_back))
                for download_id in put_back:  # (given back now: a give-back not sent yet
                    # would carry the fence of the row's next claim here, a look's attempt
                    # being given back)
                    self._unsent.pop(download_id, None)
                log.warning("downloads owned with no transfer put back in the queue",
                            download_ids=put_back)
                self.wake.set()

    async def _put_back_strays(self) -> None:
        """`running` rows that no claim made (set so with psql: no lease expiry) would block
        the queue's end for ever: any daemon's heartbeat puts them back in the queue."""
        strays = await self.store.try_call(queries.strays_requeue)
        if strays:
            log.warning("running downloads that no daemon claimed put back in the queue",
                        download_ids=strays)
            self.wake.set()

    def _let_go(self, working: set[int]) -> None:
        """Stop the transfers whose leases are about to lapse unrenewed (each puts its row
        back in the queue, its `.part` kept, once the database answers again)."""
        tasks = [t for i in working - self._ended
                 if (t := self._tasks.get(i)) is not None and not t.done()]
        if tasks:
            log.warning("database unreachable: transfers stopped before their leases lapse",
                        count=len(tasks))
        for task in tasks:
            task.cancel("lease lapsing")

    # -- the loop -----------------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event, *, exit_when_idle: bool = False,
        until: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Serve until `stop` is set, the queue is drained (`exit_when_idle`) or `until()`."""
        try:
            while not stop.is_set():
                self.wake.clear()
                if self._accounts_stale:
                    await self._refresh_accounts()
                more_requests = False
                now = time.monotonic()
                if (self._follow_in is not None and now >= self._follow_in) or \
                        now >= self._requests_at or self.resolver.unstuck_in() == 0.0:
                    self._requests_due = True  # (timers, whatever woke the loop)
                if self._requests_due:
                    self._requests_due = False
                    self._requests_at = now + REQUESTS_RECHECK
                    more_requests = await self._resolve_requests()
                    self._follow_in = await self.store.call(queries.next_request_due,
                                                            self.resolver.busy, self.owner)
                    if self._follow_in is not None:  # measured from now, the wait's start
                        # (one due but not taken, being searched by another daemon, is
                        # looked at again a second later, not in a busy loop)
                        self._follow_in = time.monotonic() + max(self._follow_in, 1.0)
                next_in, later = await self._dispatch()
                if until is not None and await self._until(until):
                    return
                # offline products and standing requests do not keep an idle run going
                if exit_when_idle and not self._tasks and next_in is None and \
                        not more_requests and not self.resolver.busy and await self._drained():
                    log.info("queue drained")
                    return
                if more_requests:
                    self._requests_due = True
                    continue
                follow_in = None if self._follow_in is None else \
                    max(0.0, self._follow_in - time.monotonic())
                unstuck_in = self.resolver.unstuck_in()
                until_in = max(0.0, self._until_at - time.monotonic()) \
                    if until is not None and self._tasks else None  # (a look put off)
                recheck_in = max(0.0, self._requests_at - time.monotonic())
                # an idle run that waits for rows other daemons run (their end sends no
                # NOTIFY, only the lapse of their leases would wake it) looks once a second
                idle_in = UNTIL_EVERY if exit_when_idle and not self._tasks and \
                    next_in is not None else None
                timeout = min((t for t in (next_in, later, follow_in, unstuck_in, until_in,
                                           recheck_in, idle_in) if t is not None),
                              default=None)
                await wait_any(self.wake, stop, timeout=timeout)
        finally:
            await self._stop_transfers()
            await self._seals.aclose()
            await self._done.aclose()
            await self.catalogs.aclose()
            await self.auths.aclose()

    async def _until(self, until: Callable[[], Awaitable[bool]]) -> bool:
        """Ask `until()` when no transfer runs here (the work may be done), else once a
        second: not at every turn (a turn follows every transfer's end)."""
        now = time.monotonic()
        if self._tasks and now < self._until_at:
            return False
        self._until_at = now + UNTIL_EVERY
        return await until()

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
            caps = self.accounts.caps(provider.id)
            self._providers[provider.id] = provider
            self.accounts.load(provider, credentials)
            now = self.accounts.caps(provider.id)
            # (rows of runs that have not started are no running transfers: they go back)
            if provider.paused:
                self._end_runs(provider.id, "provider paused")
            elif any(now.get(account, 0) < cap for account, cap in caps.items()):
                self._end_runs(provider.id, "the account's cap was lowered")

    def _run_end(self, provider_id: int) -> asyncio.Future[str]:
        """What ends the runs of a provider claimed from now on (`_runs_end`)."""
        end = self._runs_end.get(provider_id)
        if end is None:
            end = self._runs_end[provider_id] = asyncio.get_running_loop().create_future()
        return end

    def _end_runs(self, provider_id: int, reason: str) -> None:
        """The rows of the provider's runs that have not started go back (`_runs_end`)."""
        end = self._runs_end.pop(provider_id, None)
        if end is not None and not end.done():
            end.set_result(reason)

    async def _resolve_requests(self) -> bool:
        """Turn queued requests into downloads. True when more may be waiting."""

        by_catalog: list[Request] = []
        resolved: list[tuple[int, intake.Asked]] = []
        failed: list[tuple[int, str | None]] = []

        async def batch(conn: Any) -> int:
            # (run again from the start after a lost connection or a deadlock: what it
            # did is told once the transaction has committed)
            by_catalog.clear()
            resolved.clear()
            failed.clear()
            requests = await queries.request_lock_queued(conn, REQUEST_BATCH,
                                                         self.resolver.busy, self.owner)
            for request in requests:
                if intake.needs_catalog(request):
                    by_catalog.append(request)  # over the network, outside this transaction
                    continue
                status, error, asked = await self._resolve_one(conn, request)
                if status == "failed":
                    failed.append((request.id, error))
                else:
                    resolved.append((request.id, asked))
            if by_catalog:  # (the other daemons leave them alone while this one resolves)
                await queries.request_resolving(conn, [r.id for r in by_catalog], self.owner,
                                                self.settings.lease_timeout)
            return len(requests)

        try:
            n = await self.store.transaction(batch)
        except CONFLICT_ERRORS as exc:  # (deadlocks again and again: the next turn tries)
            log.warning("requests not resolved this turn, tried again in a second",
                        error=f"{type(exc).__name__}: {exc}")
            self._requests_at = time.monotonic() + 1.0
            return False
        for request_id, error in failed:
            log.error("request failed", request_id=request_id, error=error)
        for request_id, asked in resolved:
            log.info("request resolved", request_id=request_id, downloads=len(asked.ids),
                     **asked.counts())
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
            if isinstance(exc, CONFLICT_ERRORS):  # (a deadlock: the batch runs again)
                raise
            log.exception("request could not be resolved", request_id=request.id)
            error = _one_line(self.redactor(f"cannot queue this request: {exc}"))
            return await intake.fail(conn, request, error)

    async def _lease_for(self, provider_id: int) -> Lease:
        """A slot of a provider for a listing or a search, waiting for one."""
        if provider_id not in self._providers:
            await self._refresh_accounts()
        if provider_id not in self._providers:
            raise DatabaseError(f"provider {provider_id} disappeared")
        return await self.leases.take(provider_id)

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
            if provider_id not in self._providers:
                await self._refresh_accounts()
            if not due or provider_id not in self._providers:
                continue
            # the database hands out the free slots of the provider's accounts, counted
            # across every daemon, with the rows (this loop never waits for a slot)
            try:
                claimed = await self.store.call(
                    queries.claim, self.owner, provider_id, due, self.settings.lease_timeout,
                    str(self.settings.default_dest))
            except DatabaseError:
                raise
            except Exception as exc:  # one bad row must not stop every provider
                if getattr(exc, "sqlstate", None):  # (the server refused: its reason, as
                    # a full disk gives it every few seconds, without a traceback each time)
                    log.warning("claim failed", provider_id=provider_id,
                                claim_again_in=CLAIM_AGAIN,
                                error=_one_line(self.redactor(f"{type(exc).__name__}: {exc}")))
                else:  # (a bug: its traceback)
                    log.exception("claim failed", provider_id=provider_id,
                                  claim_again_in=CLAIM_AGAIN)
                claimed = []
                next_in = CLAIM_AGAIN if next_in is None else min(next_in, CLAIM_AGAIN)
            for download, account, lease_id in claimed:
                self._start(download, self.leases.wrap(lease_id, provider_id, account,
                                                       download.id))
        return next_in, later

    def _start(self, download: Download, lease: Lease, turn: _Turn | None = None) -> None:
        turn = turn or _Turn()
        self._spawn(self._run_one(download, lease, turn), download, lease, turn)

    def _spawn(self, step: Coroutine[Any, Any, None], d: Download, lease: Lease,
               turn: _Turn) -> None:
        # (the row's task logs with its own ids, in the layers below the engine too; not
        # with those of the transfer whose hand-over started it, whose context it would
        # copy)
        context = contextvars.Context()
        context.run(structlog.contextvars.bind_contextvars, download_id=d.id,
                    request_id=d.request_id, provider=d.provider)
        task = asyncio.create_task(step, name=f"download-{d.id}", context=context)
        task.add_done_callback(lambda done: self._task_done(done, d, lease, turn))
        self._tasks[d.id] = task
        self._running[d.id] = d
        # (a row claimed again while its last task ends: that one's marks are not this one's)
        self._lost.discard(d.id)
        self._ended.discard(d.id)
        self._recording.discard(d.id)

    def _task_done(self, task: asyncio.Task[None], d: Download, lease: Lease,
                   turn: _Turn) -> None:
        """A task cancelled before its first step (a user's cancel whose NOTIFY came with
        the claim's answer) never runs its handlers: the next row's turn must come all the
        same, and its row go back and its slot (a run's last row's) be given back, by a
        task of their own; else the row stays `running` and its slot held (the heartbeat
        renews both) for as long as the daemon runs, which no longer drains."""
        turn.pass_on()
        if self._tasks.get(d.id) is task:  # (a task that ran is no longer there)
            self._spawn(self._never_started(d, lease, turn), d, lease, turn)

    async def _never_started(self, d: Download, lease: Lease, turn: _Turn) -> None:
        bound = log.bind(download_id=d.id, request_id=d.request_id, provider=d.provider)
        try:
            await _to_the_end(self._unclaim(d, bound, "stopped"))
        finally:
            await self._task_ended(d, lease, turn, handed_over=False)

    async def _stop_transfers(self) -> None:
        """Cancel running transfers; each puts its row back in the queue, resumable. Then the
        give-backs that met a lost connection are sent once more (they wait for the next
        heartbeat, which never comes now), within the same `shutdown_timeout`: the database
        may still be away."""
        self._stopping = True  # a slot is no longer handed on to the next download
        await self.resolver.stop()
        if self._tasks:
            log.info("stopping transfers", count=len(self._tasks))
        deadline = time.monotonic() + self.settings.shutdown_timeout
        # (a hand-over answered while the others stop starts one more: stopped in turn)
        while self._tasks and time.monotonic() < deadline:
            tasks = list(self._tasks.values())
            # a task claimed just now may not have run its first step yet: cancelled then,
            # it would never reach the handler that puts its row back; one turn of the loop
            # lets every task start (they were scheduled before this one resumes)
            await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            _done, pending = await asyncio.wait(tasks,
                                                timeout=max(0.0, deadline - time.monotonic()))
            if pending:
                break
        # (counted once the time is spent, not from `pending`: the tasks waited for may have
        # stopped in time while those their hand-overs started meanwhile have not)
        if self._tasks:
            log.warning("transfers did not stop in time", count=len(self._tasks))
        if self._unsent:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._give_backs_again()
            if self._unsent:  # (their rows wait for their leases to lapse)
                log.warning("downloads not given back", download_ids=sorted(self._unsent))

    # -- one transfer -------------------------------------------------------------------------

    async def _run_one(self, d: Download, lease: Lease, turn: _Turn) -> None:
        bound = log.bind(download_id=d.id, request_id=d.request_id, provider=d.provider)
        handed_over = False
        try:
            if await self._take_turn(d, turn, bound):
                handed_over = await self._transfer(d, lease, turn, bound)
        finally:
            await self._task_ended(d, lease, turn, handed_over=handed_over)

    async def _task_ended(self, d: Download, lease: Lease, turn: _Turn, *,
                          handed_over: bool) -> None:
        # (the row given back may be another task's already: claimed again while this one
        # ended, which must not untrack it; the heartbeat would take its row for an orphan)
        if self._tasks.get(d.id) is asyncio.current_task():
            del self._tasks[d.id]
            self._lost.discard(d.id)
            self._ended.discard(d.id)
            self._recording.discard(d.id)
            self._running.pop(d.id, None)
        turn.pass_on()  # (the next row of the run: once the rows before this one are done)
        # (a slot handed over is busy again: nothing to claim; the last transfer's end may be
        # what an idle run waits for)
        if not handed_over or not self._tasks:
            self.wake.set()
        if self.leases.holds(lease, d.id):  # (most rows' slot went on: no step, no task)
            await _to_the_end(self._slot_after(d, lease, turn))

    async def _take_turn(self, d: Download, turn: _Turn, bound: Any) -> bool:
        """Wait for this row's turn in its slot's run (`RUN_WAIT` at most); a row whose turn
        does not come, or that is stopped or cancelled meanwhile, goes back as it was (its
        attempt unused). False: it did not start."""
        if turn.wait is None:
            return True
        waits: list[asyncio.Future[Any]] = [turn.wait] if turn.end is None else \
            [turn.wait, turn.end]
        try:  # (never cancels the turn, nor the end)
            await asyncio.wait(waits, timeout=RUN_WAIT, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _to_the_end(self._unclaim(d, bound, "stopped"))
            raise
        if turn.end is not None and turn.end.done():  # (paused, a cap lowered: not now)
            await _to_the_end(self._unclaim(d, bound, turn.end.result()))
            return False
        if turn.wait.done():
            return True
        await _to_the_end(self._unclaim(d, bound, "its slot is busy"))
        return False

    async def _unclaim(self, d: Download, bound: Any, reason: str) -> None:
        # (a look at an offline product: offline again)
        _sent, status = await self._give_back(  # (not sent: None, said by `_give_back`)
            queries.download_unclaim, d, bound, back_to="offline"
            if d.claimed_from == "offline" else "queued")
        if status == "offline":
            bound.info("download offline", reason=reason)
        elif status == "cancelled":
            bound.info("download cancelled", bytes_done=d.bytes_done)
        elif status == "queued":
            bound.info("download queued", bytes_done=d.bytes_done, reason=reason)
        elif status is not None:  # (another daemon's now: its lease lapsed)
            bound.warning("lease lost: another daemon took the download over", now=status)
        self._finished(d, "queued" if status in (None, "running") else status)

    async def _give_back(self, fn: Callable[..., Awaitable[Any]], d: Download, bound: Any,
                         **kwargs: Any) -> tuple[bool, Any]:
        """Send a statement that gives the claim's attempt back (`attempts - 1`) once:
        sent again at once after a lost connection, one that committed the first time
        could match this daemon's next claim of the row (the same owner and attempt, the
        same fence) and end it under its transfer. One that met a lost connection is sent
        again after the next heartbeat, unless the row was claimed again meanwhile
        (`_give_backs_again`)."""
        sent, result = await self.store.once(fn, d.id, self._fence(d), **kwargs)
        if not sent:
            bound.warning("the download was not given back (the database connection was "
                          "lost): it is, once the database answers")
            self._unsent[d.id] = _GiveBack(fn, d, kwargs, asyncio.current_task())
        return sent, result

    async def _give_backs_again(self) -> None:
        """Send the give-backs that met a lost connection again, after a heartbeat went
        through: each unless its row was claimed again by this daemon meanwhile (that claim
        is the row's now; the statement would match it, with the same owner and attempt).
        A row taken over by another daemon is left as it is (the fence no longer matches);
        one the heartbeat put back was given back there (`_put_back_orphans`)."""
        for download_id, back in list(self._unsent.items()):
            task = self._tasks.get(download_id)
            if task is not None and task is not back.task:
                del self._unsent[download_id]  # (claimed again)
                continue
            if task is not None:  # (the transfer that gave it back has not ended yet)
                continue
            sent, _ = await self.store.once(back.fn, download_id, self._fence(back.download),
                                            **back.kwargs)
            if not sent:
                return
            del self._unsent[download_id]
            self.wake.set()

    async def _slot_after(self, d: Download, lease: Lease, turn: _Turn) -> None:
        """The slot of a transfer that ended goes back (it did not go on): by the run's
        last row (its lease), once the rows before it have given the connection back."""
        if turn.wait is not None and not turn.wait.done():
            await asyncio.wait([turn.wait])
        await self.leases.release(lease, d.id)

    def _auth(self, d: Download, lease: Lease, provider: Provider, bound: Any) -> Auth:
        """How a transfer logs in: the download's own login (a URL's userinfo), else its
        account's, on the provider's own servers only (`sends_login`: a row whose URL is
        on another server, whoever queued it, is fetched without it)."""
        if d.login_user:
            return self.auths.for_account(provider, f"login:{d.login_user}", d.login_user,
                                          d.login_secret)
        if d.product_id is None and lease.login.user and not sends_login(provider, d.url):
            bound.warning("the account's login is not sent to a server outside the "
                          "provider's: fetched without it",
                          host=urlsplit(d.url).netloc.rpartition("@")[2])  # (no userinfo)
            return ANONYMOUS
        return self.auths.for_account(provider, lease.account, lease.login.user,
                                      lease.login.secret)

    async def _transfer(self, d: Download, lease: Lease, turn: _Turn, bound: Any) -> bool:
        """Run one download; True when its slot went on to the next one."""
        provider = self._providers[d.provider_id]
        auth = self._auth(d, lease, provider, bound)
        folder = Path(d.dest or self.settings.default_dest) / d.provider
        attempt = Attempt(start_size=d.bytes_done, size=d.bytes_done)
        events = _RowEvents(self, d, bound, lease, turn)
        if d.claimed_from == "offline":
            bound.info("offline download looked at", checks=d.offline_checks)
        else:
            bound.info("download running", url=d.url, attempt=d.attempts,
                       **({"user": auth.user} if auth.user else {}))
        self.metrics.transfer_started(d.provider)
        try:
            if d.dest and not folder.is_absolute():  # (a psql row's)
                raise TransferError(f"dest {d.dest!r} is not an absolute path")
            if lease.login.unreadable and not d.login_user and auth is not ANONYMOUS:
                # (never fetched without the login it needs)
                raise RetryableError(lease.login.unreadable)
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
                      size_from_server=d.size_from_server,
                      keep_cache=self.settings.keep_page_cache,
                      # (an earlier attempt got as far as sealing its file, and may
                      # have renamed it: a file at the final name may be its own; else
                      # it is someone else's)
                      tried=d.sealed_attempt is not None)
            outcome = await transfer(self.drivers.for_url(source.url), job, events, attempt,
                                     self.settings.chunk_size)
        except asyncio.CancelledError:
            # (a lost lease too: the fenced write does nothing if another daemon has the row,
            # and puts it back in the queue if nobody took it)
            await _to_the_end(self._after_stop(d, attempt, bound))
            raise
        except LeaseLost:  # (its lease lapsed: back in the queue unless another daemon has
            # it now, then the file is left to that one)
            await _to_the_end(self._after_stop(d, attempt, bound, reason="lease lapsed"))
        except OfflineError as exc:
            account = f"login:{d.login_user}" if d.login_user else lease.account
            await _to_the_end(self._after_offline(d, provider, exc, attempt, bound, auth,
                                                     account))
        except TransferError as exc:
            refused = None
            if isinstance(exc, AuthError):  # name the login the server refused
                refused = repr(auth.user) if auth.user else "anonymous"
                bound = bound.bind(user=auth.user or "anonymous")
            await _to_the_end(self._after_failure(d, provider, exc, attempt, bound,
                                                     refused=refused))
        except Exception as exc:  # a bug must not lose the row: retry it within the budget
            bound.exception("internal error in transfer")
            error = RetryableError(f"internal error: {type(exc).__name__}: {exc}")
            await _to_the_end(self._after_failure(d, provider, error, attempt, bound))
        else:
            # the file is at its final path: record it even if a stop arrives meanwhile
            await _to_the_end(self._record_done(d, outcome, bound))
        finally:
            self.metrics.transfer_ended(d.provider)
        return events.handed_over

    async def _record_done(self, d: Download, outcome: Outcome, bound: Any) -> None:
        self._recording.add(d.id)  # (its fence is checked by the statement that records it)
        try:
            owed = await self._done.put(queries.Done(d.id, self._fence(d), outcome.size,
                                                     str(outcome.path)))
        except Exception as exc:  # the row stays running, owned by no transfer: it goes
            # back to the queue, and its next attempt finds the file and verifies it
            bound.error("download done but not recorded: it is looked at again",
                        error=_one_line(self.redactor(f"{type(exc).__name__}: {exc}")),
                        path=str(outcome.path))
            return
        if owed is None:
            bound.warning("lease lost after the file was sealed: the daemon that took it over "
                          "verifies it again", path=str(outcome.path))
            return
        bound.info("download done", name=outcome.name, path=str(outcome.path),
                   size=outcome.size, resumed_from=outcome.resumed_from,
                   restarted=outcome.restarted)
        if owed:
            await self._place_copies(d, outcome, bound, owed)
        self._finished(d, "done")

    async def _place_copies(self, d: Download, outcome: Outcome, bound: Any,
                            owed: list[tuple[int, str]]) -> None:
        """Put the file into the folders other requests asked for (a product is fetched
        once, into the folder of the request that queued it)."""
        links = [intake.Link(d.id, outcome.path, Path(dest) / d.provider / outcome.name)
                 for _request_id, dest in owed]
        for (request_id, _dest), (link, how) in zip(
                owed, await asyncio.to_thread(intake.deliver, links), strict=True):
            report = bound.info if how in ("linked", "copied", "there") else bound.error
            report("download put in place", path=str(link.target), how=how,
                   for_request=request_id)
        await self.store.call(queries.copies_made, d.id)

    async def _after_stop(self, d: Download, attempt: Attempt, bound: Any,
                          reason: str = "stopped") -> None:
        on_disk = attempt.on_disk()  # not the last progress write: what the .part holds
        if d.claimed_from == "offline":  # stopped while looking at it: offline it stays
            sent, status = await self._give_back(queries.download_unclaim, d, bound,
                                                 back_to="offline",
                                                 unsealed=not attempt.renaming)
            if not sent:
                self._finished(d, "queued")
                return
        else:
            status = await self.store.call(queries.download_stopped, d.id, self._fence(d),
                                           error=d.error, failures=d.failures,
                                           bytes_done=on_disk, unsealed=not attempt.renaming)
        # (running: another daemon's now; queued: its lease lapsed and nobody took it, put
        # back here)
        if status == "running" or (d.id in self._lost and status != "queued"):
            bound.warning("lease lost: another daemon took the download over",
                          now=status or "removed")
        elif status is None:  # its provider was removed (`provider remove --force`)
            bound.info("download removed", bytes_done=on_disk)
        elif status == "cancelled":
            bound.info("download cancelled", bytes_done=on_disk)
        elif status == "offline":
            bound.info("download offline", reason=reason)
        else:
            bound.info("download queued", bytes_done=on_disk,
                       reason="lease lapsed" if d.id in self._lost else reason)
        self._finished(d, "queued" if status in (None, "running") else status)

    async def _after_failure(
        self, d: Download, provider: Provider, exc: TransferError, attempt: Attempt, bound: Any,
        *, refused: str | None = None,
    ) -> None:
        policy = Policy.for_provider(provider)
        mismatch = exc.evidence if isinstance(exc, VerificationError) else None
        decision = decide(exc, d.failures, attempt.progressed, policy,
                          repeated=mismatch is not None and mismatch == d.last_mismatch,
                          tries=d.attempts)
        error = _one_line(self.redactor(exc.message))
        if decision.bad_at_source and d.product_id is None and _what(mismatch) == "checksum":
            # (a URL's checksum is the user's, not a catalog's: it may be the wrong one)
            error = _one_line(self.redactor(
                f"the same bytes twice, not those of the checksum given (is it this file's?): "
                f"{exc.message}"))
        elif decision.bad_at_source:
            error = _one_line(self.redactor(
                f"bad at the source (the same wrong {_what(mismatch)} twice): {exc.message}"))
        if refused and refused.strip("'") not in error:
            error = _one_line(self.redactor(f"{error} (login: {refused})"))
        told = budget(decision, exc, attempt.progressed, policy)
        if decision.action == "retry":
            await self.store.call(queries.download_requeue, d.id, self._fence(d), error=error,
                                  failures=decision.failures, bytes_done=attempt.size,
                                  delay=decision.delay, mismatch=mismatch,
                                  unsealed=not attempt.renaming)
            bound.warning("download queued", reason="retry", error=error,
                          retry_in=round(decision.delay, 2), attempt=d.attempts, budget=told,
                          bytes_done=attempt.size)
            self.metrics.retried(d.provider, exc)
            return
        await self.store.call(queries.download_end, d.id, self._fence(d), status="failed",
                              error=error, failures=decision.failures, bytes_done=attempt.size,
                              unsealed=not attempt.renaming)
        bound.error("download failed", error=error, attempts=d.attempts, budget=told)
        self._finished(d, "failed")

    async def _after_offline(
        self, d: Download, provider: Provider, exc: OfflineError, attempt: Attempt, bound: Any,
        auth: Auth, account: str,
    ) -> None:
        """Archived: wait (no attempt used), ordering it first where the catalog can."""
        delay, note = await self.archive.park(d, provider, exc, auth, account)
        error = _one_line(self.redactor(note))
        sent, _ = await self._give_back(queries.download_offline, d, bound, error=error,
                                        delay=delay, bytes_done=attempt.size)
        if not sent:
            self._finished(d, "queued")
            return
        bound.info("download offline", error=error, look_again_in=round(delay, 1))
        self._finished(d, "offline")

    def _fence(self, d: Download) -> Fence:
        return Fence(self.owner, d.attempts)

    def _finished(self, d: Download, status: str) -> None:
        if self._running.get(d.id) is d:  # (not a later claim of the row, started while
            # this one was given back: the heartbeat keeps watching that one)
            self._ended.add(d.id)
        if status != "queued":  # a stop puts it back: not an end
            self.metrics.download_ended(d.provider, status)
        if self.sink is not None:
            self.sink.finished(d.id, status)


async def _to_the_end(step: Coroutine[Any, Any, None]) -> None:
    """Run a step that records an outcome to its end, even when a stop arrives meanwhile
    (a second stop must not cut it either): the row must never stay `running` behind the
    daemon's back. The stop is passed on once the step is done."""
    done, cancelled = await run_to_end(step)
    done.result()
    if cancelled:
        raise asyncio.CancelledError


def _what(evidence: str | None) -> str:
    return "size" if evidence and evidence.startswith("size:") else "checksum"


def _one_line(text: str, limit: int = 1000) -> str:
    """An error fit for a log line and a text column: printable, one line, bounded."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


@dataclass
class _GiveBack:
    """A give-back of an unused attempt not sent (`Engine._give_back`): the statement, the
    claim's row, its arguments, and the task of the transfer that gave it back."""

    fn: Callable[..., Awaitable[Any]]
    download: Download
    kwargs: dict[str, Any]
    task: asyncio.Task[Any] | None


class _Turn:
    """A row's place in its slot's run (rows claimed together, taken in turn over the
    slot's one connection): it starts once the row before it gives the connection back."""

    def __init__(self, wait: asyncio.Future[None] | None = None,
                 then: asyncio.Future[None] | None = None,
                 end: asyncio.Future[str] | None = None) -> None:
        self.wait = wait
        """Done when the row before it gave the connection back (None: its turn now)."""
        self.then = then
        """Set by this row when it gives the connection back (None: the run's last)."""
        self.end = end
        """Done (with the reason) when the run's rows that have not started are to go
        back: its provider paused, or an account's cap lowered (`Engine._runs_end`)."""

    def pass_on(self) -> None:
        """The connection is free as far as this row goes: the next row's turn, once the
        rows before this one are done with it too (at once when this one ran)."""
        then = self.then
        if then is None or then.done():
            return
        if self.wait is None or self.wait.done():
            _open(then)
        else:  # (never started: the next row's turn comes with this one's)
            self.wait.add_done_callback(lambda _: _open(then))


def _open(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _RowEvents:
    """Transfer events recorded in the download row (progress throttled)."""

    def __init__(self, engine: Engine, download: Download, bound: Any, lease: Lease,
                 turn: _Turn) -> None:
        self._engine = engine
        self._download = download
        self._bound = bound
        self._lease = lease
        self._turn = turn
        self.handed_over = False
        """The slot went on to the next download (`sealing`), or the next row of its run."""
        self._fenced_until = 0.0
        """Until when the row is surely still this claim's (monotonic; set by `sealing`)."""
        self._name = download.name or ""
        self._on_disk = download.bytes_done
        self._fence = engine._fence(download)
        started = self._started = time.monotonic()
        self._last = started
        """The first progress write comes `progress_interval` after the start: a file that
        ends sooner costs no write (its end records its bytes)."""
        self._meter = RateMeter()
        self._meter.add(started, download.bytes_done)
        self._logged = (started, download.bytes_done)

    async def named(self, name: str, size: int | None, validator: Validator) -> str:
        return await self._record(name, self._names(name), size, validator)

    async def elsewhere(self, name: str, size: int | None, validator: Validator) -> str:
        other = unique_name(name, self._download.id)
        chosen = await self._record(other, (other,), size, validator)  # (raises: the row
        # lost, or the name taken)
        self._bound.warning("a file this download did not write has its name: it takes "
                            "another", name=name, now=chosen)
        return chosen

    async def _record(self, name: str, names: tuple[str, ...], size: int | None,
                      validator: Validator) -> str:
        """The first of `names` no other download of the folder has, recorded with the
        size and validators (`download_named`); `name` is the one proposed."""
        named = await self._engine.store.call(
            queries.download_named, self._download.id, self._fence, names=names,
            size=size, etag=validator.etag, last_modified=validator.last_modified)
        return self._chosen(name, named)

    def _names(self, name: str) -> tuple[str, str]:
        """The name proposed, then the one taken when another download of the folder has it."""
        return name, unique_name(name, self._download.id)

    def _chosen(self, name: str, named: str | None) -> str:
        if named is None:
            raise LeaseLost()
        if not named:
            raise PermanentError(f"another download already writes {name!r}")
        self._name = named
        return named

    async def sealing(self, naming: Naming | None = None) -> str | None:
        """The body is in and its connection given back: the account's slot goes on to the
        provider's next file now (a held file's: to a run of them), or back (the next file
        starts while this one is flushed and renamed); a row of a run but its last gives
        the connection to the run's next row instead, and is sealed with the others that
        end meanwhile (`asyncsat_sealed`, no hand-over). The file gets its final name only
        while the row is still this claim's (a daemon paused past its lease must not
        rename it). A file held whole in memory records its name in the same statement
        (`naming`): returns it."""
        engine, d = self._engine, self._download
        sent = time.monotonic()
        if self._turn.then is not None:  # a row of a run, not its last: the next row goes
            # now, and this one is sealed with the others that end meanwhile (the run's
            # last row hands the slot over)
            self._turn.pass_on()
            self.handed_over = True
            seal = queries.Seal(d.id, self._fence) if naming is None else queries.Seal(
                d.id, self._fence, self._names(naming.name), naming.size,
                naming.validator.etag, naming.validator.last_modified)
            return self._sealed(await engine._seals.put(seal), sent, naming)
        extra: dict[str, Any] = {}
        if naming is not None:
            extra = {"names": self._names(naming.name), "size": naming.size,
                     "etag": naming.validator.etag,
                     "last_modified": naming.validator.last_modified}
        # (a pause or a cap lowered after this moment ends the run the hand-over claims: its
        # statement may not have seen it)
        end = engine._run_end(d.provider_id)
        # run to its end even if this transfer is cancelled meanwhile: a slot handed over
        # must reach the next transfer (started, then stopped in turn if the daemon stops)
        step, cancelled = await run_to_end(engine.store.call(
            queries.download_sealing, d.id, self._fence, self._lease.id,
            lease_seconds=engine.settings.lease_timeout,
            default_dest=str(engine.settings.default_dest), hand_over=not engine._stopping,
            more=run_more(sent - self._started) if naming is not None and not engine._stopping
            else 0, **extra))
        sealed = step.result()
        if sealed.following:  # the slot goes on to the provider's next downloads, started
            # now: the first at once, each of the others when the one before it is through
            rows = [row for row, _account, _lease in sealed.following]
            engine.leases.handed_over(self._lease, rows[-1].id)
            wait: asyncio.Future[None] | None = None
            for i, row in enumerate(rows):
                then = asyncio.get_running_loop().create_future() \
                    if i < len(rows) - 1 else None
                engine._start(row, self._lease, _Turn(wait, then, end))
                wait = then
            self.handed_over = True
        elif not self.handed_over:
            engine.leases.given_back(self._lease, d.id)
        if cancelled:
            raise asyncio.CancelledError
        return self._sealed(sealed, sent, naming)

    def _sealed(self, sealed: queries.Sealed, sent: float, naming: Naming | None) -> str | None:
        if not sealed.owned:
            raise LeaseLost()
        # (the database counted the lease from a moment after this statement was sent)
        self._fenced_until = sent + (sealed.lease_left or 0.0) - \
            min(2.0, self._engine.settings.lease_timeout / 4)
        return None if naming is None else self._chosen(naming.name, sealed.name)

    def fenced(self) -> bool:
        return time.monotonic() < self._fenced_until

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
        await self._engine.store.try_call(queries.download_progress, self._download.id,
                                          self._fence, done, rate)

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
