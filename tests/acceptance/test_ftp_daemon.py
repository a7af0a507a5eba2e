"""`asyncsat run` as a real process over FTP: SIGKILL mid-file, then a resume with REST."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncsat.config import Settings
from tests.conftest import DaemonProcess
from tests.ftpserver import FtpServer
from tests.helpers import add_provider, queue, rows

USER, PASSWORD = "carol", "pw-carol-7781"


@pytest.fixture
def ftp() -> Iterator[FtpServer]:
    with FtpServer(users={USER: PASSWORD}, max_per_user=1) as server:
        yield server


async def _wait_until(predicate: object, what: str, timeout: float = 20) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_sigkill_mid_file_resumes_with_rest(
        ftp: FtpServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data = os.urandom(4_000_000)
    f = ftp.add("S3A_SR_2_WAT.nc", data, rate=2_000_000)
    await add_provider(dsn, "local", ftp.base, {"backoff_initial": 0.05}, protocol="ftp",
                       credentials=[(USER, PASSWORD, 1)])
    dest = tmp_path / "dest"
    await queue(dsn, ftp.url("S3A_SR_2_WAT.nc"), dest=dest)
    part = dest / "local" / "S3A_SR_2_WAT.nc.part"

    first = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(first)
    await _wait_until(lambda: part.exists() and part.stat().st_size >= 1_000_000,
                      "the part file to grow")
    first.signal(signal.SIGKILL)
    first.wait()
    # the server sees the control connection go: nothing more is sent for that transfer
    await _wait_until(lambda: ftp.active[USER] == 0, "the server to drop the session")
    kept = part.stat().st_size
    assert 0 < kept < len(data)
    [row] = await rows(dsn)
    assert row["status"] == "running"  # the dead process could not say anything

    sent_before = f.sent
    second = DaemonProcess(dsn, tmp_path / "home", "--exit-when-idle")
    daemons.append(second)
    assert await asyncio.to_thread(second.wait, 30) == 0

    assert (dest / "local" / "S3A_SR_2_WAT.nc").read_bytes() == data
    assert f.starts == [0, kept]
    assert ftp.sent_commands("REST") == [str(kept)]
    # bytes fetched twice: what was in flight when the process died (at most one chunk)
    assert 0 <= sent_before - kept <= Settings().chunk_size, sent_before - kept
    assert f.sent - sent_before == len(data) - kept
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 2
    assert ftp.peak[USER] == 1 and ftp.over_limit == 0
    logs = "".join(first.raw + second.raw)
    assert PASSWORD not in logs
    assert any(line.get("event") == "download done" and line.get("resumed_from") == kept
               for line in second.lines)
