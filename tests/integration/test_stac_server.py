"""The STAC API fixture serves what the STAC catalog adapter relies on.

These tests pin stac-fastapi-pgstac's behaviour (the versions in scripts/stac-server-setup):
search criteria, the shape of `next` links for POST and GET, CQL2 and the query extension,
and assets with `file:size`/`file:checksum`.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.stac_server import (
    StacServer,
    data_asset,
    multihash_sha256,
    stac_item,
    stac_server,  # noqa: F401
)

COUNT = 5


# A parameter named like the imported fixture would shadow the import (ruff F811) in every
# test: the tests ask for `stac`, this one alias.
@pytest.fixture
def stac(stac_server: StacServer) -> StacServer:  # noqa: F811
    return stac_server


def product(i: int) -> bytes:
    return f"product {i}\n".encode() * (i + 1)


def items(n: int = COUNT) -> list[dict[str, Any]]:
    """Item i: 2024-01-(i+1), footprint [i, 0, i+1, 1], cloud cover 10 * i."""
    return [stac_item(f"S2_{i}", datetime=f"2024-01-{i + 1:02d}T10:00:00Z",
                      bbox=(float(i), 0.0, i + 1.0, 1.0),
                      properties={"eo:cloud_cover": 10.0 * i, "platform": "sentinel-2a"},
                      assets={"product": data_asset(f"http://127.0.0.1:1/files/S2_{i}.zip",
                                                    product(i)),
                              "thumbnail": {"href": f"http://127.0.0.1:1/files/S2_{i}.png",
                                            "type": "image/png", "roles": ["thumbnail"]}})
            for i in range(n)]


async def loaded(server: StacServer, n: int = COUNT) -> str:
    collection = await server.new_collection()
    await server.add_items(collection, items(n))
    return collection


async def request(method: str, url: str, body: dict[str, Any] | None = None) -> \
        tuple[int, Any]:
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def search(server: StacServer, body: dict[str, Any]) -> dict[str, Any]:
    status, page = await request("POST", server.url + "search", body)
    assert status == 200, page
    assert page["type"] == "FeatureCollection"
    return dict(page)


def ids(page: dict[str, Any]) -> set[str]:
    return {feature["id"] for feature in page["features"]}


def next_link(page: dict[str, Any]) -> dict[str, Any] | None:
    found = [link for link in page["links"] if link["rel"] == "next"]
    assert len(found) <= 1
    return found[0] if found else None


def test_conformance_lists_core_search_filter_query_sort_fields(
        stac: StacServer) -> None:
    assert stac.url.endswith("/")
    classes = set(stac.conformance)
    assert {
        "https://api.stacspec.org/v1.0.0/core",
        "https://api.stacspec.org/v1.0.0/item-search",
        "https://api.stacspec.org/v1.0.0/item-search#query",
        "https://api.stacspec.org/v1.0.0/item-search#fields",
        "https://api.stacspec.org/v1.1.0/item-search#sort",
        "https://api.stacspec.org/v1.0.0-rc.2/item-search#filter",
        "http://www.opengis.net/spec/cql2/1.0/conf/basic-cql2",
        "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json",
        "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text",
        "https://api.stacspec.org/v1.0.0/ogcapi-features/extensions/transaction",
    } <= classes


async def test_landing_page_links_search_for_get_and_post(stac: StacServer) -> None:
    status, landing = await request("GET", stac.url)
    assert status == 200
    assert landing["conformsTo"] == stac.conformance
    search_links = {link["method"]: link["href"] for link in landing["links"]
                    if link["rel"] == "search"}
    assert search_links == {"GET": stac.url + "search",
                            "POST": stac.url + "search"}


async def test_post_search_by_collection_datetime_bbox_intersects(
        stac: StacServer) -> None:
    collection = await loaded(stac)
    other = await loaded(stac, 2)  # same item ids, another collection
    base = {"collections": [collection]}
    assert ids(await search(stac, base)) == {f"S2_{i}" for i in range(COUNT)}
    assert len(ids(await search(stac, {"collections": [collection, other]}))) == COUNT
    both = await search(stac, {"collections": [collection, other], "limit": 100})
    assert len(both["features"]) == COUNT + 2

    # a closed interval holds both ends; open ends with ".."
    page = await search(stac, {**base,
                                      "datetime": "2024-01-02T10:00:00Z/2024-01-03T10:00:00Z"})
    assert ids(page) == {"S2_1", "S2_2"}
    page = await search(stac, {**base, "datetime": "2024-01-04T00:00:00Z/.."})
    assert ids(page) == {"S2_3", "S2_4"}
    page = await search(stac, {**base, "datetime": "../2024-01-01T23:59:59Z"})
    assert ids(page) == {"S2_0"}

    page = await search(stac, {**base, "bbox": [1.2, 0.2, 2.5, 0.8]})
    assert ids(page) == {"S2_1", "S2_2"}
    point = {"type": "Point", "coordinates": [3.5, 0.5]}
    assert ids(await search(stac, {**base, "intersects": point})) == {"S2_3"}
    polygon = {"type": "Polygon",
               "coordinates": [[[0.2, 0.2], [1.5, 0.2], [1.5, 0.8], [0.2, 0.8], [0.2, 0.2]]]}
    assert ids(await search(stac, {**base, "intersects": polygon})) == {"S2_0", "S2_1"}

    assert ids(await search(stac, {**base, "ids": ["S2_4", "S2_0"]})) == {"S2_0", "S2_4"}


async def test_post_next_link_repeats_the_body_with_a_token(stac: StacServer) -> None:
    collection = await loaded(stac)
    body: dict[str, Any] = {"collections": [collection], "limit": 2,
                            "datetime": "2024-01-01T00:00:00Z/2024-12-31T23:59:59Z"}
    page = await search(stac, body)
    assert page["numberReturned"] == 2
    assert "numberMatched" not in page  # pgstac's context is off by default
    link = next_link(page)
    assert link is not None
    # {"rel": "next", "type": "application/geo+json", "method": "POST",
    #  "href": ".../search", "body": {<the request>, "token": "next:<opaque>"}}
    # no "merge": the body is the whole next request
    assert link["method"] == "POST"
    assert link["href"] == stac.url + "search"
    assert link["type"] == "application/geo+json"
    assert "merge" not in link
    rest = dict(link["body"])
    assert rest.pop("token").startswith("next:")
    assert rest == body

    seen, pages = [sorted(ids(page))], 1
    while (link := next_link(page)) is not None:
        page = await search(stac, link["body"])
        seen.append(sorted(ids(page)))
        pages += 1
    assert pages == 3
    assert [len(p) for p in seen] == [2, 2, 1]
    assert {i for p in seen for i in p} == {f"S2_{i}" for i in range(COUNT)}
    # newest first by default
    assert seen[0] == ["S2_3", "S2_4"]


async def test_get_next_link_has_the_token_in_href(stac: StacServer) -> None:
    collection = await loaded(stac)
    url = f"{stac.url}search?collections={collection}&limit=3"
    status, page = await request("GET", url)
    assert status == 200
    link = next_link(page)
    assert link is not None
    # {"rel": "next", "type": "application/geo+json", "method": "GET",
    #  "href": ".../search?collections=<c>&limit=3&token=next%3A<opaque>"}
    assert link["method"] == "GET"
    assert "body" not in link
    assert link["href"].startswith(url + "&token=next%3A")
    status, last = await request("GET", link["href"])
    assert status == 200
    assert next_link(last) is None
    assert ids(page) | ids(last) == {f"S2_{i}" for i in range(COUNT)}

    # /collections/{id}/items pages the same way
    status, page = await request("GET", f"{stac.url}collections/{collection}/items"
                                        "?limit=2")
    assert status == 200
    link = next_link(page)
    assert link is not None
    assert "token=next%3A" in link["href"]


async def test_a_page_that_holds_the_rest_has_no_next_link(stac: StacServer) -> None:
    collection = await loaded(stac)
    page = await search(stac, {"collections": [collection], "limit": COUNT})
    assert len(page["features"]) == COUNT
    assert next_link(page) is None  # no empty last page to fetch
    page = await search(stac, {"collections": [collection], "limit": COUNT - 1})
    link = next_link(page)
    assert link is not None
    page = await search(stac, link["body"])
    assert len(page["features"]) == 1
    assert next_link(page) is None


async def test_cql2_filter(stac: StacServer) -> None:
    collection = await loaded(stac)
    cql2_json = {"op": "and", "args": [
        {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 20]},
        {"op": "=", "args": [{"property": "platform"}, "sentinel-2a"]}]}
    page = await search(stac, {"collections": [collection], "filter-lang": "cql2-json",
                                      "filter": cql2_json})
    assert ids(page) == {"S2_0", "S2_1", "S2_2"}
    # without filter-lang, a JSON filter is cql2-json
    page = await search(stac, {"collections": [collection], "filter": cql2_json})
    assert ids(page) == {"S2_0", "S2_1", "S2_2"}

    # cql2-text works with GET...
    status, page = await request(
        "GET", f"{stac.url}search?collections={collection}&filter-lang=cql2-text"
               "&filter=eo:cloud_cover <= 20 AND platform = 'sentinel-2a'")
    assert status == 200, page
    assert ids(page) == {"S2_0", "S2_1", "S2_2"}
    # ...but POST accepts only cql2-json (422-like validation error, status 400)
    status, error = await request("POST", stac.url + "search",
                                  {"collections": [collection], "filter-lang": "cql2-text",
                                   "filter": "eo:cloud_cover <= 20"})
    assert status == 400
    assert "cql2-json" in str(error)


async def test_query_extension(stac: StacServer) -> None:
    collection = await loaded(stac)
    page = await search(stac, {"collections": [collection],
                                      "query": {"eo:cloud_cover": {"lte": 20}}})
    assert ids(page) == {"S2_0", "S2_1", "S2_2"}
    page = await search(stac, {"collections": [collection],
                                      "query": {"eo:cloud_cover": {"gt": 10, "lt": 40}}})
    assert ids(page) == {"S2_2", "S2_3"}


async def test_sort_and_fields(stac: StacServer) -> None:
    collection = await loaded(stac)
    page = await search(stac, {"collections": [collection],
                                      "sortby": [{"field": "properties.eo:cloud_cover",
                                                  "direction": "asc"}],
                                      "fields": {"include": ["id"], "exclude": ["geometry"]}})
    assert [f["id"] for f in page["features"]] == [f"S2_{i}" for i in range(COUNT)]
    assert "geometry" not in page["features"][0]


async def test_items_keep_assets_with_file_size_checksum_and_roles(
        stac: StacServer) -> None:
    collection = await loaded(stac)
    page = await search(stac, {"collections": [collection], "ids": ["S2_2"]})
    (item,) = page["features"]
    assert item["collection"] == collection
    asset = item["assets"]["product"]
    assert asset == {"href": "http://127.0.0.1:1/files/S2_2.zip", "type": "application/zip",
                     "roles": ["data"], "file:size": len(product(2)),
                     "file:checksum": multihash_sha256(product(2))}
    assert asset["file:checksum"].startswith("1220")
    assert len(asset["file:checksum"]) == 4 + 64
    assert item["assets"]["thumbnail"]["roles"] == ["thumbnail"]
    assert item["properties"]["datetime"] == "2024-01-03T10:00:00Z"
    assert item["bbox"] == [2.0, 0.0, 3.0, 1.0]
    # the item's own links come back, absolute, with rel self
    assert any(link["rel"] == "self" and link["href"].startswith(stac.url)
               for link in item["links"])


async def test_items_need_no_stac_extensions(stac: StacServer) -> None:
    collection = await stac.new_collection()
    bare = stac_item("bare", stac_extensions=[],
                     assets={"data": data_asset("http://127.0.0.1:1/files/bare.zip", b"x")})
    del bare["stac_extensions"]
    await stac.add_items(collection, [bare])
    page = await search(stac, {"collections": [collection]})
    (item,) = page["features"]
    assert item["assets"]["data"]["file:size"] == 1
    assert item.get("stac_extensions", []) == []


async def test_unknown_collection_and_date_only_datetime(stac: StacServer) -> None:
    # an unknown collection is no error: an empty page
    page = await search(stac, {"collections": ["no-such-collection"]})
    assert page["features"] == []
    assert next_link(page) is None
    # datetimes must be full RFC 3339: a bare date is refused
    status, error = await request("POST", stac.url + "search",
                                  {"datetime": "2024-01-02/2024-01-03"})
    assert status == 400
    assert "datetime" in str(error)


async def test_adding_an_existing_item_id_fails(stac: StacServer) -> None:
    collection = await loaded(stac, 1)
    with pytest.raises(RuntimeError, match="409"):
        await stac.add_items(collection, items(1))
