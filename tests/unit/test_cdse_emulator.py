"""Tests of the CDSE emulator itself (tests/cdse.py): its $filter parser, its geometry and its
HTTP behaviour, so that a bug in the emulator cannot make the adapter tests lie."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import blake3
import pytest
from yarl import URL

from tests.cdse import (
    CdseEmulator,
    EmuProduct,
    FilterError,
    order,
    parse_filter,
    parse_wkt,
    point_in_ring,
    rings_intersect,
    segments_intersect,
)

T0 = datetime(2024, 3, 1, 10, 30, 21, tzinfo=UTC)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SQUARE = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0), (0.0, 0.0)]


def s2(i: int = 0, **kw: Any) -> EmuProduct:
    kw.setdefault("start", T0 + timedelta(hours=i))
    kw.setdefault("attributes", {"productType": "S2MSI1C", "cloudCover": 10.0 * i,
                                 "orbitNumber": 100 + i})
    kw.setdefault("data", bytes([i % 256]) * (1000 + i))
    return EmuProduct(f"S2A_MSIL1C_2024030{i % 9 + 1}T103021_N0510_R108_T32TQM_"
                      f"20240301T1234{i:02d}.SAFE", **kw)


def names(products: list[EmuProduct], text: str) -> list[str]:
    pred = parse_filter(text)
    return [p.name for p in products if pred(p)]


# ---------------------------------------------------------------- $filter

def test_documented_filters_parse_and_match() -> None:
    a = s2(0, collection="SENTINEL-1", footprint=[(15.0, 45.0), (16.0, 45.0), (16.0, 46.0),
                                                  (15.0, 46.0)])
    b = s2(1, attributes={"cloudCover": 5.0, "productType": "S2MSI2A",
                          "orbitDirection": "ASCENDING"})
    docs = [
        "not (Collection/Name eq 'SENTINEL-2') and ContentDate/Start gt 2024-03-01T00:00:00.000Z"
        " and ContentDate/Start lt 2024-03-02T00:10:00.000Z",
        "not contains(Name,'S2') and ContentDate/Start gt 2022-05-03T00:00:00.000Z",
        "OData.CSC.Intersects(area=geography'SRID=4326;POLYGON((12.655118166047592 "
        "47.44667197521409,21.39065656328509 48.347694733853245,28.334291357162826 "
        "41.877123516783655,17.47086198383573 40.35854475076158,12.655118166047592 "
        "47.44667197521409))')",
        "Attributes/OData.CSC.DoubleAttribute/any(att:att/Name eq 'cloudCover' and "
        "att/OData.CSC.DoubleAttribute/Value lt 10.00) and Attributes/OData.CSC.StringAttribute"
        "/any(att:att/Name eq 'productType' and att/OData.CSC.StringAttribute/Value eq "
        "'S2MSI2A') and Attributes/OData.CSC.StringAttribute/any(att:att/Name eq "
        "'orbitDirection' and att/OData.CSC.StringAttribute/Value eq 'ASCENDING')",
    ]
    a.name = "S1A_IW_GRDH_1SDV_20240301T101010.SAFE"
    assert [names([a, b], text) for text in docs] == [[a.name], [a.name], [a.name], [b.name]]


def test_names_and_string_functions() -> None:
    ps = [s2(0), s2(1), s2(2)]
    ps[2].name = "S2B_MSIL2A_20240303T103021_N0510_R108_T32TQM_20240303T123456.SAFE"
    assert names(ps, f"Name eq '{ps[1].name}'") == [ps[1].name]
    assert names(ps, f"Name ne '{ps[1].name}'") == [ps[0].name, ps[2].name]
    assert names(ps, "contains(Name,'MSIL1C')") == [ps[0].name, ps[1].name]
    assert names(ps, "startswith(Name,'S2B')") == [ps[2].name]
    assert names(ps, "endswith(Name,'.SAFE')") == [p.name for p in ps]
    assert names(ps, "contains(Name,'msil1c')") == []  # case-sensitive
    assert names(ps, "contains(Name, 'it''s')") == []  # '' escapes a quote


def test_precedence_not_and_parentheses() -> None:
    ps = [s2(0), s2(1), s2(2)]
    a, b, c = (f"Name eq '{p.name}'" for p in ps)
    assert names(ps, f"{a} or {b} and {c}") == [ps[0].name]  # and binds tighter
    assert names(ps, f"({a} or {b}) and {c}") == []
    assert names(ps, f"not ({a} or {b})") == [ps[2].name]
    assert names(ps, f"not not ({a})") == [ps[0].name]
    assert names(ps, f"(({a}))") == [ps[0].name]


def test_dates_lengths_online_and_ids() -> None:
    ps = [s2(0, content_length=0), s2(1, online=False), s2(2)]
    assert names(ps, "ContentDate/Start ge 2024-03-01T11:30:21.000Z") == [ps[1].name, ps[2].name]
    assert names(ps, "ContentDate/Start gt 2024-03-01T11:30:21Z") == [ps[2].name]
    assert names(ps, "ContentDate/Start le 2024-03-01T10:30:21.000000Z") == [ps[0].name]
    assert names(ps, "ContentDate/Start lt 2024-03-01T12:30+01:00") == [ps[0].name]
    assert names(ps, "ContentDate/End eq 2024-03-01T12:30:21.000Z") == [ps[2].name]
    assert names(ps, "PublicationDate gt 2024-03-01T14:00:00.000Z") == [ps[1].name, ps[2].name]
    assert names(ps, "ModificationDate lt 2024-03-01T14:00:00.000Z") == [ps[0].name]
    assert names(ps, "ContentLength eq 0") == [ps[0].name]
    assert names(ps, "ContentLength gt 1000") == [ps[1].name, ps[2].name]
    assert names(ps, "Online eq false") == [ps[1].name]
    assert names(ps, "Online ne false") == [ps[0].name, ps[2].name]
    assert names(ps, f"Id eq '{ps[2].id.upper()}'") == [ps[2].name]
    assert names(ps, f"Id eq {ps[1].id}") == [ps[1].name]  # an OData guid literal


def test_attributes() -> None:
    ps = [s2(0), s2(2), s2(3, attributes={"cloudCover": 20, "sensing": T0})]
    f = "Attributes/OData.CSC.{t}Attribute/any(att:att/Name eq '{n}' and " \
        "att/OData.CSC.{t}Attribute/Value {op} {v})"
    assert names(ps, f.format(t="Double", n="cloudCover", op="le", v="20.00")) == \
        [ps[0].name, ps[1].name]  # 20 (an int) is an Integer attribute, not a Double
    assert names(ps, f.format(t="Double", n="cloudCover", op="gt", v="5")) == [ps[1].name]
    assert names(ps, f.format(t="Integer", n="cloudCover", op="eq", v="20")) == [ps[2].name]
    assert names(ps, f.format(t="Integer", n="orbitNumber", op="ge", v="102")) == [ps[1].name]
    assert names(ps, f.format(t="String", n="productType", op="eq", v="'S2MSI1C'")) == \
        [ps[0].name, ps[1].name]
    assert names(ps, f.format(t="String", n="orbitNumber", op="eq", v="'100'")) == []
    assert names(ps, f.format(t="DateTimeOffset", n="sensing", op="lt",
                              v="2024-03-02T00:00:00.000Z")) == [ps[2].name]
    assert names(ps, "not " + f.format(t="Double", n="cloudCover", op="lt", v="1")) == \
        [ps[1].name, ps[2].name]
    assert names(ps, f.format(t="Double", n="cloudCover", op="lt", v="1").replace(
        "att", "x")) == [ps[0].name]  # any variable name


@pytest.mark.parametrize("text", [
    "Nmae eq 'x'",  # unknown property
    "Collection/Title eq 'x'",
    "Footprint eq 'x'",
    "Name eq 'x' AND Online eq true",  # operators are lower case
    "Name eq 'x' and",
    "Name eq 'x')",
    "(Name eq 'x'",
    "Name eq 'x' Online eq true",
    "Name 'x'",
    "Name eq",
    "Name eq 'unterminated",
    "Name like 'x'",
    "Name lt 'x'",
    "not Name eq 'x'",  # not needs a parenthesised expression
    "Name eq x",
    "Name eq \"x\"",
    "Name eq 'x'; drop",
    "ContentDate/Start gt '2024-03-01T00:00:00.000Z'",  # a string is no datetime
    "ContentDate/Start gt 2024-03-01",
    "ContentDate/Start gt 2024-03-01T00:00:00",  # no time zone
    "ContentDate/Start gt 2024-02-30T00:00:00.000Z",
    "ContentLength gt 1.5",
    "ContentLength gt '10'",
    "Online eq 'true'",
    "Online gt false",
    "Collection/Name eq SENTINEL-2",
    "substringof('x',Name)",  # unknown function
    "contains(Collection/Name,'S2')",
    "contains(Name,5)",
    "contains(Name)",
    "OData.CSC.Intersects(geography'SRID=4326;POINT(1 2)')",
    "OData.CSC.Intersects(area='SRID=4326;POINT(1 2)')",
    "Attributes/OData.CSC.FloatAttribute/any(att:att/Name eq 'cloudCover' and "
    "att/OData.CSC.FloatAttribute/Value le 1)",
    "Attributes/OData.CSC.StringAttribute/any(att:att/Name eq 'productType' and "
    "att/OData.CSC.StringAttribute/Value lt 'S2')",  # strings compare with eq only
    "Attributes/OData.CSC.DoubleAttribute/any(att:att/Name eq 'cloudCover' and "
    "att/OData.CSC.DoubleAttribute/Value ne 1)",
    "Attributes/OData.CSC.DoubleAttribute/any(att:att/Name eq 'cloudCover' and "
    "att/OData.CSC.StringAttribute/Value le 1)",  # mixed types
    "Attributes/OData.CSC.DoubleAttribute/any(att:x/Name eq 'cloudCover' and "
    "att/OData.CSC.DoubleAttribute/Value le 1)",  # wrong variable
    "Attributes/OData.CSC.DoubleAttribute/any(att:att/Name eq 'cloudCover' and "
    "att/OData.CSC.DoubleAttribute/Value le '1')",
    "Attributes/OData.CSC.IntegerAttribute/any(att:att/Name eq 'orbitNumber' and "
    "att/OData.CSC.IntegerAttribute/Value le 1.5)",
    "Attributes/OData.CSC.DoubleAttribute/any(att:att/Name eq 'cloudCover')",
    "Attributes/OData.CSC.DoubleAttribute/all(att:att/Name eq 'cloudCover' and "
    "att/OData.CSC.DoubleAttribute/Value le 1)",
    "()",
])
def test_refused_filters(text: str) -> None:
    with pytest.raises(FilterError):
        parse_filter(text)


def test_empty_filter_matches_everything() -> None:
    assert names([s2(0)], "") == [s2(0).name] and names([s2(0)], "  ") == [s2(0).name]


# ---------------------------------------------------------------- geometry

def test_segments_and_points() -> None:
    assert segments_intersect((0, 0), (2, 2), (0, 2), (2, 0))  # crossing
    assert segments_intersect((0, 0), (2, 0), (2, 0), (3, 5))  # touching at an end
    assert segments_intersect((0, 0), (4, 0), (1, 0), (2, 0))  # overlapping
    assert not segments_intersect((0, 0), (2, 0), (0, 1), (2, 1))  # parallel
    assert not segments_intersect((0, 0), (1, 1), (2, 2), (3, 3))  # collinear, apart
    assert point_in_ring((5, 5), SQUARE) and point_in_ring((10, 5), SQUARE)  # inside, edge
    assert point_in_ring((0, 0), SQUARE) and not point_in_ring((10.01, 5), SQUARE)


def test_polygons_intersect() -> None:
    def box(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    assert rings_intersect(SQUARE, box(5, 5, 15, 15))  # edges cross
    assert rings_intersect(SQUARE, box(2, 2, 3, 3))  # inside, no edge crossing
    assert rings_intersect(box(2, 2, 3, 3), SQUARE)
    assert rings_intersect(SQUARE, box(10, 0, 20, 10))  # a shared edge
    assert not rings_intersect(SQUARE, box(11, 0, 20, 10))
    # a concave U around a box: bounding boxes overlap, the shapes do not
    u: list[tuple[float, float]] = [(0, 0), (9, 0), (9, 9), (6, 9), (6, 3), (3, 3), (3, 9),
                                    (0, 9), (0, 0)]
    assert not rings_intersect(u, box(4, 4, 5, 8)) and rings_intersect(u, box(4, 2, 5, 8))
    assert rings_intersect([(5, 5)], SQUARE) and not rings_intersect([(50, 5)], SQUARE)


def test_wkt() -> None:
    assert parse_wkt("SRID=4326;POLYGON ((0 0, 10 0, 10 10, 0 0))") == \
        [[(0, 0), (10, 0), (10, 10), (0, 0)]]
    assert parse_wkt("SRID=4326;POINT(-0.53 28.65)") == [[(-0.53, 28.65)]]
    assert parse_wkt("SRID=4326;MULTIPOLYGON(((0 0,1 0,1 1,0 0)),((5 5,6 5,6 6,5 5)))") == \
        [[(0, 0), (1, 0), (1, 1), (0, 0)], [(5, 5), (6, 5), (6, 6), (5, 5)]]
    for bad in ["SRID=3857;POINT(1 2)", "POLYGON((0 0,1 0,1 1,0 0))",  # SRID 4326 required
                "SRID=4326;POLYGON((0 0,1 0,1 1,0 1))",  # not closed
                "SRID=4326;POLYGON((0 0,1 0,0 0))",  # too short
                "SRID=4326;POLYGON((0 0,1 1,1 0,0 1,0 0))",  # self-intersecting (bowtie)
                "SRID=4326;POLYGON((0 0,200 0,1 1,0 0))",  # out of EPSG 4326 bounds
                "SRID=4326;POLYGON((0 0,9 0,9 9,0 0),(1 1,2 1,2 2,1 1))",  # holes
                "SRID=4326;POLYGON((0 0,1 0,1 1,0 0)", "SRID=4326;POLYGON((0 0 1 0,1 1,0 0))",
                "SRID=4326;POINT(1 2, 3 4)", "SRID=4326;LINESTRING(0 0,1 1)",
                "SRID=4326;MULTIPOLYGON()", "SRID=4326;POLYGON(0 0,1 0,1 1,0 0)"]:
        with pytest.raises(FilterError):
            parse_wkt(bad)


def test_intersects_filter_uses_footprints() -> None:
    ps = [s2(0), s2(1, footprint=[(100.0, 0.0), (101.0, 0.0), (101.0, 1.0), (100.0, 1.0)]),
          s2(2, footprint=[])]
    area = "OData.CSC.Intersects(area=geography'SRID=4326;{}')"
    assert names(ps, area.format("POLYGON((12 45.5,13 45.5,13 47,12 47,12 45.5))")) == \
        [ps[0].name]
    assert names(ps, area.format("POINT(100.5 0.5)")) == [ps[1].name]
    assert names(ps, area.format("MULTIPOLYGON(((12 45.5,13 45.5,13 47,12 45.5)),"
                                 "((99 -1,99.5 -1,99.5 0.5,99 -1)))")) == [ps[0].name]


def test_order() -> None:
    ps = [s2(2), s2(0), s2(1), s2(0, id="00000000-0000-0000-0000-000000000000")]
    assert [p.start for p in order(ps, "ContentDate/Start")] == \
        sorted(p.start for p in ps)
    assert order(ps, "ContentDate/Start asc")[0].id.startswith("00000000")  # ties by Id
    assert order(ps, "ContentDate/Start desc")[-2].id.startswith("00000000")
    assert order(ps, "PublicationDate desc")[0] is ps[0]
    assert [p.name for p in order(ps, "Name desc")][:1] == [max(p.name for p in ps)]
    assert [p.id for p in order(ps, None)] == sorted(p.id for p in ps)
    for bad in ["ContentLength asc", "ContentDate/Start up", "Name asc, Id desc", ""]:
        with pytest.raises(FilterError):
            order(ps, bad)


# ---------------------------------------------------------------- HTTP

@contextlib.asynccontextmanager
async def running(*products: EmuProduct, **kw: Any) -> AsyncIterator[CdseEmulator]:
    emu = CdseEmulator(users={"alice": "pw", "bob": "pw2"}, **kw)
    for p in products:
        emu.add(p)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


async def get_json(url: str, **params: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, params=params) as r:
        return r.status, await r.json()


async def login(emu: CdseEmulator, user: str = "alice", password: str = "pw") -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(emu.token_url, data={
            "grant_type": "password", "username": user, "password": password,
            "client_id": "cdse-public"}) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_paging_by_next_links() -> None:
    products = [s2(i) for i in range(45)]
    async with running(*products) as emu:
        url, seen, pages = emu.catalogue_url + "Products", [], 0
        params = {"$filter": "Collection/Name eq 'SENTINEL-2' and ContentDate/Start gt "
                             "2024-03-01T00:00:00.000Z", "$orderby": "ContentDate/Start asc",
                  "$count": "True"}
        status, body = await get_json(url, **params)
        while True:
            assert status == 200 and body["@odata.count"] == 45
            assert body["@odata.context"] == "$metadata#Products"
            seen += [item["Name"] for item in body["value"]]
            pages += 1
            if "@odata.nextLink" not in body:
                break
            link = body["@odata.nextLink"]
            assert link.startswith(emu.catalogue_url + "Products?%24filter=") and "%24skip=" in link
            query = dict(parse_qsl(urlsplit(link).query))
            assert query["$filter"] == params["$filter"] and query["$top"] == "20"
            async with aiohttp.ClientSession() as http, http.get(URL(link, encoded=True)) as r:
                status, body = r.status, await r.json()
        assert pages == 3 and seen == [p.name for p in sorted(products, key=lambda p: p.start)]
        assert [r["query"].get("$skip") for r in emu.requests] == [None, "20", "40"]


async def test_next_link_knobs_and_top_zero() -> None:
    products = [s2(i) for i in range(5)]
    async with running(*products, next_links=False) as emu:
        status, body = await get_json(emu.catalogue_url + "Products", **{"$top": "2"})
        assert status == 200 and len(body["value"]) == 2 and "@odata.nextLink" not in body
        assert "@odata.count" not in body
    async with running(*products, next_link_on_last_page=True) as emu:
        _, body = await get_json(emu.catalogue_url + "Products", **{"$top": "5"})
        assert len(body["value"]) == 5 and "%24skip=5" in body["@odata.nextLink"]
        _, body = await get_json(emu.catalogue_url + "Products", **{"$top": "5", "$skip": "5"})
        assert body["value"] == [] and "@odata.nextLink" not in body
        _, body = await get_json(emu.catalogue_url + "Products", **{"$top": "0"})
        assert body["value"] == [] and "@odata.nextLink" not in body
    async with running(*products) as emu:
        _, body = await get_json(emu.catalogue_url + "Products")  # default $top 20
        assert len(body["value"]) == 5 and "@odata.nextLink" not in body


async def test_caps_and_parameter_errors() -> None:
    async with running(*[s2(i) for i in range(12)], max_skip=10) as emu:
        url = emu.catalogue_url + "Products"
        status, body = await get_json(url, **{"$skip": "10020"})
        assert status == 422 and body == {"detail": [{
            "type": "less_than_equal", "loc": ["query", "$skip"],
            "msg": "Input should be less than or equal to 10", "input": "10020",
            "ctx": {"le": 10}}]}
        assert emu.requests[-1]["status"] == 422 and emu.requests[-1]["query"]["$skip"] == "10020"
        _, body = await get_json(url, **{"$top": "5", "$skip": "5"})
        link = body["@odata.nextLink"]  # skip 10 is still allowed, 15 is not
        status, _ = await get_json(url, **{"$top": "5", "$skip": "10"})
        assert status == 200 and "%24skip=10" in link
        status, body = await get_json(url, **{"$top": "1001"})
        assert status == 422 and body["detail"][0]["ctx"] == {"le": 1000}
        for params in ({"$top": "-1"}, {"$top": "ten"}, {"$count": "yes"},
                       {"$expand": "Everything"}):
            status, body = await get_json(url, **params)
            assert status == 422 and body["detail"][0]["loc"][1] == next(iter(params))
        for params, kind in (({"$filter": "Name eq"}, "filter"),
                             ({"$orderby": "Size desc"}, "orderby")):
            status, body = await get_json(url, **params)
            assert status == 400 and body["detail"]["message"].startswith(f"Invalid {kind}")


async def test_product_json() -> None:
    p = s2(3, checksums=None, content_length=0)
    bare = s2(4, checksums=[], footprint=[])
    async with running(p, bare) as emu:
        status, body = await get_json(emu.catalogue_url + "Products",
                                      **{"$expand": "Attributes", "$orderby": "Name asc"})
        assert status == 200 and body["@odata.context"] == "$metadata#Products(Attributes())"
        item, other = body["value"]
        assert item["Id"] == p.id and item["Name"] == p.name and item["ContentLength"] == 0
        assert item["@odata.mediaContentType"] == item["ContentType"] == \
            "application/octet-stream"
        assert item["Online"] is True and isinstance(item["EvictionDate"], str)
        for key in ("OriginDate", "PublicationDate", "ModificationDate"):
            assert ISO.match(item[key])
        assert item["ContentDate"] == {"Start": "2024-03-01T13:30:21.000000Z",
                                       "End": "2024-03-01T13:30:21.000000Z"}
        assert [(c["Algorithm"], c["Value"]) for c in item["Checksum"]] == [
            ("MD5", hashlib.md5(p.data).hexdigest()),
            ("BLAKE3", blake3.blake3(p.data).hexdigest())]
        assert item["Footprint"] == "geography'SRID=4326;POLYGON ((11.0 45.0, 12.4 45.0, " \
            "12.4 46.0, 11.0 46.0, 11.0 45.0))'"
        assert item["GeoFootprint"]["type"] == "Polygon"
        assert item["GeoFootprint"]["coordinates"][0][0] == [11.0, 45.0]
        assert {"@odata.type": "#OData.CSC.DoubleAttribute", "Name": "cloudCover",
                "Value": 30.0, "ValueType": "Double"} in item["Attributes"]
        assert {"@odata.type": "#OData.CSC.IntegerAttribute", "Name": "orbitNumber",
                "Value": 103, "ValueType": "Integer"} in item["Attributes"]
        assert other["Checksum"] == [] and other["Footprint"] is None
        assert other["GeoFootprint"] is None and other["ContentLength"] == len(bare.data)
        status, one = await get_json(f"{emu.catalogue_url}Products({p.id})")
        assert status == 200 and one["Name"] == p.name and "Attributes" not in one
        status, _ = await get_json(f"{emu.catalogue_url}Products(00000000-0000-0000-0000-"
                                   "000000000001)")
        assert status == 404


async def test_tokens_and_refresh() -> None:
    async with running(token_lifetime=0.4, refresh_lifetime=0.8) as emu:
        body = await login(emu)
        assert body["token_type"] == "Bearer" and body["expires_in"] == 0.4
        assert body["refresh_expires_in"] == 0.8 and body["not-before-policy"] == 0
        assert set(body) >= {"access_token", "refresh_token", "session_state", "scope"}
        async with aiohttp.ClientSession() as http:
            async def post(**form: str) -> tuple[int, Any]:
                async with http.post(emu.token_url, data=form) as r:
                    return r.status, await r.json()
            assert await post(grant_type="password", username="alice", password="no",
                              client_id="cdse-public") == (401, {
                                  "error": "invalid_grant",
                                  "error_description": "Invalid user credentials"})
            status, err = await post(grant_type="password", username="alice", password="pw",
                                     client_id="other")
            assert status == 401 and err["error"] == "invalid_client"
            status, err = await post(grant_type="password", username="alice", password="pw")
            assert status == 401 and err["error"] == "invalid_client"
            status, new = await post(grant_type="refresh_token", client_id="cdse-public",
                                     refresh_token=body["refresh_token"])
            assert status == 200 and new["access_token"] != body["access_token"]
            assert new["refresh_token"] != body["refresh_token"]
            assert new["session_state"] == body["session_state"]
            status, err = await post(grant_type="refresh_token", client_id="cdse-public",
                                     refresh_token="nonsense")
            assert status == 400 and err["error"] == "invalid_grant"
            await asyncio.sleep(0.9)
            status, err = await post(grant_type="refresh_token", client_id="cdse-public",
                                     refresh_token=new["refresh_token"])
            assert (status, err["error_description"]) == (400, "Token is not active")
            status, err = await post(grant_type="client_credentials", client_id="cdse-public")
            assert status == 400 and err["error"] == "unsupported_grant_type"
        assert emu.grants == {("alice", "password"): 1, ("alice", "refresh_token"): 1}
        assert emu.requests[0]["form"] == {"grant_type": "password", "username": "alice",
                                           "client_id": "cdse-public"}  # never the password


async def test_session_cap() -> None:
    async with running(max_sessions=2, refresh_lifetime=0.5) as emu:
        await login(emu)
        await login(emu)
        await login(emu, "bob", "pw2")  # another user has sessions of its own
        async with aiohttp.ClientSession() as http, http.post(emu.token_url, data={
                "grant_type": "password", "username": "alice", "password": "pw",
                "client_id": "cdse-public"}) as r:
            assert r.status == 429 and "error" in await r.json()
        assert emu.sessions("alice") == 2
        await asyncio.sleep(0.6)  # sessions end when they can no longer be refreshed
        assert emu.sessions("alice") == 0
        await login(emu)
        assert emu.grants[("alice", "password")] == 3


async def fetch(url: str, bearer: str | None = None, headers: dict[str, str] | None = None,
                **params: str) -> tuple[int, Mapping[str, str], bytes]:
    headers = {**(headers or {}), **({"Authorization": f"Bearer {bearer}"} if bearer else {})}
    async with aiohttp.ClientSession() as http, \
            http.get(url, headers=headers, params=params, allow_redirects=False) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_download_auth_and_ranges() -> None:
    p, offline = s2(1, data=bytes(range(256)) * 40), s2(2, online=False)
    async with running(p, offline) as emu:
        url = f"{emu.download_url}Products({p.id})/$value"
        assert (await fetch(url))[0] == 401
        assert (await fetch(url, "forged"))[0] == 401
        tokens = await login(emu)
        token = tokens["access_token"]
        status, headers, data = await fetch(url, token)
        assert status == 200 and data == p.data and headers["Content-Length"] == "10240"
        assert headers["Accept-Ranges"] == "bytes" and headers["ETag"]
        assert headers["Content-Disposition"] == \
            f'attachment; filename="{p.name.removesuffix(".SAFE")}.zip"'
        status, _, data = await fetch(url, None, None, token=token)  # ?token=
        assert status == 200 and data == p.data
        status, headers, data = await fetch(url, token, {"Range": "bytes=10000-"})
        assert status == 206 and data == p.data[10000:]
        assert headers["Content-Range"] == "bytes 10000-10239/10240"
        status, headers, data = await fetch(url, token, {"Range": "bytes=0-"})
        assert status == 206 and data == p.data
        status, headers, _ = await fetch(url, token, {"Range": "bytes=10240-"})
        assert status == 416 and headers["Content-Range"] == "bytes */10240"
        status, _, data = await fetch(url, token, {"Range": "bytes=5-", "If-Range": '"old"'})
        assert status == 200 and data == p.data  # the range of another version is ignored
        assert (await fetch(f"{emu.download_url}Products({offline.id})/$value", token))[0] == 409
        assert (await fetch(f"{emu.download_url}Products({p.id[::-1]})/$value", token))[0] == 404
        emu.expire_tokens()
        status, _, body = await fetch(url, token)
        assert status == 401 and b"Expired signature" in body
        async with aiohttp.ClientSession() as http, http.post(emu.token_url, data={
                "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                "client_id": "cdse-public"}) as r:
            assert r.status == 200
            fresh = (await r.json())["access_token"]
        assert (await fetch(url, fresh))[0] == 200 and emu.requests[-1]["user"] == "alice"
        kinds = [(r["auth"], r["range"]) for r in emu.requests if "$value" in r["path"]]
        assert kinds[:5] == [(None, None), ("bearer", None), ("bearer", None), ("query", None),
                             ("bearer", "bytes=10000-")]


async def test_downloads_live_on_their_own_prefix() -> None:
    p = s2(1)
    async with running(p) as emu:
        token = (await login(emu))["access_token"]
        assert emu.download_url != emu.catalogue_url
        assert emu.download_url.startswith(f"http://127.0.0.1:{emu.port}/")
        assert (await fetch(f"{emu.catalogue_url}Products({p.id})/$value", token))[0] == 404
        assert emu.requests[-1]["status"] == 404  # unknown paths are recorded too
        assert (await fetch(f"{emu.download_url}Products({p.id})/$value", token))[0] == 200
        assert emu.token_url.endswith("/auth/realms/CDSE/protocol/openid-connect/token")


async def test_hostile_names_make_legal_headers() -> None:
    p = EmuProduct('a\x07b\n"c\\d.SAFE', b"data", start=T0)
    async with running(p) as emu:
        token = (await login(emu))["access_token"]
        status, headers, data = await fetch(f"{emu.download_url}Products({p.id})/$value", token)
        assert (status, data) == (200, b"data")
        assert headers["Content-Disposition"] == 'attachment; filename="a_b__c_d.zip"'
        _, body = await get_json(emu.catalogue_url + "Products")
        assert body["value"][0]["Name"] == p.name  # the catalogue gives the name unchanged


async def test_per_user_download_cap() -> None:
    p = s2(1, data=b"x" * 40_000, rate=100_000)  # 0.4 s per download
    async with running(p, retry_after="3") as emu:
        alice, bob = (await login(emu))["access_token"], (await login(emu, "bob", "pw2"))[
            "access_token"]
        url = f"{emu.download_url}Products({p.id})/$value"
        results = await asyncio.gather(*[fetch(url, alice) for _ in range(5)],
                                       fetch(url, bob))
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 200, 200, 200, 200, 429]
        refused = next(r for r in results if r[0] == 429)
        assert refused[1]["Retry-After"] == "3"
        body = refused[2].decode()
        assert '"code": "DAT-ZIP-100"' in body and "Max session number exceeded" in body
        assert emu.peak == {"alice": 4, "bob": 1} and emu.rejected == {"alice": 1}
        assert +emu.active == {}
        assert all(r[2] == p.data for r in results if r[0] == 200)


async def test_rate_drops_and_token_expiry_mid_stream() -> None:
    p = s2(1, data=bytes(range(256)) * 1000, rate=256_000.0, drop_after=[100_000])
    async with running(p, token_lifetime=0.7) as emu:
        token = (await login(emu))["access_token"]
        url = f"{emu.download_url}Products({p.id})/$value"
        async with aiohttp.ClientSession() as http:
            got = bytearray()
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200
                    async for block in r.content.iter_any():
                        got += block
            assert bytes(got) == p.data[:100_000]
            began = asyncio.get_running_loop().time()
            async with http.get(url, headers={"Authorization": f"Bearer {token}",
                                              "Range": f"bytes={len(got)}-"}) as r:
                assert r.status == 206 and await r.read() == p.data[100_000:]
            assert asyncio.get_running_loop().time() - began > 0.5  # 156 kB at 256 kB/s
        # the token expired during that transfer (at 0.7 s), which finished anyway
        status, _, body = await fetch(url, token)
        assert status == 401 and b"Expired signature!" in body
        assert +emu.active == {} and emu.peak == {"alice": 1}
        assert [r["status"] for r in emu.requests if "$value" in r["path"]] == [200, 206, 401]
