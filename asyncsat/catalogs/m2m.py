"""USGS Machine-to-Machine (M2M): Landsat and the other EarthExplorer datasets.

A search is `scene-search` (acquisition dates, an `mbr` from the bbox, cloud cover), paged
by `startingNumber`. A scene is prepared at download time: `download-options` names the
product to fetch (the `product` setting: a product name, or part of one; default the
dataset's "Product Bundle"), `download-request` asks for it, and a product USGS is still
preparing waits `offline` until `download-retrieve` lists it available. The URL USGS hands
out expires: it is never stored, and every attempt asks for a fresh one. File names come
from `Content-Disposition`, sanitised.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import structlog

from asyncsat.auth.base import ANONYMOUS, Auth
from asyncsat.auth.m2m import EXPIRED, envelope_error
from asyncsat.catalogs.base import PageRepeats, ProductRef, Query, page_size, root_url
from asyncsat.catalogs.client import JsonClient
from asyncsat.errors import CatalogError, OfflineError, PermanentError, UsageError
from asyncsat.models import Download, Provider
from asyncsat.retry import Policy
from asyncsat.transfer.base import Source

log = structlog.get_logger("asyncsat")

DEFAULT_PAGE_SIZE = 100
DEFAULT_PRODUCT = "Product Bundle"
CLOUD_KEYS = ("cloudCover", "cloudcover", "cloud_cover", "cloudCoverFilter")


class M2MCatalog:
    """Searches and prepares the scenes of one M2M service."""

    def __init__(self, client: JsonClient, provider: Provider) -> None:
        self._client = client
        self._provider = provider
        self._root = root_url(provider)
        settings = provider.settings
        self._page = page_size(provider, DEFAULT_PAGE_SIZE)
        product = settings.get("product")
        self._product = product if isinstance(product, str) and product else DEFAULT_PRODUCT
        self._policy = Policy.for_provider(provider)

    async def call(self, endpoint: str, body: dict[str, Any], auth: Auth) -> Any:
        """One M2M call: its `data`; an expired API key is renewed once."""
        for renewal in (True, False):
            sent = await auth.headers()
            answer = await self._client.send("POST", f"{self._root}{endpoint}", ANONYMOUS,
                                             body=body, headers=sent, policy=self._policy)
            code = answer.get("errorCode") if isinstance(answer, dict) else None
            if code in EXPIRED and renewal and auth.rejected(sent):
                continue
            error = envelope_error(answer, auth.user)
            if error is not None:
                raise error
            return answer.get("data")
        raise AssertionError("unreachable")  # pragma: no cover

    async def search(self, query: Query, auth: Auth, since: datetime | None = None) -> \
            AsyncGenerator[ProductRef, None]:
        body = scene_search(query, since, self._page)
        start = 1
        repeats = PageRepeats()
        while True:
            data = await self.call("scene-search", {**body, "startingNumber": start}, auth)
            if not isinstance(data, dict):
                raise CatalogError("scene-search answered without data")
            results = data.get("results") or []
            if not isinstance(results, list):
                raise CatalogError("scene-search answered without a list of results")
            if repeats.same_again([str(scene.get("entityId")) for scene in results
                                   if isinstance(scene, dict)]):  # startingNumber ignored
                raise CatalogError(f"scene-search answered startingNumber={start} with the "
                                   "scenes of the pages before: the search would never end")
            for scene in results:
                if isinstance(scene, dict) and scene.get("entityId"):
                    yield self._ref(query.collection, scene)
            total = data.get("totalHits")
            start += len(results)
            if not results or (isinstance(total, int) and start > total):
                return

    def _ref(self, dataset: str, scene: dict[str, Any]) -> ProductRef:
        entity = str(scene["entityId"])
        coverage = scene.get("temporalCoverage")
        return ProductRef(
            url=f"m2m://{dataset}/{entity}", id=f"{dataset}/{entity}", name=None,
            seen_at=_time(scene.get("publishDate")) or _time(
                coverage.get("startDate") if isinstance(coverage, dict) else None))

    def expand(self, pattern: str, auth: Auth) -> AsyncGenerator[ProductRef, None]:
        raise UsageError("an M2M provider takes searches, not URL patterns")

    async def order(self, download: Download, auth: Auth) -> float | None:
        raise CatalogError("M2M products are requested when they are prepared")

    async def prepare(self, download: Download, auth: Auth) -> Source:
        """A fresh download URL for the scene's product (`download-request`), or
        OfflineError while USGS prepares it."""
        dataset, entity = _identity(download)
        options = await self.call("download-options",
                                  {"datasetName": dataset, "entityIds": [entity]}, auth)
        product = self._choose(options, entity)
        label = f"asyncsat-{download.id}"
        data = await self.call("download-request", {
            "downloads": [{"entityId": entity, "productId": product["id"]}], "label": label},
            auth)
        if not isinstance(data, dict):
            raise CatalogError("download-request answered without data")
        failed = data.get("failed") or []
        if failed and not (data.get("availableDownloads") or data.get("preparingDownloads")
                           or data.get("duplicateProducts")):
            reason = failed[0].get("errorMessage") if isinstance(failed[0], dict) else failed
            raise PermanentError(f"USGS refused the download of {entity}: {reason}")
        url = _url_of(data.get("availableDownloads"), entity)
        if url is None:  # preparing, or requested before: is it ready by now?
            retrieved = await self.call("download-retrieve", {"label": label}, auth)
            url = _url_of(retrieved.get("available") if isinstance(retrieved, dict) else None,
                          entity)
        if url is None:
            raise OfflineError("USGS is preparing the product")
        return Source(url, ANONYMOUS, expires=True)

    def _choose(self, options: Any, entity: str) -> dict[str, Any]:
        """The download option of the `product` setting for the scene."""
        mine = [o for o in options or [] if isinstance(o, dict) and o.get("id")
                and str(o.get("entityId", entity)) == entity]
        wanted = self._product.lower()
        for option in mine:
            name = str(option.get("productName") or "").lower()
            code = str(option.get("productCode") or "").lower()
            if wanted in (name, code) or wanted in name:
                if not option.get("available", True):
                    raise PermanentError(f"USGS offers {option.get('productName')} of {entity}"
                                         " but not for download")
                return option
        names = ", ".join(sorted({str(o.get("productName")) for o in mine})) or "none"
        raise PermanentError(f"no download option of {entity} matches product "
                             f"{self._product!r} (offered: {names})")


def scene_search(query: Query, since: datetime | None, page: int) -> dict[str, Any]:
    """The body of `scene-search` for a query (UsageError names what M2M cannot take)."""
    scene_filter: dict[str, Any] = {}
    start = query.start
    if since is not None:
        start = max(start, since) if start is not None else since
    if start is not None or query.end is not None:
        scene_filter["acquisitionFilter"] = {
            "start": (start or datetime(1972, 7, 23, tzinfo=UTC)).strftime("%Y-%m-%d"),
            "end": (query.end or datetime.now(UTC)).strftime("%Y-%m-%d")}
    if query.bbox is not None:
        w, s, e, n = query.bbox
        scene_filter["spatialFilter"] = {
            "filterType": "mbr", "lowerLeft": {"latitude": s, "longitude": w},
            "upperRight": {"latitude": n, "longitude": e}}
    elif query.wkt is not None:
        raise UsageError("an M2M provider searches by --bbox (a minimum bounding rectangle), "
                         "not --wkt")
    low, high = 0, 100
    for f in query.filters:
        if f.key not in CLOUD_KEYS or f.number is None or f.op not in ("<=", "<", ">=", ">"):
            raise UsageError(f"invalid filter {f}: an M2M provider filters on cloud cover "
                             "only (cloudCover<=N, cloudCover>=N)")
        if f.op in ("<=", "<"):
            high = int(f.number)
        else:
            low = int(f.number)
    if (low, high) != (0, 100):
        scene_filter["cloudCoverFilter"] = {"min": low, "max": high, "includeUnknown": False}
    body: dict[str, Any] = {"datasetName": query.collection, "maxResults": page,
                            "sceneFilter": scene_filter}
    return body


def check(query: Query) -> None:
    scene_search(query, None, 1)


def _identity(download: Download) -> tuple[str, str]:
    dataset, _, entity = (download.product_id or "").partition("/")
    if not dataset or not entity:
        raise PermanentError(f"download {download.id} is not an M2M scene (product id "
                             f"{download.product_id!r})")
    return dataset, entity


def _url_of(entries: Any, entity: str) -> str | None:
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("url") and \
                str(entry.get("entityId", entity)) == entity:
            return str(entry["url"])
    return None


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
