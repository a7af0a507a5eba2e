"""The Copernicus Data Space Ecosystem (CDSE) OData catalogue, and servers like it.

A search becomes one `$filter` (collection, sensing dates, area, attributes), ordered by
sensing start and paged by `@odata.nextLink` (by `$skip` when the server gives none).
The server caps `$skip` (10 000 on CDSE, answered with 422 beyond): a search that would
pass it goes on in a new time window starting at the last sensing time seen, with no
`$skip`, so no product is lost and none is listed twice, whatever the number of results.

Products are downloaded from `{download_url}Products({Id})/$value` with the account's
bearer token; one the catalogue reports offline waits, and is looked at again by its id.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import structlog

from asyncsat.auth.base import ANONYMOUS, Auth
from asyncsat.catalogs.base import (
    Filter,
    PageRepeats,
    ProductRef,
    Query,
    offline,
    page_size,
    root_url,
)
from asyncsat.catalogs.client import JsonClient, same_origin, shown
from asyncsat.errors import CatalogError, OfflineError, UsageError
from asyncsat.models import Checksum, Download, Provider
from asyncsat.retry import Policy
from asyncsat.transfer.base import Source

log = structlog.get_logger("asyncsat")

DEFAULT_PAGE_SIZE = 100
DEFAULT_MAX_SKIP = 10_000
ORDER = "ContentDate/Start asc"
# attribute types of CDSE collections (others: a number is compared as a Double)
INTEGER_ATTRIBUTES = frozenset({
    "relativeOrbitNumber", "orbitNumber", "absoluteOrbitNumber", "sliceNumber",
    "totalSlices", "cycleNumber", "datatakeID", "missionDatatakeID", "instrumentConfigurationID",
})
DIRECTORY_FORMATS = (".SAFE", ".SEN3", ".SEN2")
"""Products that are folders: the service sends them zipped."""
CHECKSUM_PREFERENCE = ("BLAKE3", "MD5", "SHA256", "SHA3-256")


class ODataCatalog:
    """Searches and prepares the products of one OData provider."""

    def __init__(self, client: JsonClient, provider: Provider) -> None:
        self._client = client
        self._provider = provider
        self._base = root_url(provider)
        settings = provider.settings
        download = settings.get("download_url") or self._base
        self._download = str(download) if str(download).endswith("/") else f"{download}/"
        self._page = page_size(provider, DEFAULT_PAGE_SIZE)
        self._policy = Policy.for_provider(provider)
        self._max_skip = _positive(settings.get("max_skip"), DEFAULT_MAX_SKIP, zero=True)

    async def search(self, query: Query, auth: Auth, since: datetime | None = None) -> \
            AsyncGenerator[ProductRef, None]:
        window_start = query.start
        seen: set[str] = set()
        while True:  # one time window per pass; a new one when $skip would pass its cap
            restart_at: datetime | None = None
            fresh = 0
            try:
                async for item in self._pages(filter_for(query, window_start, since), auth):
                    product_id = str(item.get("Id") or "")
                    if not product_id or product_id in seen:
                        continue
                    seen.add(product_id)
                    fresh += 1
                    yield self._product(item)
                    restart_at = _time(_nested(item, "ContentDate", "Start")) or restart_at
            except _WindowFull:
                pass
            else:
                return
            if restart_at is None or fresh == 0:
                raise CatalogError(
                    f"more than {self._max_skip + self._page} products share one sensing "
                    f"start time at {window_start}: narrow the search")
            log.info("catalog search continues in a new window", provider=self._provider.name,
                     start=restart_at.isoformat(), products=len(seen))
            window_start = restart_at

    async def _pages(self, where: str, auth: Auth) -> AsyncGenerator[dict[str, Any], None]:
        """The products of one window, page after page; stops early (without exhausting)
        when the next page would pass the `$skip` cap: the caller then opens a new window."""
        url = f"{self._base}Products"
        params: dict[str, str] | None = {
            "$filter": where, "$orderby": ORDER, "$top": str(self._page)}
        skip = 0
        read: set[str] = set()
        repeats = PageRepeats()
        while True:
            page_key = url if params is None else f"{url}?{urlencode(params)}"
            if page_key in read:  # a next link back to a page read: it would never end
                raise CatalogError(f"the catalogue's next link leads back to a page already "
                                   f"read ({shown(url)}): the search would never end")
            read.add(page_key)
            # a next link elsewhere than the catalogue is followed without the credential
            sender = auth if same_origin(url, self._base) else ANONYMOUS
            page = await self._client.get(url, sender, params, policy=self._policy)
            items = page.get("value") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise CatalogError("the catalogue answered without a `value` list")
            if repeats.same_again([str(item.get("Id")) for item in items
                                   if isinstance(item, dict)]):  # $skip ignored
                raise CatalogError(f"the catalogue answered $skip={skip} with the products "
                                   "of the pages before: the search would never end")
            for item in items:
                if isinstance(item, dict):
                    yield item
            if not items:
                return
            link = page.get("@odata.nextLink")
            if isinstance(link, str) and link:
                next_skip = _skip_of(link)
                url, params = link, None
            elif params is not None:
                # no next link: page on with $skip until a page comes back empty (a server
                # may serve fewer than $top without saying so)
                next_skip = skip + len(items)
                params = {**params, "$skip": str(next_skip)}
            else:
                return
            if next_skip > self._max_skip:
                raise _WindowFull
            skip = next_skip

    def _product(self, item: dict[str, Any]) -> ProductRef:
        product_id = str(item["Id"])
        name = str(item.get("Name") or product_id)
        if name.endswith(DIRECTORY_FORMATS) or "." not in name:
            name += ".zip"
        size = item.get("ContentLength")
        published = _time(item.get("PublicationDate"))
        return ProductRef(
            url=f"{self._download}Products({_key(product_id)})/$value", name=name,
            size=size if isinstance(size, int) and not isinstance(size, bool) and size > 0
            else None,
            checksum=_checksum(item.get("Checksum")), id=product_id,
            online=not offline(item.get("Online")),
            seen_at=published or _time(_nested(item, "ContentDate", "Start")))

    def expand(self, pattern: str, auth: Auth) -> AsyncGenerator[ProductRef, None]:
        raise UsageError("an OData provider takes searches, not URL patterns")

    async def order(self, download: Download, auth: Auth) -> float | None:
        raise CatalogError("this catalog cannot order archived products")

    async def prepare(self, download: Download, auth: Auth) -> Source:
        """The `$value` URL; for a product found offline, only once the catalogue says it
        is online again."""
        if download.product_id is None or (download.claimed_from != "offline"
                                           and not download.offline_checks):
            return Source(download.url, auth)
        item = await self._client.get(f"{self._base}Products({_key(download.product_id)})", auth,
                                      policy=self._policy)
        if isinstance(item, dict) and isinstance(item.get("d"), dict):
            item = item["d"]
        if not isinstance(item, dict) or offline(item.get("Online")):
            raise OfflineError("the catalogue reports the product offline (in the long-term "
                               "archive)")
        return Source(download.url, auth)


class _WindowFull(Exception):
    """The next page of this window would pass the server's `$skip` cap."""


