"""DHuS hubs (the Data Hub Software of scihub/apihub, coda, s5phub and national hubs).

A search is an OpenSearch query (`{url}search?q=...&start=N&rows=R&format=json`), paged
with `rows` of at most 100; the exact size, the MD5 and the online flag of each product come
from its OData v1 entity. Downloads are `{url}odata/v1/Products('<uuid>')/$value` with HTTP
basic authentication. Products in the long-term archive (LTA) are ordered by a GET of
`$value` (answered 202); the hub counts those orders against a retrieval quota.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import structlog

from asyncsat.auth.base import Auth
from asyncsat.catalogs.base import (
    Filter,
    PageRepeats,
    ProductRef,
    Query,
    offline,
    page_size,
    root_url,
)
from asyncsat.catalogs.client import JsonClient
from asyncsat.errors import (
    CatalogError,
    NotFoundError,
    OfflineError,
    UsageError,
)
from asyncsat.models import Checksum, Download, Provider
from asyncsat.retry import Policy
from asyncsat.transfer.base import Source
from asyncsat.transfer.http import error_for_status

log = structlog.get_logger("asyncsat")

MAX_ROWS = 100
"""The largest page DHuS serves (sentinelsat's limit for ApiHub too)."""
DIRECTORY_FORMATS = (".SAFE", ".SEN3")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_DATE = re.compile(r"/Date\((-?\d+)\)/")


class DhusCatalog:
    """Searches and prepares the products of one DHuS hub."""

    def __init__(self, client: JsonClient, provider: Provider) -> None:
        self._client = client
        self._provider = provider
        self._root = root_url(provider)
        self._policy = Policy.for_provider(provider)
        self._rows = page_size(provider, MAX_ROWS, MAX_ROWS)

    async def search(self, query: Query, auth: Auth, since: datetime | None = None) -> \
            AsyncGenerator[ProductRef, None]:
        q = query_for(query, since)
        start = 0
        repeats = PageRepeats()
        while True:
            page = await self._client.get(f"{self._root}search", auth, {
                "q": q, "start": str(start), "rows": str(self._rows), "format": "json",
                "orderby": "beginposition asc"}, policy=self._policy)
            entries = _entries(page)
            if repeats.same_again([_uuid(entry) for entry in entries]):  # `start` ignored
                raise CatalogError(f"the hub answered start={start} with the products of the "
                                   "pages before: the search would never end")
            for entry in entries:
                ref = await self._product(entry, auth)
                if ref is not None:
                    yield ref
            total = _total(page)
            start += len(entries)
            if not entries or len(entries) < self._rows or (total is not None and
                                                              start >= total):
                return

    async def _product(self, entry: dict[str, Any], auth: Auth) -> ProductRef | None:
        uuid = _uuid(entry)
        if not re.fullmatch(r"[0-9A-Za-z-]+", uuid):
            log.warning("DHuS entry without a usable id", provider=self._provider.name)
            return None
        title = str(entry.get("title") or uuid)
        filename = str(_field(entry, "str", "filename") or title)
        name = title + ".zip" if filename.endswith(DIRECTORY_FORMATS) or "." not in filename \
            else filename
        entity = await self._entity(uuid, auth)
        size = entity.get("ContentLength")
        try:
            length = int(size) if size is not None else 0
        except (TypeError, ValueError):
            length = 0
        return ProductRef(
            url=f"{self._root}odata/v1/Products('{uuid}')/$value", name=name, id=uuid,
            size=length or None, checksum=_checksum(entity.get("Checksum")),
            online=not offline(entity.get("Online")),
            seen_at=_time(_field(entry, "date", "ingestiondate"))
            or _time(_field(entry, "date", "beginposition")))

    async def _entity(self, uuid: str, auth: Auth) -> dict[str, Any]:
        """The product's OData v1 entity (`d`): ContentLength, Checksum, Online."""
        try:
            answer = await self._client.get(
                f"{self._root}odata/v1/Products('{uuid}')", auth, {"$format": "json"},
                policy=self._policy)
        except NotFoundError:
            return {}
        entity = answer.get("d") if isinstance(answer, dict) else None
        return entity if isinstance(entity, dict) else {}

    def expand(self, pattern: str, auth: Auth) -> AsyncGenerator[ProductRef, None]:
        raise UsageError("a DHuS provider takes searches, not URL patterns")

    async def order(self, download: Download, auth: Auth) -> float | None:
        """A GET of `$value` orders an offline product: 202 accepted; 403 with a quota
        `cause-message` refused for the quota; 200 means it is online already."""
        status, headers, body = await self._client.probe("GET", download.url, auth)
        if status in (200, 206):
            return 0.0
        if status == 202:
            return None
        cause = headers.get("cause-message") or body[:200]
        error = error_for_status(status, "", headers.get("Retry-After"), cause)
        raise error

    async def prepare(self, download: Download, auth: Auth) -> Source:
        """The `$value` URL; a product found offline is downloaded only once the hub says
        it is online (`Products('<uuid>')/Online/$value`), and is ordered otherwise."""
        if download.product_id is None or (download.claimed_from != "offline"
                                           and not download.offline_checks):
            return Source(download.url, auth)
        status, headers, body = await self._client.probe(
            "GET", f"{self._root}odata/v1/Products('{download.product_id}')/Online/$value", auth)
        if status == 200 and body.strip().lower() == "false":
            raise OfflineError("the hub reports the product offline (in its long-term archive)",
                               orderable=True)
        if status >= 400 and status not in (400, 404):  # older hubs know no Online flag
            raise error_for_status(status, "", headers.get("Retry-After"),
                                   headers.get("cause-message") or body[:200])
        return Source(download.url, auth)


def query_for(query: Query, since: datetime | None) -> str:
    """The OpenSearch `q` of a search (UsageError names what DHuS cannot take)."""
    terms = [f"platformname:{_value(query.collection)}"]
    if query.start is not None or query.end is not None:
        terms.append(f"beginposition:[{_instant(query.start) if query.start else '*'} TO "
                     f"{_instant(query.end) if query.end else 'NOW'}]")
    if since is not None:
        terms.append(f"ingestiondate:[{_instant(since)} TO NOW]")
    if query.bbox is not None:
        w, s, e, n = query.bbox
        terms.append(f'footprint:"Intersects(POLYGON(({w} {s},{e} {s},{e} {n},{w} {n},'
                     f'{w} {s})))"')
    elif query.wkt is not None:
        wkt = " ".join(query.wkt.split())
        if not wkt.upper().startswith(("POLYGON", "MULTIPOLYGON", "POINT")) or '"' in wkt:
            raise UsageError(f"invalid --wkt {query.wkt[:80]!r}: give a WKT POLYGON, "
                             "MULTIPOLYGON or POINT in lon/lat degrees")
        terms.append(f'footprint:"Intersects({wkt})"')
    terms.extend(_term(f) for f in query.filters)
    return " AND ".join(terms)


def check(query: Query) -> None:
    """What the daemon would refuse, refused before the request is written."""
    query_for(query, None)


def _term(f: Filter) -> str:
    if not _KEY.fullmatch(f.key):
        raise UsageError(f"invalid filter key {f.key!r}: use a DHuS attribute name")
    if f.op == "=":
        return f"{f.key}:{_value(f.value)}"
    low = "0" if f.key == "cloudcoverpercentage" else "*"
    bounds = {"<=": f"[{low} TO {f.value}]", "<": f"[{low} TO {f.value}}}",
              ">=": f"[{f.value} TO *]", ">": f"{{{f.value} TO *]"}
    return f"{f.key}:{bounds[f.op]}"


def _value(text: str) -> str:
    """A term as DHuS takes it: bare when it is a plain word (wildcards kept), else quoted."""
    if re.fullmatch(r"[A-Za-z0-9_.*?-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _instant(when: datetime) -> str:
    utc = when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _entries(page: Any) -> list[dict[str, Any]]:
    """The entries of a page: a list, one object when there is one result, or none."""
    feed = page.get("feed") if isinstance(page, dict) else None
    if not isinstance(feed, dict):
        raise CatalogError("the hub answered a search without a `feed`")
    entries = feed.get("entry")
    if entries is None:
        return []
    if isinstance(entries, dict):
        return [entries]
    if isinstance(entries, list):
        return [e for e in entries if isinstance(e, dict)]
    raise CatalogError("the hub answered a search with an unreadable `entry`")


def _total(page: dict[str, Any]) -> int | None:
    try:
        return int(page["feed"]["opensearch:totalResults"])
    except (KeyError, TypeError, ValueError):
        return None


def _uuid(entry: dict[str, Any]) -> str:
    return str(entry.get("id") or _field(entry, "str", "uuid") or "")


def _field(entry: dict[str, Any], kind: str, name: str) -> object:
    """A typed field (`str`, `date`, `double`, `int`): a list, or one object when alone."""
    values = entry.get(kind)
    for item in values if isinstance(values, list) else [values]:
        if isinstance(item, dict) and item.get("name") == name:
            return item.get("content")
    return None


def _checksum(value: object) -> Checksum | None:
    if isinstance(value, dict) and isinstance(value.get("Value"), str) and value["Value"]:
        algo = str(value.get("Algorithm") or "MD5").lower().replace("-", "_")
        if algo in ("md5", "sha256", "sha3_256"):
            return Checksum(algo, value["Value"].lower())
    return None


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    match = _DATE.fullmatch(value)
    if match:
        return datetime.fromtimestamp(int(match[1]) / 1000, UTC)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


