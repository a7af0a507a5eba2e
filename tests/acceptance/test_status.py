"""`status` as operators read it: whether a daemon serves the database, progress, rates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import DaemonProcess, cli
from tests.helpers import add_provider, queue


async def _wait_part(path: Path, at_least: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never reached {at_least} bytes")


async def test_status_says_when_no_daemon_serves_the_rows_marked_running(
        server, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server.add("big.nc", os.urandom(6_000_000), rate=1_000_000)
    await add_provider(dsn, "local", server.base)
    dest = tmp_path / "dest"
    await queue(dsn, server.url("big.nc"), dest=dest)
    home = tmp_path / "home"
    proc = DaemonProcess(dsn, home)
    daemons.append(proc)
    await _wait_part(dest / "local" / "big.nc.part", 1_000_000)

    # `status --watch` follows the daemon: serving, then gone
    watch = subprocess.Popen(
        [sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(home), "status",
         "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(2.0)
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        await asyncio.sleep(2.5)
    finally:
        watch.send_signal(signal.SIGINT)
        out, _err = await asyncio.to_thread(watch.communicate, timeout=10)
    daemon_lines = [line for line in out.splitlines() if line.startswith("daemon: ")]
    assert daemon_lines[0] == "daemon: serving this database"
    assert daemon_lines[-1].startswith("daemon: none serves this database; 1 download(s) "
                                       "marked running are stalled")

    shown = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
    lines = shown.stdout.splitlines()
    assert lines[1] == (
        "daemon: none serves this database; 1 download(s) marked running are stalled (left "
        "by a daemon that did not stop cleanly): asyncsat run resumes them from their .part "
        "files")
    [row] = [line for line in lines if "big.nc" in line and not line.startswith("request")]
    assert row.split()[1] == "stalled"
    as_json = await asyncio.to_thread(cli, "status", "--json", dsn=dsn, home=home)
    assert [r["status"] for r in json.loads(as_json.stdout)] == ["running"]  # the contract
    assert as_json.stderr.startswith("daemon: none serves this database; 1 download(s)")
    requests = await asyncio.to_thread(cli, "status", "--requests", dsn=dsn, home=home)
    assert requests.stdout.startswith("daemon: none serves this database; 1 download(s)")

    again = DaemonProcess(dsn, home, "--exit-when-idle")
    daemons.append(again)
    assert await asyncio.to_thread(again.wait, 30) == 0
    after = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
    assert after.stdout.splitlines()[1] == "daemon: none serves this database"
    assert "stalled" not in after.stdout
