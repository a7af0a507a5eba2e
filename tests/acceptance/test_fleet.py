"""Several daemons on one database: caps counted in SQL, takeover of a dead daemon's
downloads, and a paused daemon that cannot complete what another took over."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from asyncsat.catalogs.base import Query
from tests.cdse import CdseEmulator
from tests.conftest import DaemonProcess, cli
from tests.helpers import FAST, add_provider, queue, rows, search_request, sql
from tests.integration.test_cdse import PASSWORD as CDSE_PASSWORD
from tests.integration.test_cdse import USER as CDSE_USER
from tests.integration.test_cdse import cdse_provider, payload, s2
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(120)
USER, PASSWORD = "fleet", "pw-fleet-31"


def config(tmp_path: Path, lease_timeout: float) -> dict[str, str]:
    """Environment of a daemon with a short lease (and a quick heartbeat)."""
    path = tmp_path / f"asyncsat-{lease_timeout}.toml"
    path.write_text(f"lease_timeout = {lease_timeout}\nshutdown_timeout = 3\n")
    return {"ASYNCSAT_CONFIG": str(path)}


async def _grown(part: Path, size: int) -> None:
    """Wait (10 s at most) until a transfer's `.part` holds more than `size` bytes."""
    for _ in range(200):
        if part.exists() and part.stat().st_size > size:
            return
        await asyncio.sleep(0.05)


