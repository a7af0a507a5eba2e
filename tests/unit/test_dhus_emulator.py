"""Tests of the DHuS emulator itself (tests/dhus.py): its query parser, paging, the single-entry
quirk, the OData entity, the LTA codes, quotas, flows and auth, so that a bug in the emulator
cannot make the adapter tests lie. Expected shapes are those of the recorded apihub answers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from tests.dhus import DhusEmulator, DhusProduct, SolrError, human_size, select, solr_date

T0 = datetime(2024, 3, 1, 10, 20, 21, 24000, tzinfo=UTC)
NOW = datetime(2024, 3, 10, 12, 0, 0, tzinfo=UTC)
ALICE, BOB = (aiohttp.encode_basic_auth(u, pw) for u, pw in (("alice", "pw"), ("bob", "pw2")))
JSON = {"$format": "json"}


def s2(i: int = 0, **kw: Any) -> DhusProduct:
    kw.setdefault("begin", T0 + timedelta(days=i))
    kw.setdefault("data", bytes([i % 256]) * (1000 + i))
    name = kw.pop("name", f"S2A_MSIL1C_2024{3 + i // 28:02d}{i % 28 + 1:02d}T102021_N0510_R065_"
                          f"T32TQM_20240301T{i:06d}")
    return DhusProduct(name, **kw)


def found(products: list[DhusProduct], q: str, orderby: str | None = "") -> list[int]:
    """Indexes of what a query finds (index order unless asked)."""
    return [products.index(p) for p in select(products, q, orderby, now=NOW)]


# ---------------------------------------------------------------- the query language

def catalogue() -> list[DhusProduct]:
    return [s2(0, cloud=5.0), s2(1, cloud=15.5, producttype="S2MSI2A"),
            s2(2, platform="Sentinel-1", producttype="GRD", footprint=[
                (20.0, 40.0), (21.0, 40.0), (21.0, 41.0), (20.0, 41.0)],
               attributes={"orbitdirection": "ASCENDING", "relativeorbitnumber": 117}),
            s2(3, cloud=60.0, name="S2B_MSIL1C_20240304T102021_N0510_R065_T32TQM_X.SAFE"),
            s2(9, cloud=0.0, ingested=T0 + timedelta(days=30))]


@pytest.mark.parametrize(("q", "want"), [
    ("*", [0, 1, 2, 3, 4]),
    ("*:*", [0, 1, 2, 3, 4]),
    ("platformname:Sentinel-2", [0, 1, 3, 4]),
    ("platformname:sentinel-2", [0, 1, 3, 4]),  # text field: words, lower-cased
    ('platformname:"Sentinel-1"', [2]),
    ("platformname:Sentinel", [0, 1, 2, 3, 4]),  # one word of "Sentinel-2"
    ("producttype:S2MSI1C", [0, 3, 4]),
    ("producttype:s2msi2a", [1]),
    ("filename:S2A*", [0, 1, 2, 4]),  # string field: the whole value, case-sensitive
    ("filename:s2a*", []),
    ("filename:*_X.SAFE", [3]),
    ("identifier:S2B_MSIL1C_20240304T102021_N0510_R065_T32TQM_X", [3]),
    ('identifier:"S2B_MSIL1C_20240304T102021_N0510_R065_T32TQM_X"', [3]),
    ("identifier:S2B_MSIL1C", []),
    ("S2B*", [3]),  # no field: the identifier's words (guess)
    ("cloudcoverpercentage:[0 TO 20]", [0, 1, 4]),  # products without the field never match
    ('cloudcoverpercentage:["0" TO "15.5"]', [0, 1, 4]),
    ("cloudcoverpercentage:{0 TO 15.5}", [0]),
    ("cloudcoverpercentage:[20 TO *]", [3]),
    ("cloudcoverpercentage:5", [0]),
    ("cloudcoverpercentage:*", [0, 1, 3, 4]),
    ("relativeorbitnumber:117", [2]),
    ("orbitdirection:ascending", [2]),
    ("beginposition:[2024-03-02T00:00:00.000Z TO 2024-03-04T00:00:00.000Z]", [1, 2]),
    ('beginPosition:["2024-03-02T00:00:00Z" TO "2024-03-04T00:00:00Z"]', [1, 2]),  # sentinelsat
    ("beginposition:[2024-03-02T10:20:21.024Z TO *]", [1, 2, 3, 4]),
    ("beginposition:{2024-03-02T10:20:21.024Z TO *]", [2, 3, 4]),
    ("beginposition:[* TO 2024-03-02T00:00:00Z+1DAY]", [0, 1]),
    ("beginposition:[NOW-9DAYS TO NOW]", [1, 2, 3, 4]),
    ("beginposition:[NOW-1DAY/DAY TO NOW]", [4]),
    ("ingestiondate:[NOW-1MONTH TO NOW]", [0, 1, 2, 3]),
    ("platformname:Sentinel-2 AND cloudcoverpercentage:[0 TO 20]", [0, 1, 4]),
    ("platformname:Sentinel-2 cloudcoverpercentage:[0 TO 20]", [0, 1, 4]),  # AND by default
    ("producttype:GRD OR cloudcoverpercentage:60", [2, 3]),
    ("producttype:GRD || producttype:S2MSI2A", [1, 2]),
    ("NOT platformname:Sentinel-2", [2]),
    ("-platformname:Sentinel-2", [2]),
    ("platformname:Sentinel-2 -cloudcoverpercentage:[0 TO 10]", [1, 3]),
    ("platformname:Sentinel-2 AND NOT (producttype:S2MSI2A OR cloudcoverpercentage:60)", [0, 4]),
    ("producttype:(GRD OR S2MSI2A)", [1, 2]),
    ("producttype:GRD OR producttype:S2MSI2A AND cloudcoverpercentage:15.5", [1, 2]),
    ("(producttype:GRD OR producttype:S2MSI2A) AND cloudcoverpercentage:15.5", [1]),
    ('uuid:"{}"', [1]),
])
def test_queries(q: str, want: list[int]) -> None:
    products = catalogue()
    assert found(products, q.replace("{}", products[1].uuid)) == want


@pytest.mark.parametrize(("area", "want"), [
    ("Intersects(POLYGON((11.5 45.5, 11.6 45.5, 11.6 45.6, 11.5 45.6, 11.5 45.5)))", [0, 1, 3, 4]),
    ("Intersects(GEOMETRYCOLLECTION(POLYGON((20.5 40.5,20.6 40.5,20.6 40.6,20.5 40.5))))",
     [2]),  # as sentinelsat writes it
    ("Intersects(MULTIPOLYGON(((0 0, 1 0, 1 1, 0 0)), ((20.5 40.5, 25 40.5, 25 45, 20.5 40.5))))",
     [2]),
    ("Intersects(POLYGON((10 44, 30 44, 30 47, 10 47, 10 44)))", [0, 1, 3, 4]),  # holds them
    ("Intersects(POLYGON((12.4 46, 13 46, 13 47, 12.4 46)))", [0, 1, 3, 4]),  # touches a corner
    ("Intersects(POLYGON((45.5 11.5, 45.6 11.5, 45.6 11.6, 45.5 11.6, 45.5 11.5)))",
     []),  # the same area written lat lon: Somalia
    ("Intersects(POINT (11.2 45.2))", [0, 1, 3, 4]),
    ("Intersects(45.2, 11.2)", [0, 1, 3, 4]),  # Spatial4j's legacy "lat, lon"
    ("Intersects(11.2 45.2)", [0, 1, 3, 4]),
    ("Intersects(POLYGON((11.5 45.5,11.6 45.5,11.6 45.6,11.5 45.5))) distErrPct=0", [0, 1, 3, 4]),
])
def test_footprint_intersects(area: str, want: list[int]) -> None:
    """Real polygon intersection in lon lat order, as DHuS' Spatial4j/JTS reads WKT."""
    assert found(catalogue(), f'footprint:"{area}"') == want


