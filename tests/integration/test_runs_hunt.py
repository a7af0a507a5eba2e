"""Fault hunt: runs of small files (`asyncsat_hand_over` with `p_more`) against failures,
cancels, pauses, a lowered cap, lost leases, stops, offline rows and a second daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from tests.helpers import FAST, add_provider, drain, queue, rows, sql
from tests.runs import (
    cancel_while_b_runs,
    clean,
    offline_third,
    one_slot_run,
    rows_by_name,
    slow_part,
    slow_run,
    spy_runs,
    until,
)
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(90)


def _starts(server: FileServer) -> list[tuple[str, int, float]]:
    """(file, requests being served as it starts, when) of every answer the server sends."""
    seen: list[tuple[str, int, float]] = []
    real = server._send

    async def send(request: Any, product: Any) -> Any:
        seen.append((request.match_info["name"], server.active["anonymous"], time.monotonic()))
        return await real(request, product)

    server._send = send  # type: ignore[method-assign]
    return seen


# -- failures in the middle of a run ------------------------------------------------------------

async def test_a_run_goes_on_past_a_row_that_fails_404_or_500(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await add_provider(dsn, "local", server.base, {"max_connections": 1, **FAST})
    data = {n: os.urandom(10_000) for n in ("a.nc", "c.nc", "d.nc", "e.nc")}
    for name, body in data.items():
        server.add(name, body)
    server.products["c.nc"].statuses = [(500, {}, b"boom")]  # (b.nc: 404)
    runs = spy_runs(monkeypatch)
    await queue(dsn, *(server.url(n) for n in ("a.nc", "b.nc", "c.nc", "d.nc", "e.nc")))
    await drain(settings)

    by_name = await rows_by_name(dsn)
    assert runs and [by_name[n]["id"] for n in ("b.nc", "c.nc", "d.nc", "e.nc")] == runs[0]
    assert by_name["b.nc"]["status"] == "failed"
    for name, body in data.items():
        assert by_name[name]["status"] == "done", name
        assert Path(by_name[name]["path"]).read_bytes() == body
    assert by_name["c.nc"]["attempts"] == 2  # (the 500, then the file)
    assert server.peak["anonymous"] == 1
    await clean(dsn)


# -- a cancel of the run's last row (the lease's) while it waits -----------------------------

async def test_the_runs_last_row_cancelled_while_it_waits_ends_its_claim_and_slot(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=30.0)
    runs = spy_runs(monkeypatch)
    await queue(dsn, *urls)
    await cancel_while_b_runs(settings, dsn, urls[3])

    by_name = await rows_by_name(dsn)
    assert runs[0] == [by_name[n]["id"] for n in ("b.nc", "c.nc", "d.nc")]  # (d: the lease's)
    assert (by_name["d.nc"]["status"], by_name["d.nc"]["attempts"]) == ("cancelled", 0)
    for name in ("a.nc", "b.nc", "c.nc"):
        assert by_name[name]["status"] == "done"
        assert Path(by_name[name]["path"]).read_bytes() == data[name]
    assert "/files/d.nc" not in [r["path"] for r in server.requests]
    assert server.peak["anonymous"] == 1
    await clean(dsn)


# -- a pause, a lowered cap ------------------------------------------------------------------

async def test_a_pause_starts_no_row_of_a_run_that_waits_its_turn(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A paused provider starts no transfer (running ones finish): the rows of a run that
    have not started go back to the queue, unused."""
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=30.0)
    runs = spy_runs(monkeypatch)
    await queue(dsn, *urls)
    part = slow_part(settings)

    async def b_done() -> bool:
        return (await rows_by_name(dsn)).get("b.nc", {}).get("status") == "done"

    with capture_logs() as logs:
        serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=b_done))
        try:
            await until(lambda: asyncio.sleep(0, part.exists()))
            await sql(dsn, "UPDATE provider SET paused = true WHERE name = 'local'")
            await asyncio.wait_for(serving, 30)
        finally:
            serving.cancel()
    assert any(e["event"] == "provider paused" for e in logs)
    assert runs and len(runs[0]) == 3
    await asyncio.sleep(0.3)
    by_name = await rows_by_name(dsn)
    assert by_name["b.nc"]["status"] == "done"
    assert Path(by_name["b.nc"]["path"]).read_bytes() == data["b.nc"]
    assert [r["path"] for r in server.requests] == ["/files/a.nc", "/files/b.nc"]
    for name in ("c.nc", "d.nc"):
        assert (by_name[name]["status"], by_name[name]["attempts"]) == ("queued", 0), name
    await clean(dsn)


