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

from asyncsat.auth.base import Auth
from asyncsat.catalogs.base import ProductRef, Query
from asyncsat.catalogs.templates import check_template, expand, matches, split_pattern
from asyncsat.errors import CatalogError, NotFoundError, UsageError
from asyncsat.models import Download, Provider
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

    async def search(self, query: Query, auth: Auth, since: datetime | None = None) -> \
            AsyncGenerator[ProductRef, None]:
        template = layout(self._provider, query)
        if not self._provider.url:
            raise CatalogError(f"provider {self._provider.name} has no URL to search")
        now = datetime.now(UTC)
        start = query.start or now
        if since is not None:  # a standing request: only the days since its last run
            start = max(start, since)
        by_folder: dict[str, list[str]] = {}
        for pattern in expand(template, start, query.end or now):
            folder, name = split_pattern("/" + pattern.lstrip("/"))
            by_folder.setdefault(folder, []).append(name)
        base = self._provider.url.rstrip("/")
        async with self._lister.folders(Source(base + "/", auth)) as \
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

    async def expand(self, pattern: str, auth: Auth) -> AsyncGenerator[ProductRef, None]:
        parts = urlsplit(pattern)
        folder, wanted = split_pattern(ftp_path(pattern))
        folder_url = urlunsplit((parts.scheme, parts.netloc, quote(folder), "", ""))
        async with self._lister.folders(Source(folder_url, auth)) as \
                session:
            entries = await session.listing(folder_url)
        for ref in _matching(entries, folder_url, [wanted]):
            yield ref

    async def order(self, download: Download, auth: Auth) -> float | None:
        raise CatalogError("this catalog cannot order archived products")

    async def prepare(self, download: Download, auth: Auth) -> Source:
        return Source(download.url, auth)  # a listed file is there to fetch


def layout(provider: Provider, query: Query) -> str:
    """The folder layout a search of an FTP provider lists, checked (UsageError if unfit):
    a layout named in the provider's `collections` setting, else the collection itself."""
    if query.bbox is not None or query.wkt is not None or query.filters:
        raise UsageError("an FTP provider can only search by collection and dates "
                         "(no --bbox, --wkt or --filter)")
    layouts = provider.settings.get("collections")
    template = query.collection
    if isinstance(layouts, Mapping) and isinstance(layouts.get(query.collection), str):
        template = str(layouts[query.collection])
    check_template(template)
    if "{" in template and query.start is None:
        raise UsageError(f"collection {query.collection!r} is laid out by date: "
                         "give --start (and --end, default now)")
    split_pattern("/" + template.lstrip("/"))
    return template


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
