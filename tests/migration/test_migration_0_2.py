"""A database of the previous release (0.2, commit 1bbef69), as a killed 0.2 daemon left it,
upgraded by schema.sql and served by a current daemon (issue 13)."""

from __future__ import annotations

import asyncio
import base64
import os
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from asyncsat.db.pool import apply_schema
from tests.conftest import cli
from tests.migration.shape import new_database, shape
from tests.servers import FileServer, PgCluster

pytestmark = pytest.mark.timeout(60)
OLD = Path(__file__).with_name("schema_0_2.sql")
USER, PASSWORD = "old-user", "pw-of-0.2"
PART = 300_000


async def _fill_as_0_2(conn: Any, server: FileServer, dest: Path) -> dict[str, int]:
    """Rows the way a 0.2 daemon wrote them (its columns only), killed with one transfer
    running: a request of five URLs, one download running (with its .part on disk), one
    done, one failed, two queued. The ids of the downloads by file name."""
    provider = await conn.fetchval(
        "INSERT INTO provider (name, protocol, url) VALUES ('hub', 'http', $1) RETURNING id",
        server.base)
    await conn.execute(
        "INSERT INTO credential (provider_id, username, secret, max_connections)"
        " VALUES ($1, $2, $3, 2)", provider, USER, PASSWORD)
    names = ["S1_running.zip", "S1_done.zip", "S1_failed.zip", "S1_q1.zip", "S1_q2.zip"]
    request = await conn.fetchval(
        "INSERT INTO request (provider_id, urls, dest, status) VALUES ($1, $2, $3, 'resolved')"
        " RETURNING id", provider, [server.url(n) for n in names], str(dest))
    ids: dict[str, int] = {}
    for name in names:  # as 0.2 queued a URL: no name nor size until the server tells them
        ids[name] = await conn.fetchval(
            "INSERT INTO download (request_id, provider_id, url, dest) VALUES ($1, $2, $3, $4)"
            " RETURNING id", request, provider, server.url(name), str(dest))
        await conn.execute("INSERT INTO request_download (request_id, download_id)"
                           " VALUES ($1, $2)", request, ids[name])
    folder = dest / "hub"
    folder.mkdir(parents=True)
    running = server.products["S1_running.zip"]
    # claimed, named from the server's answer, progress written (behind the .part: the
    # daemon writes it every progress_interval), then SIGKILL
    await conn.execute(
        "UPDATE download SET status = 'running', attempts = 1, started_at = now(),"
        " name = 'S1_running.zip', size = $2, size_origin = 'server', etag = $3,"
        " last_modified = $4, bytes_done = $5 WHERE id = $1",
        ids["S1_running.zip"], running.size, running.etag,
        formatdate(running.last_modified, usegmt=True), PART - 40_000)
    (folder / "S1_running.zip.part").write_bytes(running.data[:PART])
    done = server.products["S1_done.zip"]
    (folder / "S1_done.zip").write_bytes(done.data)
    await conn.execute(
        "UPDATE download SET status = 'done', attempts = 1, name = 'S1_done.zip', size = $2,"
        " size_origin = 'server', bytes_done = $2, path = $3, etag = $4, started_at = now(),"
        " finished_at = now() WHERE id = $1",
        ids["S1_done.zip"], done.size, str(folder / "S1_done.zip"), done.etag)
    await conn.execute(
        "UPDATE download SET status = 'failed', attempts = 3, failures = 3,"
        " error = 'HTTP 404 Not Found', finished_at = now() WHERE id = $1",
        ids["S1_failed.zip"])
    return ids


async def test_a_0_2_database_is_upgraded_and_its_running_download_resumed(
        pg: PgCluster, tmp_path: Path) -> None:
    server = await FileServer(users={USER: PASSWORD}).start()
    _, fresh = await new_database(pg)
    dsn, old = await new_database(pg)
    try:
        for name in ("S1_running.zip", "S1_done.zip", "S1_failed.zip", "S1_q1.zip",
                     "S1_q2.zip"):
            server.add(name, os.urandom(700_000), rate=2_000_000)
        dest = tmp_path / "dest"
        folder = dest / "hub"
        await apply_schema(fresh, always=True)
        await old.execute(OLD.read_text())
        ids = await _fill_as_0_2(old, server, dest)
        done_mtime = (folder / "S1_done.zip").stat().st_mtime_ns

        await apply_schema(old, always=True)
        await apply_schema(old, always=True)  # and again: idempotent
        assert await shape(old) == await shape(fresh)

        home = tmp_path / "home"
        run = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=home,
                                    timeout=30)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr
        status = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
        assert status.returncode == 0, status.stderr
        final = {r["id"]: (r["status"], r["error"], r["attempts"]) for r in
                 await old.fetch("SELECT id, status, error, attempts FROM download")}
    finally:
        await server.stop()
        await fresh.close()
        await old.close()

    # the running row was taken over at once and resumed from its .part, not from the
    # progress the 0.2 daemon last wrote
    for name in ("S1_running.zip", "S1_q1.zip", "S1_q2.zip"):
        assert final[ids[name]][0] == "done", final
        assert (folder / name).read_bytes() == server.products[name].data, name
    asked = {str(r["path"]).rsplit("/", 1)[-1]: r for r in server.requests}
    assert asked["S1_running.zip"]["range"] == f"bytes={PART}-"
    assert asked["S1_running.zip"]["if_range"] == server.products["S1_running.zip"].etag
    assert [r["path"] for r in server.requests].count("/files/S1_running.zip") == 1
    assert final[ids["S1_running.zip"]][2] == 2  # the 0.2 attempt, and this one
    # done stays done (not fetched, not rewritten), failed stays failed
    assert final[ids["S1_done.zip"]][0] == "done"
    assert (folder / "S1_done.zip").stat().st_mtime_ns == done_mtime
    assert final[ids["S1_failed.zip"]][:2] == ("failed", "HTTP 404 Not Found")
    assert "S1_done.zip" not in asked and "S1_failed.zip" not in asked
    assert not list(folder.glob("*.part"))
    # status reads the upgraded database: four done, one failed
    shown = {int(words[0]): words[1] for line in status.stdout.splitlines()
             if (words := line.split()) and words[0].isdigit()}
    assert shown == {i: final[i][0] for i in ids.values()}, status.stdout
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for text in (run.stdout, run.stderr, status.stdout, status.stderr):
        assert PASSWORD not in text and token not in text


async def test_a_0_2_database_not_upgraded_yet_says_to_run_init(
        pg: PgCluster, tmp_path: Path) -> None:
    """An operator who upgraded asyncsat but forgot `asyncsat init` is told to run it."""
    dsn, old = await new_database(pg)
    try:
        await old.execute(OLD.read_text())
    finally:
        await old.close()
    home = tmp_path / "home"
    for args in (("run", "--exit-when-idle"), ("status",)):
        told = await asyncio.to_thread(cli, *args, dsn=dsn, home=home, timeout=30)
        assert told.returncode == 1, told.stderr
        assert "`asyncsat init` upgrades it" in told.stderr, told.stderr
        assert told.stderr.count("\n") == 1
    init = await asyncio.to_thread(cli, "init", dsn=dsn, home=home)
    assert init.returncode == 0, init.stderr
    status = await asyncio.to_thread(cli, "status", dsn=dsn, home=home)
    assert status.returncode == 0, status.stderr
