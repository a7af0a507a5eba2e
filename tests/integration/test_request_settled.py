"""What `get --wait` asks at its turns: is the request settled (`request_settled`)?"""

from __future__ import annotations

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
