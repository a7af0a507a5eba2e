"""A file at a download's final name is taken for its own only when an earlier attempt got as
far as sealing it (it may have renamed it, then stopped before it was recorded done): the
row's `sealed_attempt`. Else it is someone else's, and is never touched."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.logs import Redactor
from asyncsat.transfer import files
from tests.helpers import drain, local_folder, named_row, rows, sql
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


def _users_file_after_the_first_requeue(monkeypatch: pytest.MonkeyPatch, users: Path,
                                        mine: bytes, then: Callable[[], None] | None = None,
                                        ) -> None:
    """Once the first attempt's row is back in the queue (`then` run first), a user's file
    (`mine`) appears at `users`: between the two attempts."""
    real = queries.download_requeue
    once: list[bool] = []

    async def requeued(*args: Any, **kw: Any) -> Any:
        done = await real(*args, **kw)
        if not once:
            once.append(True)
            if then is not None:
                then()
            users.write_bytes(mine)
        return done

    monkeypatch.setattr(queries, "download_requeue", requeued)


@pytest.mark.parametrize("size", [3000, 2_500_000], ids=["held", "streamed"])
async def test_a_users_file_that_appears_after_an_attempt_failed_early_is_kept(
        local_server: FileServer, dsn: str, settings: Settings, size: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A row named by a catalog that gave no size; its first attempt gets a 503 (nothing
    written, nothing sealed); a user's file then appears at its name. The second attempt
    must not take it for a file an earlier attempt renamed: the product takes the other
    name, and the user's file keeps its bytes. (Before, any attempt after the first took
    any regular file there for its own when no size was known, and emptied it.)"""
    data, mine = os.urandom(size), os.urandom(5000)
    local_server.add("a.nc", data, statuses=[(503, {"Retry-After": "0"}, b"busy")])
    local_folder(settings).mkdir(parents=True)
    users = local_folder(settings) / "a.nc"
    _users_file_after_the_first_requeue(monkeypatch, users, mine)
    download_id = await named_row(dsn, settings, local_server.url("a.nc"), "a.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert (row["status"], row["attempts"]) == ("done", 2), row
    assert row["name"] == f"a_{download_id}.nc"
    assert Path(row["path"]).read_bytes() == data
    assert users.read_bytes() == mine
    [marked] = await sql(dsn, "SELECT sealed_attempt FROM download")
    assert marked["sealed_attempt"] is None  # (done: no attempt is left to adopt a file)


@pytest.mark.parametrize("size", [3000, 2_500_000], ids=["held", "streamed"])
async def test_a_file_an_attempt_renamed_before_it_was_recorded_done_is_adopted(
        local_server: FileServer, dsn: str, settings: Settings, size: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt seals and renames its file, then its record fails (the database
    refuses it once): the row goes back to the queue, marked as sealed by attempt 1. The
    second attempt takes the file at the final name for its own, verifies it and fetches
    nothing: one file, at its name, fetched once."""
    data = os.urandom(size)
    local_server.add("b.nc", data)
    real = queries.downloads_done
    refused: list[int] = []

    async def refused_once(db: Any, done: Any) -> Any:
        if not refused:
            [marked] = await sql(db_dsn, "SELECT sealed_attempt FROM download")
            refused.append(marked["sealed_attempt"])
            raise RuntimeError("the database refused the record")
        return await real(db, done)

    db_dsn = dsn
    settings = dataclasses.replace(settings, lease_timeout=2.0)  # (put back sooner)
    monkeypatch.setattr(queries, "downloads_done", refused_once)
    await named_row(dsn, settings, local_server.url("b.nc"), "b.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert refused == [1]  # (the first attempt had sealed when its record failed)
    assert (row["status"], row["attempts"], row["name"]) == ("done", 2, "b.nc"), row
    assert Path(row["path"]).read_bytes() == data
    assert sorted(p.name for p in local_folder(settings).iterdir()) == ["b.nc"]
    # (the second attempt asked for what follows the whole file: nothing came twice)
    assert [r["range"] for r in local_server.requests] == [None, f"bytes={size}-"]


@pytest.mark.parametrize("size", [3000, 2_500_000], ids=["held", "streamed"])
async def test_a_users_file_after_an_attempt_that_sealed_but_renamed_nothing_is_kept(
        local_server: FileServer, dsn: str, settings: Settings, size: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt seals its file, then finds the wrong checksum: the `.part` goes,
    nothing was renamed, and the mark it set when it sealed goes with it. A user's file of
    the product's size then appears at the name: the next attempt leaves it alone (before,
    it took it for a file renamed before a crash, found the wrong checksum, and deleted
    it). (Found by a review.)"""
    data, wrong, mine = os.urandom(size), os.urandom(size), os.urandom(size)
    product = local_server.add("c.nc", wrong)
    local_folder(settings).mkdir(parents=True)
    users = local_folder(settings) / "c.nc"

    def then() -> None:
        assert not users.exists()  # (attempt 1 renamed nothing)
        product.data = data

    _users_file_after_the_first_requeue(monkeypatch, users, mine, then)
    download_id = await named_row(dsn, settings, local_server.url("c.nc"), "c.nc", size=size,
                                  checksum=("md5", hashlib.md5(data).hexdigest()))
    await drain(settings)
    [row] = await rows(dsn)
    assert (row["status"], row["attempts"]) == ("done", 2), row
    assert row["name"] == f"c_{download_id}.nc"
    assert Path(row["path"]).read_bytes() == data
    assert users.read_bytes() == mine



async def test_a_look_at_an_offline_product_stopped_before_its_rename_takes_its_mark_back(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A look at an offline product finds it online, seals its file (the mark set), and is
    stopped before the rename: the row goes back to `offline` with its attempt given back,
    and the mark must go with it, as it does for a stop of any other attempt (the next
    attempt has the same number: a user's file at the name would be taken for its own)."""
    local_server.add("o.nc", os.urandom(2_500_000))  # (streamed: sealed, then renamed)
    download_id = await named_row(dsn, settings, local_server.url("o.nc"), "o.nc")
    await sql(dsn, "UPDATE download SET status = 'offline', not_before = now() WHERE id = $1",
              download_id)
    at_rename = asyncio.Event()

    async def stalled(self: files.PartFile, *args: Any) -> Any:
        at_rename.set()
        await asyncio.Event().wait()  # (until the stop)

    monkeypatch.setattr(files.PartFile, "finish", stalled)

    async def stopping() -> bool:
        return at_rename.is_set()

    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=stopping), 30)
    [row] = await sql(dsn, "SELECT status, attempts, sealed_attempt, owner FROM download")
    assert (row["status"], row["attempts"], row["owner"]) == ("offline", 0, None), dict(row)
    assert row["sealed_attempt"] is None, dict(row)


# -- a daemon of the previous release (schema 6) on this release's schema ---------------------

_SCHEMA_6_SEALING = (  # (the previous release's download_sealing: no sealed_attempt)
    "SELECT o.lease_left > 0 AS owned, o.lease_left, o.named, n.* FROM (SELECT (SELECT"
    " extract(epoch FROM lease_expires - now())::float8 FROM download WHERE id = $1"
    " AND status = 'running' AND owner = $2 AND attempts = $3) AS lease_left,"
    " CASE WHEN $8::text[] IS NOT NULL THEN asyncsat_named($1, $2, $3, $8, $9, $10, $11)"
    " END AS named) o LEFT JOIN LATERAL asyncsat_hand_over($2, $4, $1, $5, $6,"
    " $7 AND coalesce(o.lease_left > 0, false), $12) WITH ORDINALITY n ON true"
    " ORDER BY n.ordinality")


@pytest.mark.parametrize("held", [True, False], ids=["held", "streamed"])
async def test_a_file_a_previous_release_daemon_renamed_before_its_crash_is_adopted(
        local_server: FileServer, dsn: str, settings: Settings, held: bool) -> None:
    """A fleet being upgraded: a daemon of the previous release (schema 6's statements; a
    daemon starts on a newer schema) seals its file with its own hand-over statement,
    renames it, and dies before it records it done. Its rows are taken over by a daemon of
    this release: the file at the final name is the row's own (the earlier attempt renamed
    it), as it was before schema 7; it must be verified and kept, not fetched again into
    `b_<id>.nc` next to it (two copies, the first one nobody's)."""
    data = os.urandom(3000)
    local_server.add("b.nc", data)
    download_id = await named_row(dsn, settings, local_server.url("b.nc"), "b.nc")
    conn = await connect(dsn)
    try:
        await queries.daemon_register(conn, "old", host="elsewhere", pid=1, version="0.5",
                                      lease_timeout=30)
        [provider] = [p for p in await queries.provider_list(conn) if p.name == "local"]
        [(row, _account, lease)] = await queries.claim(conn, "old", provider.id, 1, 30,
                                                       str(settings.dest))
        assert row.id == download_id
        sealed = await conn.fetch(
            _SCHEMA_6_SEALING, row.id, "old", row.attempts, lease, 30.0, str(settings.dest),
            True, ["b.nc", f"b_{row.id}.nc"] if held else None, len(data), None, None, 0)
        assert sealed[0]["owned"]
        local_folder(settings).mkdir(parents=True)
        (local_folder(settings) / "b.nc").write_bytes(data)  # (renamed; then it died)
        await queries.daemon_gone(conn, "old")  # (found dead: taken over at once)
    finally:
        await conn.close()
    await drain(settings)
    [done] = await sql(dsn, "SELECT status, name, path, attempts FROM download")
    assert done["status"] == "done"
    assert sorted(p.name for p in local_folder(settings).iterdir()) == ["b.nc"], \
        (dict(done), sorted(p.name for p in local_folder(settings).iterdir()))
    assert done["name"] == "b.nc"