async def test_four_daemons_never_exceed_an_accounts_cap(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server = await FileServer(users={USER: PASSWORD}).start()
    try:
        names = [f"S2_{i:02d}.zip" for i in range(40)]
        for name in names:
            server.add(name, os.urandom(150_000), rate=600_000)
        await add_provider(dsn, "hub", server.base, FAST, credentials=[(USER, PASSWORD, 3)])
        for i in range(4):
            proc = DaemonProcess(dsn, tmp_path / f"home{i}", env=config(tmp_path, 10))
            daemons.append(proc)
            await proc.wait_for(lambda line: line["event"] == "daemon started")
        await queue(dsn, *(server.url(n) for n in names), dest=tmp_path / "dest")
        for _ in range(600):
            done = [r for r in await rows(dsn) if r["status"] == "done"]
            if len(done) == 40:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the fleet did not finish the 40 files")
    finally:
        await server.stop()
    assert server.peak[USER] == 3  # the account's cap, used whole and never exceeded
    assert server.over_limit == 0
    whole = Counter(r["path"] for r in server.requests if r["range"] is None)
    assert set(whole.values()) == {1}  # no file transferred whole twice
    workers = [sum(line.get("event") == "download done" for line in d.lines) for d in daemons]
    assert sum(workers) == 40 and sum(1 for n in workers if n) >= 2  # the work was shared


async def test_a_killed_daemons_download_is_taken_over_and_resumed(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server = await FileServer().start()
    try:
        data = os.urandom(3_000_000)
        server.add("S1A_big.zip", data, rate=500_000)
        await add_provider(dsn, "hub", server.base, FAST)
        env = config(tmp_path, 3)
        first = DaemonProcess(dsn, tmp_path / "a", env=env)
        daemons.append(first)
        await first.wait_for(lambda line: line["event"] == "daemon started")
        await queue(dsn, server.url("S1A_big.zip"), dest=tmp_path / "dest")
        await _grown(tmp_path / "dest" / "hub" / "S1A_big.zip.part", 500_000)
        # a second daemon, started while the first lives: it takes the download over once
        # it sees the killed one's process gone, or its lease lapsed
        second = DaemonProcess(dsn, tmp_path / "b", env=env)
        daemons.append(second)
        await second.wait_for(lambda line: line["event"] == "daemon started")
        first.signal(signal.SIGKILL)
        first.wait()
        killed_at = asyncio.get_running_loop().time()
        await second.wait_for(lambda line: line["event"] == "download done", timeout=30)
        taken_in = asyncio.get_running_loop().time() - killed_at
    finally:
        await server.stop()
    final = tmp_path / "dest" / "hub" / "S1A_big.zip"
    assert hashlib.md5(final.read_bytes()).digest() == hashlib.md5(data).digest()
    assert server.requests[-1]["range"] is not None  # resumed from the .part
    assert taken_in < 3 + 6 + 5  # lease timeout, plus the transfer's rest, plus slack


async def test_a_daemon_of_the_same_host_killed_meanwhile_is_taken_over_before_its_lease(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """Two daemons run on one host; one is SIGKILLed mid-transfer. The other sees its
    process gone (it looks every third of `lease_timeout`) and takes its download over
    then, not when the dead one's 12 s lease lapses; it resumes from the `.part`."""
    server = await FileServer().start()
    try:
        data = os.urandom(2_000_000)
        server.add("S1B_host.zip", data, rate=400_000)
        await add_provider(dsn, "hub", server.base, FAST)
        env = config(tmp_path, 12)
        pair: dict[str, DaemonProcess] = {}
        for home in ("a", "b"):
            proc = DaemonProcess(dsn, tmp_path / home, env=env)
            daemons.append(proc)
            started = await proc.wait_for(lambda line: line["event"] == "daemon started")
            pair[started["daemon_id"]] = proc
        await queue(dsn, server.url("S1B_host.zip"), dest=tmp_path / "dest")
        await _grown(tmp_path / "dest" / "hub" / "S1B_host.zip.part", 300_000)
        [owner] = await sql(dsn, "SELECT owner FROM download")
        dying = pair.pop(owner["owner"])
        [living] = pair.values()
        dying.signal(signal.SIGKILL)
        dying.wait()
        killed_at = asyncio.get_running_loop().time()
        await living.wait_for(lambda line: line["event"] == "download running")
        taken_in = asyncio.get_running_loop().time() - killed_at
        await living.wait_for(lambda line: line["event"] == "download done", timeout=30)
    finally:
        await server.stop()
    final = tmp_path / "dest" / "hub" / "S1B_host.zip"
    assert final.read_bytes() == data
    assert server.requests[-1]["range"] is not None  # resumed from the .part
    assert any(line["event"] == "a daemon of this host is gone: its downloads are taken over"
               for line in living.lines)
    assert taken_in < 12 - 2, taken_in  # before the dead daemon's lease would lapse


async def test_a_paused_daemon_cannot_complete_what_another_took_over(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server = await FileServer().start()
    try:
        data = b"CDF\x01" + os.urandom(2_000_000)
        server.add("S3A_paused.nc", data, rate=400_000)
        await add_provider(dsn, "hub", server.base, FAST)
        env = config(tmp_path, 2)
        first = DaemonProcess(dsn, tmp_path / "a", env=env)
        daemons.append(first)
        await first.wait_for(lambda line: line["event"] == "daemon started")
        await queue(dsn, server.url("S3A_paused.nc"), dest=tmp_path / "dest")
        await first.wait_for(lambda line: line["event"] == "download running")
        await asyncio.sleep(0.5)
        first.signal(signal.SIGSTOP)  # a "zombie": alive, its lease lapses
        second = DaemonProcess(dsn, tmp_path / "b", env=env)
        daemons.append(second)
        # the second takes the download over, but the zombie still holds the .part: it
        # waits for it rather than writing the same file
        await second.wait_for(lambda line: line["event"] == "download queued"
                              and "another process is writing" in line.get("error", ""),
                              timeout=30)
        first.signal(signal.SIGCONT)  # the zombie wakes: its writes are refused, it lets go
        await first.wait_for(lambda line: line["event"].startswith("lease lost"), timeout=20)
        # from now on both are healthy daemons: either may finish the download
        for _ in range(400):
            if (await rows(dsn))[0]["status"] == "done":
                break
            await asyncio.sleep(0.1)
        final = tmp_path / "dest" / "hub" / "S3A_paused.nc"
        sealed = final.stat().st_mtime_ns
        await asyncio.sleep(2)
    finally:
        await server.stop()
    [row] = await rows(dsn)
    assert row["status"] == "done"
    assert final.read_bytes() == data
    assert final.stat().st_mtime_ns == sealed  # never rewritten after done
    done = await sql(dsn, "SELECT attempts FROM download_event WHERE status = 'done'")
    assert len(done) == 1 and done[0]["attempts"] >= 2  # one completion, not the zombie's
    assert any(r["range"] for r in server.requests[1:])  # the .part was resumed


async def _held_catalogue(dsn: str) -> tuple[CdseEmulator, int]:
    """The CDSE stand-in with 30 products and its provider; the search's second page waits
    until a download begins (10 s at most): a search stays on for a while."""
    emu = await CdseEmulator(users={CDSE_USER: CDSE_PASSWORD}, hold_pages_from=10).start()
    for n in range(30):
        emu.add(s2(n, data=payload(2000)))
    return emu, await cdse_provider(dsn, emu, page_size=10)


async def _all_done(dsn: str, what: str) -> None:
    for _ in range(600):
        if sum(r["status"] == "done" for r in await rows(dsn)) == 30:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(what)


def _first_pages(emu: CdseEmulator) -> int:
    return sum(r["path"] == "/odata/v1/Products" and "$skip" not in r["query"]
               for r in emu.requests)


async def test_a_search_is_searched_by_one_daemon_of_the_fleet(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    emu, pid = await _held_catalogue(dsn)
    try:
        for i in range(3):
            proc = DaemonProcess(dsn, tmp_path / f"home{i}", env=config(tmp_path, 10))
            daemons.append(proc)
            await proc.wait_for(lambda line: line["event"] == "daemon started")
        rid = await search_request(dsn, pid, Query("SENTINEL-2"), dest=tmp_path / "dest")
        for _ in range(200):  # the search is on: its second page waits
            if _first_pages(emu):
                break
            await asyncio.sleep(0.05)
        for _ in range(3):  # every daemon looks at the queued requests again
            await sql(dsn, "NOTIFY asyncsat")
            await asyncio.sleep(0.3)
        shown = await asyncio.to_thread(cli, "check", dsn=dsn, home=tmp_path / "cli")
        await _all_done(dsn, "the fleet did not download the 30 products")
    finally:
        await emu.stop()
    assert _first_pages(emu) == 1  # one daemon searched; the others left the request to it
    assert shown.returncode == 0 and shown.stdout.count(f"searching request {rid}") == 1
    gets = Counter(r["path"] for r in emu.requests
                   if r["path"].startswith("/download/") and r.get("status") == 200)
    assert len(gets) == 30 and set(gets.values()) == {1}


async def test_a_search_whose_daemon_died_is_taken_up_by_another(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    emu, pid = await _held_catalogue(dsn)
    try:
        ids = []
        for i in range(2):
            proc = DaemonProcess(dsn, tmp_path / f"home{i}", env=config(tmp_path, 3))
            daemons.append(proc)
            ids.append((await proc.wait_for(
                lambda line: line["event"] == "daemon started"))["daemon_id"])
        rid = await search_request(dsn, pid, Query("SENTINEL-2"), dest=tmp_path / "dest")
        for _ in range(200):  # the search is on, its second page held
            marked = await sql(dsn, "SELECT resolver FROM request WHERE id = $1"
                                    " AND resolving_until > now()", rid)
            if marked and _first_pages(emu):
                break
            await asyncio.sleep(0.05)
        searching = ids.index(marked[0]["resolver"])
        daemons[searching].signal(signal.SIGKILL)
        daemons[searching].wait()
        await _all_done(dsn, "the search was not taken up by the other daemon")
    finally:
        await emu.stop()
    [request] = await sql(dsn, "SELECT resolver, status FROM request WHERE id = $1", rid)
    assert request["resolver"] == ids[1 - searching] and request["status"] == "resolved"
    assert _first_pages(emu) == 2  # the dead daemon's search, then the other's, once
