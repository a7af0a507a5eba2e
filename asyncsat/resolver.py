"""Requests that need a catalog: searches and URL patterns, resolved over the network.

They are resolved outside the request transaction (a listing or a search may take long),
each holding one connection slot of its provider's account, as any request sent for that
account does. Until it is resolved the request stays `queued`: after a crash it is simply
resolved again, by another daemon once the crashed one's mark lapses (`request.resolver`:
one daemon resolves a request at a time; a product is queued once, so nothing doubles). A
long search queues its products as they come, `FLUSH_EVERY` at a time, so that they
download while it pages on.

A standing request (`follow`) is searched again every `follow_interval` from its
watermark less an overlap (late-indexed products are caught; the products already known
are recognised by their catalog id and not queued twice), and stays `following`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from asyncsat import intake
from asyncsat.auth.base import ANONYMOUS, Auth
from asyncsat.auth.hosts import LOGIN_SPREAD, one_server, sends_login
from asyncsat.auth.registry import Auths
from asyncsat.catalogs.base import Catalog, ProductRef, Query, checked
from asyncsat.catalogs.registry import Catalogs
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.store import Store
from asyncsat.errors import AsyncsatError, DatabaseError, RetryableError
from asyncsat.intake import Asked
from asyncsat.leases import Lease
from asyncsat.logs import Redactor
from asyncsat.metrics import Recorder
from asyncsat.models import Provider, Request
from asyncsat.naming import SplitUrl, split_login, without_login
from asyncsat.retry import Policy, decide, follow_settings

log = structlog.get_logger("asyncsat")
STUCK_PAUSE = 60.0
FLUSH_EVERY = 100
"""Products found that are queued at once while a search or a listing goes on (a page of
CDSE's by default): a search of thousands of products has its first files downloading
while it pages on, instead of at its end."""


@dataclass
class _Queued:
    """What one resolve has queued so far, across its tries."""

    keys: set[str] = field(default_factory=set)
    asked: Asked = field(default_factory=Asked)
    """Merged; its done products' links are made once the account slot is given back."""
    known: set[str] = field(default_factory=set)
    """Products the request had before this resolve (loaded when it has a limit)."""
    new: int = 0
    """Products of `keys` the request did not have before."""


class Resolver:
    """Runs one task per request being resolved by a catalog."""

    def __init__(
        self, store: Store, settings: Settings, catalogs: Catalogs, auths: Auths,
        redactor: Redactor, take: Callable[[int], Awaitable[Lease]],
        give_back: Callable[[Lease], Awaitable[None]], ended: Callable[[], None], *,
        owner: str, metrics: Recorder | None = None,
    ) -> None:
        self._store = store
        self._owner = owner
        """This daemon's id: the requests it resolves are marked with it (`request.resolver`)."""
        self._settings = settings
        self._catalogs = catalogs
        self._auths = auths
        self._redactor = redactor
        self._take = take
        self._give_back = give_back
        self._ended = ended
        """Called when a search ends (the daemon then looks at the requests again)."""
        self._metrics = metrics or Recorder()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._stuck: dict[int, float] = {}

    @property
    def resolving(self) -> list[int]:
        """Ids of the requests being resolved now."""
        return list(self._tasks)

    @property
    def busy(self) -> list[int]:
        """Ids of the requests being resolved now, and of those whose failure could not be
        recorded lately (left alone for a minute rather than tried in a loop)."""
        now = time.monotonic()
        self._stuck = {i: t for i, t in self._stuck.items() if t > now}
        return [*self._tasks, *self._stuck]

    def unstuck_in(self) -> float | None:
        """Seconds until a request left alone is to be tried again (None: none is)."""
        if not self._stuck:
            return None
        return max(0.0, min(self._stuck.values()) - time.monotonic())

    def start(self, request: Request) -> None:
        if request.id not in self._tasks:
            self._tasks[request.id] = asyncio.create_task(
                self._resolve(request), name=f"request-{request.id}")

    def cancel(self, request_id: int) -> None:
        """The request was cancelled: stop resolving it (nothing is queued for it)."""
        task = self._tasks.get(request_id)
        if task is not None:
            log.info("request search stopped", request_id=request_id, reason="cancelled")
            task.cancel("request cancelled")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _resolve(self, request: Request) -> None:
        bound = log.bind(request_id=request.id)
        queued = _Queued()
        try:
            try:
                provider, products, login = await self._find(request, queued)
            except Exception:
                await settled(queued.asked, request.id)  # (what the batches queued stays)
                raise
            await settled(queued.asked, request.id)
            rest = [p for p in products if _key(p) not in queued.keys]
            asked = await self._store.transaction(
                lambda conn: self._queue(conn, request, provider, rest, login, products))
            if asked is not None:
                await settled(asked, request.id)
                queued.asked.add(asked)
                total = queued.asked
                bound.info("request followed" if request.follow else "request resolved",
                           downloads=len(total.ids), provider=provider.name, **total.counts())
        except asyncio.CancelledError:
            raise
        except _Gone:
            bound.info("request no longer to resolve: left as it is")
            urls = [without_login(u) if isinstance(u, str) else u for u in request.urls or []]
            await self._store.call(queries.request_scrub, request.id,
                                   urls if request.urls else None)
        except DatabaseError:
            bound.exception("request left queued: the database failed")
        except Exception as exc:
            if not isinstance(exc, AsyncsatError):
                bound.exception("internal error while resolving a request")
            error = " ".join(self._redactor(str(exc) or type(exc).__name__).split())[:1000]
            try:
                await self._store.transaction(lambda conn: self._fail(conn, request, error))
            except Exception:
                bound.exception("the request's failure could not be recorded: left for a minute")
                self._stuck[request.id] = time.monotonic() + STUCK_PAUSE
        finally:
            # the mark cleared while the request is still busy here: a search of it that
            # the loop starts once told cannot have its fresh mark cleared by this one's
            # (best effort, even if cancelled meanwhile: the mark is no longer renewed and
            # lapses anyway; this daemon's own marks never stop it)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._store.try_call(queries.request_resolved_by, self._owner,
                                           request.id)
            self._tasks.pop(request.id, None)
            self._ended()

    async def _find(self, request: Request, queued: _Queued) -> \
            tuple[Provider, list[ProductRef], SplitUrl | None]:
        """Ask the catalog, retrying transient faults; the account slot is held meanwhile.
        The products found are queued `FLUSH_EVERY` at a time as they come (`queued`); the
        caller queues the rest, and finishes the request, in one transaction."""
        intake.check_dest(request.dest)
        if request.search is not None:
            Query.from_json(request.search)  # validate before anything is asked
            if request.provider_id is None:
                raise AsyncsatError("a search request needs a provider (request.provider_id)")
            provider = await self._store.call(queries.provider_by_id, request.provider_id)
            if provider is None:
                raise AsyncsatError(f"provider {request.provider_id} does not exist")
            login = None
        else:
            provider, login = await self._pattern_owner(request)
        catalog = self._catalogs.for_provider(provider)
        policy = Policy.for_provider(provider)
        limit = Query.from_json(request.search).limit if request.search is not None else None
        if limit is not None:  # the cap is on the request's total: what it has counts
            queued.known = await self._store.call(queries.request_product_keys, request.id)
            if len(queued.known) >= limit:
                return provider, [], login
        failures = 0
        while True:
            try:
                found = await self._ask(catalog, request, provider, login, limit, queued)
            except RetryableError as exc:
                # the policy of downloads: a refused login is tried twice, a connection limit
                # is waited out without using the budget, other faults max_attempts times
                decision = decide(exc, failures, False, policy)
                if decision.action != "retry":
                    raise
                failures = decision.failures
                log.warning("request search retried", request_id=request.id,
                            error=self._redactor(exc.message), retry_in=round(decision.delay, 2))
                await asyncio.sleep(decision.delay)
                if await self._store.call(queries.request_status, request.id) not in (
                        "queued", "following"):
                    raise _Gone from None  # cancelled (or resolved) meanwhile
            else:
                break
        return provider, found, login

    async def _pattern_owner(self, request: Request) -> tuple[Provider, SplitUrl | None]:
        urls = [split_login(u) for u in request.urls or []]
        for u in urls:
            self._redactor.add_login(u.user, u.password)
        if not urls:
            raise AsyncsatError("no URL given")
        if request.checksum:
            raise AsyncsatError("a checksum cannot apply to a URL pattern")
        owners = {(await self._provider(request, u.url)).id: u for u in urls}
        if len(owners) > 1:
            raise AsyncsatError("the URLs of a request with a pattern must all belong "
                                "to one provider")
        provider = await self._provider(request, urls[0].url)
        login = next((u for u in urls if u.user), None)
        if request.login_user:  # a `get` keeps the login apart from the URLs
            login = SplitUrl("", request.login_user, request.login_secret)
            self._redactor.add_login(login.user, login.password)
        if login is not None and not one_server([u.url for u in urls]):
            raise AsyncsatError(LOGIN_SPREAD)
        return provider, login

    async def _ask(self, catalog: Catalog, request: Request, provider: Provider,
                   login: SplitUrl | None, limit: int | None, queued: _Queued) -> \
            list[ProductRef]:
        """One try: the products of the request, with an account slot held meanwhile."""
        found: list[ProductRef] = []
        seen: set[str] = set()
        waiting: list[ProductRef] = []
        new = 0  # products of this try new to the request and not queued by an earlier one
        lease = await self._take(provider.id)
        started, ok = time.monotonic(), False
        try:
            if login is not None:
                auth = self._auths.for_account(provider, f"login:{login.user}", login.user,
                                               login.password)
            else:
                if lease.login.unreadable:  # (never asked without its login)
                    raise RetryableError(lease.login.unreadable)
                auth = self._auths.for_account(provider, lease.account, lease.login.user,
                                               lease.login.secret)
            stream = self._products(catalog, request, provider, auth)
            async with contextlib.aclosing(stream):  # its session ends before the slot does
                async for found_ref in stream:
                    ref, wrong = checked(found_ref)
                    if wrong:
                        log.warning("catalog product skipped" if ref is None else
                                    "catalog values ignored", request_id=request.id,
                                    product=self._redactor(found_ref.id or
                                                          found_ref.url.split("?")[0])[:300],
                                    wrong="; ".join(wrong))
                    if ref is None:
                        continue
                    key = _key(ref)
                    if key in seen:
                        continue
                    seen.add(key)
                    found.append(ref)
                    if key not in queued.keys:
                        new += key not in queued.known
                        if limit is not None and len(queued.known) + queued.new + new >= limit:
                            break  # (this one is queued with the rest, at the end)
                        waiting.append(ref)
                        if len(waiting) >= FLUSH_EVERY:
                            new -= await self._flush(request, provider, login, waiting, queued)
                            waiting = []
            ok = True
        finally:
            self._metrics.catalog_request(provider.name, time.monotonic() - started, ok=ok)
            await self._give_back(lease)
        return found

    async def _flush(self, request: Request, provider: Provider, login: SplitUrl | None,
                     products: Sequence[ProductRef], queued: _Queued) -> int:
        """Queue products found so far (the request stays `queued` until its end); how many
        of them the request did not have before."""
        asked = await self._store.transaction(
            lambda conn: self._queue_found(conn, request, provider, products, login))
        if asked is None:
            raise _Gone  # cancelled (or resolved) meanwhile
        new = sum(_key(p) not in queued.known for p in products)
        queued.keys.update(_key(p) for p in products)
        queued.new += new
        queued.asked.add(asked)
        return new

    def _products(self, catalog: Catalog, request: Request, provider: Provider,
                  auth: Auth) -> AsyncGenerator[ProductRef, None]:
        if request.search is None:
            return _expand_all(catalog, request, provider, auth)
        since = None
        if request.status == "following" and request.watermark is not None:
            since = request.watermark - timedelta(seconds=follow_settings(provider).overlap)
        return catalog.search(Query.from_json(request.search), auth, since)

    async def _provider(self, request: Request, url: str) -> Provider:
        if request.provider_id is not None:
            provider = await self._store.call(queries.provider_by_id, request.provider_id)
            if provider is not None:
                return provider
        return await self._store.transaction(lambda conn: intake.provider_for(conn, url))

    async def _queue_found(self, conn: Any, request: Request, provider: Provider,
                           products: Sequence[ProductRef], login: SplitUrl | None) -> \
            Asked | None:
        """Queue products of the request (None: it left the queue meanwhile)."""
        if await queries.request_lock(conn, request.id, self._owner) is None:
            return None  # cancelled or resolved meanwhile
        dest = request.dest or str(self._settings.default_dest)
        # a standing request's later runs do not revive products that failed for good
        return await intake.queue_products(
            conn, request.id, provider, products, dest=dest, login=login,
            revive=request.status == "queued",
            offline_in=follow_settings(provider).offline_interval)

    async def _queue(self, conn: Any, request: Request, provider: Provider,
                     products: Sequence[ProductRef], login: SplitUrl | None,
                     found: Sequence[ProductRef]) -> Asked | None:
        """Queue the last products found and finish the request (or set its next run);
        `found`: every product of this run, queued before or now."""
        asked = await self._queue_found(conn, request, provider, products, login)
        if asked is None:
            return None
        follow = follow_settings(provider)
        limit = Query.from_json(request.search).limit if request.search else None
        full = limit is not None and \
            await queries.request_product_count(conn, request.id) >= limit
        if request.follow and not full:
            seen = [p.seen_at for p in found if p.seen_at is not None]
            await queries.request_follow_next(
                conn, request.id, watermark=max(seen) if seen else None,
                interval=follow.interval)
            return asked
        urls = [split_login(u).url for u in request.urls] if request.urls else None
        await queries.request_finish(conn, request.id, "resolved", None, urls)
        return asked

    async def _fail(self, conn: Any, request: Request, error: str) -> None:
        locked = await queries.request_lock(conn, request.id, self._owner)
        if locked is None:
            return
        if locked.status == "following":  # a standing request stays: the next run may work
            provider = await queries.provider_by_id(conn, request.provider_id or 0)
            delay = follow_settings(provider).interval if provider else 900.0
            await queries.request_retry_later(conn, request.id, error, delay)
            log.warning("request run failed", request_id=request.id, error=error,
                        retry_in=delay)
            return
        await intake.fail(conn, request, error)
        log.error("request failed", request_id=request.id, error=error)


