"""Helpers of the tests of small files in runs (tests/integration/test_runs*.py)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncsat import daemon, engine
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.logs import Redactor
from tests.helpers import add_provider, rows, sql
from tests.servers import FileServer


async def rows_by_name(dsn: str) -> dict[str, dict[str, Any]]:
    """Every download row, by the name its URL ends in."""
    return {Path(r["url"]).name: r for r in await rows(dsn)}


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never met")


def _spy(monkeypatch: pytest.MonkeyPatch, record: Callable[[int, list[int]], object]) -> None:
    real = queries.download_sealing

    async def seen(*args: Any, **kw: Any) -> queries.Sealed:
        sealed = await real(*args, **kw)
        record(kw.get("more", 0), [d.id for d, _account, _lease in sealed.following])
        return sealed

    monkeypatch.setattr(queries, "download_sealing", seen)


def spy_hand_overs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(rows asked for after the next one, rows claimed) of every statement that may hand a
    slot over (`download_sealing`)."""
    seen: list[tuple[int, int]] = []
    _spy(monkeypatch, lambda more, ids: seen.append((more, len(ids))))
    return seen


def spy_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The ids of the rows of every run a hand-over claimed (more than one row)."""
    seen: list[list[int]] = []
    _spy(monkeypatch, lambda _more, ids: len(ids) > 1 and seen.append(ids))
    return seen


def slow_run(server: FileServer, slow: dict[str, int] | None = None, *,
             rate: int = 200_000) -> tuple[dict[str, bytes], list[str]]:
    """a (small, held: its hand-over claims a run), then b (600 kB at `rate` bytes/s), c
    and d (small, unless `slow` gives them a rate: then 200 kB)."""
    names = ["a.nc", "b.nc", "c.nc", "d.nc"]
    data = {n: os.urandom(10_000) for n in names}
    data["b.nc"] = os.urandom(600_000)
    rates = {"b.nc": rate, **(slow or {})}
    for name in names:
        if name in rates and name != "b.nc":
            data[name] = os.urandom(200_000)
        server.add(name, data[name], **({"rate": rates[name]} if name in rates else {}))
    return data, [server.url(n) for n in names]


async def offline_third(dsn: str, urls: list[str]) -> None:
    """Rows of `urls` (provider `local`), due in that order, the third one offline."""
    for i, url in enumerate(urls):
        await sql(dsn, "INSERT INTO download (provider_id, url, status, not_before)"
                       " SELECT id, $1, $2, now() - make_interval(secs => $3) FROM provider"
                       " WHERE name = 'local'", url, "offline" if i == 2 else "queued",
                  10.0 - i)


async def clean(dsn: str) -> None:
    """No lease left, no row owned."""
    assert await sql(dsn, "SELECT * FROM lease") == []
    assert await sql(dsn, "SELECT id, status, owner FROM download"
                          " WHERE owner IS NOT NULL OR status = 'running'") == []


async def one_slot_run(dsn: str, server: FileServer, monkeypatch: pytest.MonkeyPatch, *,
                       wait: float, rate: int = 200_000) -> \
        tuple[dict[str, bytes], list[str]]:
    """Provider `local` of one slot, a row waiting its turn `wait` s at most, `slow_run`'s
    files (not queued yet)."""
    monkeypatch.setattr(engine, "RUN_WAIT", wait)
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    return slow_run(server, rate=rate)


def slow_part(settings: Settings) -> Path:
    """The `.part` of `slow_run`'s b: there while b comes in."""
    assert settings.dest is not None
    return settings.dest / "local" / "b.nc.part"


async def cancel_while_b_runs(settings: Settings, dsn: str, url: str) -> None:
    """Serve until idle; while `slow_run`'s b comes in, cancel `url` (as `asyncsat cancel`
    does, with SQL)."""
    serving = asyncio.create_task(daemon.serve(settings, Redactor(), exit_when_idle=True))
    try:
        await until(lambda: asyncio.sleep(0, slow_part(settings).exists()))
        await sql(dsn, "UPDATE download SET status = 'cancelled' WHERE url = $1", url)
        await asyncio.wait_for(serving, 30)
    finally:
        serving.cancel()
