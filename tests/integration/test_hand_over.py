"""A transfer's slot handed over to the provider's next file (`asyncsat_hand_over`): never
twice, never lost with a cancelled transfer, never past a waiting search, and an idle run
still ends."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.logs import Redactor
from asyncsat.transfer import files
from tests.helpers import add_provider, queue, rows, sql
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


async def _claimed(dsn: str, n: int = 3) -> tuple[Any, Any, tuple[Any, str, int]]:
    """A provider of one slot with `n` queued rows, a registered daemon `D` and its claim."""
    await add_provider(dsn, "hub", "http://127.0.0.1:9/", {"max_connections": 1})
    conn = await connect(dsn)
    await queries.daemon_register(conn, "D", host="h", pid=1, version="t", lease_timeout=30)
    provider = await queries.provider_get(conn, "hub")
    assert provider is not None
    for i in range(n):
        await conn.execute("INSERT INTO download (provider_id, url, dest) VALUES ($1, $2, '/d')",
                           provider.id, f"http://127.0.0.1:9/f{i}")
    [claimed] = await queries.claim(conn, "D", provider.id, 5, 30, "/d")
    return conn, provider, claimed


async def test_a_repeated_hand_over_hands_nothing_over_twice(dsn: str) -> None:
    """A statement retried after its answer was lost (the connection broke after the
    commit) must not take a second row with the same slot."""
    conn, _provider, (d, _account, lease) = await _claimed(dsn)
    try:
        fence = queries.Fence("D", d.attempts)
        sealed = await queries.download_sealing(
            conn, d.id, fence, lease, lease_seconds=30, default_dest="/d", hand_over=True)
        assert sealed.owned and len(sealed.following) == 1
        following = sealed.following[0]
        assert sealed.lease_left is not None and 28 < sealed.lease_left <= 30
        again = await queries.download_sealing(
            conn, d.id, fence, lease, lease_seconds=30, default_dest="/d", hand_over=True)
        assert (again.owned, again.following) == (True, [])
        assert [(r["id"], r["status"]) for r in await sql(
            dsn, "SELECT id, status FROM download ORDER BY id")] == \
            [(d.id, "running"), (following[0].id, "running"), (following[0].id + 1, "queued")]
        assert [tuple(r) for r in await sql(dsn, "SELECT id, download_id FROM lease")] == \
            [(lease, following[0].id)]  # the slot is the next row's, still
    finally:
        await conn.close()


async def test_a_waiting_search_gets_the_next_slot(dsn: str) -> None:
    """While a listing or a search waits for a slot of the provider, a transfer's slot is
    given back instead of handed on (else the search would wait for the whole queue)."""
    conn, provider, (d, _account, lease) = await _claimed(dsn)
    try:
        assert await queries.lease_take(conn, "D", provider.id, 30) is None  # it waits
        fence = queries.Fence("D", d.attempts)
        sealed = await queries.download_sealing(
            conn, d.id, fence, lease, lease_seconds=30, default_dest="/d", hand_over=True)
        assert (sealed.owned, sealed.following, sealed.name) == (True, [], None)
        # nor does a claim take the slot the search waits for
        assert await queries.claim(conn, "D", provider.id, 5, 30, "/d") == []
        taken = await queries.lease_take(conn, "D", provider.id, 30)
        assert taken is not None
        assert await sql(dsn, "SELECT * FROM lease_wait") == []
    finally:
        await conn.close()


async def test_a_transfer_cancelled_while_its_slot_is_handed_over_loses_nothing(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user cancels a download just as its slot goes to the next one: the next one
    still runs (the slot is not lost with a row `running` that nobody works)."""
    server = await FileServer().start()
    try:
        await add_provider(dsn, "hub", server.base, {"max_connections": 1})
        names = [f"f{i}.bin" for i in range(3)]
        for n in names:
            server.add(n, os.urandom(100_000))
        await queue(dsn, *(server.url(n) for n in names))
        real = queries.download_sealing
        first: list[int] = []
        answered = asyncio.Event()

        async def slow(db: Any, download_id: int, *a: Any, **kw: Any) -> Any:
            result = await real(db, download_id, *a, **kw)
            if not first:
                first.append(download_id)
                answered.set()
                await asyncio.sleep(1.0)  # the cancel lands here, after the commit
            return result

        monkeypatch.setattr(queries, "download_sealing", slow)
        serving = asyncio.create_task(daemon.serve(settings, Redactor(), exit_when_idle=True))
        await asyncio.wait_for(answered.wait(), 20)
        await sql(dsn, "UPDATE download SET status = 'cancelled' WHERE id = $1", first[0])
        # at once: not after two heartbeats put the row back (the safety net)
        await asyncio.wait_for(serving, 8)
    finally:
        await server.stop()
    statuses = {r["id"]: r["status"] for r in await rows(dsn)}
    assert statuses.pop(first[0]) == "cancelled"
    assert set(statuses.values()) == {"done"}
    assert await sql(dsn, "SELECT * FROM lease") == []


