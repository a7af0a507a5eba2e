"""Give-backs under races and lost connections: a row given back while it is claimed
again, a give-back whose connection is cut after its commit, a slot whose give-back is cut
(found by a fault hunt, 2026-12-01)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from asyncsat import daemon, engine
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.db.store import Store
from asyncsat.engine import Engine
from asyncsat.logs import Redactor
from asyncsat.models import Download
from asyncsat.transfer.registry import Drivers
from tests.helpers import add_provider, drain, named_row, sql
from tests.runs import rows_by_name, spy_runs, until
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


async def _a_run_whose_last_row_waits(server: FileServer, dsn: str, *, c_size: int) -> None:
    """Two slots. a (quick) hands its slot over to the run [b, c]; b is slow (3 s), so c's
    turn does not come within `RUN_WAIT` and it goes back to the queue; s (0.5 s), on the
    other slot, then claims c again with its own hand-over."""
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    sizes = {"a.nc": 10_000, "s.nc": 100_000, "b.nc": 600_000, "c.nc": c_size}
    for i, (name, size) in enumerate(sizes.items()):
        server.add(name, os.urandom(size), **({} if name == "a.nc" else {"rate": 200_000}))
        await sql(dsn, "INSERT INTO download (provider_id, url, not_before)"
                       " SELECT id, $1, now() - make_interval(secs => $2) FROM provider"
                       " WHERE name = 'local'", server.url(name), 10.0 - i)


# -- a row given back, claimed again before the give-back's answer is in ----------------------

async def test_a_row_claimed_again_before_its_give_back_answers_is_still_watched(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two slots. a's hand-over claims the run [b (slow), c]; c's turn does not come
    (RUN_WAIT) and it goes back to the queue (`download_unclaim`), whose answer comes late
    (a busy database, a slow network). Meanwhile s's slot claims c again: a new transfer of
    c runs. The old task's give-back then marks c as ended (`Engine._finished` ->
    `_ended`), which the new transfer never clears: the heartbeat no longer watches it.
    Another daemon then takes c over; the heartbeat must let this transfer go (as it does
    for any transfer whose lease is lost), not let it run on to its end over a connection
    of the account that is no longer this daemon's."""
    monkeypatch.setattr(engine, "RUN_WAIT", 0.3)
    settings = dataclasses.replace(settings, lease_timeout=3.0)  # (a heartbeat a second)
    await _a_run_whose_last_row_waits(server, dsn, c_size=1_600_000)  # (c: 8 s)
    real = queries.download_unclaim
    given_back: list[int] = []

    async def late_answer(db: Any, download_id: int, *args: Any, **kw: Any) -> Any:
        status = await real(db, download_id, *args, **kw)  # (committed: c is due now)
        given_back.append(download_id)
        await asyncio.sleep(0.8)  # (its answer comes late)
        return status

    monkeypatch.setattr(queries, "download_unclaim", late_answer)
    runs = spy_runs(monkeypatch)
    stop = asyncio.Event()

    async def stopped() -> bool:
        return stop.is_set()

    with capture_logs() as logs:
        serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=stopped))
        try:
            by_name: dict[str, Any] = {}

            async def c_again() -> bool:
                nonlocal by_name
                by_name = await rows_by_name(dsn)
                c = by_name.get("c.nc", {})
                return bool(given_back) and c.get("status") == "running" and \
                    c.get("attempts") == 1 and \
                    [r["path"] for r in server.requests].count("/files/c.nc") == 1
            await until(c_again)
            c_id = by_name["c.nc"]["id"]
            assert runs and runs[0] == [by_name["b.nc"]["id"], c_id]
            await asyncio.sleep(1.0)  # (the late answer is in: the old task has ended)
            # another daemon takes c over (its lease lapsed there, say)
            conn = await connect(dsn)
            try:
                await queries.daemon_register(conn, "other", host="elsewhere", pid=1,
                                              version="t", lease_timeout=30)
            finally:
                await conn.close()
            await sql(dsn, "UPDATE download SET owner = 'other', attempts = attempts + 1,"
                           " lease_expires = now() + interval '30 seconds' WHERE id = $1", c_id)
            took_over = time.monotonic()

            async def let_go() -> bool:
                return any(e["event"] == "lease lost: the download is let go"
                           and e.get("download_id") == c_id for e in logs)
            try:
                await until(let_go, timeout=4.0)  # (a heartbeat a second)
            except AssertionError:
                pytest.fail("c's transfer was not let go by the heartbeat after another "
                            f"daemon took it over ({time.monotonic() - took_over:.1f} s)")
        finally:
            stop.set()
            try:
                await asyncio.wait_for(serving, 20)
            finally:
                serving.cancel()


