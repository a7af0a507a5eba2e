"""Requests become download rows: URLs are matched to providers (or an implicit one per host)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from asyncsat import checksums
from asyncsat.catalogs.base import ProductRef
from asyncsat.catalogs.templates import has_glob
from asyncsat.db import queries
from asyncsat.errors import UsageError
from asyncsat.models import Checksum, Provider, Request
from asyncsat.naming import (
    SplitUrl,
    ftp_path,
    implicit_provider_name,
    sanitize,
    split_login,
    without_login,
)


def match_provider(url: str, providers: Sequence[Provider]) -> Provider | None:
    """The explicit provider whose base URL is the longest prefix of `url`."""
    best: Provider | None = None
    for p in providers:
        if not p.url or p.implicit:
            continue
        base = p.url if p.url.endswith("/") else p.url + "/"
        if (url.lower().startswith(base.lower()) or url.lower() == p.url.lower()) and (
            best is None or len(p.url) > len(best.url or "")
        ):
            best = p
    return best


def parse_urls(urls: Sequence[str]) -> list[SplitUrl]:
    """Validate every URL first, so that one bad URL writes nothing."""
    if not urls:
        raise UsageError("no URL given")
    return [split_login(u) for u in urls]


async def queue_urls(
    conn: Any, request_id: int, urls: Sequence[SplitUrl], *, provider: Provider | None,
    dest: str, checksum: Checksum | None,
) -> list[int]:
    """Insert one download per URL for a request (inside the caller's transaction)."""
    providers = await queries.provider_list(conn)
    ids = []
    for u in urls:
        owner = provider or await provider_for(conn, u.url, providers)
        ids.append(await queries.download_add(
            conn, request_id=request_id, provider_id=owner.id, url=u.url, name=None, dest=dest,
            size=None, checksum=checksum, login_user=u.user, login_secret=u.password,
        ))
    return ids


async def queue_products(
    conn: Any, request_id: int, provider: Provider, products: Sequence[ProductRef], *,
    dest: str, login: SplitUrl | None = None, revive: bool = True,
    offline_in: float = 60.0,
) -> list[int]:
    """Insert one download per product a catalog found (inside the caller's transaction).

    A catalog name is sanitised; one that another download of the folder already has (daily
    folders that reuse a file name) is left for the transfer to choose (`name_<id>`). A
    product the catalog reports offline waits `offline_in` seconds before it is looked at.
    """
    ids = []
    for p in products:
        name = (sanitize(p.name) if p.name else "") or None
        ids.append(await queries.download_add(
            conn, request_id=request_id, provider_id=provider.id, url=p.url, name=name,
            dest=dest, size=p.size, checksum=p.checksum,
            login_user=login.user if login else None,
            login_secret=login.password if login else None,
            size_origin="catalog" if p.size_binding else "server", product_id=p.id,
            offline_in=None if p.online else offline_in, revive=revive,
        ))
    return ids


async def provider_for(conn: Any, url: str, providers: Sequence[Provider] | None = None) -> \
        Provider:
    """The explicit provider whose base URL is the longest prefix, else the host's implicit one."""
    if providers is None:
        providers = await queries.provider_list(conn)
    return match_provider(url, providers) or await _implicit(conn, url)


def is_pattern(url: str) -> bool:
    """An FTP URL with wildcards (percent-encoded or not): a folder listing expands it."""
    return urlsplit(url).scheme.lower() in ("ftp", "ftps") and has_glob(ftp_path(url))


def needs_catalog(request: Request) -> bool:
    """A search, or URLs with patterns: resolved by a catalog adapter, over the network."""
    return request.search is not None or any(
        isinstance(u, str) and is_pattern(u) for u in request.urls or [])


async def _implicit(conn: Any, url: str) -> Provider:
    parts = urlsplit(url)
    protocol = "ftp" if parts.scheme in ("ftp", "ftps") else "http"
    return await queries.provider_ensure_implicit(
        conn, implicit_provider_name(url), protocol, f"{parts.scheme}://{parts.netloc}/"
    )


async def resolve(conn: Any, request: Request, default_dest: Path) -> tuple[str, str | None, int]:
    """Resolve a queued request row (inserted by psql or the CLI): (status, error, downloads)."""
    if request.search is not None and not request.urls:
        return await fail(conn, request, "catalog searches are not supported yet")
    try:
        urls = parse_urls(request.urls or [])
        checksum = checksums.parse(request.checksum) if request.checksum else None
        if checksum and len(urls) != 1:
            raise UsageError("a checksum applies to a request of exactly one URL")
    except UsageError as exc:
        return await fail(conn, request, exc.message)
    provider = None
    if request.provider_id is not None:
        provider = next((p for p in await queries.provider_list(conn)
                         if p.id == request.provider_id), None)
    dest = request.dest or str(default_dest)
    ids = await queue_urls(conn, request.id, urls, provider=provider, dest=dest,
                           checksum=checksum)
    await queries.request_finish(conn, request.id, "resolved", None, [u.url for u in urls])
    return "resolved", None, len(ids)


async def fail(conn: Any, request: Request, error: str) -> tuple[str, str | None, int]:
    """Mark a request failed; logins are taken out of the URLs it keeps."""
    urls = [without_login(u) if isinstance(u, str) else u for u in request.urls or []]
    await queries.request_finish(conn, request.id, "failed", error,
                                 urls if request.urls else None)
    return "failed", error, 0