async def test_a_lowered_cap_opens_no_connection_of_a_run_over_it(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two slots, each with a run whose first row is slow; max_connections lowered to 1
    meanwhile: the running rows finish, but no row of the runs starts a connection while
    the account has as many as its new cap."""
    monkeypatch.setattr(engine, "RUN_WAIT", 30.0)
    monkeypatch.setattr(engine, "RUN", 4)  # (runs of 4: each slot's run takes half the rows)
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    names = ["a1.nc", "a2.nc", "b1.nc", "c1.nc", "d1.nc", "e1.nc", "b2.nc", "c2.nc", "d2.nc",
             "e2.nc"]
    data = {n: os.urandom(10_000 if n.startswith("a") else 150_000) for n in names}
    for name, body in data.items():
        server.add(name, body, **({} if name.startswith("a") else {"rate": 300_000}))
    starts = _starts(server)
    runs = spy_runs(monkeypatch)
    await queue(dsn, *(server.url(n) for n in names))
    lowered_at: list[float] = []

    async def lower() -> None:
        await until(lambda: asyncio.sleep(0, len(runs) == 2 and len(starts) >= 4))
        await sql(dsn, "UPDATE provider SET settings = settings || '{\"max_connections\": 1}'"
                       " WHERE name = 'local'")
        await asyncio.sleep(0.1)  # (the daemon reads the accounts again)
        lowered_at.append(time.monotonic())

    lowering = asyncio.create_task(lower())
    await drain(settings)
    await lowering

    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] == "done", name
        assert Path(row["path"]).read_bytes() == data[name]
    over = [(n, active) for n, active, t in starts if t > lowered_at[0] and active > 1]
    assert over == []
    await clean(dsn)


# -- a lost lease ----------------------------------------------------------------------------

async def test_a_run_taken_over_by_another_daemon_is_let_go_and_fetched_once(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While b runs, another daemon owns b, c and d (their leases lapsed and were taken
    over: set with SQL): b is let go, c and d are never started here; each file is
    fetched whole once they come back."""
    monkeypatch.setattr(engine, "RUN_WAIT", 30.0)
    settings = dataclasses.replace(settings, lease_timeout=3.0)
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    data, urls = slow_run(server)
    runs = spy_runs(monkeypatch)
    await queue(dsn, *urls)
    part = slow_part(settings)

    async def all_done() -> bool:
        return {r["status"] for r in await rows(dsn)} == {"done"}

    with capture_logs() as logs:
        serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=all_done))
        try:
            await until(lambda: asyncio.sleep(0, part.exists()))
            await sql(dsn, "INSERT INTO daemon (id, host, pid, version, lease_timeout)"
                           " VALUES ('other', 'elsewhere', 1, 't', 3)")
            taken = await sql(dsn, "UPDATE download SET owner = 'other',"
                                   " lease_expires = now() + interval '2 seconds'"
                                   " WHERE status = 'running' RETURNING id")
            assert sorted(r["id"] for r in taken) == sorted(runs[0])
            await asyncio.wait_for(serving, 40)
        finally:
            serving.cancel()
    lost = {e["download_id"] for e in logs if e["event"].startswith("lease lost")}
    assert set(runs[0]) <= lost
    by_name = await rows_by_name(dsn)
    for name, row in by_name.items():
        assert row["status"] == "done"
        assert Path(row["path"]).read_bytes() == data[name]
    paths = [r["path"] for r in server.requests]
    assert paths.count("/files/c.nc") == 1 and paths.count("/files/d.nc") == 1
    assert server.peak["anonymous"] == 1
    await clean(dsn)


