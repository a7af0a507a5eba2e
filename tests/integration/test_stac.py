"""STAC searches end to end: the daemon in-process against a real stac-fastapi-pgstac, with
the assets served by the loopback file server."""

from __future__ import annotations

import asyncio
import io
import os
import zipfile
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from asyncsat import daemon
from asyncsat.catalogs.base import Filter, Query
from asyncsat.catalogs.stac import multihash, search_body, wkt_geometry
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.errors import UsageError
from asyncsat.logs import Redactor
from tests.helpers import FAST, drain, rows
from tests.helpers import request_summary_of as summary
from tests.helpers import search_request as search
from tests.servers import FileServer
from tests.stac_server import (
    StacServer,
    data_asset,
    multihash_sha256,
    stac_item,
    stac_server,  # noqa: F401
)


@pytest.fixture
def stac(stac_server: StacServer) -> StacServer:  # noqa: F811
    return stac_server


def product(size: int = 20_000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data.bin", os.urandom(size))
    return buf.getvalue()


async def stac_provider(dsn: str, url: str, *, name: str = "stac",
                        credentials: list[tuple[str, str, int]] | None = None,
                        **settings: object) -> int:
    conn = await connect(dsn)
    try:
        p = await queries.provider_add(conn, name, "stac", url, {**FAST, **settings})
        for user, secret, n in credentials or []:
            await queries.credential_upsert(conn, p.id, user, secret, n)
        return p.id
    finally:
        await conn.close()




def item(server: FileServer, item_id: str, *, when: str = "2024-03-01T10:00:00Z",
         bbox: tuple[float, float, float, float] = (8.0, 43.0, 9.0, 44.0),
         cloud: float = 10.0, extra: dict[str, Any] | None = None,
         checksum: str | None = None) -> dict[str, Any]:
    data = product()
    server.add(f"{item_id}.zip", data)
    assets = {"product": data_asset(server.url(f"{item_id}.zip"), data, checksum=checksum),
              "thumbnail": {"href": server.url(f"{item_id}.png"), "roles": ["thumbnail"],
                            "type": "image/png"},
              **(extra or {})}
    return stac_item(item_id, datetime=when, bbox=bbox,
                     properties={"eo:cloud_cover": cloud, "platform": "sentinel-2a"},
                     assets=assets)


async def test_criteria_reach_the_api_and_data_assets_are_fetched_and_verified(
        dsn: str, settings: Settings, stac: StacServer, server: FileServer) -> None:
    collection = await stac.new_collection()
    await stac.add_items(collection, [
        item(server, "S2_ok"),
        item(server, "S2_cloudy", cloud=80.0),
        item(server, "S2_far", bbox=(20.0, 60.0, 21.0, 61.0)),
        item(server, "S2_early", when="2024-01-01T10:00:00Z"),
    ])
    pid = await stac_provider(dsn, stac.url)
    rid = await search(dsn, pid, Query(
        collection, start=datetime(2024, 2, 1, tzinfo=UTC),
        end=datetime(2024, 4, 1, tzinfo=UTC), bbox=(8.2, 43.2, 8.8, 43.8),
        filters=(Filter("eo:cloud_cover", "<=", "20"),)))
    await drain(settings)
    [row] = await rows(dsn)
    assert (row["name"], row["status"]) == ("S2_ok.zip", "done")
    assert row["checksum_algo"] == "sha256"  # file:checksum, verified
    assert [r["path"] for r in server.requests] == ["/files/S2_ok.zip"]  # no thumbnail
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 1, 1)


async def test_pages_follow_post_next_links(
        dsn: str, settings: Settings, stac: StacServer, server: FileServer) -> None:
    collection = await stac.new_collection()
    await stac.add_items(collection, [
        item(server, f"S2_{n}", when=f"2024-03-0{n + 1}T10:00:00Z") for n in range(5)])
    pid = await stac_provider(dsn, stac.url, page_size=2)
    rid = await search(dsn, pid, Query(collection))
    await drain(settings)
    state = await summary(dsn, rid)
    assert state["products"] == 5 and state["done"] == 5
    assert len({r["name"] for r in await rows(dsn)}) == 5


async def test_the_assets_setting_chooses_the_assets_and_names_stay_apart(
        dsn: str, settings: Settings, stac: StacServer, server: FileServer) -> None:
    collection = await stac.new_collection()
    bands = {}
    for item_id in ("S2_a", "S2_b"):
        server.add(f"{item_id}/B04.tif", b"II*\x00" + os.urandom(3000))
        bands[item_id] = {"B04": {"href": server.url(f"{item_id}/B04.tif"),
                                  "type": "image/tiff", "roles": ["reflectance"]}}
    await stac.add_items(collection, [item(server, i, extra=bands[i]) for i in bands])
    pid = await stac_provider(dsn, stac.url, assets=["B04"])
    await search(dsn, pid, Query(collection))
    await drain(settings)
    names = sorted(r["name"] for r in await rows(dsn))
    assert names == ["S2_a_B04.tif", "S2_b_B04.tif"]  # one B04.tif per item, never clashing


