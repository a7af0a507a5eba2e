"""The rule for a product asked for again, as catalog searches and standing requests meet it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog

from asyncsat import intake
from asyncsat.catalogs.base import ProductRef
from asyncsat.config import Settings
from asyncsat.db import queries
from tests.conftest import cli
from tests.ftpserver import FtpServer
from tests.helpers import FAST, add_provider, drain, queue, rows, sql
from tests.servers import FileServer


async def _search(db: Any, provider_id: int, dest: Path, follow: bool = False) -> int:
    return await queries.request_insert(
        db, provider_id=provider_id, urls=None, search={"collection": "c"}, dest=str(dest),
        checksum=None, status="queued", follow=follow)


async def test_standing_requests_do_not_fetch_again_what_downstream_moved_away(
        db: Any, tmp_path: Path) -> None:
    provider = await queries.provider_add(db, "hub", "stac", "https://hub.example/", {})
    dest = tmp_path / "d"
    product = ProductRef(url="https://hub.example/a/S2A.zip", name="S2A.zip", size=3, id="p1")
    standing = await _search(db, provider.id, dest, follow=True)
    async with db.transaction():
        first = await intake.queue_products(db, standing, provider, [product], dest=str(dest))
    assert first.queued == first.ids
    [download_id] = first.ids
    final = dest / "hub" / "S2A.zip"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"zip")
    await db.execute("UPDATE download SET status = 'done', size = 3, path = $2 WHERE id = $1",
                     download_id, str(final))
    final.unlink()  # the application downstream took it

    # the standing request's next run finds it again: left alone
    async with db.transaction():
        later = await intake.queue_products(db, standing, provider, [product], dest=str(dest),
                                            revive=False)
    assert later.done == [(download_id, str(final))] and not later.refetched
    # another standing request's later run, same folder: not fetched again either
    other = await _search(db, provider.id, dest, follow=True)
    async with db.transaction():
        found = await intake.queue_products(db, other, provider, [product], dest=str(dest),
                                            revive=False)
    assert found.gone == [download_id]
    assert await queries.download_status(db, download_id) == "done"

    # a new search asks for it: fetched again
    fresh = await _search(db, provider.id, dest)
    async with db.transaction():
        asked = await intake.queue_products(db, fresh, provider, [product], dest=str(dest))
    assert asked.refetched == [(download_id, str(final))]
    [row] = await queries.status_rows(db)
    assert (row["status"], row["path"], row["bytes_done"]) == ("queued", None, 0)
    assert [e["status"] for e in await db.fetch(
        "SELECT status FROM download_event WHERE download_id = $1 ORDER BY id",
        download_id)] == ["queued", "done", "queued"]


async def test_a_glob_asked_again_fetches_only_the_files_that_are_gone(
        dsn: str, settings: Settings) -> None:
    with FtpServer(anonymous=True) as ftp:
        files = {f"sst/sst_2024030{d}.nc": b"CDF\x01" + os.urandom(10_000) for d in (1, 2, 3)}
        for name, data in files.items():
            ftp.add(name, data)
        await add_provider(dsn, "cmems", ftp.base, FAST, protocol="ftp")

        async def get_all() -> None:
            result = cli("get", ftp.base + "sst/*.nc", dsn=dsn, home=settings.home,
                         env={"ASYNCSAT_DEST": str(settings.dest)})
            assert result.returncode == 0, result.stderr
            await drain(settings)

        await get_all()
        assert sorted(ftp.sent_commands("RETR")) == sorted(files)
        paths = {r["name"]: Path(r["path"]) for r in await rows(dsn)}
        paths["sst_20240302.nc"].unlink()
        with structlog.testing.capture_logs() as logs:
            await get_all()
        [resolved] = [e for e in logs if e["event"] == "request resolved"]
        assert (resolved["done"], resolved["refetched"]) == (2, 1)
        [requeued] = [e for e in logs if e["event"] == "download queued"]
        assert (requeued["reason"], requeued["path"]) == \
            ("file gone", str(paths["sst_20240302.nc"]))
        assert ftp.sent_commands("RETR")[3:] == ["sst/sst_20240302.nc"]
        assert paths["sst_20240302.nc"].read_bytes() == files["sst/sst_20240302.nc"]
        assert {r["status"] for r in await rows(dsn)} == {"done"}
        [req] = await sql(dsn, "SELECT count(*) AS n FROM request_download WHERE request_id = 2")
        assert req["n"] == 3


async def test_a_psql_request_for_a_done_product_whose_file_is_gone(
        server: FileServer, dsn: str, settings: Settings) -> None:
    data = os.urandom(50_000)
    server.add("psql.nc", data)
    await queue(dsn, server.url("psql.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    Path(row["path"]).unlink()
    await queue(dsn, server.url("psql.nc"))
    await drain(settings)
    assert Path(row["path"]).read_bytes() == data
    assert sum(1 for r in server.requests if r["path"] == "/files/psql.nc") == 2
