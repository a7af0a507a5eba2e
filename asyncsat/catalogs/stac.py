"""STAC API item search (CDSE STAC, Earth Search, any stac-fastapi deployment).

A search is `POST {url}search` (`GET` when the server refuses POST) with collections,
datetime, bbox or intersects, and filters: CQL2 (`filter`) when the server's conformance
lists it, else the `query` extension. Pages follow `next` links in both forms: a GET href,
or a POST with a `body` to merge into the request (or to send as it is). Each item yields
the assets the `assets` setting names (default: those with role `data`, else its only
asset), with `file:size` and `file:checksum` (multihash) verified after the transfer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import structlog

from asyncsat.auth.base import ANONYMOUS, Auth
from asyncsat.auth.hosts import sends_login
from asyncsat.catalogs.base import Filter, ProductRef, Query, page_size, root_url
from asyncsat.catalogs.client import JsonClient, same_origin, shown
from asyncsat.errors import CatalogError, PermanentError, UsageError
from asyncsat.models import Checksum, Download, Provider
from asyncsat.naming import sanitize
from asyncsat.retry import Policy
from asyncsat.transfer.base import Source

log = structlog.get_logger("asyncsat")

DEFAULT_PAGE_SIZE = 100
MAX_PAGES = 100_000
# multihash codes (https://github.com/multiformats/multicodec) of the digests we verify
MULTIHASH = {0xD5: "md5", 0x12: "sha256", 0x13: "sha512", 0x16: "sha3_256", 0x1E: "blake3",
             0x11: "sha1"}
_CQL2 = ("filter", "cql2-json", "cql2-text", "cql-json")
_OPS = {"=": "=", "<=": "<=", ">=": ">=", "<": "<", ">": ">"}
_QUERY_OPS = {"=": "eq", "<=": "lte", ">=": "gte", "<": "lt", ">": "gt"}


class StacCatalog:
    """Searches one STAC API; assets are fetched from their hrefs."""

    def __init__(self, client: JsonClient, provider: Provider) -> None:
        self._client = client
        self._provider = provider
        self._root = root_url(provider)
        settings = provider.settings
        self._page = page_size(provider, DEFAULT_PAGE_SIZE)
        assets = settings.get("assets")
        self._assets = [str(a) for a in assets] if isinstance(assets, list) else None
        self._policy = Policy.for_provider(provider)

    async def search(self, query: Query, auth: Auth, since: datetime | None = None) -> \
            AsyncGenerator[ProductRef, None]:
        conformance = await self._conformance(auth)
        body = search_body(query, since, self._page, conformance)
        page = await self._first_page(body, auth)
        read = {_page_key("POST", f"{self._root}search", body, None)}
        for _ in range(MAX_PAGES):
            features = page.get("features") if isinstance(page, dict) else None
            if not isinstance(features, list):
                raise CatalogError("the STAC API answered a search without `features`")
            for item in features:
                if isinstance(item, dict):
                    for ref in self._products(item):
                        yield ref
            link = _next(page)
            if not features or link is None:
                return
            page = await self._follow(link, body, auth, read)
        raise CatalogError(f"the search did not end after {MAX_PAGES} pages")

    async def _conformance(self, auth: Auth) -> set[str]:
        landing = await self._client.get(self._root, auth, policy=self._policy)
        found = landing.get("conformsTo") if isinstance(landing, dict) else None
        if not isinstance(found, list):
            answer = await self._client.get(f"{self._root}conformance", auth,
                                            policy=self._policy)
            found = answer.get("conformsTo") if isinstance(answer, dict) else []
        return {str(c) for c in found or []}

    async def _first_page(self, body: dict[str, Any], auth: Auth) -> Any:
        try:
            return await self._client.post(f"{self._root}search", auth, body,
                                           policy=self._policy)
        except PermanentError as exc:
            if not any(f"HTTP {s}" in exc.message for s in (404, 405, 501)):
                raise
        log.info("STAC search by GET: the server refuses POST", provider=self._provider.name)
        return await self._client.get(f"{self._root}search", auth, get_params(body),
                                      policy=self._policy)

    async def _follow(self, link: Mapping[str, Any], body: dict[str, Any], auth: Auth,
                      read: set[str]) -> Any:
        """The page a next link leads to; CatalogError when it is one of the pages `read`
        already (a server that links a page to itself would be paged for ever)."""
        href = str(link["href"])
        headers = link.get("headers") if isinstance(link.get("headers"), dict) else None
        # a next link elsewhere than the API is followed without the credential
        auth = auth if same_origin(href, self._root) else ANONYMOUS
        post = str(link.get("method", "GET")).upper() == "POST"
        sent: dict[str, Any] | None = None
        if post:
            extra = link.get("body")
            extra = extra if isinstance(extra, dict) else {}
            sent = {**body, **extra} if link.get("merge") else (extra or body)
        key = _page_key("POST" if post else "GET", href, sent, headers)
        if key in read:
            raise CatalogError(f"the STAC API's next link leads back to a page already read "
                               f"({shown(href)}): the search would never end")
        read.add(key)
        if post:
            return await self._client.send("POST", href, auth, body=sent,
                                           headers={str(k): str(v) for k, v in
                                                    (headers or {}).items()},
                                           policy=self._policy)
        return await self._client.send("GET", href, auth, headers=headers, policy=self._policy)

    def _products(self, item: dict[str, Any]) -> list[ProductRef]:
        item_id = str(item.get("id") or "")
        assets = item.get("assets")
        if not item_id or not isinstance(assets, dict):
            return []
        chosen = self._choose(assets)
        if not chosen:
            log.warning("STAC item has no asset to fetch", item=item_id,
                        assets=sorted(assets)[:20], provider=self._provider.name)
        base = _self_href(item) or self._root
        props = item.get("properties")
        props = props if isinstance(props, dict) else {}
        when = _time(props.get("datetime")) or _time(props.get("start_datetime"))
        collection = str(item.get("collection") or "")
        refs = []
        for key in chosen:
            asset = assets[key]
            href = urljoin(base, str(asset["href"]))
            size = asset.get("file:size")
            refs.append(ProductRef(
                url=href, name=_name(item_id, href, asset), id=f"{collection}/{item_id}/{key}",
                size=size if isinstance(size, int) and not isinstance(size, bool) and size > 0
                else None,
                checksum=multihash(asset.get("file:checksum")), seen_at=when))
        return refs

    def _choose(self, assets: dict[str, Any]) -> list[str]:
        usable = {k for k, a in assets.items() if isinstance(a, dict) and a.get("href")}
        if self._assets is not None:
            return [k for k in self._assets if k in usable]
        data = [k for k in sorted(usable) if isinstance(assets[k].get("roles"), list)
                and "data" in assets[k]["roles"]]
        if data:
            return data
        return sorted(usable) if len(usable) == 1 else []

    def expand(self, pattern: str, auth: Auth) -> AsyncGenerator[ProductRef, None]:
        raise UsageError("a STAC provider takes searches, not URL patterns")

    async def order(self, download: Download, auth: Auth) -> float | None:
        raise CatalogError("this catalog cannot order archived products")

    async def prepare(self, download: Download, auth: Auth) -> Source:
        """The asset's href; the account logs in only on the provider's own servers (an
        asset on a public bucket or another service never sees the credential)."""
        return Source(download.url,
                      auth if sends_login(self._provider, download.url) else ANONYMOUS)


def check(query: Query) -> None:
    """What the daemon would refuse, refused before the request is written."""
    search_body(query, None, 1, set())


def search_body(query: Query, since: datetime | None, limit: int,
                conformance: set[str]) -> dict[str, Any]:
    """The body of `POST /search` for a query."""
    body: dict[str, Any] = {"collections": [query.collection], "limit": limit}
    start = query.start
    if since is not None:
        start = max(start, since) if start is not None else since
    if start is not None or query.end is not None:
        body["datetime"] = f"{_iso(start) if start else '..'}/" \
                           f"{_iso(query.end) if query.end else '..'}"
    if query.bbox is not None:
        body["bbox"] = list(query.bbox)
    elif query.wkt is not None:
        body["intersects"] = wkt_geometry(query.wkt)
    if query.filters:
        if any(c.endswith(_CQL2) or "#filter" in c for c in conformance) or not conformance:
            body["filter-lang"] = "cql2-json"
            args = [_cql2(f) for f in query.filters]
            body["filter"] = args[0] if len(args) == 1 else {"op": "and", "args": args}
        else:
            body["query"] = {f.key: {_QUERY_OPS[f.op]: _value(f)} for f in query.filters}
    return body


def get_params(body: dict[str, Any]) -> dict[str, str]:
    """The same search as GET query parameters (CQL2 as JSON text)."""
    params = {"collections": ",".join(body["collections"]), "limit": str(body["limit"])}
    if "datetime" in body:
        params["datetime"] = body["datetime"]
    if "bbox" in body:
        params["bbox"] = ",".join(str(v) for v in body["bbox"])
    if "intersects" in body:
        params["intersects"] = json.dumps(body["intersects"])
    if "filter" in body:
        params["filter"] = json.dumps(body["filter"])
        params["filter-lang"] = "cql2-json"
    if "query" in body:
        params["query"] = json.dumps(body["query"])
    return params


def _cql2(f: Filter) -> dict[str, Any]:
    return {"op": _OPS[f.op], "args": [{"property": f.key}, _value(f)]}


def _value(f: Filter) -> str | int | float:
    number = f.number
    if number is None:
        return f.value
    return int(number) if number.is_integer() and "." not in f.value else number


def wkt_geometry(wkt: str) -> dict[str, Any]:
    """A GeoJSON geometry from WKT POINT, POLYGON or MULTIPOLYGON (lon lat)."""
    text = " ".join(wkt.split()).upper()
    kind, _, rest = text.partition("(")
    kind = kind.strip()
    try:
        if kind == "POINT":
            return {"type": "Point", "coordinates": _coords(rest.rstrip(") "))[0]}
        if kind == "POLYGON":
            return {"type": "Polygon", "coordinates": _rings("(" + rest)}
        if kind == "MULTIPOLYGON":
            polygons = ("(" + rest).strip()[1:-1].split(")),")
            return {"type": "MultiPolygon", "coordinates": [
                _rings(p if p.endswith("))") else p + "))") for p in polygons]}
    except (ValueError, IndexError):
        pass
    raise UsageError(f"invalid --wkt {wkt[:80]!r}: give a WKT POINT, POLYGON or MULTIPOLYGON "
                     "in lon/lat degrees")


def _rings(text: str) -> list[list[list[float]]]:
    inner = text.strip()
    if not (inner.startswith("((") and inner.endswith("))")):
        raise ValueError(text)
    return [_coords(r) for r in inner[2:-2].split("),(")]


def _coords(text: str) -> list[list[float]]:
    points = [[float(v) for v in p.split()] for p in text.strip("() ").split(",")]
    if not points or any(len(p) != 2 for p in points):
        raise ValueError(text)
    return points


def multihash(value: object) -> Checksum | None:
    """A `file:checksum` (hex multihash: code varint, length, digest) as a Checksum."""
    if not isinstance(value, str):
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    code, shift, i = 0, 0, 0
    while i < len(raw):  # unsigned varint
        code |= (raw[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not raw[i - 1] & 0x80:
            break
    if i >= len(raw) or code not in MULTIHASH:
        return None
    length, digest = raw[i], raw[i + 1:]
    if len(digest) != length:
        return None
    return Checksum(MULTIHASH[code], digest.hex())


def _name(item_id: str, href: str, asset: dict[str, Any]) -> str:
    """The file name of an asset: its href's, prefixed by the item id when the href's
    name alone would clash between items (`B04.tif`)."""
    base = sanitize(unquote(urlsplit(href).path.rstrip("/").rsplit("/", 1)[-1]))
    if not base or "." not in base or base.startswith("$"):
        media = str(asset.get("type") or "")
        return sanitize(item_id + (".zip" if "zip" in media else
                                   ".nc" if "netcdf" in media else ""))
    return base if item_id in base else sanitize(f"{item_id}_{base}")


def _page_key(method: str, href: str, body: Any, headers: Any) -> str:
    """What makes a page: a next link with the same key is the same page again."""
    return json.dumps([method, href, body, headers], sort_keys=True, default=str)


def _self_href(item: dict[str, Any]) -> str | None:
    for link in item.get("links") or []:
        if isinstance(link, dict) and link.get("rel") == "self" and link.get("href"):
            return str(link["href"])
    return None


def _next(page: Any) -> dict[str, Any] | None:
    for link in page.get("links") or [] if isinstance(page, dict) else []:
        if isinstance(link, dict) and link.get("rel") == "next" and link.get("href"):
            return link
    return None


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
