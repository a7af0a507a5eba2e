"""Small files come in runs: after a small file (held whole), its slot's hand-over claims the
provider's next row and up to `RUN - 1` after it, and the slot takes them in turn over its
one connection, with no statement between them. A row whose turn does not come within
`RUN_WAIT` (the row before it is slow), or that is stopped or cancelled while it waits,
goes back as it was, its attempt unused."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from asyncsat import daemon, engine
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.logs import Redactor
from tests.helpers import add_provider, drain, queue, rows, sql
from tests.runs import cancel_while_b_runs, one_slot_run, rows_by_name, slow_part, spy_hand_overs
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


async def test_small_files_are_claimed_in_runs_within_the_cap(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    data = {f"s{i:02}.nc": os.urandom(20_000 + i) for i in range(24)}
    for name, body in data.items():
        server.add(name, body)
    sealings = spy_hand_overs(monkeypatch)
    await queue(dsn, *(server.url(n) for n in data))
    await drain(settings)

    for name, row in (await rows_by_name(dsn)).items():
        assert (row["status"], row["attempts"]) == ("done", 1)
        assert Path(row["path"]).read_bytes() == data[name]
    assert len(server.requests) == len(data)  # every file fetched once
    # runs were claimed: fewer hand-overs than files, some of several rows
    assert all(0 <= more <= engine.RUN - 1 for more, _n in sealings)
    assert max(n for _more, n in sealings) > 1
    assert sum(1 for _more, n in sealings if n) < len(data) - 2
    assert server.peak["anonymous"] <= 2  # the account's cap, never exceeded
    assert await sql(dsn, "SELECT * FROM lease") == []


async def test_a_row_whose_turn_does_not_come_goes_back_unused(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One slot; after a small file, a run of a slow file and two small ones: the small
    ones give their claim back when their turn does not come, and run after the slow one,
    each on its first attempt."""
    monkeypatch.setattr(engine, "RUN_WAIT", 0.3)
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    small = {n: os.urandom(10_000) for n in ("a.nc", "c.nc", "d.nc")}
    slow = os.urandom(200_000)
    server.add("a.nc", small["a.nc"])
    server.add("b.nc", slow, rate=150_000)  # about 1.3 s
    server.add("c.nc", small["c.nc"])
    server.add("d.nc", small["d.nc"])
    sealings = spy_hand_overs(monkeypatch)
    await queue(dsn, *(server.url(n) for n in ("a.nc", "b.nc", "c.nc", "d.nc")))
    with capture_logs() as logs:
        await drain(settings)

    by_name = await rows_by_name(dsn)
    for name, row in by_name.items():
        assert (row["status"], row["attempts"]) == ("done", 1), name
    assert Path(by_name["b.nc"]["path"]).read_bytes() == slow
    for name, body in small.items():
        assert Path(by_name[name]["path"]).read_bytes() == body
    assert sealings[0] == (engine.RUN - 1, 3)  # a's hand-over: b, c and d
    given_back = sorted(e["download_id"] for e in logs if e["event"] == "download queued"
                        and e.get("reason") == "its slot is busy")
    assert given_back == sorted([by_name["c.nc"]["id"], by_name["d.nc"]["id"]])
    starts = {e["download_id"]: e["attempt"] for e in logs if e["event"] == "download running"}
    assert starts == {row["id"]: 1 for row in by_name.values()}  # (none ran before its turn)
    assert server.peak["anonymous"] == 1
    assert await sql(dsn, "SELECT * FROM lease") == []