@pytest.mark.parametrize(("q", "message"), [
    ("xxx:yyy", "undefined field xxx"),  # test_invalid_query
    ("platformname:Sentinel-2 (", "org.apache.solr.search.SyntaxError: Cannot parse "
                                  "'platformname:Sentinel-2 (': Encountered \"<EOF>\""),
    ("õäöüÿ(", "org.apache.solr.search.SyntaxError: Cannot parse 'õäöüÿ(': "),  # recorded
    ("platformname:Sentinel-2 AND", "SyntaxError"),
    ("beginposition:[2024-03-01T00:00:00Z TO", "SyntaxError"),
    ("platformname:Sentinel-2)", "SyntaxError"),
    ("beginposition:[2024-13-01T00:00:00Z TO NOW]", "Invalid Date String:'2024-13-01T00:00:00Z'"),
    ("beginposition:[2024-03-01 TO NOW]", "Invalid Date String:'2024-03-01'"),
    ("beginposition:[NOW-1FORTNIGHT TO NOW]", "Invalid Date Math String:'NOW-1FORTNIGHT'"),
    ("cloudcoverpercentage:[a TO 20]", "Invalid Number: a"),
    ('footprint:"Intersects(POLYGON((45 11, 46 11, 46 95, 45 11)))"', "Couldn't parse shape "
     "'POLYGON((45 11, 46 11, 46 95, 45 11))' because: "),  # a latitude of 95
    ('footprint:"Intersects(POLYGON((0 0, 1 0, 1 1, 0 1)))"', "Couldn't parse shape"),  # open
    ('footprint:"Intersects(CIRCLE(1 1))"', "Couldn't parse shape"),
    ('footprint:"IsWithin(POLYGON((0 0, 1 0, 1 1, 0 0)))"', "emulator: only Intersects"),
])
def test_refused_queries(q: str, message: str) -> None:
    with pytest.raises(SolrError) as e:
        select(catalogue(), q)
    assert message in str(e.value)