# -- stops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("at", [2, 3, 4])
async def test_a_stop_at_any_moment_of_a_run_leaves_no_lease_no_owned_row(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    monkeypatch.setattr(engine, "RUN_WAIT", 30.0)
    monkeypatch.setattr(engine, "UNTIL_EVERY", 0.01)
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    data, urls = slow_run(server, {"c.nc": 200_000, "d.nc": 200_000})
    runs = spy_runs(monkeypatch)
    await queue(dsn, *urls)

    async def requests_seen() -> bool:
        return len(server.requests) >= at

    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=requests_seen), 30)
    assert runs and len(runs[0]) == 3
    await clean(dsn)
    requested = {Path(str(r["path"])).name for r in server.requests}
    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] in ("done", "queued"), name
        if name not in requested:
            assert row["attempts"] == 0, name
    await drain(settings)
    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] == "done"
        assert Path(row["path"]).read_bytes() == data[name]
    await clean(dsn)


# -- offline rows ----------------------------------------------------------------------------

async def test_an_offline_row_of_a_run_whose_turn_does_not_come_stays_offline_unused(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=0.3)
    await offline_third(dsn, urls)
    runs = spy_runs(monkeypatch)
    with capture_logs() as logs:
        await drain(settings)
    by_name = await rows_by_name(dsn)
    assert runs[0] == [by_name[n]["id"] for n in ("b.nc", "c.nc", "d.nc")]
    back = [e for e in logs if e.get("download_id") == by_name["c.nc"]["id"]
            and e.get("reason") == "its slot is busy"]
    assert [e["event"] for e in back] == ["download offline"]
    for name, row in by_name.items():
        assert (row["status"], row["attempts"]) == ("done", 1), name
        assert Path(row["path"]).read_bytes() == data[name]
    assert [r["path"] for r in server.requests].count("/files/c.nc") == 1
    await clean(dsn)


# -- two daemons -----------------------------------------------------------------------------

async def test_two_daemons_share_a_capped_account_with_many_small_files(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # (two daemons of one process: each would take the other's pid for a dead one's)
    monkeypatch.setattr(daemon, "process_alive", lambda pid: True)
    await add_provider(dsn, "local", server.base, {"max_connections": 3})
    data = {f"s{i:03}.nc": os.urandom(8_000 + i) for i in range(120)}
    for name, body in data.items():
        server.add(name, body)
    runs = spy_runs(monkeypatch)
    await queue(dsn, *(server.url(n) for n in data))

    async def both() -> None:
        await asyncio.gather(
            daemon.serve(settings, Redactor(), exit_when_idle=True),
            daemon.serve(settings, Redactor(), exit_when_idle=True))

    started = time.monotonic()
    await asyncio.wait_for(both(), 60)
    # (the first to be idle does not wait for the other's leases to lapse: 30 s here; the
    # end of another daemon's transfer sends it no NOTIFY)
    assert time.monotonic() - started < 15
    by_name = await rows_by_name(dsn)
    for name, row in by_name.items():
        assert (row["status"], row["attempts"]) == ("done", 1), name
        assert Path(row["path"]).read_bytes() == data[name]
    paths = [r["path"] for r in server.requests]
    assert sorted(paths) == sorted(f"/files/{n}" for n in data)  # each once
    assert server.peak["anonymous"] <= 3
    assert runs  # (runs were claimed)
    await clean(dsn)


# -- a task cancelled before its first step ------------------------------------------------

@pytest.mark.parametrize("position", [0, 1, 2])
async def test_a_run_row_whose_task_is_cancelled_before_it_starts_goes_back(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch, position: int) -> None:
    """A cancel that reaches a row's task before its first step (a user's cancel whose
    NOTIFY comes with the hand-over's answer): the task never runs its own handlers; the
    row must not stay `running`, its slot must not stay held, the daemon must drain."""
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=30.0)
    server.products["b.nc"].rate = 2_000_000
    real = engine.Engine._start
    hit: list[int] = []

    def start(self: engine.Engine, download: Any, lease: Any, turn: Any = None) -> None:
        real(self, download, lease, turn)
        if turn is not None and not hit:
            index = self._starting = getattr(self, "_starting", -1) + 1
            if index == position:
                hit.append(download.id)
                self._tasks[download.id].cancel("cancelled by user")
            if turn.then is None:
                self._starting = -1

    monkeypatch.setattr(engine.Engine, "_start", start)
    await queue(dsn, *urls)
    await drain(settings, timeout=30)
    assert hit
    for name, row in (await rows_by_name(dsn)).items():  # (the cancelled one: back unused)
        assert (row["status"], row["attempts"]) == ("done", 1), name
        assert Path(row["path"]).read_bytes() == data[name]
    await clean(dsn)


