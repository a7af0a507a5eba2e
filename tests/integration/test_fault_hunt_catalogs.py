"""Fault hunt of the catalog side: hostile or broken provider answers, as real ones send them.

A scripted server (`Hostile`) answers each path with what a test sets; the daemon runs
in-process against it. Each test names the fault and pins the behaviour that handles it.
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from asyncsat.catalogs.base import Query
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from tests.helpers import FAST, drain, rows, sql
from tests.helpers import request_summary_of as summary
from tests.helpers import search_request as search

Handler = Callable[[web.Request], Any]


def zipped(size: int = 2000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.SAFE/band.bin", b"x" * size)
    return buf.getvalue()


class Hostile:
    """Answers every request with the handler set for its path (404 otherwise)."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[tuple[str, str]] = []  # (method, path_qs)
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.port = 0

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs))
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404)
        result = handler(request)
        if asyncio.iscoroutine(result):
            result = await result
        if isinstance(result, web.StreamResponse):
            return result
        return web.json_response(result)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> Hostile:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    server = await Hostile().start()
    yield server
    await server.stop()


async def provider(dsn: str, name: str, protocol: str, url: str, **settings: object) -> int:
    conn = await connect(dsn)
    try:
        return (await queries.provider_add(conn, name, protocol, url,
                                           {**FAST, **settings})).id
    finally:
        await conn.close()


def odata_item(n: int, **kw: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "Id": f"00000000-0000-0000-0000-{n:012d}", "Name": f"S2A_{n}.SAFE",
        "ContentLength": None, "Online": True,
        "PublicationDate": "2024-03-01T10:00:00.000Z",
        "ContentDate": {"Start": f"2024-03-01T{n % 24:02d}:00:00.000Z"}}
    item.update(kw)
    return item



def searches(server: Hostile, path: str) -> int:
    return sum(1 for _, target in server.seen if target.split("?")[0] == path)


async def test_an_odata_next_link_back_to_the_same_page_fails_the_search_instead_of_looping(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    again = f"{hostile.url}odata/v1/Products?$skip=2&$top=2"
    hostile.routes["/odata/v1/Products"] = lambda r: {
        "value": [odata_item(1), odata_item(2)], "@odata.nextLink": again}
    pid = await provider(dsn, "cdse", "odata", f"{hostile.url}odata/v1/")
    rid = await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings, timeout=20)  # it paged the same page for ever
    state = await summary(dsn, rid)
    assert state["status"] == "failed"
    assert "the search would never end" in state["error"]
    assert searches(hostile, "/odata/v1/Products") == 2


def stac_item(server: Hostile, item_id: str) -> dict[str, Any]:
    return {"type": "Feature", "id": item_id, "collection": "c",
            "properties": {"datetime": "2024-03-01T00:00:00Z"},
            "assets": {"data": {"href": f"{server.url}files/{item_id}.zip", "roles": ["data"]}}}


