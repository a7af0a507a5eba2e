"""What `status` and `check` say a daemon does while small files go in runs: the rows it
runs, and the connections they hold (a run's rows take one in turn)."""

from __future__ import annotations

import asyncio
import os

from asyncsat.commands import _doing
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from tests.helpers import add_provider, drain, queue, rows
from tests.servers import FileServer


def test_rows_running_beyond_the_connections_are_said_to_wait_on_them() -> None:
    assert _doing({"running": 3, "connections": 3}) == "3 running"
    assert _doing({"running": 32, "connections": 2}) == "32 running on 2 connections"
    assert _doing({"running": 5, "connections": 1, "resolving": [7]}) == \
        "5 running on 1 connection, searching request 7"


async def test_a_daemon_shows_its_connections_within_the_cap(
        server: FileServer, dsn: str, settings: Settings) -> None:
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    for i in range(300):
        server.add(f"s{i:03}.nc", os.urandom(8_000))
    await queue(dsn, *(server.url(f"s{i:03}.nc") for i in range(300)))
    seen: list[tuple[int, int]] = []

    async def look() -> None:
        conn = await connect(dsn)
        try:
            while True:
                seen.extend((d["running"], d["connections"])
                            for d in await queries.live_daemons(conn))
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    looking = asyncio.create_task(look())
    try:
        await drain(settings)
    finally:
        looking.cancel()
    assert {r["status"] for r in await rows(dsn)} == {"done"}
    assert seen and all(connections <= 2 for _running, connections in seen)  # the cap
    assert any(running > connections for running, connections in seen)  # runs, in turn