def filter_for(query: Query, start: datetime | None, since: datetime | None) -> str:
    """The `$filter` of a search (criteria checked: UsageError names the bad one)."""
    terms = [f"Collection/Name eq {_string(query.collection)}"]
    if start is not None:
        terms.append(f"ContentDate/Start ge {_instant(start)}")
    if query.end is not None:
        terms.append(f"ContentDate/Start lt {_instant(query.end)}")
    if since is not None:
        terms.append(f"PublicationDate ge {_instant(since)}")
    area = _area(query)
    if area is not None:
        terms.append(f"OData.CSC.Intersects(area=geography'SRID=4326;{area}')")
    terms.extend(_attribute(f) for f in query.filters)
    return " and ".join(terms)


def check(query: Query) -> None:
    """What the daemon would refuse, refused before the request is written."""
    filter_for(query, query.start, None)


_OPS = {"=": "eq", "<=": "le", ">=": "ge", "<": "lt", ">": "gt"}


def _attribute(f: Filter) -> str:
    number = f.number
    if number is None:
        kind, value = "String", _string(f.value)
    elif f.key in INTEGER_ATTRIBUTES and number.is_integer():
        kind, value = "Integer", str(int(number))
    else:
        kind, value = "Double", repr(number)
    if not f.key.replace("_", "").replace(":", "").isalnum():
        raise UsageError(f"invalid filter key {f.key!r}: use the catalog's attribute name")
    attr = f"OData.CSC.{kind}Attribute"
    return (f"Attributes/{attr}/any(att:att/Name eq {_string(f.key)} and "
            f"att/{attr}/Value {_OPS[f.op]} {value})")


def _area(query: Query) -> str | None:
    if query.bbox is not None:
        w, s, e, n = query.bbox
        return f"POLYGON(({w} {s},{e} {s},{e} {n},{w} {n},{w} {s}))"
    if query.wkt is not None:
        wkt = " ".join(query.wkt.split())
        if not wkt.upper().startswith(("POLYGON", "MULTIPOLYGON", "POINT", "LINESTRING")) \
                or "'" in wkt or wkt.count("(") != wkt.count(")"):
            raise UsageError(f"invalid --wkt {query.wkt[:80]!r}: give a WKT POLYGON, "
                             "MULTIPOLYGON, POINT or LINESTRING in lon/lat degrees")
        return wkt
    return None


def _string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _instant(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{when.astimezone(UTC).microsecond // 1000:03d}Z"


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _nested(item: dict[str, Any], *keys: str) -> object:
    value: object = item
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _checksum(value: object) -> Checksum | None:
    """The best digest of a CDSE Checksum list (or a DHuS-style single object)."""
    entries = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    found: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("Value"), str) and entry["Value"]:
            found[str(entry.get("Algorithm", "")).upper()] = entry["Value"].lower()
    for algo in CHECKSUM_PREFERENCE:
        if algo in found:
            return Checksum(algo.lower().replace("-", "_"), found[algo])
    return None


def _key(product_id: str) -> str:
    """An Id as it goes in a URL: `/`, `..`, `?` or `#` in it cannot lead the request (with
    the account's token) to another path of the host."""
    return quote(product_id, safe="")


def _skip_of(link: str) -> int:
    values = parse_qs(urlsplit(link).query).get("$skip")
    try:
        return int(values[0]) if values else 0
    except ValueError:
        return 0


def _positive(value: object, default: int, *, zero: bool = False) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (zero and
                                                                     value == 0)):
        return value
    return default
