"""An FTP tree as a catalog: URL patterns and date-templated folder layouts, by listing.

Operational feeds lay their files out by date (`sst/2024/03/sst_20240301_v2.nc`). A
provider's settings name such layouts (`{"collections": {"sst": "sst/{date:%Y/%m}/
sst_{date:%Y%m%d}_*.nc"}}`), or the collection given to `search` is the layout itself,
relative to the provider's URL. Each day of the range gives a folder and a name pattern;
each folder is listed once (MLSD, else LIST) and the names that match become products,
with their size known before the transfer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import structlog

from asyncsat.catalogs.base import ProductRef, Query
from asyncsat.catalogs.templates import expand, matches, split_pattern
from asyncsat.errors import CatalogError, PermanentError
from asyncsat.models import Provider
from asyncsat.transfer.base import RemoteEntry, Source

log = structlog.get_logger("asyncsat")


class Lister(Protocol):
    """Lists a remote directory (the FTP driver)."""

    async def list_dir(self, source: Source) -> list[RemoteEntry]:
        """The entries of the directory at `source.url` (a URL ending with `/`)."""
        ...


class FtpTree:
    """The catalog of an FTP provider."""

    def __init__(self, lister: Lister, provider: Provider) -> None:
        self._lister = lister
        self._provider = provider

    def _template(self, collection: str) -> str:
        layouts = self._provider.settings.get("collections")
        if isinstance(layouts, Mapping) and isinstance(layouts.get(collection), str):
            return str(layouts[collection])
        return collection

    async def search(self, query: Query, login: Source) -> AsyncIterator[ProductRef]:
        if query.bbox is not None or query.wkt is not None or query.filters:
            raise CatalogError("an FTP provider can only search by collection and dates "
                               "(no --bbox, --wkt or --filter)")
        if not self._provider.url:
            raise CatalogError(f"provider {self._provider.name} has no URL to search")
        template = self._template(query.collection)
        if "{" in template and query.start is None:
            raise CatalogError(f"collection {query.collection!r} is laid out by date: "
                               "give --start (and --end, default now)")
        now = datetime.now(UTC)
        patterns = expand(template, query.start or now, query.end or now)
        base = self._provider.url.rstrip("/") + "/"
        for pattern in patterns:
            url = base + quote(pattern.lstrip("/"), safe="/*?[]!")
            try:
                async for ref in self.expand(url, login):
                    yield ref
            except PermanentError as exc:  # no folder for that day: no data that day
                log.info("nothing to list", provider=self._provider.name, pattern=pattern,
                         reason=exc.message)

    async def expand(self, pattern: str, login: Source) -> AsyncIterator[ProductRef]:
        parts = urlsplit(pattern)
        folder, wanted = split_pattern(unquote(parts.path))
        folder_url = urlunsplit((parts.scheme, parts.netloc, quote(folder), "", ""))
        entries = await self._lister.list_dir(Source(folder_url, login.user, login.password))
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_dir and matches(entry.name, wanted):
                yield ProductRef(url=folder_url + quote(entry.name), name=entry.name,
                                 size=entry.size)