async def test_a_stop_puts_the_rows_waiting_their_turn_back_unused(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=30.0, rate=100_000)
    sealings = spy_hand_overs(monkeypatch)
    await queue(dsn, *urls)
    part = slow_part(settings)

    async def slow_one_under_way() -> bool:
        return part.exists() and part.stat().st_size > 0

    started = time.monotonic()
    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=slow_one_under_way), 30)
    assert time.monotonic() - started < 6  # (stopped, not run to the end)
    assert sealings[0] == (engine.RUN - 1, 3)  # a's hand-over claimed b, c and d

    by_name = await rows_by_name(dsn)
    assert (by_name["a.nc"]["status"], by_name["a.nc"]["attempts"]) == ("done", 1)
    assert (by_name["b.nc"]["status"], by_name["b.nc"]["attempts"]) == ("queued", 1)
    assert 0 < by_name["b.nc"]["bytes_done"] < len(data["b.nc"])
    for name in ("c.nc", "d.nc"):  # claimed, never started: as they were
        assert (by_name[name]["status"], by_name[name]["attempts"]) == ("queued", 0), name
    assert [r["path"] for r in server.requests] == ["/files/a.nc", "/files/b.nc"]
    assert await sql(dsn, "SELECT * FROM lease") == []
    assert await sql(dsn, "SELECT id FROM download WHERE owner IS NOT NULL") == []

    await drain(settings)  # the next daemon resumes the slow one and runs the others
    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] == "done"
        assert Path(row["path"]).read_bytes() == data[name]


async def test_a_row_cancelled_while_it_waits_its_turn_stays_cancelled(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=30.0, rate=100_000)
    sealings = spy_hand_overs(monkeypatch)
    await queue(dsn, *urls)
    await cancel_while_b_runs(settings, dsn, urls[2])

    assert sealings[0] == (engine.RUN - 1, 3)  # a's hand-over claimed b, c and d
    by_name = await rows_by_name(dsn)
    assert by_name["c.nc"]["status"] == "cancelled"
    for name in ("a.nc", "b.nc", "d.nc"):
        assert by_name[name]["status"] == "done"
        assert Path(by_name[name]["path"]).read_bytes() == data[name]
    assert "/files/c.nc" not in [r["path"] for r in server.requests]
    assert not (settings.dest / "local" / "c.nc").exists() if settings.dest else True
    assert await sql(dsn, "SELECT * FROM lease") == []


async def _run_of(dsn: str, n: int) -> tuple[Any, list[queries.Download], int]:
    """A provider of one slot with `n` + 1 queued rows, a daemon `D`, its claim of the
    first, and the run its hand-over claims after it (the rest)."""
    await add_provider(dsn, "hub", "http://127.0.0.1:9/", {"max_connections": 1})
    conn = await connect(dsn)
    await queries.daemon_register(conn, "D", host="h", pid=1, version="t", lease_timeout=30)
    provider = await queries.provider_get(conn, "hub")
    assert provider is not None
    for i in range(n + 1):
        await conn.execute("INSERT INTO download (provider_id, url, dest) VALUES ($1, $2, '/d')",
                           provider.id, f"http://127.0.0.1:9/f{i}")
    [(first, _account, lease)] = await queries.claim(conn, "D", provider.id, 5, 30, "/d")
    sealed = await queries.download_sealing(
        conn, first.id, queries.Fence("D", first.attempts), lease, lease_seconds=30,
        default_dest="/d", hand_over=True, more=n - 1)
    return conn, [row for row, _account, _lease in sealed.following], lease


async def test_a_hand_over_claims_a_run_whose_last_row_holds_the_slot(dsn: str) -> None:
    conn, run, lease = await _run_of(dsn, 3)
    try:
        assert len(run) == 3 and all(d.status == "running" for d in run)
        assert [tuple(r) for r in await sql(dsn, "SELECT id, download_id FROM lease")] == \
            [(lease, run[-1].id)]  # one slot, the run's last row's
        # the rows before the last hand nothing over: the slot stays the last one's
        for d in run[:-1]:
            sealed = await queries.download_sealing(
                conn, d.id, queries.Fence("D", d.attempts), lease, lease_seconds=30,
                default_dest="/d", hand_over=True, more=3)
            assert (sealed.owned, sealed.following) == (True, [])
        assert [tuple(r) for r in await sql(dsn, "SELECT id, download_id FROM lease")] == \
            [(lease, run[-1].id)]
        # an unused row goes back as it was
        assert await queries.download_unclaim(
            conn, run[1].id, queries.Fence("D", run[1].attempts)) == "queued"
        [back] = await sql(dsn, "SELECT status, attempts, owner FROM download WHERE id = $1",
                           run[1].id)
        assert tuple(back) == ("queued", 0, None)
    finally:
        await conn.close()


