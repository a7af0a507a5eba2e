from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.servers import FileServer


async def test_get_wait_downloads_a_file(server: FileServer, dsn: str, tmp_path) -> None:
    data = os.urandom(3_000_000)
    server.add("S2A_MSIL1C_20240101.zip", data)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "h"),
        "get", server.url("S2A_MSIL1C_20240101.zip"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    final = tmp_path / "d" / f"127.0.0.1_{server.port}" / "S2A_MSIL1C_20240101.zip"
    assert final.read_bytes() == data
    # stdout: the JSON log lines of the foreground run, then the summary
    *logs, summary = out.decode().splitlines()
    assert summary == f"done    {final}"
    assert {json.loads(line)["event"] for line in logs} >= {"download running", "download done"}


async def test_get_wait_waits_for_a_running_daemon(server: FileServer, dsn: str, tmp_path,
                                                   daemons) -> None:
    from tests.conftest import DaemonProcess

    daemon = DaemonProcess(dsn, tmp_path / "h")
    daemons.append(daemon)
    await daemon.wait_for(lambda line: line["event"] == "daemon started")
    server.add("served.bin", os.urandom(2_000_000), rate=2_000_000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "h"),
        "get", server.url("served.bin"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "a daemon serves this database" in err.decode()
    assert out.decode().splitlines()[-1].startswith("done    ")
    # the daemon did the work, the waiting command only watched
    await daemon.wait_for(lambda line: line["event"] == "download done")


async def test_get_wait_on_a_request_deleted_meanwhile_says_so(
        server: FileServer, dsn: str, tmp_path) -> None:
    """A request deleted with psql while `get --wait` waits for it: one line and exit 1,
    not a traceback."""
    from tests.helpers import sql

    server.add("slow.bin", os.urandom(3_000_000), rate=1_000_000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "h"),
        "get", server.url("slow.bin"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    for _ in range(200):  # (until its download runs)
        if await sql(dsn, "SELECT 1 FROM download WHERE status = 'running'"):
            break
        await asyncio.sleep(0.05)
    await sql(dsn, "DELETE FROM request")
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, err.decode()
    assert err.decode().splitlines()[-1] == "request 1 no longer exists: it was deleted"
    assert "Traceback" not in err.decode()


async def test_get_wait_beside_a_daemon_rides_through_a_postgresql_restart(
        tmp_path, daemons) -> None:
    """`get --wait` watching a running daemon while PostgreSQL restarts: it says the
    database went away and came back, keeps waiting, and ends 0 once the daemon is done
    (it ended with `InterfaceError: connection is closed` while the daemon went on)."""
    from pathlib import Path

    from tests.conftest import DaemonProcess
    from tests.helpers import schema_database
    from tests.servers import PgCluster

    cluster = PgCluster().init()
    server = await FileServer().start()
    try:
        dsn = await schema_database(cluster, "waitdb")
        config = Path(tmp_path) / "asyncsat.toml"
        config.write_text("lease_timeout = 15\nlistener_ping = 1\nprogress_interval = 0.2\n")
        env = {**os.environ, "ASYNCSAT_CONFIG": str(config)}
        daemon = DaemonProcess(dsn, tmp_path / "h", env={"ASYNCSAT_CONFIG": str(config)})
        daemons.append(daemon)
        await daemon.wait_for(lambda line: line["event"] == "daemon started")
        server.add("slow.bin", os.urandom(1_200_000), rate=300_000)  # 4 s
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "h"),
            "get", server.url("slow.bin"), "--dest", str(tmp_path / "d"), "--wait", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await daemon.wait_for(lambda line: line["event"] == "download running")
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.stop, "fast")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.start)
        out, err = await asyncio.wait_for(proc.communicate(), 45)
        text = err.decode()
        assert proc.returncode == 0, text
        assert "the database went away" in text and "the database is back" in text, text
        assert out.decode().splitlines()[-1].startswith("done    "), out.decode()
    finally:
        await server.stop()
        cluster.destroy()


async def test_get_wait_does_the_work_itself_when_the_daemon_it_watched_dies(
        server: FileServer, dsn: str, tmp_path, daemons) -> None:
    """`get --wait` watching a daemon that is killed mid-transfer: it takes the download
    over, resumes its `.part`, and ends 0 (it used to wait until interrupted)."""
    import signal

    from tests.conftest import DaemonProcess

    daemon = DaemonProcess(dsn, tmp_path / "h")
    daemons.append(daemon)
    await daemon.wait_for(lambda line: line["event"] == "daemon started")
    data = os.urandom(3_000_000)
    server.add("long.bin", data, rate=1_000_000)  # 3 s
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "h"),
        "get", server.url("long.bin"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    part = tmp_path / "d" / f"127.0.0.1_{server.port}" / "long.bin.part"
    for _ in range(400):
        if part.exists() and part.stat().st_size >= 1_000_000:
            break
        await asyncio.sleep(0.02)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    text = err.decode()
    assert proc.returncode == 0, text
    assert "a daemon serves this database" in text
    assert "no daemon serves this database any more: this command does the work itself" \
        in text
    final = tmp_path / "d" / f"127.0.0.1_{server.port}" / "long.bin"
    assert out.decode().splitlines()[-1] == f"done    {final}"
    assert final.read_bytes() == data
    resumed = [r for r in server.requests if r["range"]]
    assert len(server.requests) == 2 and resumed and resumed[0]["range"] != "bytes=0-"


async def test_get_wait_waits_for_a_daemon_restarted_under_it(
        server: FileServer, dsn: str, tmp_path, daemons) -> None:
    """A daemon stopped and started again at once (`systemctl restart`): `get --wait`
    waits for the new one, it does not take the work over (ALONE_GRACE)."""
    import signal

    from tests.conftest import DaemonProcess

    first = DaemonProcess(dsn, tmp_path / "h")
    daemons.append(first)
    await first.wait_for(lambda line: line["event"] == "daemon started")
    server.add("long.bin", os.urandom(3_000_000), rate=1_000_000)  # 3 s
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "h"),
        "get", server.url("long.bin"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await first.wait_for(lambda line: line["event"] == "download running")
    first.signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait) == 0
    await asyncio.sleep(2.0)  # (its looks, once a second, see none for two seconds)
    second = DaemonProcess(dsn, tmp_path / "h")
    daemons.append(second)
    _out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0, err.decode()
    assert "does the work itself" not in err.decode(), err.decode()
    await second.wait_for(lambda line: line["event"] == "download done")
