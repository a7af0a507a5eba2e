"""Log lines as operators read them: console on a terminal, JSON elsewhere; truthful fields."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from tests.conftest import DaemonProcess
from tests.helpers import FAST, add_provider, queue
from tests.servers import FileServer


def _on_a_terminal(dsn: str, home: Path, *args: str) -> str:
    """Run the CLI with its stdout on a pseudo-terminal; what it printed there."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home",
                             str(home), *args], stdout=child, stderr=subprocess.DEVNULL)
    os.close(child)
    out = b""
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(main)
    assert proc.wait(timeout=30) == 0
    return out.decode()


async def test_console_logs_on_a_terminal_json_elsewhere(dsn: str, tmp_path: Path) -> None:
    console = await asyncio.to_thread(_on_a_terminal, dsn, tmp_path, "run", "--exit-when-idle")
    lines = [line for line in console.splitlines() if "daemon started" in line]
    assert lines and not lines[0].lstrip().startswith("{"), console
    forced = await asyncio.to_thread(_on_a_terminal, dsn, tmp_path, "--log-format", "json",
                                     "run", "--exit-when-idle")
    started = next(json.loads(line) for line in forced.splitlines() if "daemon started" in line)
    assert started["event"] == "daemon started"
    piped = subprocess.run([sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home",
                            str(tmp_path), "run", "--exit-when-idle"], capture_output=True,
                           text=True, timeout=30)
    assert json.loads(piped.stdout.splitlines()[0])["event"] == "daemon started"


async def test_log_lines_name_the_login_and_tell_the_retry_budget_truthfully(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server = await FileServer(users={"alice": "right-pw-1"}).start()
    try:
        server.add("cut.bin", os.urandom(300_000), drop_after=[100_000])
        server.add("locked.bin", os.urandom(1000))
        await add_provider(dsn, "good", server.url("cut.bin").rsplit("/", 1)[0] + "/",
                           settings=FAST, credentials=[("alice", "right-pw-1", 2)])
        anonymous = FileServer()
        await anonymous.start()
        try:
            anonymous.add("open.bin", os.urandom(1000))
            dest = tmp_path / "dest"
            await queue(dsn, server.url("cut.bin"), dest=dest)
            await queue(dsn, server.url("locked.bin", user="alice", password="wrong-pw-2"),
                        dest=dest)
            await queue(dsn, anonymous.url("open.bin"), dest=dest)
            proc = DaemonProcess(dsn, tmp_path / "home", "--exit-when-idle")
            daemons.append(proc)
            assert await asyncio.to_thread(proc.wait, 60) == 0
        finally:
            await anonymous.stop()
    finally:
        await server.stop()
    lines = proc.lines

    ids = {str(line["url"]).rsplit("/", 1)[-1]: line["download_id"] for line in lines
           if line["event"] == "download running"}

    def about(name: str, event: str) -> list[dict[str, object]]:
        return [line for line in lines
                if line["event"] == event and line.get("download_id") == ids[name]]
    [running_open] = about("open.bin", "download running")
    assert "user" not in running_open  # anonymous: no "user": null
    assert about("cut.bin", "download running")[0]["user"] == "alice"

    [retry] = about("cut.bin", "download queued")
    assert retry["reason"] == "retry" and "failures" not in retry
    assert retry["budget"] == "not used: the attempt moved the file forward"
    assert retry["attempt"] == 1 and retry["error"]

    locked_retry = about("locked.bin", "download queued")[0]
    assert locked_retry["user"] == "alice"
    assert locked_retry["budget"] == "1 of 2 tries for a refused login"
    [locked_failed] = about("locked.bin", "download failed")
    assert locked_failed["user"] == "alice"
    assert locked_failed["error"] == "HTTP 401 Unauthorized (login: 'alice')"
    assert locked_failed["budget"] == "2 of 2 tries for a refused login"
    assert "wrong-pw-2" not in "".join(proc.raw)
