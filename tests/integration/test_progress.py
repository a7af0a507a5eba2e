"""Progress in the database: true byte counts on cancel and stop, rates, progress log lines."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import structlog

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.logs import Redactor
from tests.helpers import add_provider, queue, rows, sql
from tests.servers import FileServer


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never met")


def _part(settings: Settings, name: str) -> Path:
    assert settings.dest is not None
    return settings.dest / "local" / f"{name}.part"


async def test_a_cancelled_download_records_the_bytes_of_its_part(
        server: FileServer, dsn: str, settings: Settings) -> None:
    server.add("slow.nc", os.urandom(4_000_000), rate=1_000_000)
    await add_provider(dsn, "local", server.base)
    await queue(dsn, server.url("slow.nc"))
    # progress is written to the row rarely: what the row holds at the cancel is stale
    settings = replace(settings, progress_interval=30.0)
    part = _part(settings, "slow.nc")

    async def cancelled() -> bool:
        [row] = await rows(dsn)
        return row["status"] == "cancelled" and row["bytes_done"] == part.stat().st_size

    serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=cancelled))
    try:
        await _until(lambda: _grown(part, 600_000))
        conn = await connect(dsn)
        try:
            [row] = await rows(dsn)
            stale = row["bytes_done"]
            assert await queries.cancel(conn, [row["id"]]) == 1
        finally:
            await conn.close()
        await asyncio.wait_for(serving, 10)
    finally:
        serving.cancel()
    [row] = await rows(dsn)
    assert row["bytes_done"] == part.stat().st_size > stale


async def _grown(path: Path, size: int) -> bool:
    return path.exists() and path.stat().st_size >= size


async def test_a_stopped_download_records_the_bytes_of_its_part(
        server: FileServer, dsn: str, settings: Settings) -> None:
    server.add("stop.nc", os.urandom(4_000_000), rate=1_000_000)
    await add_provider(dsn, "local", server.base)
    await queue(dsn, server.url("stop.nc"))
    settings = replace(settings, progress_interval=30.0)
    part = _part(settings, "stop.nc")

    async def grown() -> bool:
        return await _grown(part, 600_000)

    # `until` is asked at each wake-up: a NOTIFY once the part has grown ends the serve,
    # which stops the transfer as SIGTERM does
    serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=grown))
    try:
        await _until(grown)
        await sql(dsn, "NOTIFY asyncsat")
        await asyncio.wait_for(serving, 10)
    finally:
        serving.cancel()
    [row] = await sql(dsn, "SELECT status, bytes_done FROM download")
    assert row["status"] == "queued"
    assert row["bytes_done"] == part.stat().st_size >= 600_000


async def test_rate_in_the_row_and_progress_log_lines(
        server: FileServer, dsn: str, settings: Settings) -> None:
    server.add("long.nc", os.urandom(3_000_000), rate=1_000_000)
    await add_provider(dsn, "local", server.base)
    await queue(dsn, server.url("long.nc"))
    settings = replace(settings, progress_interval=0.2, progress_log_interval=0.8)
    rates: list[float] = []

    async def done() -> bool:
        found = await sql(dsn, "SELECT status, rate FROM download")
        if not found:  # the request is not resolved yet
            return False
        row = found[0]
        if row["status"] == "running" and row["rate"] is not None:
            rates.append(row["rate"])
        return bool(row["status"] == "done")

    with structlog.testing.capture_logs() as logs:
        serving = asyncio.create_task(daemon.serve(settings, Redactor(), until=done))
        try:
            while not serving.done():  # `until` is asked at wake-ups: poll the row as well
                await done()
                await asyncio.sleep(0.2)
            await serving
        finally:
            serving.cancel()
    lines = [e for e in logs if e["event"] == "download progress"]
    assert 2 <= len(lines) <= 4, lines  # ~3 s of transfer, a line every 0.8 s
    for e in lines:
        assert e["download_id"] == 1 and e["size"] == 3_000_000
        assert 0 < e["bytes_done"] < 3_000_000 and e["percent"] == \
            round(100 * e["bytes_done"] / 3_000_000, 1)
        assert 500_000 < e["rate"] < 1_600_000, e
        assert e["eta"] == round((3_000_000 - e["bytes_done"]) / e["rate"])
    assert rates and all(400_000 < r < 1_600_000 for r in rates), rates
