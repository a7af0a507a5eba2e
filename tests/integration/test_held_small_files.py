"""A new file no larger than a chunk that comes in at once is held in memory whole, and
its name is recorded with its slot's hand-over (one statement instead of two); one that
comes in slowly, or is cut short, is written as it comes and resumes like any other."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.logs import Redactor
from tests.helpers import add_provider, drain, queue, rows, sql
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


def _folder(settings: Settings) -> Path:
    assert settings.dest is not None
    return settings.dest / "local"


def _gets(server: FileServer, name: str) -> list[dict[str, object]]:
    return [r for r in server.requests if r["path"] == f"/files/{name}"]


def _count(monkeypatch: pytest.MonkeyPatch, name: str) -> list[dict[str, Any]]:
    """The keyword arguments of every call of `queries.<name>`."""
    calls: list[dict[str, Any]] = []
    real = getattr(queries, name)

    async def counted(*args: Any, **kw: Any) -> Any:
        calls.append(kw)
        return await real(*args, **kw)

    monkeypatch.setattr(queries, name, counted)
    return calls


async def test_small_files_are_named_with_their_hand_over(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    data = {f"s{i}.nc": os.urandom(50_000 + i) for i in range(6)}
    for name, body in data.items():
        server.add(name, body)
    named = _count(monkeypatch, "download_named")
    sealed = _count(monkeypatch, "download_sealing")
    in_runs: list[queries.Seal] = []  # (rows of runs that hand no slot over)
    real = queries.downloads_sealed

    async def sealed_together(db: Any, seals: list[queries.Seal]) -> list[queries.Sealed]:
        in_runs.extend(seals)
        return await real(db, seals)

    monkeypatch.setattr(queries, "downloads_sealed", sealed_together)
    await queue(dsn, *(server.url(n) for n in data))
    await drain(settings)

    assert named == []  # no statement of its own
    assert sorted([kw["names"][0] for kw in sealed] +
                  [s.names[0] for s in in_runs if s.names]) == sorted(data)
    for row in await rows(dsn):
        name = row["name"]
        assert row["status"] == "done"
        assert Path(row["path"]).read_bytes() == data[name]
        assert row["size"] == len(data[name])
    etags = {r["name"]: r["etag"] for r in await sql(dsn, "SELECT name, etag FROM download")}
    assert etags == {name: server.products[name].etag for name in data}
    assert not list(_folder(settings).glob("*.part"))


async def test_two_small_files_of_one_name_get_a_file_each(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """Two products of one folder whose URLs end in the same name, held at the same time:
    the second to be sealed gets `a_<id>.nc` in the same statement."""
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    first, second = os.urandom(30_000), os.urandom(40_000)
    server.add("one/a.nc", first)
    server.add("two/a.nc", second)
    await queue(dsn, server.url("one/a.nc"), server.url("two/a.nc"))
    await drain(settings)

    by_url = {r["url"]: r for r in await rows(dsn)}
    one, two = by_url[server.url("one/a.nc")], by_url[server.url("two/a.nc")]
    assert one["status"] == two["status"] == "done"
    assert {one["name"], two["name"]} == {"a.nc", f"a_{max(one['id'], two['id'])}.nc"}
    assert Path(one["path"]).read_bytes() == first
    assert Path(two["path"]).read_bytes() == second
    assert Path(one["path"]) != Path(two["path"])


async def test_a_slow_small_file_is_on_disk_while_it_comes(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """A file that takes longer than the hold is written as it comes: its `.part` grows
    on disk (a kill loses no more than with any other file)."""
    await add_provider(dsn, "local", server.base, {})
    data = os.urandom(400_000)
    server.add("slow.nc", data, rate=100_000)  # 4 s
    await queue(dsn, server.url("slow.nc"))
    serving = asyncio.create_task(daemon.serve(settings, Redactor(), exit_when_idle=True))
    part = _folder(settings) / "slow.nc.part"
    try:
        seen = 0
        for _ in range(300):
            await asyncio.sleep(0.01)
            seen = part.stat().st_size if part.exists() else 0
            if seen:
                break
        assert 0 < seen < len(data)
        await asyncio.wait_for(serving, 30)
    finally:
        serving.cancel()
    assert (_folder(settings) / "slow.nc").read_bytes() == data


async def test_a_small_file_cut_short_resumes_from_its_bytes(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """The bytes of a small file that were in memory when its connection dropped are
    written to its `.part`: the next attempt asks for the rest."""
    await add_provider(dsn, "local", server.base, {"backoff_initial": 0.05})
    data = os.urandom(300_000)
    server.add("cut.nc", data, drop_after=[120_000])
    await queue(dsn, server.url("cut.nc"))
    await drain(settings)

    assert (_folder(settings) / "cut.nc").read_bytes() == data
    assert [g["range"] for g in _gets(server, "cut.nc")] == [None, "bytes=120000-"]
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 2


async def test_a_lone_daemon_stalled_past_its_lease_after_a_seal_gets_its_row_back(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One daemon stalls (SIGSTOP, a paused VM, a blocked loop) between the sealing
    statement's answer and the lock of the held file, past its lease: the file is not
    written then, and the row goes back to the queue (no other daemon takes it over: it
    must not stay `running` for ever), to be fetched again."""
    await add_provider(dsn, "local", server.base, {})
    body = os.urandom(50_000)
    server.add("a.nc", body)
    await queue(dsn, server.url("a.nc"))
    real = queries.download_sealing
    stalled: list[int] = []

    async def sealing_then_stalled(*args: Any, **kw: Any) -> Any:
        sealed = await real(*args, **kw)
        if not stalled:
            stalled.append(1)
            time.sleep(2.5)  # the whole process, past its 2 s lease
        return sealed

    monkeypatch.setattr(queries, "download_sealing", sealing_then_stalled)
    with capture_logs() as logs:
        await asyncio.wait_for(daemon.serve(replace(settings, lease_timeout=2.0), Redactor(),
                                            exit_when_idle=True), 20)
    [row] = await rows(dsn)
    assert stalled and row["status"] == "done" and row["attempts"] == 2
    # put back by this daemon, not taken over by another
    told = [(e["event"], e.get("reason")) for e in logs if e.get("download_id") == row["id"]]
    assert ("download queued", "lease lapsed") in told, told
    assert not [e for e, _ in told if "another daemon" in e], told
    assert Path(row["path"]).read_bytes() == body
    assert len(_gets(server, "a.nc")) == 2


