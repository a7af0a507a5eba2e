"""`asyncsat run` as a real process: SIGKILL, SIGTERM, NOTIFY wake-ups, a PostgreSQL restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import asyncpg

from asyncsat.config import Settings
from tests.conftest import DaemonProcess, cli
from tests.helpers import add_provider, drain, queue, rows
from tests.servers import FileServer, PgCluster


def _part(dest: Path, name: str) -> Path:
    return dest / "local" / f"{name}.part"


async def _wait_part(path: Path, at_least: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never reached {at_least} bytes")


async def test_sigkill_mid_file_resumes_from_the_part(
        server: FileServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data = os.urandom(6_000_000)
    server.add("S2A_big.nc", data, rate=2_000_000)
    await add_provider(dsn, "local", server.base)
    dest = tmp_path / "dest"
    await queue(dsn, server.url("S2A_big.nc"), dest=dest)

    first = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(first)
    part = _part(dest, "S2A_big.nc")
    await _wait_part(part, 2_000_000)
    first.signal(signal.SIGKILL)
    first.wait()
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    [row] = await rows(dsn)
    assert row["status"] == "running"  # the dead process could not say anything

    sent_before = server.bytes_sent
    second = DaemonProcess(dsn, tmp_path / "home", "--exit-when-idle")
    daemons.append(second)
    assert await asyncio.to_thread(second.wait, 30) == 0

    final = dest / "local" / "S2A_big.nc"
    assert final.read_bytes() == data
    assert server.requests[-1]["range"] == f"bytes={kept}-"
    # bytes fetched twice: what was in flight when the process died (at most one chunk)
    refetched = sent_before - kept
    assert 0 <= refetched <= Settings().chunk_size, refetched
    assert server.bytes_sent - sent_before == len(data) - kept
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 2


async def test_sigterm_stops_cleanly_and_leaves_rows_resumable(
        server: FileServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data = os.urandom(4_000_000)
    server.add("S1B.zip.bin", data, rate=1_000_000)
    await add_provider(dsn, "local", server.base)
    dest = tmp_path / "dest"
    await queue(dsn, server.url("S1B.zip.bin"), dest=dest)
    proc = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(proc)
    await _wait_part(_part(dest, "S1B.zip.bin"), 500_000)

    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0
    assert time.monotonic() - started < 10
    [row] = await rows(dsn)
    assert row["status"] == "queued"
    assert row["bytes_done"] == _part(dest, "S1B.zip.bin").stat().st_size > 0
    assert not (dest / "local" / "S1B.zip.bin").exists()
    events = [line["event"] for line in proc.lines]
    assert "stop requested" in events and "daemon stopped" in events


async def test_psql_insert_wakes_a_running_daemon_within_a_second(
        server: FileServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server.add("wake.bin", os.urandom(10_000))
    proc = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(proc)
    await proc.wait_for(lambda line: line["event"] == "daemon started")
    await asyncio.sleep(0.5)  # idle: nothing to do, nothing polled

    conn = await asyncpg.connect(dsn)
    try:
        dest = str(tmp_path / "dest")
        inserted = time.monotonic()
        await conn.execute("INSERT INTO request (urls, dest) VALUES ($1, $2)",
                           [server.url("wake.bin")], dest)
        await proc.wait_for(lambda line: line["event"] == "download running", timeout=5)
        assert time.monotonic() - inserted < 1.0  # woken, resolved and claimed
        await proc.wait_for(lambda line: line["event"] == "download done", timeout=5)

        # a queued download row inserted directly also wakes it
        provider_id = await conn.fetchval("SELECT provider_id FROM download")
        server.add("direct.bin", os.urandom(1000))
        inserted = time.monotonic()
        await conn.execute("INSERT INTO download (provider_id, url, dest) VALUES ($1, $2, $3)",
                           provider_id, server.url("direct.bin"), dest)
        await proc.wait_for(lambda line: line["event"] == "download running"
                            and line.get("url", "").endswith("direct.bin"), timeout=5)
        assert time.monotonic() - inserted < 1.0
        await proc.wait_for(lambda line: line["event"] == "download done"
                            and line.get("name") == "direct.bin", timeout=5)
    finally:
        await conn.close()
    assert (tmp_path / "dest" / f"127.0.0.1_{server.port}" / "direct.bin").exists()


async def test_daemon_survives_a_postgresql_restart(
        server: FileServer, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    cluster = PgCluster().init()
    try:
        cluster.psql("CREATE DATABASE restartdb OWNER asyncsat")
        dsn = cluster.dsn("restartdb")
        init = await asyncio.to_thread(cli, "init", dsn=dsn, home=tmp_path / "home")
        assert init.returncode == 0, init.stderr
        data = os.urandom(3_000_000)
        server.add("during.bin", data, rate=1_000_000)
        await add_provider(dsn, "local", server.base)
        dest = tmp_path / "dest"
        await queue(dsn, server.url("during.bin"), dest=dest)
        proc = DaemonProcess(dsn, tmp_path / "home", env={"ASYNCSAT_LOG_LEVEL": "info"})
        daemons.append(proc)
        await _wait_part(_part(dest, "during.bin"), 300_000)

        await asyncio.to_thread(cluster.stop, "fast")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.start)
        await proc.wait_for(lambda line: line["event"] == "database connection restored",
                            timeout=30)
        # the transfer that ran across the restart finished and was recorded
        await proc.wait_for(lambda line: line["event"] == "download done", timeout=30)

        server.add("after.bin", os.urandom(5000))
        await queue(dsn, server.url("after.bin"), dest=dest)
        await proc.wait_for(lambda line: line["event"] == "download done"
                            and line.get("name") == "after.bin", timeout=10)
        statuses = {r["url"].rsplit("/", 1)[-1]: r["status"] for r in await rows(dsn)}
        assert statuses == {"during.bin": "done", "after.bin": "done"}
        assert (dest / "local" / "during.bin").read_bytes() == data
    finally:
        for d in daemons:
            d.kill()
        cluster.destroy()


async def test_notify_asyncsat_rescans(server: FileServer, dsn: str, tmp_path: Path,
                                       daemons: list[DaemonProcess]) -> None:
    """A change no trigger announces is picked up on `NOTIFY asyncsat`, not before."""
    server.add("later.bin", os.urandom(2000))
    await add_provider(dsn, "local", server.base)
    conn = await asyncpg.connect(dsn)
    try:
        provider_id = await conn.fetchval("SELECT id FROM provider WHERE name = 'local'")
        await conn.execute(
            "INSERT INTO download (provider_id, url, dest, not_before)"
            " VALUES ($1, $2, $3, now() + interval '1 hour')",
            provider_id, server.url("later.bin"), str(tmp_path / "dest"))
        proc = DaemonProcess(dsn, tmp_path / "home")
        daemons.append(proc)
        await proc.wait_for(lambda line: line["event"] == "daemon started")
        await asyncio.sleep(0.5)  # past its first scan: the row is not due then
        await conn.execute("UPDATE download SET not_before = now()")  # no trigger fires
        await asyncio.sleep(1.0)
        assert not [line for line in proc.lines if line["event"] == "download running"]
        sent = time.monotonic()
        await conn.execute("NOTIFY asyncsat")
        await proc.wait_for(lambda line: line["event"] == "download running", timeout=5)
        assert time.monotonic() - sent < 1.0
        await proc.wait_for(lambda line: line["event"] == "download done", timeout=5)
    finally:
        await conn.close()


async def test_a_second_daemon_joins_and_check_lists_both(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    for _ in range(2):
        proc = DaemonProcess(dsn, tmp_path / "home")
        daemons.append(proc)
        await proc.wait_for(lambda line: line["event"] == "daemon started")
    shown = await asyncio.to_thread(cli, "check", dsn=dsn, home=tmp_path / "home")
    assert shown.returncode == 0, shown.stderr
    assert "2 daemons serve it" in shown.stdout
    assert sum(line.strip().startswith("daemon ") for line in shown.stdout.splitlines()) == 2


async def test_exit_when_idle_drains_everything(server: FileServer, dsn: str,
                                                settings: Settings) -> None:
    for i in range(6):
        server.add(f"x{i}.bin", os.urandom(20_000 + i))
    await queue(dsn, *(server.url(f"x{i}.bin") for i in range(3)))
    await queue(dsn, *(server.url(f"x{i}.bin") for i in range(3, 6)))
    await drain(settings)
    assert [r["status"] for r in await rows(dsn)] == ["done"] * 6


async def test_systemd_notify_watchdog_and_check(dsn: str, tmp_path: Path,
                                                daemons: list[DaemonProcess]) -> None:
    """Under systemd (Type=notify, WatchdogSec): READY=1 once serving, WATCHDOG=1 while the
    loop turns, STOPPING=1 on SIGTERM; `asyncsat check` says whether a daemon serves."""
    import socket

    home = tmp_path / "home"
    stopped = cli("check", dsn=dsn, home=home)
    assert stopped.returncode == 1 and "no daemon" in stopped.stderr
    assert stopped.stderr.count("\n") == 1
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(10)
        proc = DaemonProcess(dsn, home, env={"NOTIFY_SOCKET": address,
                                             "WATCHDOG_USEC": "400000"})
        daemons.append(proc)
        assert sock.recv(256) == b"READY=1"
        # every 0.2 s, between the STATUS= lines (every 10 s)
        beats = [m for m in (sock.recv(256) for _ in range(4)) if not m.startswith(b"STATUS=")]
        assert len(beats) >= 3 and set(beats) == {b"WATCHDOG=1"}
        serving = cli("check", dsn=dsn, home=home)
        assert serving.returncode == 0, serving.stderr
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        messages = []
        with contextlib.suppress(TimeoutError):
            sock.settimeout(0.5)
            while True:
                messages.append(sock.recv(256))
        assert b"STOPPING=1" in messages
    assert cli("check", dsn=dsn, home=home).returncode == 1


async def test_provider_remove_refuses_while_work_is_unfinished_then_force_stops_it(
        server: FileServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server.add("slow.bin", os.urandom(3_000_000), rate=500_000)
    server.add("done.bin", os.urandom(1000))
    await add_provider(dsn, "local", server.base, credentials=[("u", "pw-local-1", 2)])
    dest = tmp_path / "dest"
    await queue(dsn, server.url("done.bin"), dest=dest)
    await drain(Settings(dsn=dsn, home=tmp_path / "home", dest=dest))
    await queue(dsn, server.url("slow.bin"), dest=dest)
    proc = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(proc)
    await _wait_part(_part(dest, "slow.bin"), 100_000)

    refused = await asyncio.to_thread(cli, "provider", "remove", "local", dsn=dsn,
                                      home=tmp_path / "home")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == ("asyncsat: error: provider local has 1 unfinished download(s) "
                              "(queued, running or offline) and 0 queued request(s): cancel "
                              "them, or remove it with --force\n")
    assert len(await rows(dsn)) == 2

    forced = await asyncio.to_thread(cli, "provider", "remove", "local", "--force", dsn=dsn,
                                     home=tmp_path / "home")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout == ("provider local removed, with 1 credential(s) and 2 download "
                             "row(s), 1 of them unfinished; files on disk are kept\n")
    await proc.wait_for(lambda line: line["event"] == "download removed", timeout=10)
    assert await rows(dsn) == []
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM provider") == 0
        assert await conn.fetchval("SELECT count(*) FROM credential") == 0
    finally:
        await conn.close()
    # its requests say why they have no product any more (the done one read `done`, with
    # nothing found)
    listed = json.loads((await asyncio.to_thread(
        cli, "status", "--requests", "--json", dsn=dsn, home=tmp_path / "home")).stdout)
    assert [(r["status"], r["products"], r["error"]) for r in listed] == [
        ("cancelled", 0, "its provider was removed, with its downloads")] * 2
    assert (dest / "local" / "done.bin").exists() and _part(dest, "slow.bin").exists()
    assert proc.proc.poll() is None  # the daemon goes on serving
    gone = await asyncio.to_thread(cli, "provider", "remove", "local", dsn=dsn,
                                   home=tmp_path / "home")
    assert gone.returncode == 2 and "unknown provider 'local'" in gone.stderr