# -- a row given back and claimed again before its old task has ended -----------------------

async def test_a_row_claimed_again_while_its_old_task_ends_stays_tracked(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An offline row of a run whose turn does not come is given back in two statements
    (offline again, then its status read): another slot's hand-over may claim it again in
    between. The old task's end must not untrack the new one (else the heartbeat takes its
    row for an orphan: put back, its slot freed, while it transfers)."""
    monkeypatch.setattr(engine, "RUN_WAIT", 0.3)
    settings = dataclasses.replace(settings, lease_timeout=3.0)
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    names = ["a.nc", "s.nc", "b.nc", "c.nc", "d.nc"]
    data = {n: os.urandom(10_000) for n in names}
    data["s.nc"] = os.urandom(100_000)  # (0.5 s: its hand-over claims c again)
    data["b.nc"] = os.urandom(600_000)  # (3 s: c and d do not get their turn)
    data["c.nc"] = os.urandom(500_000)  # (2.5 s: heartbeats meanwhile)
    for name in names:
        server.add(name, data[name], **({} if name in ("a.nc", "d.nc") else
                                        {"rate": 200_000}))
    for i, name in enumerate(names):
        await sql(dsn, "INSERT INTO download (provider_id, url, status, not_before)"
                       " SELECT id, $1, $2, now() - make_interval(secs => $3) FROM provider"
                       " WHERE name = 'local'", server.url(name),
                  "offline" if name == "c.nc" else "queued", 10.0 - i)
    real = queries.download_status

    async def slow_status(db: Any, download_id: int) -> str | None:
        await asyncio.sleep(0.5)  # (a slow round trip)
        return await real(db, download_id)

    monkeypatch.setattr(queries, "download_status", slow_status)
    runs = spy_runs(monkeypatch)
    with capture_logs() as logs:
        await drain(settings)
    by_name = await rows_by_name(dsn)
    assert runs[0] == [by_name[n]["id"] for n in ("b.nc", "c.nc", "d.nc")]
    assert not [e for e in logs if e["event"].startswith("downloads owned with no transfer")]
    for name, row in by_name.items():
        assert row["status"] == "done", name
        assert Path(row["path"]).read_bytes() == data[name]
    assert [r["path"] for r in server.requests].count("/files/c.nc") == 1
    assert server.peak["anonymous"] <= 2
    await clean(dsn)


# -- the migration: schema 4 -> 5, a schema 4 daemon's hand-over -----------------------------

_OLD_SEALING = (  # (schema 4's download_sealing: six arguments, one row handed over)
    "SELECT o.lease_left > 0 AS owned, o.lease_left, o.named, n.* FROM (SELECT (SELECT"
    " extract(epoch FROM lease_expires - now())::float8 FROM download WHERE id = $1"
    " AND status = 'running' AND owner = $2 AND attempts = $3) AS lease_left,"
    " CASE WHEN $8::text[] IS NOT NULL THEN asyncsat_named($1, $2, $3, $8, $9, $10, $11)"
    " END AS named) o LEFT JOIN LATERAL asyncsat_hand_over($2, $4, $1, $5, $6,"
    " $7 AND coalesce(o.lease_left > 0, false)) n ON true")


async def test_a_schema_4_database_upgraded_serves_both_releases_hand_overs(
        pg: Any) -> None:
    import subprocess

    from asyncsat.db.pool import (
        apply_schema,
        database_schema_version,
        schema_sql,
        schema_version,
    )
    from tests.migration.shape import new_database

    old = subprocess.run(["git", "-C", str(Path(__file__).parents[2]), "show",
                          "989f95d~1:asyncsat/schema.sql"], capture_output=True, text=True,
                         check=True).stdout
    _dsn, conn = await new_database(pg)
    try:
        await conn.execute(old)
        assert await database_schema_version(conn) == 4
        assert await apply_schema(conn, always=True)
        assert await apply_schema(conn, always=True)  # (again: idempotent)
        assert await database_schema_version(conn) == schema_version(schema_sql())
        await conn.execute("INSERT INTO provider (name, protocol, url, settings) VALUES"
                           " ('hub', 'http', 'http://127.0.0.1:9/', '{\"max_connections\": 1}')")
        await queries.daemon_register(conn, "old", host="h", pid=1, version="t",
                                      lease_timeout=30)
        provider = await queries.provider_get(conn, "hub")
        assert provider is not None
        for i in range(6):
            await conn.execute("INSERT INTO download (provider_id, url, dest)"
                               " VALUES ($1, $2, '/d')", provider.id, f"http://127.0.0.1:9/{i}")
        [(first, _account, lease)] = await queries.claim(conn, "old", provider.id, 5, 30, "/d")
        # a daemon of schema 4: its statement, six arguments, one row handed over
        got = await conn.fetch(_OLD_SEALING, first.id, "old", first.attempts, lease, 30.0,
                               "/d", True, ["x.nc"], 10, None, None)
        assert [r["download_id"] for r in got] == [first.id + 1] and got[0]["owned"]
        assert [tuple(r) for r in await conn.fetch("SELECT id, download_id FROM lease")] == \
            [(lease, first.id + 1)]
        # this release's: a run
        nxt = await queries.download_status(conn, first.id + 1)
        assert nxt == "running"
        sealed = await queries.download_sealing(
            conn, first.id + 1, queries.Fence("old", 1), lease, lease_seconds=30,
            default_dest="/d", hand_over=True, more=engine.RUN - 1)
        assert [d.id for d, _a, _l in sealed.following] == \
            [first.id + 2, first.id + 3, first.id + 4, first.id + 5]
        assert [tuple(r) for r in await conn.fetch("SELECT id, download_id FROM lease")] == \
            [(lease, first.id + 5)]
    finally:
        await conn.close()


async def test_a_stop_while_a_runs_seals_are_being_written_leaves_no_claim(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The seal of a run's row (not its last) takes long (a busy database): a stop then
    finds the row waiting for it; nothing is left claimed, and the next daemon fetches
    every file whole."""
    monkeypatch.setattr(engine, "UNTIL_EVERY", 0.01)
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    data = {n: os.urandom(10_000) for n in ("a.nc", "b.nc", "c.nc", "d.nc", "e.nc")}
    for name, body in data.items():
        server.add(name, body)
    real = queries.downloads_sealed
    pending: list[int] = []

    async def slow(db: Any, seals: list[queries.Seal]) -> list[queries.Sealed]:
        pending.extend(s.download_id for s in seals)
        await asyncio.sleep(1.0)
        return await real(db, seals)

    monkeypatch.setattr(queries, "downloads_sealed", slow)
    await queue(dsn, *(server.url(n) for n in data))

    async def sealing() -> bool:
        return bool(pending)

    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=sealing), 30)
    assert pending
    await clean(dsn)
    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] in ("done", "queued"), name
        if row["status"] == "done":
            assert Path(row["path"]).read_bytes() == data[name]
    monkeypatch.setattr(queries, "downloads_sealed", real)
    await drain(settings)
    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] == "done"
        assert Path(row["path"]).read_bytes() == data[name]
    await clean(dsn)


