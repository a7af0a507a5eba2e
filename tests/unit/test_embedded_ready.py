"""The quick look at a running embedded server (`ready_dsn`) leaves anything unusual to the
wheel: it names a server only when the postmaster that wrote `postmaster.pid` is alive,
ready, serving that folder and listening on its socket."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncsat.db.embedded import _started, ready_dsn


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose program is named `postgres` (a copy of sleep)."""
    program = tmp_path / "bin" / "postgres"
    program.parent.mkdir()
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    process = subprocess.Popen([str(program), "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _pid_file(pgdata: Path, pid: int, *, status: str = "ready", started: int | None = None,
              folder: Path | None = None) -> None:
    pgdata.mkdir(exist_ok=True)
    started = int(_started(pid)) if started is None else started
    (pgdata / "postmaster.pid").write_text(
        f"{pid}\n{folder or pgdata.resolve()}\n{started}\n5432\n{pgdata}\n\n"
        f"  2490394   7045152\n{status}\n")


def test_a_ready_postmaster_of_the_folder_is_found(
        tmp_path: Path, postgres: subprocess.Popen[bytes]) -> None:
    pgdata = tmp_path / "pg"
    _pid_file(pgdata, postgres.pid)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(pgdata / ".s.PGSQL.5432"))
        assert ready_dsn(pgdata) == f"postgresql://postgres:@/postgres?host={pgdata}"
        for status in ("starting", "stopping"):
            _pid_file(pgdata, postgres.pid, status=status)
            assert ready_dsn(pgdata) is None, status
        _pid_file(pgdata, postgres.pid, folder=tmp_path / "other")  # another server's file
        assert ready_dsn(pgdata) is None
        # its pid reused by another postmaster, started later than the file says
        _pid_file(pgdata, postgres.pid, started=int(_started(postgres.pid)) - 3600)
        assert ready_dsn(pgdata) is None
    (pgdata / ".s.PGSQL.5432").unlink()  # (its socket gone)
    _pid_file(pgdata, postgres.pid)
    assert ready_dsn(pgdata) is None


def test_a_pid_file_whose_process_is_not_postgres_is_left_to_the_wheel(tmp_path: Path) -> None:
    """(a server killed, its pid reused by another program, its socket left behind)"""
    import os

    pgdata = tmp_path / "pg"
    _pid_file(pgdata, os.getpid())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(pgdata / ".s.PGSQL.5432"))
        assert ready_dsn(pgdata) is None


def test_no_pid_file_a_dead_pid_or_a_torn_file_is_no_server(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    assert ready_dsn(pgdata) is None
    _pid_file(pgdata, 1, started=0)
    (pgdata / "postmaster.pid").write_text(
        (pgdata / "postmaster.pid").read_text().replace("1\n", f"{2**22 + 7}\n", 1))
    assert ready_dsn(pgdata) is None  # (above the kernel's pid_max: no such process)
    (pgdata / "postmaster.pid").write_text("12")
    assert ready_dsn(pgdata) is None