async def test_a_held_file_waits_for_no_worker_of_the_loops_thread_pool(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """Every worker of the loop's default thread pool is busy for a while (copies of
    products into other requests' folders, hashes of large `.part` files resumed, large
    files' fsyncs run there): a small file held whole and sealed meanwhile waited behind
    them for its write, whose fence (checked as the file is locked) had lapsed by then, and
    its row went back to the queue ("lease lapsed") to be fetched again, as every one did
    while the pool stayed busy. Its writer waits for no other work."""
    await add_provider(dsn, "local", server.base, {"max_connections": 4})
    data = {f"w{i}.nc": os.urandom(20_000 + i) for i in range(4)}
    for name, body in data.items():
        server.add(name, body)
    await queue(dsn, *(server.url(n) for n in data))
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    busy = [loop.run_in_executor(None, time.sleep, 4.0) for _ in range(2)]
    try:
        with capture_logs() as logs:
            await drain(replace(settings, lease_timeout=2.0))
    finally:
        await asyncio.gather(*busy)
    lapsed = [e for e in logs if e.get("reason") == "lease lapsed"]
    assert not lapsed, lapsed
    assert {name: len(_gets(server, name)) for name in data} == dict.fromkeys(data, 1)
    for row in await rows(dsn):
        assert row["status"] == "done", row
        assert Path(row["path"]).read_bytes() == data[row["name"]]