async def test_an_idle_run_ends_when_the_giver_of_a_slot_ends_last(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file that handed its slot over is still being flushed when the next one ends:
    `run --exit-when-idle` must still notice that the queue is drained."""
    server = await FileServer().start()
    try:
        await add_provider(dsn, "hub", server.base, {"max_connections": 1})
        server.add("big.bin", os.urandom(300_000))
        server.add("small.bin", os.urandom(1000))
        await queue(dsn, server.url("big.bin"), server.url("small.bin"))
        real = files.PartFile.finish

        async def slow(self: files.PartFile, total: int | None, name: str) -> Any:
            if name == "big.bin":
                await asyncio.sleep(1.5)  # a long fsync of a large file
            return await real(self, total, name)

        monkeypatch.setattr(files.PartFile, "finish", slow)
        await asyncio.wait_for(daemon.serve(settings, Redactor(), exit_when_idle=True), 15)
    finally:
        await server.stop()
    assert {r["name"]: r["status"] for r in await rows(dsn)} == \
        {"big.bin": "done", "small.bin": "done"}


async def test_a_row_owned_with_no_transfer_is_put_back_by_the_heartbeat(
        dsn: str, settings: Settings) -> None:
    """The safety net: a row the daemon owns in the database but no transfer of it works
    (an answer lost with the connection) goes back to the queue after two heartbeats, and
    is fetched."""
    from dataclasses import replace

    server = await FileServer().start()
    try:
        server.add("lost.bin", os.urandom(20_000))
        await add_provider(dsn, "hub", server.base, {"max_connections": 2})
        fast = replace(settings, lease_timeout=1.5)  # a heartbeat every 0.5 s

        async def orphaned() -> None:
            # the daemon's own claim of a row, as if its answer never arrived
            for _ in range(200):
                got = await sql(dsn, "SELECT id FROM daemon WHERE stopped_at IS NULL")
                if got:
                    break
                await asyncio.sleep(0.02)
            await sql(dsn, "INSERT INTO download (provider_id, url, name, dest, status, owner,"
                           " attempts, lease_expires) SELECT id, $1, 'lost.bin', $2, 'running',"
                           " $3, 1, now() + interval '1 hour' FROM provider",
                      server.url("lost.bin"), str(settings.dest), got[0]["id"])

        async def done() -> bool:
            return [r["status"] for r in await rows(dsn)] == ["done"]

        await asyncio.wait_for(asyncio.gather(
            orphaned(), daemon.serve(fast, Redactor(), until=done)), 15)
    finally:
        await server.stop()
    assert [r["status"] for r in await rows(dsn)] == ["done"]


async def test_hand_overs_and_heartbeats_run_side_by_side(dsn: str, settings: Settings) -> None:
    """Many short files, and a heartbeat every 0.2 s renewing the leases of the rows being
    handed over: the statements lock rows in the same order (download, then lease), so no
    deadlock ends the daemon or a transfer (a review found one when a hand-over also wrote
    its download row)."""
    from dataclasses import replace

    server = await FileServer().start()
    try:
        names = [f"s{i}.bin" for i in range(2000)]
        for n in names:
            server.add(n, os.urandom(1024))
        await add_provider(dsn, "hub", server.base, {"max_connections": 4})
        # rows as a catalog queues them, with their names
        await sql(dsn, "INSERT INTO download (provider_id, url, name, dest) SELECT p.id,"
                       " $1 || n, n, $2 FROM provider p, unnest($3::text[]) n",
                  server.base, str(settings.dest), names)
        fast = replace(settings, lease_timeout=0.6, progress_interval=30.0)
        await asyncio.wait_for(daemon.serve(fast, Redactor(), exit_when_idle=True), 50)
    finally:
        await server.stop()
    got = await sql(dsn, "SELECT status, attempts, error FROM download")
    assert {r["status"] for r in got} == {"done"}
    assert {r["attempts"] for r in got} == {1}, [r["error"] for r in got if r["attempts"] > 1]


async def test_a_held_file_is_named_with_its_hand_over_only_while_it_is_the_claims(
        dsn: str) -> None:
    """The name of a file held in memory goes with its slot's hand-over: the first name
    no other download of the folder has; nothing for a row that is no longer the claim's."""
    conn, provider, (d, _account, lease) = await _claimed(dsn)
    try:
        await conn.execute("INSERT INTO download (provider_id, url, dest, name) VALUES"
                           " ($1, 'http://127.0.0.1:9/x', '/d', 'a.nc'),"
                           " ($1, 'http://127.0.0.1:9/y', '/d', 'b.nc')", provider.id)
        stale = queries.Fence("D", d.attempts - 1)
        sealed = await queries.download_sealing(
            conn, d.id, stale, lease, lease_seconds=30, default_dest="/d", hand_over=True,
            names=["c.nc"], size=10, etag='"e"', last_modified=None)
        assert sealed == (False, [], None, None)  # (and its slot is given back)
        fence = queries.Fence("D", d.attempts)
        sealed = await queries.download_sealing(
            conn, d.id, fence, lease, lease_seconds=30, default_dest="/d", hand_over=True,
            names=["a.nc", "b.nc"], size=10, etag='"e"', last_modified=None)
        assert sealed.owned and sealed.name == ""  # both taken
        named = await queries.download_named(
            conn, d.id, fence, names=["a.nc", "c.nc"], size=10, etag='"e"',
            last_modified="Tue, 01 Oct 2024 10:00:00 GMT")
        assert named == "c.nc"
        row = await conn.fetchrow("SELECT name, size, etag, last_modified FROM download"
                                  " WHERE id = $1", d.id)
        assert tuple(row) == ("c.nc", 10, '"e"', "Tue, 01 Oct 2024 10:00:00 GMT")
        assert await queries.download_named(
            conn, d.id, stale, names=["d.nc"], size=10, etag=None, last_modified=None) is None
    finally:
        await conn.close()


async def test_a_claim_never_waits_for_a_lapsed_lease_a_hand_over_holds(dsn: str) -> None:
    """A hand-over locks its lease, then the provider's row; a claim holds the provider's row
    and deleted the lapsed leases, waiting for a lapsed one the hand-over had locked just
    before it lapsed: each waited for the other (a deadlock, seen after a database outage
    let many leases lapse at once). The claim now skips it, and counts it as used."""
    conn, provider, (_d, _account, lease) = await _claimed(dsn)
    other = await connect(dsn)
    try:
        await queries.daemon_register(other, "E", host="h", pid=2, version="t",
                                      lease_timeout=30)
        await conn.execute("UPDATE lease SET expires_at = now() - interval '1 second'"
                           " WHERE id = $1", lease)
        async with conn.transaction():  # (the hand-over's first step)
            await conn.execute("SELECT 1 FROM lease WHERE id = $1 FOR UPDATE", lease)
            claimed = await asyncio.wait_for(
                queries.claim(other, "E", provider.id, 5, 30, "/d"), 2)
        assert claimed == []  # (the held lease's slot is not handed out twice)
        assert [r["id"] for r in await sql(dsn, "SELECT id FROM lease")] == [lease]
    finally:
        await other.close()
        await conn.close()
