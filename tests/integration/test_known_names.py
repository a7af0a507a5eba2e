"""A file whose download row already has its name (from a catalog, or an earlier attempt):
the server's size and validators are recorded with the next write the transfer makes (the
hand-over when its body is in, or its first progress write), not in a round trip of
their own; a file whose name is not the row's yet is named before its first byte."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from email.utils import formatdate
from typing import Any

import pytest

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.logs import Redactor
from tests.helpers import add_provider, queue, rows, sql
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names `download_named` was sent, each time it runs."""
    sent: list[str] = []
    real = queries.download_named

    async def counted(db: Any, download_id: int, fence: Any, **kw: Any) -> Any:
        sent.append(kw["name"])
        return await real(db, download_id, fence, **kw)

    monkeypatch.setattr(queries, "download_named", counted)
    return sent


async def test_a_named_file_is_recorded_by_its_hand_over_not_a_round_trip_of_its_own(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await FileServer().start()
    try:
        await add_provider(dsn, "hub", server.base, {"max_connections": 2})
        data = {f"p{i}.zip": os.urandom(50_000 + i) for i in range(4)}
        for name, body in data.items():
            server.add(name, body)
        # rows as a catalog queues them: the product's name is known, the size is not
        for name in data:
            await sql(dsn, "INSERT INTO download (provider_id, url, name, dest) SELECT id, $1,"
                           " $2, $3 FROM provider", server.url(name), name, str(settings.dest))
        sent = _counting(monkeypatch)
        quiet = replace(settings, progress_interval=30.0)  # no progress write: files end first
        await asyncio.wait_for(daemon.serve(quiet, Redactor(), exit_when_idle=True), 30)
    finally:
        await server.stop()
    assert sent == []  # no statement of its own
    got = {r["name"]: r for r in await sql(
        dsn, "SELECT name, status, size, size_origin, etag, last_modified FROM download")}
    for name, body in data.items():
        row = got[name]
        assert (row["status"], row["size"], row["size_origin"]) == \
            ("done", len(body), "server")
        assert row["etag"] == server.products[name].etag
        assert row["last_modified"] == formatdate(server.products[name].last_modified,
                                                  usegmt=True)
        path = settings.dest / "hub" / name
        assert hashlib.md5(path.read_bytes()).hexdigest() == hashlib.md5(body).hexdigest()


async def test_a_long_named_transfer_has_its_validators_recorded_before_it_ends(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a resume after a crash needs (the ETag for If-Range) is in the row from the
    first progress write on, not only once the file has ended."""
    server = await FileServer().start()
    try:
        await add_provider(dsn, "hub", server.base, {"max_connections": 1})
        body = os.urandom(300_000)
        server.add("slow.zip", body, rate=100_000)  # 3 s
        await sql(dsn, "INSERT INTO download (provider_id, url, name, dest) SELECT id, $1,"
                       " 'slow.zip', $2 FROM provider", server.url("slow.zip"),
                  str(settings.dest))
        sent = _counting(monkeypatch)
        seen: list[Any] = []

        async def watch() -> bool:
            got = await sql(dsn, "SELECT status, bytes_done, etag, size FROM download")
            if got[0]["status"] == "running" and got[0]["bytes_done"] > 0 and not seen:
                seen.append(got[0])
            return got[0]["status"] == "done"

        await asyncio.wait_for(daemon.serve(replace(settings, progress_interval=0.3),
                                            Redactor(), until=watch), 30)
    finally:
        await server.stop()
    assert seen, "no progress write was seen while the file was running"
    assert seen[0]["etag"] == server.products["slow.zip"].etag
    assert seen[0]["size"] == len(body)
    assert sent == ["slow.zip"]  # once, with the first progress write
    assert [r["status"] for r in await rows(dsn)] == ["done"]


async def test_a_file_named_by_its_server_is_named_before_its_first_byte(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `get` of a URL: the name comes from the server (or the URL), and another
    download may have it: it is recorded, and checked, before the `.part` is written."""
    server = await FileServer().start()
    try:
        await add_provider(dsn, "hub", server.base, {"max_connections": 1})
        server.add("x.bin", os.urandom(10_000), content_disposition='attachment; filename="a.bin"')
        await queue(dsn, server.url("x.bin"), provider="hub")
        sent = _counting(monkeypatch)
        await asyncio.wait_for(daemon.serve(replace(settings, progress_interval=30.0),
                                            Redactor(), exit_when_idle=True), 30)
    finally:
        await server.stop()
    assert sent == ["a.bin"]
    assert [(r["name"], r["status"]) for r in await rows(dsn)] == [("a.bin", "done")]