async def test_rows_of_a_run_are_sealed_together_never_waiting_while_holding(
        dsn: str) -> None:
    """Held files of a run record their names in one statement; a row another transaction
    holds is sealed alone once it is free, after the others were committed; a row no
    longer the claim's is told so."""
    conn, run, _lease = await _run_of(dsn, 4)
    a, b, c, d = run
    other = await connect(dsn)
    try:
        await conn.execute("UPDATE download SET name = 'taken.nc' WHERE id = $1", d.id)
        seals = [queries.Seal(x.id, queries.Fence("D", x.attempts), (f"{n}.nc", f"{n}_2.nc"),
                              10, '"e"', None) for x, n in ((a, "a"), (b, "b"))]
        seals.append(queries.Seal(c.id, queries.Fence("D", c.attempts), ("taken.nc", "c.nc"),
                                  10, None, None))
        seals.append(queries.Seal(d.id, queries.Fence("D", d.attempts - 1)))  # (stale)
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM download WHERE id = $1 FOR UPDATE", b.id)
        sealing = asyncio.create_task(queries.downloads_sealed(conn, seals))
        for _ in range(100):  # the rows nobody holds are committed meanwhile
            await asyncio.sleep(0.02)
            names = {r["id"]: r["name"] for r in await sql(
                dsn, "SELECT id, name FROM download WHERE id = ANY($1)", [a.id, c.id])}
            if names == {a.id: "a.nc", c.id: "c.nc"}:
                break
        assert names == {a.id: "a.nc", c.id: "c.nc"} and not sealing.done()
        await tx.rollback()
        got = await asyncio.wait_for(sealing, 10)
        assert [(s.owned, s.name) for s in got] == \
            [(True, "a.nc"), (True, "b.nc"), (True, "c.nc"), (False, None)]
        assert all(s.lease_left is not None and 25 < s.lease_left <= 30 for s in got[:3])
        [row] = await sql(dsn, "SELECT name, size, etag FROM download WHERE id = $1", b.id)
        assert tuple(row) == ("b.nc", 10, '"e"')
    finally:
        await other.close()
        await conn.close()


async def test_rows_waiting_their_turn_do_not_start_once_their_provider_is_paused(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=30.0, rate=100_000)
    sealings = spy_hand_overs(monkeypatch)
    await queue(dsn, *urls)
    part = slow_part(settings)
    paused = False

    async def given_back() -> bool:
        nonlocal paused
        if not paused and part.exists():
            await sql(dsn, "UPDATE provider SET paused = true WHERE name = 'local'")
            paused = True
        states = {r["url"]: r["status"] for r in await rows(dsn)}
        return states.get(urls[1]) == "done" and \
            states.get(urls[2]) == states.get(urls[3]) == "queued"

    with capture_logs() as logs:
        await asyncio.wait_for(daemon.serve(settings, Redactor(), until=given_back), 30)

    assert paused and sealings[0] == (engine.RUN - 1, 3)  # a's hand-over claimed b, c, d
    by_name = await rows_by_name(dsn)
    assert by_name["b.nc"]["status"] == "done"  # (the running one finished)
    for name in ("c.nc", "d.nc"):
        assert (by_name[name]["status"], by_name[name]["attempts"]) == ("queued", 0), name
    assert sorted(e["download_id"] for e in logs if e.get("reason") == "provider paused") == \
        sorted([by_name["c.nc"]["id"], by_name["d.nc"]["id"]])
    assert [r["path"] for r in server.requests] == ["/files/a.nc", "/files/b.nc"]
    assert await sql(dsn, "SELECT * FROM lease") == []

    await sql(dsn, "UPDATE provider SET paused = false WHERE name = 'local'")
    await drain(settings)
    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] == "done" and Path(row["path"]).read_bytes() == data[name]