async def test_a_stac_next_link_back_to_the_same_page_fails_the_search_instead_of_looping(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    hostile.routes["/"] = lambda r: {"conformsTo": []}
    hostile.routes["/search"] = lambda r: {
        "type": "FeatureCollection", "features": [stac_item(hostile, "a")],
        "links": [{"rel": "next", "href": f"{hostile.url}search?token=abc"}]}
    pid = await provider(dsn, "stac", "stac", hostile.url)
    rid = await search(dsn, pid, Query("c"))
    await drain(settings, timeout=20)  # it asked 100 000 pages, then failed
    state = await summary(dsn, rid)
    assert state["status"] == "failed"
    assert "next link leads back to a page already read" in state["error"]
    assert searches(hostile, "/search") == 2



def stac_catalog(server: Hostile, *items: dict[str, Any]) -> None:
    """One page of `items`; every asset href serves a small zip."""
    server.routes["/"] = lambda r: {"conformsTo": []}
    server.routes["/search"] = lambda r: {
        "type": "FeatureCollection", "features": list(items), "links": []}
    for item in items:
        path = "/files/" + str(item["id"]).replace("\0", "") + ".zip"
        server.routes[path] = lambda r: web.Response(body=zipped())


async def test_a_size_out_of_range_from_the_catalog_is_ignored_not_fatal_to_the_search(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    huge, fine = stac_item(hostile, "huge"), stac_item(hostile, "fine")
    huge["assets"]["data"]["file:size"] = 2 ** 70  # no bigint holds it
    stac_catalog(hostile, huge, fine)
    pid = await provider(dsn, "stac", "stac", hostile.url)
    rid = await search(dsn, pid, Query("c"))
    await drain(settings, timeout=20)  # the request failed: 'value out of int64 range'
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 2, 2)


def dhus_hub(server: Hostile, entity: dict[str, Any]) -> None:
    """A hub with one product, `abc-1`, whose OData entity is `entity`."""
    server.routes["/dhus/search"] = lambda r: {"feed": {
        "opensearch:totalResults": "1",
        "entry": {"id": "abc-1", "title": "S1A_X",
                  "str": [{"name": "filename", "content": "S1A_X.SAFE"}]}}}
    server.routes["/dhus/odata/v1/Products('abc-1')"] = lambda r: {"d": entity}
    server.routes["/dhus/odata/v1/Products('abc-1')/$value"] = \
        lambda r: web.Response(body=zipped())


async def test_a_negative_dhus_content_length_is_ignored_not_fatal_to_the_search(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    dhus_hub(hostile, {"ContentLength": "-5"})
    pid = await provider(dsn, "dhus", "dhus", f"{hostile.url}dhus/")
    rid = await search(dsn, pid, Query("Sentinel-1"))
    await drain(settings, timeout=20)  # failed: violates check constraint download_size_check
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 1, 1)


async def test_a_malformed_catalog_checksum_is_left_out_before_the_product_is_fetched(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    dhus_hub(hostile, {"Checksum": {"Algorithm": "MD5", "Value": "ab" * 20}})  # 40 digits
    pid = await provider(dsn, "dhus", "dhus", f"{hostile.url}dhus/")
    rid = await search(dsn, pid, Query("Sentinel-1"))
    await drain(settings, timeout=20)  # fetched twice, then failed: 'bad at the source'
    state = await summary(dsn, rid)
    assert (state["status"], state["done"]) == ("done", 1)
    assert searches(hostile, "/dhus/odata/v1/Products('abc-1')/$value") == 1
    assert (await rows(dsn))[0]["checksum_algo"] is None


async def test_a_catalog_id_postgresql_cannot_store_skips_that_product_only(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    stac_catalog(hostile, stac_item(hostile, "a\0b"), stac_item(hostile, "fine"))
    pid = await provider(dsn, "stac", "stac", hostile.url)
    rid = await search(dsn, pid, Query("c"))
    await drain(settings, timeout=20)  # failed: invalid byte sequence for encoding "UTF8"
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 1, 1)


async def test_a_publication_date_in_the_future_does_not_move_the_watermark_past_now(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    future = stac_item(hostile, "future")
    future["properties"]["datetime"] = "9999-01-01T00:00:00Z"  # a catalogue's typo
    stac_catalog(hostile, future, stac_item(hostile, "fine"))
    pid = await provider(dsn, "stac", "stac", hostile.url)
    rid = await search(dsn, pid, Query("c"), follow=True)
    await drain(settings, timeout=20)
    state = await summary(dsn, rid)
    assert (state["status"], state["done"]) == ("following", 2)
    # the next runs would have searched from year 9999 on, for ever finding nothing
    (watermark,) = await sql(dsn, "SELECT watermark <= now() FROM request WHERE id = $1", rid)
    assert watermark[0] is True


async def test_a_watermark_an_earlier_release_left_in_the_future_comes_back_to_now(
        dsn: str) -> None:
    """Capping only what a run found left a request stuck at year 9999 by an earlier
    release there for ever."""
    conn = await connect(dsn)
    try:
        rid = await conn.fetchval(
            "INSERT INTO request (search, status, watermark)"
            " VALUES ('{\"collection\": \"c\"}', 'following', '9999-01-01') RETURNING id")
        await queries.request_follow_next(
            conn, rid, watermark=await conn.fetchval("SELECT now() - interval '1 hour'"),
            interval=900)
        assert await conn.fetchval(
            "SELECT watermark <= now() FROM request WHERE id = $1", rid) is True
        other = await conn.fetchval(
            "INSERT INTO request (search, status) VALUES ('{\"collection\": \"c\"}',"
            " 'following') RETURNING id")
        await queries.request_follow_next(conn, other, watermark=None, interval=900)
        assert await conn.fetchval(  # (nothing found yet: no watermark yet)
            "SELECT watermark FROM request WHERE id = $1", other) is None
    finally:
        await conn.close()


async def test_a_page_pushed_back_by_a_product_published_meanwhile_is_no_endless_search(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    """Offset paging on a catalogue that grows: one product published between two pages
    with an earlier sensing time pushes the next page back, so that it repeats the page
    before. Its repeats are dropped and the search goes on; it failed as a server that
    ignores `$skip`."""
    store = [odata_item(5), odata_item(6), odata_item(7)]

    def products(request: web.Request) -> dict[str, Any]:
        skip = int(request.query.get("$skip", "0"))
        page = {"value": store[skip:skip + 1]}
        if skip == 0 and len(store) == 3:
            store.insert(0, odata_item(1))  # (published meanwhile, sensed earlier)
        return page

    hostile.routes["/odata/v1/Products"] = products
    pid = await provider(dsn, "cdse", "odata", f"{hostile.url}odata/v1/", page_size=1)
    rid = await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings, timeout=20)
    state = await summary(dsn, rid)  # (its products are not served: they fail, later)
    assert state["products"] == 3 and "never end" not in str(state), state


async def test_a_stac_item_with_wrong_typed_roles_is_skipped_not_fatal_to_the_search(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    odd = stac_item(hostile, "odd")
    odd["assets"]["data"]["roles"] = 5
    odd["assets"]["meta"] = {"href": "odd.xml", "roles": None}
    stac_catalog(hostile, odd, stac_item(hostile, "fine"))
    pid = await provider(dsn, "stac", "stac", hostile.url)
    rid = await search(dsn, pid, Query("c"))
    await drain(settings, timeout=20)  # failed: "argument of type 'int' is not iterable"
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 1, 1)


async def test_an_m2m_scene_with_a_wrong_typed_temporal_coverage_is_still_queued(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    hostile.routes["/m2m/scene-search"] = lambda r: {"errorCode": None, "data": {
        "totalHits": 2, "results": [{"entityId": "E1", "temporalCoverage": "2024"},
                                    {"entityId": "E2", "temporalCoverage": {"startDate": 5}}]}}
    pid = await provider(dsn, "usgs", "m2m", f"{hostile.url}m2m/")
    rid = await search(dsn, pid, Query("landsat_ot_c2_l2"))
    await drain(settings, timeout=20)  # failed: "'str' object has no attribute 'get'"
    state = await summary(dsn, rid)
    assert state["products"] == 2  # (they fail later: this server offers no download)



async def test_a_dhus_product_whose_entity_is_gone_does_not_fail_the_search(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    dhus_hub(hostile, {})
    hostile.routes.pop("/dhus/odata/v1/Products('abc-1')")  # evicted since it was listed: 404
    pid = await provider(dsn, "dhus", "dhus", f"{hostile.url}dhus/")
    rid = await search(dsn, pid, Query("Sentinel-1"))
    await drain(settings, timeout=20)  # the request failed: 'HTTP 404 Not Found'
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 1, 1)


async def test_a_hub_that_ignores_start_and_gives_no_total_fails_the_search_not_loops(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    entries = [{"id": f"abc-{n}", "title": f"S1A_{n}"} for n in range(2)]
    hostile.routes["/dhus/search"] = lambda r: {"feed": {"entry": entries}}
    pid = await provider(dsn, "dhus", "dhus", f"{hostile.url}dhus/", page_size=2)
    rid = await search(dsn, pid, Query("Sentinel-1"))
    await drain(settings, timeout=20)  # it paged for ever
    state = await summary(dsn, rid)
    assert state["status"] == "failed"
    assert "with the products of the pages before" in state["error"]
    assert searches(hostile, "/dhus/search") == 3


async def test_an_m2m_search_that_ignores_starting_number_fails_instead_of_looping(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    hostile.routes["/m2m/scene-search"] = lambda r: {"errorCode": None, "data": {
        "results": [{"entityId": "E1"}, {"entityId": "E2"}]}}  # and no totalHits
    pid = await provider(dsn, "usgs", "m2m", f"{hostile.url}m2m/")
    rid = await search(dsn, pid, Query("landsat_ot_c2_l2"))
    await drain(settings, timeout=20)  # it paged for ever
    state = await summary(dsn, rid)
    assert state["status"] == "failed"
    assert "the scenes of the pages before" in state["error"]
    assert searches(hostile, "/m2m/scene-search") == 3


async def test_an_odata_id_with_dot_segments_cannot_send_the_token_to_another_path(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    item = odata_item(1, Id="../../../admin/export?all=1#")
    hostile.routes["/odata/v1/Products"] = lambda r: {
        "value": [] if "$skip" in r.query else [item]}
    hostile.routes["/admin/export"] = lambda r: web.Response(body=zipped())
    pid = await provider(dsn, "cdse", "odata", f"{hostile.url}odata/v1/")
    await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings, timeout=20)
    # the product was asked for at `Products(../../../admin/export?all=1`, which a server
    # (or the client) resolves to /admin/export, with the account's token
    assert not [target for _, target in hostile.seen if "/admin/export" in target]
    (row,) = await rows(dsn)
    assert row["url"].startswith(f"{hostile.url}odata/v1/Products(")


async def test_an_odata_server_that_ignores_skip_fails_the_search_at_once(
        hostile: Hostile, dsn: str, settings: Settings) -> None:
    hostile.routes["/odata/v1/Products"] = lambda r: {"value": [odata_item(1)]}  # no next link
    pid = await provider(dsn, "cdse", "odata", f"{hostile.url}odata/v1/")
    rid = await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings, timeout=60)
    # it asked $skip=1, 2, ... 10 000, then failed: 'more than 10100 products share one
    # sensing start time'
    state = await summary(dsn, rid)
    assert state["status"] == "failed"
    assert "$skip=2 with the products of the pages before" in state["error"]
    assert searches(hostile, "/odata/v1/Products") == 3
