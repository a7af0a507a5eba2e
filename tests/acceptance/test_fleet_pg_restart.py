"""Three daemons on one database while PostgreSQL restarts under them (issue 13).

An operator restarts PostgreSQL (a minor upgrade, a failover) while a fleet downloads
through an account capped at three connections. Every daemon lives on, every file ends
`done` once with the server's bytes, the cap holds, no transfer starts over from zero,
and LISTEN/NOTIFY wakes the daemons again afterwards.

Two restarts: a `fast` one shorter than `lease_timeout` (the transfers ride through it: each
file is asked for once), and an `immediate` one (a crash) longer than `lease_timeout` (the
leases lapse: the downloads are taken over and resumed from their `.part` with Range).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest

from tests.conftest import DaemonProcess
from tests.helpers import FAST, add_provider, queue, rows, schema_database, sql
from tests.servers import FileServer, PgCluster

pytestmark = pytest.mark.timeout(60)
USER, PASSWORD = "fleet", "pw-restart-77"
CAP = 3
BIG, SMALL = 900_000, 240_000
RATE = 150_000  # bytes/s per connection: a big file takes 6 s, a small one 1.6 s


def _config(tmp_path: Path, lease_timeout: float) -> dict[str, str]:
    path = tmp_path / "asyncsat.toml"
    path.write_text(f"lease_timeout = {lease_timeout}\nshutdown_timeout = 3\n"
                    "listener_ping = 1\nprogress_interval = 0.2\n")
    return {"ASYNCSAT_CONFIG": str(path)}


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(("mode", "lease_timeout", "outage"), [
    ("fast", 15.0, 2.5),       # shorter than the leases: nothing is taken over
    ("immediate", 1.0, 3.0),   # a crash longer than the leases: everything is taken over
])
async def test_three_daemons_survive_a_postgresql_restart(
        tmp_path: Path, daemons: list[DaemonProcess], mode: str, lease_timeout: float,
        outage: float) -> None:
    # durable: an immediate stop is a crash, and a crash keeps what was committed only
    # with synchronous commits (a production server's setting)
    cluster = PgCluster(durable=True).init()
    server = await FileServer(users={USER: PASSWORD}, max_per_user=CAP).start()
    try:
        dsn = await schema_database(cluster, "fleetdb")
        big = [f"S2_big_{i}.zip" for i in range(3)]
        small = [f"S2_small_{i}.zip" for i in range(3)]
        later = [f"S2_after_{i}.zip" for i in range(3)]
        for name in big:
            server.add(name, os.urandom(BIG), rate=RATE)
        for name in small + later:
            server.add(name, os.urandom(SMALL), rate=RATE)
        await add_provider(dsn, "hub", server.base, FAST, credentials=[(USER, PASSWORD, CAP)])
        env = _config(tmp_path, lease_timeout)
        for i in range(3):
            proc = DaemonProcess(dsn, tmp_path / f"home{i}", env=env)
            daemons.append(proc)
        for proc in daemons:
            await proc.wait_for(lambda line: line["event"] == "daemon started")
        dest = tmp_path / "dest"
        folder = dest / "hub"
        await queue(dsn, *(server.url(n) for n in big + small), dest=dest)

        # the three big files are in flight (the cap's three connections) when the server goes
        def parts() -> list[int]:
            return [(folder / f"{n}.part").stat().st_size if (folder / f"{n}.part").exists()
                    else 0 for n in big]

        async def in_flight() -> bool:
            return min(parts()) >= 100_000

        await _until(in_flight, 10, "the big files to be in flight")
        stopping_at = time.monotonic()
        await asyncio.to_thread(cluster.stop, mode)
        at_stop = parts()
        assert max(at_stop) < BIG  # really in flight
        await asyncio.sleep(outage)
        await asyncio.to_thread(cluster.start)
        for proc in daemons:  # each one's LISTEN connection is back
            await proc.wait_for(lambda line: line["event"] == "database connection restored",
                                timeout=20)

        async def phase_one_done() -> bool:
            return sum(r["status"] == "done" for r in await rows(dsn)) == 6

        await _until(phase_one_done, 30, "the six files queued before the restart")
        listening = await sql(dsn, "SELECT count(*) AS n FROM pg_stat_activity"
                                   " WHERE application_name = 'asyncsat listener'")
        assert listening[0]["n"] == 3

        # LISTEN/NOTIFY works again: new files wake an idle fleet at once (nothing polls:
        # an idle daemon with an empty queue waits for a notification only)
        await asyncio.sleep(0.5)
        seen = len(server.requests)
        queued_at = time.monotonic()
        await queue(dsn, *(server.url(n) for n in later), dest=dest)

        async def picked_up() -> bool:
            return any(str(r["path"]).endswith(later[0]) for r in server.requests[seen:])

        await _until(picked_up, 5, "the files queued after the restart to be picked up")
        assert time.monotonic() - queued_at < 1.5

        async def all_done() -> bool:
            return sum(r["status"] == "done" for r in await rows(dsn)) == 9

        await _until(all_done, 20, "the files queued after the restart")

        for proc in daemons:  # every daemon lived through it, and stops cleanly
            assert proc.proc.poll() is None, "".join(proc.raw)[-3000:]
        for proc in daemons:
            proc.signal(signal.SIGTERM)
        for proc in daemons:
            assert await asyncio.to_thread(proc.wait) == 0, "".join(proc.raw)[-3000:]
    finally:
        await server.stop()
        for d in daemons:
            d.kill()
        await asyncio.to_thread(cluster.destroy)

    _check(server, daemons, folder, big + small + later, big, mode, stopping_at)


def _check(server: FileServer, daemons: list[DaemonProcess], folder: Path, names: list[str],
           big: list[str], mode: str, stopping_at: float) -> None:
    """What an operator expects after the restart."""
    # every file whole, with the server's bytes, under its final name only
    for name in names:
        assert (folder / name).read_bytes() == server.products[name].data, name
    assert not list(folder.glob("*.part"))
    # the account's cap held across the restart and the takeovers
    assert server.over_limit == 0
    assert server.peak[USER] <= CAP
    # each download completed once, across the fleet
    done = Counter(line["download_id"] for d in daemons for line in d.lines
                   if line.get("event") == "download done")
    assert len(done) == 9 and set(done.values()) == {1}, done
    # no file was transferred whole twice: what was on disk was resumed, not fetched again
    asked = [r for r in server.requests if r["user"] == USER]
    whole = Counter(str(r["path"]) for r in asked if r["range"] is None)
    assert set(whole.values()) == {1} and len(whole) == 9, whole
    resumed = [r for r in asked if r["range"] is not None]
    if mode == "fast":
        # the transfers rode through the restart: no file was asked for twice
        assert not resumed, resumed
    else:
        # the leases lapsed: each big file was taken over after the restart (no claim
        # before: the database was down) and resumed from its .part (never from 0)
        assert all(cast(float, r["t"]) > stopping_at for r in resumed), resumed
        assert {str(r["path"]).rsplit("/", 1)[-1] for r in resumed} >= set(big), resumed
        for r in resumed:
            start = int(str(r["range"]).removeprefix("bytes=").split("-")[0])
            assert 0 < start < BIG
    # no secret in any log line
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for proc in daemons:
        text = "".join(proc.raw)
        assert PASSWORD not in text and token not in text
