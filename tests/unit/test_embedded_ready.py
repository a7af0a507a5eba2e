"""The quick look at a running embedded server (`ready_dsn`) leaves anything unusual to the
wheel: it never names a server that is not up and ready."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from asyncsat.db.embedded import ready_dsn


def _pid_file(pgdata: Path, pid: int, status: str = "ready", port: int = 5432) -> None:
    pgdata.mkdir(exist_ok=True)
    (pgdata / "postmaster.pid").write_text(
        f"{pid}\n{pgdata}\n1796042266\n{port}\n{pgdata}\n\n  2490394   7045152\n{status}\n")


def test_a_pid_file_whose_process_is_not_postgres_is_left_to_the_wheel(tmp_path: Path) -> None:
    """(a server killed, its pid reused by another program, its socket left behind)"""
    pgdata = tmp_path / "pg"
    _pid_file(pgdata, os.getpid())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(pgdata / ".s.PGSQL.5432"))
        assert ready_dsn(pgdata) is None


def test_no_pid_file_a_dead_pid_or_a_torn_file_is_no_server(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    assert ready_dsn(pgdata) is None
    _pid_file(pgdata, 2**22 + 7)  # (above the kernel's pid_max: no such process)
    assert ready_dsn(pgdata) is None
    (pgdata / "postmaster.pid").write_text("12")
    assert ready_dsn(pgdata) is None
