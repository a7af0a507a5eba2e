"""Fixtures: a real PostgreSQL (template database cloned per test) and loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from asyncsat.config import Settings
from asyncsat.db.pool import apply_schema, connect
from tests.helpers import resident
from tests.servers import FileServer, PgCluster

TEMPLATE = "asyncsat_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster().init()
    cluster.psql(f"CREATE DATABASE {TEMPLATE} OWNER asyncsat")

    async def prepare() -> None:
        conn = await connect(cluster.dsn(TEMPLATE))
        try:
            await apply_schema(conn, always=True)
        finally:
            await conn.close()

    asyncio.run(prepare())
    yield cluster
    cluster.destroy()


@pytest.fixture
def dsn(pg: PgCluster) -> Iterator[str]:
    name = f"t_{os.getpid()}_{next(_counter)}"
    pg.psql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} OWNER asyncsat")
    yield pg.dsn(name)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[Any]:
    conn = await connect(dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def server() -> AsyncIterator[FileServer]:
    srv = await FileServer().start()
    yield srv
    await srv.stop()


@pytest.fixture
async def local_server(server: FileServer, dsn: str) -> FileServer:
    """`server`, added as provider `local` with quick retries (`FAST`)."""
    from tests.helpers import FAST, add_provider
    await add_provider(dsn, "local", f"http://127.0.0.1:{server.port}/", {**FAST})
    return server


def _drops_pages(folder: Path) -> bool:
    """Whether the page cache advice works in `folder` (tmpfs keeps every page: a file
    there is its pages; macOS has no posix_fadvise)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    probe = folder / ".page-cache-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x" * 8192)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return resident(probe) == 0
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder on a file system with a page cache to drop: the test's own when it
    has one, else one beside the checkout, in $HOME or in /var/tmp (removed after)."""
    if _drops_pages(tmp_path):
        yield tmp_path
        return
    root = Path(__file__).resolve().parent.parent
    for base in (root, Path.home(), Path("/var/tmp")):
        try:
            folder = Path(tempfile.mkdtemp(prefix=".asyncsat-test-", dir=base))
        except OSError:
            continue
        if _drops_pages(folder):
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
        shutil.rmtree(folder, ignore_errors=True)
    pytest.skip("no folder here whose file system drops pages from its page cache "
                "(tmpfs everywhere, or no posix_fadvise)")


@pytest.fixture
def settings(dsn: str, tmp_path: Path) -> Settings:
    return Settings(dsn=dsn, home=tmp_path / "home", dest=tmp_path / "dest",
                    progress_interval=0.05, shutdown_timeout=5.0, listener_ping=1.0)


def cli(*args: str, dsn: str, home: Path, input: str | None = None,
        env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m asyncsat --dsn DSN --home HOME ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(home), *args],
        capture_output=True, text=True, input=input, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class DaemonProcess:
    """`asyncsat run` in a subprocess, with its JSON log lines collected."""

    def __init__(self, dsn: str, home: Path, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(home), "run", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> \
            dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if pred(line):
                    return line
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        stderr = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr \
            else ""
        raise AssertionError(f"no such log line; daemon said: {''.join(self.raw)[-3000:]} "
                             f"{stderr}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        """The exit code, once the lines it wrote are read (`lines`: the reader thread had
        not always reached its last line when the process was reaped)."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)  # (a child that keeps its stdout: no end, 5 s)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.kill()


async def fetchrow(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()