async def test_a_wrong_file_checksum_is_never_done(
        dsn: str, settings: Settings, stac: StacServer, server: FileServer) -> None:
    collection = await stac.new_collection()
    await stac.add_items(collection, [item(server, "S2_bad", checksum="1220" + "ab" * 32)])
    pid = await stac_provider(dsn, stac.url)
    await search(dsn, pid, Query(collection))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "sha256 mismatch" in row["error"]
    assert not (settings.default_dest / "stac" / "S2_bad.zip").exists()


async def test_a_server_that_refuses_post_is_searched_with_get(
        dsn: str, settings: Settings, stac: StacServer, server: FileServer) -> None:
    collection = await stac.new_collection()
    await stac.add_items(collection, [
        item(server, f"S2_g{n}", when=f"2024-03-0{n + 1}T10:00:00Z") for n in range(3)])
    methods: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        """The real API, but POST /search answers 405 (as some deployments do)."""
        methods.append(f"{request.method} {request.path}")
        if request.method == "POST":
            return web.Response(status=405, text="Method Not Allowed")
        async with aiohttp.ClientSession() as session, session.get(
                stac.url + request.path_qs.lstrip("/")) as upstream:
            body = await upstream.read()
            text = body.decode().replace(stac.url, str(request.url.origin()) + "/")
            return web.Response(status=upstream.status, text=text,
                                content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        pid = await stac_provider(dsn, f"http://127.0.0.1:{port}/", page_size=2)
        rid = await search(dsn, pid, Query(collection, filters=(
            Filter("eo:cloud_cover", "<", "50"),)))
        await drain(settings)
    finally:
        await runner.cleanup()
    assert (await summary(dsn, rid))["done"] == 3
    assert "POST /search" in methods and methods.count("GET /search") == 2  # 2 pages


async def test_credentials_go_only_to_the_providers_own_hosts(
        dsn: str, settings: Settings, stac: StacServer) -> None:
    public = await FileServer().start()
    try:
        collection = await stac.new_collection()
        data = product()
        public.add("S2_pub.zip", data)
        href = f"http://localhost:{public.port}/files/S2_pub.zip"  # another host name
        await stac.add_items(collection, [stac_item(
            "S2_pub", assets={"product": data_asset(href, data)})])
        pid = await stac_provider(dsn, stac.url, credentials=[("ana", "pw-stac-77", 2)])
        await search(dsn, pid, Query(collection))
        await drain(settings)
    finally:
        await public.stop()
    [row] = await rows(dsn)
    assert row["status"] == "done"
    assert [r["user"] for r in public.requests] == [None]  # no Authorization sent there


async def test_follow_picks_up_items_added_later(
        dsn: str, settings: Settings, stac: StacServer, server: FileServer) -> None:
    collection = await stac.new_collection()
    now = datetime.now(UTC)
    await stac.add_items(collection, [item(server, "S2_first",
                                           when=(now - timedelta(hours=2)).isoformat())])
    pid = await stac_provider(dsn, stac.url, follow_interval=0.5)
    rid = await search(dsn, pid, Query(collection), follow=True)
    added: list[bool] = []

    async def second_arrived() -> bool:
        state = await summary(dsn, rid)
        if state["done"] == 1 and not added:
            added.append(True)
            await stac.add_items(collection, [item(server, "S2_second",
                                                   when=datetime.now(UTC).isoformat())])
        return state["done"] == 2

    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=second_arrived), 30)
    state = await summary(dsn, rid)
    assert state["status"] == "following" and state["products"] == 2
    assert sorted(r["path"] for r in server.requests) == ["/files/S2_first.zip",
                                                           "/files/S2_second.zip"]


def test_filters_use_the_query_extension_when_cql2_is_not_offered() -> None:
    query = Query("c", filters=(Filter("eo:cloud_cover", "<=", "20"),
                                Filter("platform", "=", "sentinel-2a")))
    cql2 = search_body(query, None, 10, {"https://api.stacspec.org/v1.0.0-rc.2/item-search"
                                         "#filter"})
    assert cql2["filter"]["op"] == "and" and "query" not in cql2
    legacy = search_body(query, None, 10, {"https://api.stacspec.org/v1.0.0/item-search#query"})
    assert legacy["query"] == {"eo:cloud_cover": {"lte": 20}, "platform": {"eq": "sentinel-2a"}}


def test_multihash_and_wkt() -> None:
    digest = multihash(multihash_sha256(b"x"))
    assert digest is not None and digest.algo == "sha256"
    assert multihash("d50110" + "00" * 16) is not None  # md5
    assert multihash("1220abcd") is None  # length does not match
    assert wkt_geometry("POLYGON((1 2, 3 2, 3 4, 1 2))")["type"] == "Polygon"
    with pytest.raises(UsageError):
        wkt_geometry("CIRCLE(1 2)")