# -- a give-back retried after a lost connection, once the row is claimed again --------------

async def test_a_give_back_retried_after_a_lost_connection_leaves_a_new_claim_alone(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """c's turn in its run does not come: it goes back (`download_unclaim`: its attempt
    given back, 1 -> 0), but the connection is cut before the answer comes, and the store
    sends the statement again. Meanwhile s's slot has claimed c again: attempt 1 again, by
    the same daemon, the very fence the give-back carries. The statement sent again must
    not end that new claim (its row put back in the queue while its transfer runs, its slot
    still held: claimed a third time, c comes over two connections at once)."""
    monkeypatch.setattr(engine, "RUN_WAIT", 0.3)
    await _a_run_whose_last_row_waits(server, dsn, c_size=600_000)  # (c: 3 s)
    real = queries.download_unclaim
    cut: list[int] = []
    seen: list[tuple[str, int, str | None]] = []

    async def cut_once(db: Any, download_id: int, *args: Any, **kw: Any) -> Any:
        status = await real(db, download_id, *args, **kw)  # (committed)
        if not cut:
            cut.append(download_id)
            await asyncio.sleep(0.6)  # (the answer never comes: the connection is cut)
            raise ConnectionResetError("connection reset by peer")
        return status

    async def watch() -> None:  # c's row while its second transfer comes in
        while True:
            for row in await sql(dsn, "SELECT url, attempts, owner, status FROM download"
                                      " WHERE url LIKE '%/c.nc'"):
                seen.append((row["status"], row["attempts"], row["owner"]))
            await asyncio.sleep(0.05)

    monkeypatch.setattr(queries, "download_unclaim", cut_once)
    runs = spy_runs(monkeypatch)
    watching = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(daemon.serve(settings, Redactor(), exit_when_idle=True), 30)
    finally:
        watching.cancel()
    by_name = await rows_by_name(dsn)
    assert runs and runs[0] == [by_name["b.nc"]["id"], by_name["c.nc"]["id"]]
    assert cut == [by_name["c.nc"]["id"]]
    for name, row in by_name.items():
        assert row["status"] == "done", name
    c_gets = [r["path"] for r in server.requests].count("/files/c.nc")
    states = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    assert c_gets == 1 and by_name["c.nc"]["attempts"] == 1, (c_gets, states)
    # (queued at first, given back once, claimed again: never back in the queue under its
    # second transfer)
    assert [s for s in states if s[0] == "queued"] == [("queued", 0, None)] * 2, states
    assert server.peak["anonymous"] <= 2
    assert await sql(dsn, "SELECT * FROM lease") == []


# -- a slot given back while the database connection is cut ---------------------------------

async def test_a_slot_whose_give_back_is_cut_comes_back(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One slot. x fails at once (404): its slot goes back (`lease_release`, best effort),
    but the connection is cut under that statement. The lease row stays, and this daemon's
    heartbeat renews it with the others at every beat (`heartbeat` renews every lease of
    the daemon): the slot is never free again, y is never claimed, and the daemon never
    drains. A give-back that did not go through must be sent again once the database
    answers (a lease this daemon no longer holds must not be renewed for ever)."""
    await sql(dsn, "UPDATE provider SET settings = settings || '{\"max_connections\": 1}'"
                   " WHERE name = 'local'")
    settings = dataclasses.replace(settings, lease_timeout=2.0)  # (a heartbeat every 0.7 s)
    local_server.add("y.nc", os.urandom(5000))  # (x.nc: 404)
    real = queries.lease_release
    cut: list[int] = []

    async def cut_once(db: Any, lease_id: int, download_id: int | None = None) -> None:
        if not cut:
            cut.append(lease_id)
            raise ConnectionResetError("connection reset by peer")
        await real(db, lease_id, download_id)

    monkeypatch.setattr(queries, "lease_release", cut_once)
    for i, name in enumerate(("x.nc", "y.nc")):
        await sql(dsn, "INSERT INTO download (provider_id, url, not_before)"
                       " SELECT id, $1, now() - make_interval(secs => $2) FROM provider"
                       " WHERE name = 'local'", local_server.url(name), 10.0 - i)
    try:
        await drain(settings, timeout=12)  # (several lease timeouts)
    except TimeoutError:
        leases = await sql(dsn, "SELECT id, download_id, expires_at > now() AS live"
                                " FROM lease")
        pytest.fail(f"never drained: the lease given back under a cut connection {cut} is"
                    f" still held and renewed: {[dict(r) for r in leases]}")
    by_name = await rows_by_name(dsn)
    assert cut
    assert (by_name["x.nc"]["status"], by_name["y.nc"]["status"]) == ("failed", "done")


# -- a stop while the database is away, a request being searched -----------------------------

class _Away:
    """A pool whose database is away: every statement fails to connect."""

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("database away")

    fetch = fetchval = fetchrow = execute

    def acquire(self) -> Any:
        raise ConnectionRefusedError("database away")


async def test_a_stop_while_the_database_is_away_ends_within_shutdown_timeout(
        settings: Settings) -> None:
    """A request is being searched (its slot, a lease of the resolver, is given back at the
    search's end: `Leases.release`). The daemon stops while the database is away: the
    search is cancelled, and its give-back must not wait for the database (it is sent again
    after a heartbeat, `release_again`): the stop ends within `shutdown_timeout`. (Found by
    a review: a give-back retried while the database was away held the stop for 300 s.)"""
    settings = dataclasses.replace(settings, shutdown_timeout=1.0)
    eng = Engine(Store(_Away()), settings, Drivers(), Redactor(), owner="me")
    lease = eng.leases.wrap(1, 1, "anonymous")  # (a search's: no download)

    async def searching() -> None:  # (as `Resolver._find`: the slot given back at its end)
        try:
            await asyncio.sleep(3600)
        finally:
            await eng.resolver._give_back(lease)

    task = asyncio.create_task(searching())
    eng.resolver._tasks[7] = task
    await asyncio.sleep(0)
    started = time.monotonic()
    try:
        await asyncio.wait_for(eng._stop_transfers(), settings.shutdown_timeout + 4)
    except TimeoutError:
        pytest.fail("the stop did not end within shutdown_timeout: the search's give-back "
                    f"waits for the database ({time.monotonic() - started:.1f} s)")
    finally:
        task.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_stop_that_leaves_a_transfer_started_by_a_hand_over_says_so(
        settings: Settings) -> None:
    """A transfer's hand-over is answered while the daemon stops: it starts the next row's
    transfer, then its own end (the rename, the record) runs past `shutdown_timeout`. The
    stop waits for it, finds the time spent and the new transfer not stopped: it must say
    so ("transfers did not stop in time"), as it does for any transfer left running.
    Before, the loop ended at its deadline without a word."""
    settings = dataclasses.replace(settings, shutdown_timeout=0.3)
    eng = Engine(Store(_Away()), settings, Drivers(), Redactor(), owner="me")
    started: list[asyncio.Task[None]] = []

    async def handing_over() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            started.append(asyncio.create_task(asyncio.sleep(3600)))  # (the next row's)
            eng._tasks[2] = started[0]
            time.sleep(settings.shutdown_timeout + 0.1)  # (its end: past the deadline)
            del eng._tasks[1]

    eng._tasks[1] = asyncio.create_task(handing_over())
    await asyncio.sleep(0)
    try:
        with capture_logs() as logs:
            await asyncio.wait_for(eng._stop_transfers(), settings.shutdown_timeout + 4)
        assert list(eng._tasks) == [2]
        told = [e.get("count") for e in logs if e["event"] == "transfers did not stop in time"]
        assert told == [1], [e["event"] for e in logs]
    finally:
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)


# -- a give-back not sent, its lease lapsed meanwhile ------------------------------------------

async def test_a_give_back_not_sent_whose_lease_lapsed_is_put_back(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One daemon, two slots. c's turn in its run does not come: `download_unclaim` is sent
    once (`Store.once`) and the connection is lost under it before it commits; by the time
    the database answers again c's lease has lapsed. The heartbeat renews no lapsed lease
    (so c is no orphan of it), and a claim takes over the lapsed rows of other daemons
    only: the give-back is sent again after the next heartbeat (`_give_backs_again`), and
    c is fetched. (Found by a review.)"""
    monkeypatch.setattr(engine, "RUN_WAIT", 0.3)
    settings = dataclasses.replace(settings, lease_timeout=3.0)  # (a heartbeat a second)
    await _a_run_whose_last_row_waits(server, dsn, c_size=10_000)
    cut: list[int] = []
    real = queries.download_unclaim

    async def lost(db: Any, download_id: int, *args: Any, **kw: Any) -> Any:
        if cut:  # (the database is back)
            return await real(db, download_id, *args, **kw)
        cut.append(download_id)  # (not committed; the database away past the lease)
        await sql(dsn, "UPDATE download SET lease_expires = now() - interval '1 second'"
                       " WHERE id = $1", download_id)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(queries, "download_unclaim", lost)
    stop = asyncio.Event()

    async def stopped() -> bool:
        return stop.is_set()

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await _serve_until_all_done(settings, dsn, stopped, stop, cut)
    # (every line of a transfer names its own download, those of the lower layers too:
    # a row started by another's hand-over does not inherit that one's log context)
    [not_sent] = [e for e in logs if e["event"].startswith("database unavailable, statement")]
    assert not_sent.get("download_id") == cut[0], not_sent


async def _serve_until_all_done(settings: Settings, dsn: str, stopped: Any,
                                stop: asyncio.Event, cut: list[int]) -> None:
    serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=stopped))
    try:
        by_name: dict[str, Any] = {}

        async def all_done() -> bool:
            nonlocal by_name
            by_name = await rows_by_name(dsn)
            return len(by_name) == 4 and all(r["status"] == "done" for r in by_name.values())
        try:
            await until(all_done, timeout=15)  # (many heartbeats)
        except AssertionError:
            pytest.fail(f"never put back (give-back cut for {cut}): "
                        f"{ {n: (r['status'], r['attempts']) for n, r in by_name.items()} }")
    finally:
        stop.set()  # (an idle daemon looks at `until` late: cancelled after a while)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(serving, 3)


# -- an offline look whose claim's answer was lost -------------------------------------------

async def test_an_offline_look_put_back_by_the_heartbeat_stays_offline(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A product in a long-term archive (`offline`) is due for a look; the claim commits, but
    its answer is lost with the connection: the row is this daemon's, `running`, with no
    transfer. The heartbeat puts it back (`orphans_requeue`); it must go back as a stopped
    look does (`download_unclaim`, back to `offline`): offline still, its attempt given back
    (a look uses none), not queued with an attempt used that nothing tried."""
    settings = dataclasses.replace(settings, lease_timeout=2.0)  # (a heartbeat every 0.7 s)
    local_server.add("o.nc", os.urandom(5000))
    download_id = await named_row(dsn, settings, local_server.url("o.nc"), "o.nc")
    await sql(dsn, "UPDATE download SET status = 'offline', offline_checks = 1,"
                   " not_before = now() WHERE id = $1", download_id)
    real = queries.claim
    lost: list[int] = []

    async def answer_lost(db: Any, *args: Any, **kw: Any) -> Any:
        claimed = await real(db, *args, **kw)  # (committed)
        if claimed and not lost:
            lost.extend(d.id for d, _account, _lease in claimed)
            raise ConnectionResetError("connection reset by peer")
        return claimed

    monkeypatch.setattr(queries, "claim", answer_lost)
    with capture_logs() as logs:
        await drain(settings, timeout=20)
    assert lost == [download_id]
    assert [e for e in logs if e["event"].startswith("downloads owned with no transfer")]
    history = [(e["status"], e["attempts"]) for e in await sql(
        dsn, "SELECT status, attempts FROM download_event WHERE download_id = $1"
             " ORDER BY id", download_id)]
    # (queued as inserted, offline, looked at, put back, looked at again: found online)
    assert history == [("queued", 0), ("offline", 0), ("running", 1), ("offline", 0),
                       ("running", 1), ("done", 1)], history
    [row] = await sql(dsn, "SELECT owner, offline_checks FROM download")
    assert (row["owner"], row["offline_checks"]) == (None, 1)


# -- a give-back not sent when the daemon stops -----------------------------------------------

async def test_a_give_back_not_sent_is_sent_again_at_a_clean_stop(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon stops while it looks at an offline product (found online, coming in): the
    look goes back to `offline`, its attempt given back (`download_unclaim`), but the
    connection is lost under that statement, before it commits. It waits for the next
    heartbeat (`_give_backs_again`), which never comes: the daemon is stopping. The stop
    must send it once more: before, the row stayed `running`, its attempt used, until a
    claim took it over as a transfer (no longer a look at an offline product)."""
    local_server.add("o.nc", os.urandom(2_000_000), rate=200_000)  # (10 s)
    download_id = await named_row(dsn, settings, local_server.url("o.nc"), "o.nc")
    await sql(dsn, "UPDATE download SET status = 'offline', offline_checks = 1,"
                   " not_before = now() WHERE id = $1", download_id)
    real = queries.download_unclaim
    cut: list[int] = []

    async def lost_once(db: Any, download_id: int, *args: Any, **kw: Any) -> Any:
        if not cut:  # (not committed: the database is back a moment later)
            cut.append(download_id)
            raise ConnectionResetError("connection reset by peer")
        return await real(db, download_id, *args, **kw)

    monkeypatch.setattr(queries, "download_unclaim", lost_once)

    async def coming_in() -> bool:
        return any(r["path"] == "/files/o.nc" for r in local_server.requests)

    # (no heartbeat within the test: `lease_timeout` is 30 s)
    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=coming_in), 20)
    assert cut == [download_id]
    [row] = await sql(dsn, "SELECT status, attempts, owner FROM download")
    assert (row["status"], row["attempts"], row["owner"]) == ("offline", 0, None), dict(row)