def test_order() -> None:
    products = catalogue()
    assert found(products, "*", None) == [4, 3, 2, 1, 0]  # ingestiondate desc by default
    assert found(products, "*", "") == [0, 1, 2, 3, 4]  # empty: index order (relevance)
    assert found(products, "*", "beginposition asc") == [0, 1, 2, 3, 4]
    assert found(products, "*", "beginposition desc") == [4, 3, 2, 1, 0]
    assert found(products, "*", "cloudcoverpercentage asc,beginposition desc") == [4, 0, 1, 3, 2]
    assert found(products, "*", "cloudcoverpercentage desc") == [3, 1, 0, 4, 2]  # missing last
    for bad in ("beginposition", "beginposition up", "nosuchfield asc", "footprint asc"):
        with pytest.raises(SolrError):
            select(products, "*", bad)


def test_date_math() -> None:
    assert solr_date("NOW", NOW) == NOW
    assert solr_date("NOW-1DAY", NOW) == NOW - timedelta(days=1)
    assert solr_date("NOW/DAY", NOW) == datetime(2024, 3, 10, tzinfo=UTC)
    assert solr_date("NOW-1YEARS/MONTH", NOW) == datetime(2023, 3, 1, tzinfo=UTC)
    assert solr_date("2024-01-31T10:00:00Z+1MONTH", NOW) == datetime(2024, 2, 29, 10, tzinfo=UTC)
    assert solr_date("2024-03-01T00:00:00.5Z-2HOURS+30MINUTES", NOW) == datetime(
        2024, 2, 29, 22, 30, 0, 500000, tzinfo=UTC)


def test_product_defaults() -> None:
    p = s2(0, name="S2A_X.SAFE")
    assert (p.title, p.filename, p.md5) == ("S2A_X", "S2A_X.SAFE", hashlib.md5(p.data).hexdigest())
    p = DhusProduct("S5P_OFFL_L2__NO2____X", b"x", platform="Sentinel-5 Precursor", begin=T0,
                    footprint=[(0, 0), (1, 0), (1, 1)])
    assert p.filename == "S5P_OFFL_L2__NO2____X.nc" and p.footprint[-1] == (0.0, 0.0)
    assert p.ingested == T0 + timedelta(hours=3)
    assert [human_size(n) for n in (10, 10_906, 115_807_437, 1_170_378_588)] == [
        "10 bytes", "10.65 KB", "110.44 MB", "1.09 GB"]


# ---------------------------------------------------------------- HTTP

@contextlib.asynccontextmanager
async def running(*products: DhusProduct, **kw: Any) -> AsyncIterator[DhusEmulator]:
    emu = DhusEmulator(users={"alice": "pw", "bob": "pw2"}, **kw)
    for p in products:
        emu.add(p)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


