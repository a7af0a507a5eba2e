"""The daemon as systemd runs it: the notify protocol, and the unit's hardening."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


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