class _Hanging(_Away):
    """A pool whose database does not answer (its host is cut off): every statement waits."""

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    fetch = fetchval = fetchrow = execute


async def test_a_give_back_sent_again_at_a_stop_never_holds_it_past_shutdown_timeout(
        settings: Settings) -> None:
    """A give-back not sent is tried once more at the stop: while the database does not
    answer, the stop still ends within `shutdown_timeout`, and says which rows were not
    given back (they wait for their leases to lapse)."""
    settings = dataclasses.replace(settings, shutdown_timeout=1.0)
    eng = Engine(Store(_Hanging()), settings, Drivers(), Redactor(), owner="me")
    row = Download(id=7, request_id=None, provider_id=1, provider="local", url="x",
                   name=None, dest=None, size=None, checksum=None, status="running",
                   bytes_done=0, attempts=1, failures=0, error=None, path=None, etag=None,
                   last_modified=None, claimed_from="offline")
    eng._unsent[7] = engine._GiveBack(queries.download_unclaim, row, {"back_to": "offline"},
                                      None)
    started = time.monotonic()
    with capture_logs() as logs:
        try:
            await asyncio.wait_for(eng._stop_transfers(), settings.shutdown_timeout + 4)
        except TimeoutError:
            pytest.fail("the stop waited for the database past shutdown_timeout "
                        f"({time.monotonic() - started:.1f} s)")
    assert time.monotonic() - started < settings.shutdown_timeout + 0.5
    [told] = [e for e in logs if e["event"] == "downloads not given back"]
    assert told["download_ids"] == [7]