async def get(url: str, auth: str | None = ALICE, headers: dict[str, str] | None = None,
              params: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """A GET with basic auth (`auth`: an Authorization header value)."""
    headers = {**({"Authorization": auth} if auth else {}), **(headers or {})}
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.get(url, params=params or {}) as r:
        return r.status, r.headers, await r.read()


async def search(emu: DhusEmulator, q: str, **params: str) -> dict[str, Any]:
    status, _, body = await get(emu.url + "search", params={"q": q, "format": "json", **params})
    assert status == 200, body
    feed: dict[str, Any] = json.loads(body)["feed"]
    return feed


async def test_auth_everywhere() -> None:
    p = s2(0)
    async with running(p) as emu:
        urls = [emu.url + "search?q=*&format=json", f"{emu.url}odata/v1/Products('{p.uuid}')",
                f"{emu.url}odata/v1/Products('{p.uuid}')/$value", emu.url + "nowhere"]
        for url in urls:
            for auth in (None, aiohttp.encode_basic_auth("alice", "wrong"),
                         aiohttp.encode_basic_auth("eve"), "Basic %%%", "Bearer x"):
                status, headers, body = await get(url, auth)
                assert status == 401 and b"HTTP Status 401" in body, url
                realm = "OData service" if "odata" in url else \
                    "Sentinels Scientific Data Hub Search"
                assert headers["WWW-Authenticate"] == f'Basic realm="{realm}"'
        assert {(r["user"], r["status"]) for r in emu.requests} == {(None, 401)}
        assert (await get(urls[0]))[0] == 200 and (await get(urls[3]))[0] == 404
        assert emu.requests[-2]["user"] == "alice" and emu.requests[-1]["status"] == 404


async def test_paging_links_and_counts() -> None:
    products = [s2(i) for i in range(250)]
    async with running(*products) as emu:
        ids, q = [], "platformname:Sentinel-2"
        for start in (0, 100, 200):
            page = await search(emu, q, rows="100", start=str(start),
                                orderby="beginposition asc")
            assert (page["opensearch:totalResults"], page["opensearch:startIndex"],
                    page["opensearch:itemsPerPage"]) == ("250", str(start), "100")
            ids += [e["id"] for e in page["entry"]]
            rels = {link["rel"]: link["href"].split("&", 1)[-1] for link in page["link"]}
            assert rels["last"] == "start=249&rows=100&format=json"
            assert rels.get("next") == (f"start={start + 100}&rows=100&format=json"
                                        if start < 200 else None)
            assert ("previous" in rels) == (start > 100)
            assert page["link"][0]["href"] == (f"{emu.url}search?q={q}&start={start}&rows=100"
                                               "&format=json")  # no orderby in links
        assert ids == [p.uuid for p in products]
        assert page["subtitle"].startswith("Displaying 200 to 249 of 250 total results. Request")
        first = await search(emu, q, rows="100")
        assert first["subtitle"].startswith("Displaying 0 to 99 of 250 total results.")
        assert [e["id"] for e in first["entry"]][:2] == [products[-1].uuid, products[-2].uuid]
        count = await search(emu, q, rows="0")  # test_count: a count without entries
        assert "entry" not in count and count["opensearch:totalResults"] == "250"
        assert {lk["rel"]: lk["href"] for lk in count["link"]}["next"].endswith(
            "start=NaN&rows=0&format=json")
        beyond = await search(emu, q, rows="10", start="300")
        assert "entry" not in beyond and beyond["opensearch:startIndex"] == "300"
        default = await search(emu, q, rows="many")  # ignored: Solr's 10
        assert default["opensearch:itemsPerPage"] == "10" and len(default["entry"]) == 10


async def test_single_entry_quirk_and_entry_fields() -> None:
    p = s2(0, cloud=12.5, footprint=[(11.0, 45.0), (12.0, 45.0), (12.0, 46.0)])
    q = s2(1, attributes={"relativeorbitnumber": 65, "orbitnumber": 35624,
                          "orbitdirection": "DESCENDING"})
    async with running(p, q) as emu:
        one = await search(emu, "cloudcoverpercentage:[0 TO 20]", rows="100")
        assert one["subtitle"].startswith("Displaying 1 results.")
        e = one["entry"]  # one result: an object, not a list
        assert isinstance(e, dict) and e["title"] == p.title and e["id"] == p.uuid
        assert e["double"] == {"name": "cloudcoverpercentage", "content": "12.5"}  # object too
        assert "int" not in e and isinstance(e["date"], list)
        assert e["link"] == [
            {"href": f"{emu.url}odata/v1/Products('{p.uuid}')/$value"},
            {"rel": "alternative", "href": f"{emu.url}odata/v1/Products('{p.uuid}')/"},
            {"rel": "icon", "href": f"{emu.url}odata/v1/Products('{p.uuid}')/Products("
                                   "'Quicklook')/$value"}]
        strs = {s["name"]: s["content"] for s in e["str"]}
        assert strs["footprint"] == "MULTIPOLYGON (((11.0 45.0, 12.0 45.0, 12.0 46.0, 11.0 45.0)))"
        assert "<gml:coordinates>45.0,11.0 45.0,12.0 46.0,12.0 45.0,11.0</gml:coordinates>" in \
            strs["gmlfootprint"]
        assert (strs["platformname"], strs["producttype"], strs["filename"], strs["format"],
                strs["uuid"], strs["identifier"], strs["size"]) == (
            "Sentinel-2", "S2MSI1C", p.title + ".SAFE", "SAFE", p.uuid, p.title, "1000 bytes")
        assert {d["name"]: d["content"] for d in e["date"]} == {
            "beginposition": "2024-03-01T10:20:21.024Z", "endposition": "2024-03-01T10:20:21.024Z",
            "ingestiondate": "2024-03-01T13:20:21.024Z"}
        assert e["summary"] == ("Date: 2024-03-01T10:20:21.024Z, Instrument: MSI, Satellite: "
                                "Sentinel-2, Size: 1000 bytes")
        other = (await search(emu, "orbitdirection:DESCENDING"))["entry"]
        assert "double" not in other and len(other["int"]) == 2
        assert {"name": "orbitdirection", "content": "DESCENDING"} in other["str"]
        two = await search(emu, "*")
        assert isinstance(two["entry"], list) and len(two["entry"]) == 2
        none = await search(emu, "producttype:GRD")
        assert "entry" not in none and none["subtitle"].startswith("Displaying 0 results.")


async def test_search_errors() -> None:
    async with running(s2(0), max_rows=100) as emu:
        status, headers, body = await get(emu.url + "search",
                                          params={"q": "xxx:yyy", "format": "json"})
        assert status == 200 and json.loads(body) == {"feed": {
            "xmlns:opensearch": "http://a9.com/-/spec/opensearch/1.1/",
            "xmlns": "http://www.w3.org/2005/Atom",
            "error": {"code": "400", "message": "undefined field xxx"}}}
        status, headers, body = await get(emu.url + "search",
                                          params={"q": "*", "rows": "101", "format": "json"})
        assert status == 400 and headers["Content-Type"].startswith("text/html")
        assert b"Parameter `rows` exceeds the maximum value (100) in search request" in body
        status, _, body = await get(emu.url + "search", params={"format": "json"})
        assert status == 400 and b"Required String parameter 'q' is not present" in body
        error = (await search(emu, "*", rows="-1"))["error"]
        assert error == {"code": "400", "message": "'rows' parameter cannot be negative"}
        assert (await get(emu.url + "search", params={"q": "*"}))[0] == 400  # Atom: not emulated
    async with running(s2(0), root="apihub") as emu:
        assert emu.url.endswith("/apihub/") and (await search(emu, "*"))["entry"]
        assert (await get(emu.url.replace("apihub", "dhus") + "search",
                          params={"q": "*"}))[0] == 404


async def test_odata_product() -> None:
    p = s2(0, cloud=1.0, md5="D5E4DF5C38C6E97BF7E7BD540AB21C05")  # some hubs: upper case
    async with running(p) as emu:
        status, _, body = await get(f"{emu.url}odata/v1/Products('{p.uuid}')",
                                    params=JSON)
        d = json.loads(body)["d"]
        uri = f"{emu.url}odata/v1/Products('{p.uuid}')"
        assert status == 200 and d["__metadata"]["media_src"] == uri + "/$value"
        assert (d["Id"], d["Name"], d["ContentLength"], d["Online"]) == (
            p.uuid, p.title, "1000", True)
        assert d["Checksum"] == {"__metadata": {"type": "DHuS.Checksum"}, "Algorithm": "MD5",
                                 "Value": "D5E4DF5C38C6E97BF7E7BD540AB21C05"}
        assert d["ContentDate"]["Start"] == "/Date(1709288421024)/"
        assert d["IngestionDate"] == "/Date(1709299221024)/"
        status, headers, body = await get(f"{emu.url}odata/v1/Products('nope')",
                                          params=JSON)
        assert status == 404 and json.loads(body) == {"error": {
            "code": None, "message": {"lang": "en", "value": "Invalid key (nope) to access "
                                                             "Products"}}}
        assert headers["cause-message"] == ("InvalidKeyException : Invalid key (nope) to access "
                                            "Products")
        status, headers, body = await get(f"{emu.url}odata/v1/Products('nope')/$value")
        assert status == 404 and body.startswith(b"<?xml") and b"Invalid key (nope)" in body
        assert (await get(uri + "/Online/$value"))[2] == b"true"
        p.online = False
        assert (await get(uri + "/Online/$value"))[2] == b"false"
    async with running(p, old_dhus=True) as emu:
        uri = f"{emu.url}odata/v1/Products('{p.uuid}')"
        _, _, body = await get(uri, params=JSON)
        assert "Online" not in json.loads(body)["d"]
        status, headers, body = await get(uri + "/Online/$value")
        assert status == 500 and headers["cause-message"] == (
            "UriNotMatchingException : Could not find property with name: 'Online'.")
        assert b"<message xml:lang=\"en\">Could not find property with name: 'Online'." in body


async def test_download_headers_and_ranges() -> None:
    p = s2(0, data=bytes(range(256)) * 40)
    async with running(p) as emu:
        url = f"{emu.url}odata/v1/Products('{p.uuid}')/$value"
        status, headers, body = await get(url)
        assert status == 200 and body == p.data
        assert headers["Content-Disposition"] == f'inline;filename="{p.title}.zip"'
        assert (headers["ETag"], headers["Content-Length"], headers["Content-Range"]) == (
            p.md5, "10240", "bytes 0-10239/10240")  # recorded: Content-Range on a 200
        status, headers, body = await get(url, headers={"Range": "bytes=0-1"})  # sentinelsat
        assert status == 206 and body == p.data[:2]
        status, headers, body = await get(url, headers={"Range": "bytes=10000-"})
        assert status == 206 and body == p.data[10000:]
        assert headers["Content-Range"] == "bytes 10000-10239/10240"
        status, headers, _ = await get(url, headers={"Range": "bytes=10240-"})
        assert status == 416 and headers["Content-Range"] == "bytes */10240"
        status, _, body = await get(url, headers={"Range": "bytes=5-", "If-Range": '"other"'})
        assert status == 200 and body == p.data
        assert [r["range"] for r in emu.requests][1:3] == ["bytes=0-1", "bytes=10000-"]


async def test_drop_after_then_resume() -> None:
    p = s2(0, data=bytes(range(256)) * 1000, drop_after=[100_000])
    async with running(p) as emu, aiohttp.ClientSession(headers={"Authorization": ALICE}) as http:
        url, got = f"{emu.url}odata/v1/Products('{p.uuid}')/$value", b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(url) as r:
                async for chunk in r.content.iter_any():
                    got += chunk
        assert len(got) == 100_000
        async with http.get(url, headers={"Range": f"bytes={len(got)}-"}) as r:
            assert r.status == 206
            got += await r.read()
        assert got == p.data and [r["status"] for r in emu.requests] == [200, 206]


async def test_lta_order_then_restore() -> None:
    p, q = s2(0, online=False), s2(1)
    async with running(p, q, restore_delay=0.3) as emu:
        uri = f"{emu.url}odata/v1/Products('{p.uuid}')"
        status, headers, body = await get(uri + "/$value", headers={"Range": "bytes=0-1"})
        assert (status, body, headers["Content-Type"]) == (202, b"", "text/plain; charset=utf-8")
        assert [(u, k) for u, k, _ in emu.orders] == [("alice", p.uuid)]
        assert (await get(uri + "/$value", BOB))[0] == 202
        assert len(emu.orders) == 1  # already ordered: nothing counted
        _, _, body = await get(uri, params=JSON)
        assert json.loads(body)["d"]["Online"] is False
        await asyncio.sleep(0.35)
        assert (await get(uri + "/Online/$value"))[2] == b"true"
        status, _, body = await get(uri + "/$value")
        assert status == 200 and body == p.data and len(emu.orders) == 1
        _, _, body = await get(uri, params=JSON)
        d = json.loads(body)["d"]
        assert d["Online"] is True and d["ModificationDate"] != d["IngestionDate"]


async def test_retrieval_quota() -> None:
    products = [s2(i, online=False) for i in range(4)]
    async with running(*products, quota=2, quota_window=0.5, restore_delay=60) as emu:
        def url(p: DhusProduct) -> str:
            return f"{emu.url}odata/v1/Products('{p.uuid}')/$value"
        assert [(await get(url(p)))[0] for p in products[:2]] == [202, 202]
        status, headers, body = await get(url(products[2]))
        assert (status, body) == (403, b"") and headers["cause-message"] == (
            "ExpectedException : User 'alice' offline products retrieval quota exceeded (2 fetches"
            f" max)  trying to fetch product {products[2].title} (1002 bytes compressed)")
        assert (await get(url(products[0])))[0] == 202  # under way: no new order
        assert (await get(url(products[2]), BOB))[0] == 202
        assert emu.quota_refused == {"alice": 1}
        await asyncio.sleep(0.55)  # the window slides
        assert (await get(url(products[3])))[0] == 202
        assert [(u, products.index(emu.products[k])) for u, k, _ in emu.orders] == [
            ("alice", 0), ("alice", 1), ("bob", 2), ("alice", 3)]
        t = [t for *_, t in emu.orders]
        assert t == sorted(t) and t[-1] <= time.monotonic()


async def test_orders_refused_and_old_offline() -> None:
    p = s2(0, online=False)
    async with running(p, accept_orders=False) as emu:
        status, headers, _ = await get(f"{emu.url}odata/v1/Products('{p.uuid}')/$value")
        assert status == 503 and "cause-message" in headers and emu.orders == []
    async with running(p, old_offline=True, restore_delay=0.1) as emu:
        status, headers, body = await get(f"{emu.url}odata/v1/Products('{p.uuid}')/$value")
        assert (status, body, "cause-message" in headers) == (500, b"", False)  # #358: "500 0"
        assert len(emu.orders) == 1
        await asyncio.sleep(0.15)
        assert (await get(f"{emu.url}odata/v1/Products('{p.uuid}')/$value"))[2] == p.data


async def test_concurrent_flows() -> None:
    slow, other = s2(0, data=b"x" * 200_000, rate=100_000), s2(1)
    async with running(slow, other, max_flows_per_user=2) as emu, \
            aiohttp.ClientSession(headers={"Authorization": ALICE}) as http:
        def url(p: DhusProduct) -> str:
            return f"{emu.url}odata/v1/Products('{p.uuid}')/$value"
        async with http.get(url(slow)) as a, http.get(url(slow)) as b:
            assert a.status == b.status == 200
            status, headers, body = await get(url(other))
            assert (status, body) == (403, b"") and headers["cause-message"] == (
                "MediaRegulationException : An exception occured while creating a stream: "
                'Maximum number of 2 concurrent flows achieved by the user "alice"')
            assert (await get(url(other), BOB))[0] == 200
            await a.read()
        for _ in range(50):  # b was closed unread: its stream ends
            if emu.active["alice"] == 0:
                break
            await asyncio.sleep(0.02)
        assert emu.active["alice"] == 0 and emu.peak == {"alice": 2, "bob": 1}
        assert emu.flows_refused == {"alice": 1}
        assert (await get(url(other)))[0] == 200


async def test_xml_error_body_with_200() -> None:
    p = s2(0, xml_error_body=True)
    async with running(p) as emu:
        status, headers, body = await get(f"{emu.url}odata/v1/Products('{p.uuid}')/$value")
        assert status == 200 and headers["Content-Type"].startswith("application/xml")
        assert body.startswith(b"<?xml version='1.0' encoding='UTF-8'?><error xmlns=\"http://"
                               b"schemas.microsoft.com/ado/2007/08/dataservices/metadata\">"
                               b"<code/><message xml:lang=\"en\">")
        assert emu.peak == {}
