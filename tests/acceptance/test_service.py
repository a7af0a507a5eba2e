"""The daemon as systemd runs it: the notify protocol, and the unit's hardening."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, cli
from tests.helpers import add_provider, queue
from tests.servers import FileServer, PgCluster


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(20)
        yield sock


def test_sigterm_right_after_ready_stops_gracefully(
        dsn: str, tmp_path: Path, notify_socket: socket.socket) -> None:
    """systemd may stop the service the instant it reports READY=1: the SIGTERM handler
    must already be there (exit 0, `daemon stopped`), never the default disposition."""
    address = notify_socket.getsockname()
    # The daemon shares one CPU with this thread, at the lowest priority: when its READY=1
    # wakes this thread up, the signal is sent before the daemon takes its next step.
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    os.sched_setaffinity(0, {cpu})
    try:
        for attempt in range(5):
            proc = subprocess.Popen(
                ["nice", "-n", "19", "taskset", "-c", str(cpu), sys.executable, "-m",
                 "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "home"), "run"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "NOTIFY_SOCKET": address})
            try:
                while b"READY=1" not in notify_socket.recv(4096).split(b"\n"):
                    pass
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            assert proc.returncode == 0, (attempt, proc.returncode, err)
            assert '"event": "daemon stopped"' in out, (attempt, out)
    finally:
        os.sched_setaffinity(0, cpus)


def _messages(sock: socket.socket, until: Callable[[list[str]], bool],
              timeout: float = 20) -> list[str]:
    """Notify lines received until `until(lines)` holds."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(lines):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            lines += sock.recv(4096).decode().split("\n")
        except TimeoutError:
            raise AssertionError(f"never came; got {lines}") from None
    return lines


async def test_status_lines_carry_the_queue_figures(
        server: FileServer, dsn: str, tmp_path: Path, notify_socket: socket.socket,
        daemons: list[DaemonProcess]) -> None:
    server.add("S3A_slow.nc", os.urandom(1_500_000), rate=500_000)
    server.add("S3A_fast.nc", os.urandom(1000))
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    dest = tmp_path / "dest"
    await queue(dsn, server.url("S3A_slow.nc"), server.url("S3A_fast.nc"), dest=dest)
    config = tmp_path / "asyncsat.toml"
    config.write_text("status_interval = 0.2\n")
    proc = DaemonProcess(dsn, tmp_path / "home", env={
        "NOTIFY_SOCKET": notify_socket.getsockname(), "ASYNCSAT_CONFIG": str(config)})
    daemons.append(proc)

    def seen(text: str) -> Callable[[list[str]], bool]:
        return lambda lines: f"STATUS={text}" in lines

    await asyncio.to_thread(_messages, notify_socket, seen("1 running, 1 queued, 0 done"))
    await asyncio.to_thread(_messages, notify_socket, seen("0 running, 0 queued, 2 done"))
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait) == 0


async def test_a_database_not_up_yet_is_waited_for(
        tmp_path: Path, notify_socket: socket.socket, daemons: list[DaemonProcess]) -> None:
    """A service started before its database waits for it (asking systemd for more time to
    start) instead of failing; it stops cleanly while waiting; `--exit-when-idle` does not
    wait."""
    cluster = PgCluster().init()
    try:
        cluster.psql("CREATE DATABASE laterdb OWNER asyncsat")
        dsn = cluster.dsn("laterdb")
        await asyncio.to_thread(cluster.stop, "fast")
        env = {"NOTIFY_SOCKET": notify_socket.getsockname()}

        batch = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn,
                                        home=tmp_path / "home")
        assert batch.returncode == 1
        assert batch.stderr.startswith("asyncsat: error: cannot connect to PostgreSQL")

        waiting = DaemonProcess(dsn, tmp_path / "home", env=env)
        daemons.append(waiting)
        lines = await asyncio.to_thread(_messages, notify_socket, lambda lines: any(
            line.startswith("EXTEND_TIMEOUT_USEC=") for line in lines))
        assert "STATUS=waiting for the database" in lines
        await waiting.wait_for(lambda line: line["event"] == "database not ready, waiting")
        waiting.signal(signal.SIGTERM)
        assert await asyncio.to_thread(waiting.wait) == 0
        events = [line["event"] for line in waiting.lines]
        assert "daemon stopped" in events and "daemon started" not in events

        proc = DaemonProcess(dsn, tmp_path / "home", env=env)
        daemons.append(proc)
        await asyncio.to_thread(_messages, notify_socket, lambda lines: any(
            line.startswith("EXTEND_TIMEOUT_USEC=") for line in lines))
        extend = next(line for line in lines if line.startswith("EXTEND_TIMEOUT_USEC="))
        assert int(extend.split("=")[1]) >= 15_000_000
        assert proc.proc.poll() is None
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(_messages, notify_socket, lambda lines: "READY=1" in lines)
        await proc.wait_for(lambda line: line["event"] == "daemon started")
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait) == 0
    finally:
        for d in daemons:
            d.kill()
        cluster.destroy()