@pytest.mark.parametrize("stop_after", [5, 30])
async def test_two_daemons_one_stopping_mid_run_keep_the_cap_and_fetch_every_file(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch, stop_after: int) -> None:
    monkeypatch.setattr(daemon, "process_alive", lambda pid: True)
    monkeypatch.setattr(engine, "UNTIL_EVERY", 0.01)
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    data = {f"s{i:03}.nc": os.urandom(8_000 + i) for i in range(80)}
    for name, body in data.items():
        server.add(name, body, **({"rate": 400_000} if name.endswith("3.nc") else {}))
    runs = spy_runs(monkeypatch)
    await queue(dsn, *(server.url(n) for n in data))

    async def enough() -> bool:
        return len(server.requests) >= stop_after

    await asyncio.wait_for(asyncio.gather(
        daemon.serve(settings, Redactor(), until=enough),
        daemon.serve(settings, Redactor(), exit_when_idle=True)), 60)
    for name, row in (await rows_by_name(dsn)).items():
        assert row["status"] == "done", name
        assert Path(row["path"]).read_bytes() == data[name]
    assert server.peak["anonymous"] <= 2
    assert runs
    await clean(dsn)


async def test_a_row_given_back_and_claimed_again_during_a_heartbeat_is_not_lost(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat looks at the transfers running as it starts; a row of a run given back
    (its turn did not come) and claimed again by this daemon while the heartbeat's
    statement runs is owned by a new transfer: the heartbeat must not take it for lost."""
    monkeypatch.setattr(engine, "RUN_WAIT", 1.2)  # (given back after the heartbeat began)
    settings = dataclasses.replace(settings, lease_timeout=3.0)  # (a heartbeat a second)
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    names = ["a.nc", "s.nc", "b.nc", "c.nc"]
    data = {n: os.urandom(10_000) for n in names}
    data["s.nc"] = os.urandom(300_000)  # (1.5 s: its hand-over claims c again)
    data["b.nc"] = os.urandom(800_000)  # (4 s: c does not get its turn)
    for name in names:
        server.add(name, data[name], **({"rate": 200_000} if name in ("s.nc", "b.nc") else {}))
    for i, name in enumerate(names):
        await sql(dsn, "INSERT INTO download (provider_id, url, not_before) SELECT id, $1,"
                       " now() - make_interval(secs => $2) FROM provider WHERE name = 'local'",
                  server.url(name), 10.0 - i)
    [c_id] = [r["id"] for r in await sql(dsn, "SELECT id FROM download WHERE url = $1",
                                         server.url("c.nc"))]
    given_back, claimed_again = asyncio.Event(), asyncio.Event()
    real_unclaim, real_heartbeat = queries.download_unclaim, queries.heartbeat
    real_start = engine.Engine._start
    starts: list[int] = []

    async def unclaim(db: Any, download_id: int, fence: queries.Fence,
                      **kw: Any) -> str | None:
        status = await real_unclaim(db, download_id, fence, **kw)
        if download_id == c_id:
            given_back.set()
        return status

    def start(self: engine.Engine, download: Any, lease: Any, turn: Any = None) -> None:
        real_start(self, download, lease, turn)
        if download.id == c_id:
            starts.append(c_id)
            if len(starts) == 2:
                claimed_again.set()

    async def heartbeat(db: Any, daemon_id: str, lease_seconds: float) -> set[int]:
        if len(starts) == 1 and not given_back.is_set():  # (c waits its turn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(given_back.wait(), 0.5)
            owned = await real_heartbeat(db, daemon_id, lease_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(claimed_again.wait(), 0.4)
            return owned
        return await real_heartbeat(db, daemon_id, lease_seconds)

    monkeypatch.setattr(queries, "download_unclaim", unclaim)
    monkeypatch.setattr(queries, "heartbeat", heartbeat)
    monkeypatch.setattr(engine.Engine, "_start", start)
    with capture_logs() as logs:
        await drain(settings)
    assert given_back.is_set() and claimed_again.is_set()
    assert not [e for e in logs if e["event"].startswith("lease lost")]
    by_name = await rows_by_name(dsn)
    for name, row in by_name.items():
        assert (row["status"], row["attempts"]) == ("done", 1), name
        assert Path(row["path"]).read_bytes() == data[name]
    await clean(dsn)


async def test_an_offline_row_of_a_run_cancelled_while_it_waits_ends_its_claim(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, urls = await one_slot_run(dsn, server, monkeypatch, wait=30.0)
    await offline_third(dsn, urls)
    runs = spy_runs(monkeypatch)
    await cancel_while_b_runs(settings, dsn, urls[2])
    by_name = await rows_by_name(dsn)
    assert runs[0] == [by_name[n]["id"] for n in ("b.nc", "c.nc", "d.nc")]
    assert (by_name["c.nc"]["status"], by_name["c.nc"]["attempts"]) == ("cancelled", 0)
    for name in ("a.nc", "b.nc", "d.nc"):
        assert by_name[name]["status"] == "done"
        assert Path(by_name[name]["path"]).read_bytes() == data[name]
    assert "/files/c.nc" not in [r["path"] for r in server.requests]
    await clean(dsn)


# -- the plan of the run's seals on a large table ---------------------------------------------

from tests.integration.test_plans import (  # noqa: E402  (their 200,000 downloads)
    RUNNING,
    Explained,
    _examined,
    _no_seq_scan,
    big,  # noqa: F401
    ex,  # noqa: F401
)


async def test_the_seals_of_a_run_read_their_rows_by_key(ex: Explained) -> None:  # noqa: F811
    first = await ex.conn.fetchval("SELECT min(id) FROM download WHERE status = 'running'")
    ids = [first, first + 1, first + 2]
    assert RUNNING >= 3
    seals = [queries.Seal(i, queries.Fence("gone", 0), (f"run{i}.nc", f"run{i}_2.nc"), 10,
                          None, None) for i in ids]

    class Undo(Exception):
        pass

    for _ in range(7):  # (a generic plan after five runs)
        with contextlib.suppress(Undo):
            async with ex.conn.transaction():
                got, plans = await ex.run(queries.downloads_sealed(ex.conn, seals))
                raise Undo
        assert [s.name for s in got] == [f"run{i}.nc" for i in ids]
        _no_seq_scan(plans)
        assert _examined(plans) <= 10 * len(ids)


async def test_an_idle_run_ends_soon_after_another_daemons_last_transfer(
        dsn: str, settings: Settings) -> None:
    """A daemon that would exit when idle, with nothing of its own to do, waits for a row
    another live daemon runs: that row's end sends it no NOTIFY, and its lease lapses in
    `lease_timeout` (30 s); it looks again every second instead."""
    await add_provider(dsn, "local", "http://127.0.0.1:9/files/", {})
    conn = await connect(dsn)
    try:
        await queries.daemon_register(conn, "A", host="elsewhere", pid=1, version="t",
                                      lease_timeout=30)
        await conn.execute(
            "INSERT INTO download (provider_id, url, dest, status, owner, attempts,"
            " lease_expires) SELECT id, 'http://127.0.0.1:9/files/x.nc', '/d', 'running', 'A',"
            " 1, now() + interval '30 seconds' FROM provider WHERE name = 'local'")
    finally:
        await conn.close()
    serving = asyncio.create_task(daemon.serve(settings, Redactor(), exit_when_idle=True))
    await asyncio.sleep(1.0)
    assert not serving.done()  # (it waits for A's row)
    await sql(dsn, "UPDATE download SET status = 'done', owner = NULL, path = '/d/x.nc'")
    ended = time.monotonic()
    await asyncio.wait_for(serving, 10)
    assert time.monotonic() - ended < 3