async def settled(asked: Asked, request_id: int) -> None:
    """After a request's transaction: log the done products fetched again (their files were
    gone), and put the done ones it wants elsewhere into its folder (in a thread: a copy
    across file systems takes time)."""
    for download_id, path in asked.refetched:
        log.info("download queued", reason="file gone", download_id=download_id,
                 request_id=request_id, path=path)
    if not asked.links:
        return
    for link, how in await asyncio.to_thread(intake.deliver, asked.links):
        report = log.info if how in ("linked", "copied", "there") else log.error
        report("download put in place", download_id=link.download_id, request_id=request_id,
               path=str(link.target), source=str(link.source), how=how)


class _Gone(Exception):
    """The request left the queue while it was being resolved."""


def _key(ref: ProductRef) -> str:
    """A product's identity within one request: its catalog id, else its URL."""
    return ref.id or ref.url


async def _expand_all(catalog: Catalog, request: Request, provider: Provider, auth: Auth) \
        -> AsyncGenerator[ProductRef, None]:
    """Every URL of a request: patterns expanded by the catalog (listed with the account's
    login on the provider's own servers only), plain URLs as they are."""
    for raw in request.urls or []:
        u = split_login(raw)
        if intake.is_pattern(u.url):
            home = request.login_user is not None or sends_login(provider, u.url)
            async for ref in catalog.expand(u.url, auth if home else ANONYMOUS):
                yield ref
        else:
            yield ProductRef(url=u.url)
