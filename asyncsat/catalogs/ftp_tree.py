"""An FTP tree as a catalog: URL patterns and date-templated folder layouts, by listing.

Operational feeds lay their files out by date (`sst/2024/03/sst_20240301_v2.nc`). A
provider's settings name such layouts (`{"collections": {"sst": "sst/{date:%Y/%m}/
sst_{date:%Y%m%d}_*.nc"}}`), or the collection given to `search` is the layout itself,
relative to the provider's URL. Each day of the range gives a folder and a name pattern;
each folder is listed once (MLSD, else LIST) and the names that match become products,
with their size known before the transfer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import structlog

from asyncsat.catalogs.base import ProductRef, Query
from asyncsat.catalogs.templates import expand, matches, split_pattern
from asyncsat.errors import CatalogError, NotFoundError
from asyncsat.models import Provider
from asyncsat.naming import ftp_path
from asyncsat.transfer.base import Folders, RemoteEntry, Source

log = structlog.get_logger("asyncsat")


class Lister(Protocol):
    """Opens folder-listing sessions (the transfer drivers)."""

    def folders(self, source: Source) -> AbstractAsyncContextManager[Folders]:
        """A logged-in session on the server of `source.url`."""
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

    async def search(self, query: Query, login: Source) -> AsyncGenerator[ProductRef, None]:
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
        by_folder: dict[str, list[str]] = {}
        for pattern in expand(template, query.start or now, query.end or now):
            folder, name = split_pattern("/" + pattern.lstrip("/"))
            by_folder.setdefault(folder, []).append(name)
        base = self._provider.url.rstrip("/")
        async with self._lister.folders(Source(base + "/", login.user, login.password)) as \
                session:
            for folder, names in by_folder.items():
                folder_url = base + quote(folder)
                try:
                    entries = await session.listing(folder_url)
                except NotFoundError as exc:  # no folder for those days: no data then
                    log.info("nothing to list", provider=self._provider.name, folder=folder,
                             reason=exc.message)
                    continue
                for ref in _matching(entries, folder_url, names):
                    yield ref

    async def expand(self, pattern: str, login: Source) -> AsyncGenerator[ProductRef, None]:
        parts = urlsplit(pattern)
        folder, wanted = split_pattern(ftp_path(pattern))
        folder_url = urlunsplit((parts.scheme, parts.netloc, quote(folder), "", ""))
        async with self._lister.folders(Source(folder_url, login.user, login.password)) as \
                session:
            entries = await session.listing(folder_url)
        for ref in _matching(entries, folder_url, [wanted]):
            yield ref


def _matching(entries: list[RemoteEntry], folder_url: str, patterns: list[str]) -> \
        list[ProductRef]:
    """The files of a listing that match any pattern, by name.

    A size from a listing is not binding: a near-real-time feed lists files still being
    uploaded, and the transfer then finds them larger.
    """
    return [
        ProductRef(url=folder_url + quote(e.name), name=e.name, size=e.size, size_binding=False)
        for e in sorted(entries, key=lambda e: e.name)
        if not e.is_dir and any(matches(e.name, p) for p in patterns)
    ]
