"""`status` as operators read it: whether a daemon serves the database, progress, rates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import DaemonProcess, cli
from tests.helpers import add_provider, queue, sql
from tests.servers import FileServer


async def _wait_part(path: Path, at_least: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never reached {at_least} bytes")


async def test_status_says_when_no_daemon_serves_the_rows_marked_running(
        server, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server.add("big.nc", os.urandom(6_000_000), rate=1_000_000)
    await add_provider(dsn, "local", server.base)
    dest = tmp_path / "dest"
    await queue(dsn, server.url("big.nc"), dest=dest)
    home = tmp_path / "home"
    proc = DaemonProcess(dsn, home)
    daemons.append(proc)
    await _wait_part(dest / "local" / "big.nc.part", 1_000_000)

    # `status --watch` follows the daemon: serving, then gone
    watch = subprocess.Popen(
        [sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(home), "status",
         "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(2.0)
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        await asyncio.sleep(2.5)
    finally:
        watch.send_signal(signal.SIGINT)
        out, _err = await asyncio.to_thread(watch.communicate, timeout=10)
    daemon_lines = [line for line in out.splitlines() if line.startswith("daemon: ")]
    assert daemon_lines[0].startswith("daemon: serving this database (")
    assert daemon_lines[-1].startswith("daemon: none serves this database; 1 download(s) "
                                       "marked running are stalled")

    shown = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
    lines = shown.stdout.splitlines()
    assert lines[1] == (
        "daemon: none serves this database; 1 download(s) marked running are stalled (left "
        "by a daemon that did not stop cleanly): asyncsat run resumes them from their .part "
        "files")
    [row] = [line for line in lines if "big.nc" in line and not line.startswith("request")]
    assert row.split()[1] == "stalled"
    as_json = await asyncio.to_thread(cli, "status", "--json", dsn=dsn, home=home)
    assert [r["status"] for r in json.loads(as_json.stdout)] == ["running"]  # the contract
    assert as_json.stderr.startswith("daemon: none serves this database; 1 download(s)")
    requests = await asyncio.to_thread(cli, "status", "--requests", dsn=dsn, home=home)
    assert requests.stdout.splitlines()[0].startswith("database: ")  # as `status` starts
    assert requests.stdout.splitlines()[1].startswith(
        "daemon: none serves this database; 1 download(s)")

    again = DaemonProcess(dsn, home, "--exit-when-idle")
    daemons.append(again)
    assert await asyncio.to_thread(again.wait, 30) == 0
    after = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
    assert after.stdout.splitlines()[1] == "daemon: none serves this database"
    assert "stalled" not in after.stdout


def _config(tmp_path: Path, **values: float) -> dict[str, str]:
    path = tmp_path / "asyncsat.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    return {"ASYNCSAT_CONFIG": str(path)}


async def test_get_wait_shows_the_daemons_progress_from_the_database(
        server, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    home = tmp_path / "home"
    proc = DaemonProcess(dsn, home)
    daemons.append(proc)
    await proc.wait_for(lambda line: line["event"] == "daemon started")
    server.add("served.bin", os.urandom(4_000_000), rate=1_000_000)
    waiting = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(home), "get",
        server.url("served.bin"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **_config(tmp_path, progress_log_interval=0.7)})
    out, err = await waiting.communicate()
    assert waiting.returncode == 0, err.decode()
    lines = err.decode().splitlines()
    assert lines[1] == "a daemon serves this database: waiting for the downloads to finish"
    progress = [line for line in lines[2:] if line.startswith("request 1: 0 of 1 done, "
                                                               "1 running; ")]
    assert len(progress) >= 2, lines  # not on a terminal: a line every 0.7 s
    # request 1: 0 of 1 done, 1 running; 1.2 MB/4.0 MB; 1.0 MB/s; ETA 0:00:03
    fields = progress[-1].split("; ")
    assert fields[1].endswith("/4.0 MB") and fields[2].endswith("B/s")
    assert fields[3].startswith("ETA 0:00:0")
    assert out.decode().splitlines()[-1].startswith("done    ")


async def test_get_wait_on_a_terminal_draws_each_transfer(
        server, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    import pty

    home = tmp_path / "home"
    proc = DaemonProcess(dsn, home)
    daemons.append(proc)
    await proc.wait_for(lambda line: line["event"] == "daemon started")
    server.add("tty.bin", os.urandom(3_000_000), rate=1_000_000)
    master, slave = pty.openpty()
    waiting = subprocess.Popen(
        [sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(home), "get",
         server.url("tty.bin"), "--dest", str(tmp_path / "d"), "--wait"],
        stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed with the process
                return
            if not data:
                return
            shown.extend(data)

    reader = asyncio.create_task(asyncio.to_thread(read))
    assert await asyncio.to_thread(waiting.wait, 30) == 0
    await asyncio.wait_for(reader, 10)
    os.close(master)
    assert waiting.stdout is not None
    waiting.stdout.close()
    text = shown.decode()
    assert "\x1b[2F\x1b[J" in text  # the transfer and the request lines, redrawn in place
    drawn = [line for line in text.replace("\x1b[2F\x1b[J", "\n").splitlines()
             if line.lstrip().startswith("tty.bin")]
    # "  tty.bin   45.0% 1.4 MB/3.0 MB 1.0 MB/s ETA 0:00:02"
    assert any(line.split()[-3].endswith("/s") and line.split()[-1].startswith("0:00:0")
               for line in drawn), drawn


async def test_status_shows_rate_eta_and_totals_of_running_transfers(
        server, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    server.add("one.nc", os.urandom(5_000_000), rate=1_000_000)
    await add_provider(dsn, "local", server.base)
    dest = tmp_path / "dest"
    await queue(dsn, server.url("one.nc"), dest=dest)
    home = tmp_path / "home"
    proc = DaemonProcess(dsn, home)
    daemons.append(proc)
    await _wait_part(dest / "local" / "one.nc.part", 2_000_000)
    shown = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
    lines = shown.stdout.splitlines()
    assert lines[1].startswith("daemon: serving this database (")
    # progress: 1 running at 1.0 MB/s, 0 queued; 2.9 MB left; ETA 0:00:03
    assert lines[2].startswith("progress: 1 running at ") and "B/s, 0 queued; " in lines[2]
    assert lines[2].split("; ")[-1].startswith("ETA 0:00:0")
    header = lines[3].split()
    row = lines[4].split()
    assert header[:6] == ["ID", "STATUS", "PROVIDER", "PROGRESS", "RATE", "ETA"]
    # 1  running  local  45.0% 2.3 MB/5.0 MB  1.0 MB/s  0:00:03  1  one.nc
    assert row[1] == "running" and row[8].endswith("B/s") and row[9].startswith("0:00:0")
    shown_rate = float(row[7]) * (1e6 if row[8] == "MB/s" else 1e3)
    assert 500_000 < shown_rate < 1_600_000
    [as_json] = json.loads((await asyncio.to_thread(cli, "status", "--json", dsn=dsn,
                                                    home=home)).stdout)
    assert as_json["status"] == "running" and 500_000 < as_json["rate"] < 1_600_000


async def test_get_wait_says_when_the_daemon_goes_away_and_goes_on_with_the_next(
        server, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    home = tmp_path / "home"
    first = DaemonProcess(dsn, home)
    daemons.append(first)
    await first.wait_for(lambda line: line["event"] == "daemon started")
    data = os.urandom(3_000_000)
    server.add("crash.bin", data, rate=1_000_000)
    waiting = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(home), "get",
        server.url("crash.bin"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert waiting.stderr is not None
    seen: list[str] = []

    async def read_until(start: str) -> None:
        assert waiting.stderr is not None
        while not any(line.startswith(start) for line in seen):
            line = (await asyncio.wait_for(waiting.stderr.readline(), 10)).decode()
            assert line, f"get --wait ended: {seen}"
            seen.append(line)

    try:
        await read_until("a daemon serves this database")  # else get --wait works in the foreground
        await first.wait_for(lambda line: line["event"] == "download running")
        first.signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait)
        await read_until("no daemon serves this database any more")
        second = DaemonProcess(dsn, home)
        daemons.append(second)
        out, _err = await asyncio.wait_for(waiting.communicate(), 30)
    finally:
        if waiting.returncode is None:
            waiting.kill()
            await waiting.wait()
    assert waiting.returncode == 0
    final = tmp_path / "d" / f"127.0.0.1_{server.port}" / "crash.bin"
    assert out.decode().splitlines()[-1] == f"done    {final}"
    assert final.read_bytes() == data


async def test_status_pages_by_keyset_cover_every_row_once_while_rows_change(
        dsn: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    await add_provider(dsn, "local", "http://127.0.0.1:9/files/")
    await sql(dsn, "INSERT INTO download (provider_id, url, name, status)"
              " SELECT p.id, 'http://127.0.0.1:9/files/f' || g, 'f' || g,"
              "  CASE WHEN g % 3 = 0 THEN 'failed' ELSE 'done' END"
              " FROM provider p, generate_series(1, 250) g WHERE p.name = 'local'")

    def page(*args: str) -> list[dict[str, object]]:
        out = cli("status", "--json", *args, dsn=dsn, home=home)
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, object]] = json.loads(out.stdout)
        return rows

    # --json pages of 40, newest first; between two pages rows change status (and one is
    # added): a page never repeats nor skips a row that was there when paging began
    seen: list[int] = []
    before: list[str] = []
    while True:
        rows = await asyncio.to_thread(page, "--limit", "40", *before)
        if not rows:
            break
        ids = [int(str(r["id"])) for r in rows]
        assert ids == sorted(ids, reverse=True) and len(ids) <= 40
        seen += ids
        before = ["--before", str(ids[-1])]
        await sql(dsn, "UPDATE download SET status = 'queued' WHERE id IN (SELECT id FROM"
                  " download WHERE status <> 'queued' ORDER BY random() LIMIT 30)")
        await sql(dsn, "INSERT INTO download (provider_id, url) SELECT id,"
                  " 'http://127.0.0.1:9/files/new' || $1::int FROM provider", len(seen))
    assert seen == list(range(250, 0, -1))

    # by status: the failed ones now, over pages of 7, are exactly what one query shows
    failed = [r["id"] for r in await asyncio.to_thread(page, "--status", "failed")]
    assert failed and all(r["status"] == "failed"
                          for r in await asyncio.to_thread(page, "--status", "failed"))
    paged: list[object] = []
    before = []
    while rows := await asyncio.to_thread(page, "--status", "failed", "--limit", "7", *before):
        paged += [r["id"] for r in rows]
        before = ["--before", str(rows[-1]["id"])]
    assert paged == failed

    # the text view shows a page and the command for the next; that command shows the next
    everything = [r["id"] for r in await asyncio.to_thread(page)]
    assert len(everything) > 100  # --json without --limit: every download (the contract)
    shown = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
    lines = shown.stdout.splitlines()
    table = [int(line.split()[0]) for line in lines if line[:6].strip().isdigit()]
    assert table == everything[:100]
    footer = f"... {len(everything) - 100} older download(s) not shown (100 per page); " \
             f"next page: asyncsat status --before {everything[99]}"
    assert lines[-1] == footer
    command = footer.split("next page: asyncsat ")[1].split()
    shown = await asyncio.to_thread(cli, *command, dsn=dsn, home=home)
    table = [int(line.split()[0]) for line in shown.stdout.splitlines()
             if line[:6].strip().isdigit()]
    assert table == everything[100:200]


async def test_status_into_a_pipe_closed_early_ends_quietly(dsn: str, tmp_path: Path) -> None:
    """`asyncsat status | head`: the reader leaves after a line; no error line, no
    traceback, and the exit code a shell shows for SIGPIPE."""
    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    await sql(dsn, "INSERT INTO download (provider_id, url) SELECT id,"
                   " 'http://127.0.0.1:9/' || repeat('x', 200) || g FROM provider,"
                   " generate_series(1, 2000) g")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "home"),
         "status", "--limit", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # more than a pipe holds follows: the writer blocks
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 141
    assert err == ""


async def test_status_shows_request_rows_of_any_shape_psql_inserted(
        dsn: str, tmp_path: Path) -> None:
    """A search that is not a JSON object, or whose collection is not text, is failed by
    the daemon with its reason; `status` shows such rows instead of ending with
    AttributeError (exit 1)."""
    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    await sql(dsn, "INSERT INTO request (search) VALUES ('\"str\"'), ('[1, 2]')")
    await sql(dsn, "INSERT INTO request (search, provider_id)"
                   " SELECT '{\"collection\": 5}', id FROM provider")
    home = tmp_path / "home"
    ran = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=home)
    assert ran.returncode == 0, ran.stderr
    for command in (["status"], ["status", "--requests"], ["status", "--requests", "--json"]):
        shown = await asyncio.to_thread(cli, *command, dsn=dsn, home=home)
        assert shown.returncode == 0 and shown.stderr == "", (command, shown.stderr)
        assert shown.stdout.count("failed") >= 3, (command, shown.stdout)


async def test_a_request_of_urls_shows_its_products_provider_and_its_first_url(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    """A request of URLs has no provider of its own: `status --requests` names its
    products' one when they share it, and its first URL whole (the end kept when long)."""
    for name in ("a.bin", "b.bin"):
        server.add(name, os.urandom(1000))
    long = "x" * 80 + ".bin"
    server.add(long, os.urandom(1000))
    home = tmp_path / "h"
    for urls in ([server.url("a.bin"), server.url("b.bin")], [server.url(long)]):
        got = await asyncio.to_thread(cli, "get", *urls, "--dest", str(tmp_path / "d"),
                                      "--wait", dsn=dsn, home=home)
        assert got.returncode == 0, got.stderr
    listed = json.loads((await asyncio.to_thread(
        cli, "status", "--requests", "--json", dsn=dsn, home=home)).stdout)
    assert [r["provider"] for r in listed] == [f"127.0.0.1_{server.port}"] * 2
    table = (await asyncio.to_thread(cli, "status", "--requests", dsn=dsn,
                                     home=home)).stdout.splitlines()
    assert table[3].endswith(f"{server.url('a.bin')} (+1 more)"), table
    assert f" 127.0.0.1_{server.port} " in table[3]
    assert table[4].endswith("..." + long[-57:]), table


async def test_status_requests_shows_no_signature_of_a_long_presigned_url(
        dsn: str, tmp_path: Path) -> None:
    """A request of a pre-signed URL longer than the column: its end is shown, and that end
    is the signature. It is masked before the URL is cut (cut first, the name before it was
    gone and the redactor had nothing to find: the signature was printed)."""
    signature = "f" * 40 + "0123456789abcdef0123"
    url = ("https://bucket.example.org/S2/a.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           f"&X-Amz-Expires=3600&X-Amz-Signature={signature}")
    await sql(dsn, "INSERT INTO request (urls) VALUES ($1)", [url])
    for args in (["status", "--requests"], ["status"]):
        shown = await asyncio.to_thread(cli, *args, dsn=dsn, home=tmp_path / "h")
        assert shown.returncode == 0, shown.stderr
        assert signature[-20:] not in shown.stdout, shown.stdout
