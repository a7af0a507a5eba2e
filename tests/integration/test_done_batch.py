"""`downloads_done`: the files that end together recorded in one statement, fenced per row,
never waiting for one row while holding others, and counted once after a lost answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.db.queries import Done, Fence
from tests.helpers import add_provider, sql

pytestmark = pytest.mark.timeout(60)


async def _running(dsn: str, n: int, owner: str = "D") -> list[int]:
    """`n` rows running under `owner`, attempt 1; one of them asked for by a second request
    that wants it in another folder."""
    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    made = await sql(dsn, "INSERT INTO download (provider_id, url, dest, name, status, owner,"
                          " attempts, lease_expires)"
                          " SELECT (SELECT id FROM provider), 'http://127.0.0.1:9/f' || g, '/d',"
                          " 'f' || g, 'running', $2, 1, now() + interval '1 hour'"
                          " FROM generate_series(1, $1::int) g RETURNING id", n, owner)
    ids = sorted(r["id"] for r in made)
    await sql(dsn, "WITH r AS (INSERT INTO request (urls, status, dest)"
                   " VALUES (ARRAY['x'], 'resolved', '/other') RETURNING id)"
                   " INSERT INTO request_download (request_id, download_id, dest)"
                   " SELECT id, $1, '/other' FROM r", ids[0])
    return ids


@asynccontextmanager
async def _held(dsn: str, row_id: int) -> AsyncIterator[tuple[Any, Callable[[], Awaitable[None]]]]:
    """A connection to write with, and `let_go()`: until it is awaited, another session
    holds the row (as an open psql session, or a heartbeat, would)."""
    holder = await connect(dsn)
    writer = await connect(dsn)
    try:
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT 1 FROM download WHERE id = $1 FOR UPDATE", row_id)
        yield writer, holding.rollback
    finally:
        await holder.close()
        await writer.close()


def _done(ids: list[int], owner: str = "D") -> list[Done]:
    return [Done(i, Fence(owner, 1), 100 + i, f"/d/hub/f{i}") for i in ids]


async def _statuses(dsn: str) -> dict[int, str]:
    return {r["id"]: r["status"] for r in await sql(dsn, "SELECT id, status FROM download")}


async def test_rows_are_recorded_each_with_its_size_path_and_copies_owed(dsn: str) -> None:
    ids = await _running(dsn, 3)
    conn = await connect(dsn)
    try:
        owed = await queries.downloads_done(conn, _done(ids))
    finally:
        await conn.close()
    [request] = await sql(dsn, "SELECT id FROM request")
    assert owed == [[(request["id"], "/other")], [], []]
    got = {r["id"]: r for r in await sql(dsn, "SELECT * FROM download")}
    for i in ids:
        assert (got[i]["status"], got[i]["size"], got[i]["bytes_done"], got[i]["path"],
                got[i]["owner"]) == ("done", 100 + i, 100 + i, f"/d/hub/f{i}", None)


async def test_a_row_no_longer_this_claims_is_left_alone(dsn: str) -> None:
    """Taken over by another daemon (a new owner and attempt) or cancelled by a user: None,
    and the row is not recorded done (a cancelled one only loses its owner:
    `test_a_row_cancelled_under_its_transfer_keeps_no_owner`); the others are recorded."""
    ids = await _running(dsn, 3)
    await sql(dsn, "UPDATE download SET owner = 'E', attempts = 2 WHERE id = $1", ids[1])
    await sql(dsn, "UPDATE download SET status = 'cancelled' WHERE id = $1", ids[2])
    conn = await connect(dsn)
    try:
        owed = await queries.downloads_done(conn, _done(ids))
    finally:
        await conn.close()
    assert owed[0] is not None and owed[1:] == [None, None]
    assert await _statuses(dsn) == {ids[0]: "done", ids[1]: "running", ids[2]: "cancelled"}


async def test_a_row_cancelled_under_its_transfer_keeps_no_owner(dsn: str) -> None:
    """A user cancels a running row (`asyncsat cancel`) as its file gets its final name: the
    record finds it cancelled, not done (None), and it stays cancelled; but its claim ends
    all the same, as a stopped transfer's does (`download_stopped`): no owner, whether the
    cancel committed before the statement or while it waited for the row. Before, the owner
    stayed on the cancelled row for good. A row another claim owns is left alone."""
    ids = await _running(dsn, 4)
    await sql(dsn, "UPDATE download SET owner = 'E', attempts = 2 WHERE id = $1", ids[3])
    conn = await connect(dsn)
    await queries.cancel(conn, [ids[0], ids[3]])
    cancelling = await connect(dsn)
    try:
        async with cancelling.transaction():  # (a cancel not committed yet)
            await queries.cancel(cancelling, [ids[1]])
            task = asyncio.ensure_future(queries.downloads_done(conn, _done(ids)))
            for _ in range(200):
                if (await _statuses(dsn))[ids[2]] == "done":
                    break
                await asyncio.sleep(0.02)
        owed = await asyncio.wait_for(task, 10)
    finally:
        await cancelling.close()
        await conn.close()
    assert owed[:2] == [None, None] and owed[2] is not None and owed[3] is None
    got = {r["id"]: (r["status"], r["owner"]) for r in await sql(
        dsn, "SELECT id, status, owner FROM download")}
    assert got == {ids[0]: ("cancelled", None), ids[1]: ("cancelled", None),
                   ids[2]: ("done", None), ids[3]: ("cancelled", "E")}, got


async def test_a_row_another_transaction_holds_is_written_alone_after_the_others(
        dsn: str) -> None:
    """The statement never waits for a row while it holds others (a cycle with a
    statement that locks several rows in another order is a deadlock): the rows nobody
    holds are recorded at once, the held one when it is let go."""
    ids = await _running(dsn, 3)
    async with _held(dsn, ids[1]) as (writer, let_go):
        task: asyncio.Task[Any] = asyncio.ensure_future(
            queries.downloads_done(writer, _done(ids)))
        for _ in range(200):
            if (await _statuses(dsn))[ids[2]] == "done":
                break
            await asyncio.sleep(0.02)
        assert await _statuses(dsn) == {ids[0]: "done", ids[1]: "running", ids[2]: "done"}
        assert not task.done()  # it waits for the held row alone, the others committed
        await let_go()
        owed = await asyncio.wait_for(task, 10)
    assert all(o is not None for o in owed)
    assert set((await _statuses(dsn)).values()) == {"done"}


async def test_the_same_records_again_after_a_lost_answer_count_as_recorded(dsn: str) -> None:
    """The connection broke after the commit and the statement runs again: the rows this
    attempt ended are reported done (their copies still owed), not as lost leases; a row
    another attempt ended is not."""
    ids = await _running(dsn, 2)
    conn = await connect(dsn)
    try:
        first = await queries.downloads_done(conn, _done(ids))
        await conn.execute("UPDATE download SET attempts = 3 WHERE id = $1", ids[1])
        again = await queries.downloads_done(conn, _done(ids))
    finally:
        await conn.close()
    assert again[0] == first[0] and again[0]
    assert again[1] is None


async def test_a_row_held_for_long_fails_its_record_after_the_others_are_written(
        dsn: str) -> None:
    """A row some transaction holds for over 5 s (an open psql session): the others are
    recorded, the call then raises LockNotAvailableError (not None: the row is not lost),
    and the same records again, once it is let go, are all recorded."""
    import asyncpg

    ids = await _running(dsn, 2)
    async with _held(dsn, ids[0]) as (writer, let_go):
        with pytest.raises(asyncpg.LockNotAvailableError):
            await asyncio.wait_for(queries.downloads_done(writer, _done(ids)), 30)
        assert await _statuses(dsn) == {ids[0]: "running", ids[1]: "done"}
        await let_go()
        owed = await asyncio.wait_for(queries.downloads_done(writer, _done(ids)), 10)
    assert all(o is not None for o in owed)
    assert set((await _statuses(dsn)).values()) == {"done"}
