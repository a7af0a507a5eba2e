"""What `get --wait` asks at its turns: is the request settled (`request_settled`)?"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from asyncsat.db import queries
from asyncsat.models import TERMINAL
from tests.helpers import add_provider

T = sorted(TERMINAL)


async def test_settled_once_resolved_and_every_download_final(dsn: str, db: Any) -> None:
    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    rid = await db.fetchval("INSERT INTO request (urls, status) VALUES ('{}', 'queued')"
                            " RETURNING id")
    assert await queries.request_settled(db, rid, T) is False  # not resolved yet
    await db.execute("UPDATE request SET status = 'resolved' WHERE id = $1", rid)
    assert await queries.request_settled(db, rid, T) is True  # nothing to fetch
    ids = [await db.fetchval(
        "INSERT INTO download (request_id, provider_id, url, status) SELECT $1, id, $2, $3"
        " FROM provider RETURNING id", rid, f"http://127.0.0.1:9/{n}", status)
        for n, status in enumerate(("done", "running", "failed"))]
    await db.executemany("INSERT INTO request_download (request_id, download_id)"
                         " VALUES ($1, $2)", [(rid, i) for i in ids])
    assert await queries.request_settled(db, rid, T) is False  # one still running
    await db.execute("UPDATE download SET status = 'done' WHERE id = $1", ids[1])
    assert await queries.request_settled(db, rid, T) is True


async def test_a_request_deleted_meanwhile_is_settled(db: Any) -> None:
    """(it returned None before, and `get --wait` waited for ever)"""
    assert await queries.request_settled(db, 123456, T) is True


async def test_a_waiter_looks_at_its_request_a_few_times_not_at_every_change(
        dsn: str, db: Any, settings: Any, monkeypatch: Any) -> None:
    """`get --wait` beside a running daemon: every download that changes sends a NOTIFY
    (hundreds a second with small files); the waiter looks at the request at most every
    `LOOK_GAP` seconds, not once per change (each look is a query the daemon's statements
    queue behind), and still returns once the last download is done."""
    import asyncio

    from asyncsat import daemon

    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    rid = await db.fetchval("INSERT INTO request (urls, status) VALUES ('{}', 'resolved')"
                            " RETURNING id")
    ids = [await db.fetchval(
        "INSERT INTO download (request_id, provider_id, url) SELECT $1, id, $2 FROM provider"
        " RETURNING id", rid, f"http://127.0.0.1:9/{n}") for n in range(300)]
    await db.executemany("INSERT INTO request_download (request_id, download_id)"
                         " VALUES ($1, $2)", [(rid, i) for i in ids])
    looks = 0

    def counted(query: Any) -> Any:
        async def look(*args: Any) -> Any:
            nonlocal looks
            looks += 1
            return await query(*args)
        return look

    for name in ("request_settled", "request_state"):  # (what a look may ask)
        monkeypatch.setattr(queries, name, counted(getattr(queries, name)))
    waiter = asyncio.create_task(daemon.wait_for_request(settings, rid))
    await asyncio.sleep(0.3)
    started = asyncio.get_running_loop().time()
    for i in ids:  # one commit (and NOTIFY) per download, as the daemon makes them
        await db.execute("UPDATE download SET status = 'done' WHERE id = $1", i)
    took = asyncio.get_running_loop().time() - started
    await asyncio.wait_for(waiter, 1.0)  # (woken by the last change: the safety net is 5 s)
    # (one look at the start, one per LOOK_GAP while the changes came, and the last)
    assert looks <= 3 + took / daemon.LOOK_GAP, (looks, took)
    assert looks < len(ids) / 3


async def test_a_waiter_ends_when_its_database_is_dropped_not_waits_for_ever(
        dsn: str, db: Any, settings: Any, pg: Any) -> None:
    """A database that goes away for good (dropped; the same for a login refused from
    then on) ends the wait with the reason, instead of a wait for ever (a restart is
    waited for: `test_get_wait_beside_a_daemon_rides_through_a_postgresql_restart`)."""
    import asyncio

    import pytest

    from asyncsat import daemon
    from asyncsat.errors import DatabaseError

    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    rid = await db.fetchval("INSERT INTO request (urls, status) VALUES ('{}', 'resolved')"
                            " RETURNING id")
    await db.execute("INSERT INTO download (request_id, provider_id, url) SELECT $1, id,"
                     " 'http://127.0.0.1:9/a' FROM provider", rid)
    await db.execute("INSERT INTO request_download (request_id, download_id)"
                     " SELECT $1, id FROM download", rid)
    notes: list[str] = []
    waiter = asyncio.create_task(daemon.wait_for_request(settings, rid, note=notes.append))
    await asyncio.sleep(0.5)
    await db.close()
    name = dsn.rsplit("/", 1)[1].split("?")[0]
    await asyncio.to_thread(pg.psql, f"DROP DATABASE {name} WITH (FORCE)")
    with pytest.raises(DatabaseError, match="does not exist"):
        await asyncio.wait_for(waiter, 10)
    assert notes and notes[0].startswith("the database went away"), notes


async def test_a_heartbeat_renews_a_lapsed_mark_but_never_a_cleared_one(
        dsn: str, db: Any) -> None:
    """A heartbeat on its way while a search ends and clears its mark must not set the mark
    again: the other daemons would leave the request alone for a lease for nothing."""
    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    lapsed, cleared = [await db.fetchval(
        "INSERT INTO request (provider_id, search, status, resolver, resolving_until)"
        " SELECT id, '{}', 'queued', 'me', $1 FROM provider RETURNING id", until)
        for until in (datetime.now(UTC) - timedelta(seconds=5), None)]
    await queries.request_resolving_renew(db, "me", [lapsed, cleared], 30)
    got = {r["id"]: r["resolving_until"] for r in await db.fetch(
        "SELECT id, resolving_until FROM request")}
    assert got[lapsed] is not None and got[lapsed] > datetime.now(UTC)
    assert got[cleared] is None


async def test_one_statement_wakes_each_listener_once_not_once_per_row(
        dsn: str, db: Any) -> None:
    """2,000 rows queued by one `get` sent the daemon 2,000 notifications, and the rows that
    one statement records `done` as many to a waiting client, each read and handled by the
    listener. The payloads now carry what the listeners use, so PostgreSQL delivers the
    notifications of a transaction once; a cancelled row is still named (the daemon stops
    its transfer). Told once per statement, the changes still leave one history row and
    one `asyncsat_done` each, in order."""
    import asyncio
    import json

    import asyncpg

    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    heard: list[tuple[str, dict[str, Any]]] = []
    listener = await asyncpg.connect(dsn)
    try:
        for channel in ("asyncsat", "asyncsat_status", "asyncsat_done"):
            await listener.add_listener(
                channel, lambda _c, _p, ch, payload: heard.append((ch, json.loads(payload))))
        rid = await db.fetchval("INSERT INTO request (urls, status) VALUES ('{}', 'resolved')"
                                " RETURNING id")
        ids = await db.fetchval(
            "WITH d AS (INSERT INTO download (request_id, provider_id, url)"
            " SELECT $1, p.id, 'http://127.0.0.1:9/' || n FROM provider p,"
            " generate_series(1, 200) n RETURNING id) SELECT array_agg(id ORDER BY id) FROM d",
            rid)
        await db.execute("UPDATE download SET status = 'running' WHERE id = ANY($1)", ids)
        await db.execute("UPDATE download SET status = 'done' WHERE id = ANY($1)", ids[:150])
        await db.execute("UPDATE download SET status = 'cancelled' WHERE id = ANY($1)",
                         ids[150:152])
        # no status changed: no history row, no notification
        await db.execute("UPDATE download SET bytes_done = 1 WHERE id = ANY($1)", ids)
        await db.execute("UPDATE download SET status = status WHERE id = ANY($1)", ids)
        await asyncio.sleep(0.5)  # (notifications are delivered after the commits)
    finally:
        await listener.close()
    queued = [p for ch, p in heard if ch == "asyncsat" and p.get("status") == "queued"]
    cancelled = [p for ch, p in heard if ch == "asyncsat" and p.get("status") == "cancelled"]
    ended = [p for ch, p in heard if ch == "asyncsat_status"]
    assert queued == [{"type": "download", "status": "queued"}]  # one for 200 rows
    assert cancelled == [{"type": "download", "id": i, "status": "cancelled"}
                         for i in ids[150:152]]
    # none for `running`; one for the 150 done, one for the 2 cancelled
    assert ended == [{"request_id": rid}, {"request_id": rid}]
    ready = [p for ch, p in heard if ch == "asyncsat_done"]  # one per product, as before
    assert [p["download_id"] for p in ready] == ids[:150]
    assert ready[0]["request_id"] == rid and ready[0]["provider"] == "hub"
    history = await db.fetch("SELECT download_id, status FROM download_event ORDER BY id")
    assert [(r["download_id"], r["status"]) for r in history] == (
        [(i, "queued") for i in ids] + [(i, "running") for i in ids]
        + [(i, "done") for i in ids[:150]] + [(i, "cancelled") for i in ids[150:152]])
