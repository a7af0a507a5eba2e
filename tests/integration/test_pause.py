"""`provider pause` / `resume`: a paused provider starts no transfer, running ones finish."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.logs import Redactor
from tests.helpers import add_provider, drain, queue, rows, sql
from tests.servers import FileServer


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never met")


async def _statuses(dsn: str) -> dict[str, str]:
    return {r["url"].rsplit("/", 1)[-1]: r["status"] for r in await rows(dsn)}


async def test_a_paused_provider_starts_nothing_until_resumed_by_plain_sql(
        server: FileServer, dsn: str, settings: Settings) -> None:
    for name in ("a.bin", "b.bin"):
        server.add(name, os.urandom(200_000))
    await add_provider(dsn, "local", server.base)
    await sql(dsn, "UPDATE provider SET paused = true WHERE name = 'local'")
    await queue(dsn, server.url("a.bin"), server.url("b.bin"))

    async def all_done() -> bool:
        return set((await _statuses(dsn)).values()) == {"done"}

    serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=all_done))
    try:
        await _until(lambda: _has_rows(dsn, 2))
        await asyncio.sleep(1.5)  # long enough for a daemon that ignores the pause
        assert set((await _statuses(dsn)).values()) == {"queued"}
        assert server.requests == []
        resumed = time.monotonic()
        await sql(dsn, "UPDATE provider SET paused = false WHERE name = 'local'")
        await asyncio.wait_for(serving, 10)
        assert time.monotonic() - resumed < 3  # applied at once (NOTIFY), not polled
    finally:
        serving.cancel()
    assert len(server.requests) == 2


async def _has_rows(dsn: str, n: int) -> bool:
    return len(await rows(dsn)) == n


async def test_pause_lets_the_running_transfer_finish(
        server: FileServer, dsn: str, settings: Settings) -> None:
    server.add("first.bin", os.urandom(1_500_000), rate=1_000_000)
    server.add("second.bin", os.urandom(100_000))
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    await queue(dsn, server.url("first.bin"), server.url("second.bin"))

    async def first_done() -> bool:
        return (await _statuses(dsn)).get("first.bin") == "done"

    serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=first_done))
    try:
        async def first_running() -> bool:
            found = await sql(dsn, "SELECT bytes_done FROM download WHERE status = 'running'")
            return bool(found) and found[0]["bytes_done"] > 0

        await _until(first_running)
        await sql(dsn, "UPDATE provider SET paused = true WHERE name = 'local'")
        await asyncio.wait_for(serving, 15)
    finally:
        serving.cancel()
    await asyncio.sleep(0.5)
    assert await _statuses(dsn) == {"first.bin": "done", "second.bin": "queued"}
    assert [r["path"] for r in server.requests] == ["/files/first.bin"]

    # `run --exit-when-idle` does not wait for a paused provider: its rows stay queued
    await drain(settings, timeout=15)
    assert (await _statuses(dsn))["second.bin"] == "queued"
    await sql(dsn, "UPDATE provider SET paused = false WHERE name = 'local'")
    await drain(settings, timeout=15)
    assert (await _statuses(dsn))["second.bin"] == "done"


async def test_a_drain_ends_beside_a_paused_providers_orphaned_transfer(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """A daemon died while the provider was paused: its running row waits for the resume
    (the claim takes it over only then), so `run --exit-when-idle` must not wait for it;
    another provider's work is drained meanwhile."""
    server.add("b.bin", os.urandom(50_000))
    await add_provider(dsn, "paused", "http://127.0.0.1:9/archive/")
    await add_provider(dsn, "live", server.base)
    await sql(dsn, "UPDATE provider SET paused = true WHERE name = 'paused'")
    await sql(dsn, "INSERT INTO daemon (id, host, pid, version, lease_timeout)"
                   " VALUES ('gone', 'elsewhere', 1, 'test', 30)")
    await sql(dsn, "INSERT INTO download (provider_id, url, name, status, owner, attempts,"
                   " lease_expires) SELECT id, 'http://127.0.0.1:9/archive/a.bin', 'a.bin',"
                   " 'running', 'gone', 1, now() - interval '1 minute'"
                   " FROM provider WHERE name = 'paused'")
    await queue(dsn, server.url("b.bin"))
    await asyncio.wait_for(drain(settings), 15)
    assert await _statuses(dsn) == {"a.bin": "running", "b.bin": "done"}
    assert [r["path"].rsplit("/", 1)[-1] for r in server.requests] == ["b.bin"]
