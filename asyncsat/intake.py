"""Requests become download rows: URLs are matched to providers (or an implicit one per host)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from asyncsat import checksums
from asyncsat.catalogs.base import ProductRef
from asyncsat.catalogs.templates import has_glob
from asyncsat.db import queries
from asyncsat.errors import UsageError
from asyncsat.models import Added, Checksum, Provider, Request
from asyncsat.naming import (
    SplitUrl,
    ftp_path,
    implicit_provider_name,
    sanitize,
    split_login,
    unique_name,
    without_login,
)
from asyncsat.transfer.files import NOT_THE_PRODUCT, place, placed


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


@dataclass(frozen=True)
class Link:
    """A done product to put into the folder a request asked for (after its transaction)."""

    download_id: int
    source: Path
    target: Path


@dataclass
class Asked:
    """What became of the products a request asked for (inside its transaction).

    The rule: a product is fetched once. One not done yet is left to its transfer
    (`queued`; failed and cancelled ones are queued again, but by a standing request's later
    runs). One done whose file is where the request wants it is `done`. One done whose file
    is gone (deleted, moved away downstream) is fetched again (`refetched`), into the folder
    asked for; a standing request's later runs leave it (`gone`). Asked into another folder
    than the one its download uses, a done product is hard-linked (else copied) there after
    the transaction (`links`); one not done yet is put there by the daemon once done (`owed`).
    """

    ids: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    done: list[tuple[int, str]] = field(default_factory=list)
    refetched: list[tuple[int, str]] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    owed: list[int] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)

    def add(self, other: Asked) -> None:
        """Count `other`'s products in as well (a request queued in several steps)."""
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def counts(self) -> dict[str, int]:
        """How many products went each way (for a log line)."""
        return {k: len(v) for k, v in (("queued", self.queued), ("done", self.done),
                                       ("refetched", self.refetched), ("linked", self.links),
                                       ("owed", self.owed), ("gone", self.gone)) if v}


async def _settle(conn: Any, request_id: int, added: Added, provider: Provider, dest: str,
                  revive: bool, asked: Asked) -> None:
    """Apply the rule of `Asked` to one product (its file looked at on disk)."""
    asked.ids.append(added.id)
    if not added.first_ask:  # a standing request found its own product again
        if added.status == "done":
            asked.done.append((added.id, added.path or ""))
        else:
            asked.queued.append(added.id)
        return
    folder = Path(dest)
    elsewhere = added.dest is not None and Path(added.dest) != folder
    if added.status != "done":
        if elsewhere:
            await queries.copy_owed(conn, request_id, added.id, dest)
            asked.owed.append(added.id)
        else:
            asked.queued.append(added.id)
        return
    target = folder / provider.name / added.name if added.name else None
    # (someone else's file at the name in the folder asked for is not the product: it is put
    # there under the other name, `deliver`)
    if target is not None and (placed(Path(added.path), target) if added.path
                               else target.exists()):
        asked.done.append((added.id, str(target)))
    elif target is not None and added.path and Path(added.path).exists():
        asked.links.append(Link(added.id, Path(added.path), target))
    elif not revive:
        asked.gone.append(added.id)
    else:
        await queries.download_refetch(conn, added.id, dest if elsewhere else None)
        asked.refetched.append((added.id, added.path or str(target or folder)))


def deliver(links: Sequence[Link]) -> list[tuple[Link, str]]:
    """Put each done product into the folder asked for: (link, `linked`, `copied`, `there`,
    or why not). Blocking: a copy across file systems may take long."""
    results = []
    for link in links:
        try:
            how = place(link.source, link.target)
            if how == NOT_THE_PRODUCT:  # (someone else's file: the other name, as a
                # download takes it)
                other = replace(link, target=link.target.with_name(
                    unique_name(link.target.name, link.download_id)))
                how, link = place(other.source, other.target), other
        except OSError as exc:
            how = f"not put there: {exc.strerror or exc}"
        results.append((link, how))
    return results


async def queue_urls(
    conn: Any, request_id: int, urls: Sequence[SplitUrl], *, provider: Provider | None,
    dest: str, checksum: Checksum | None,
) -> Asked:
    """Insert one download per URL for a request (inside the caller's transaction)."""
    providers = await queries.provider_list(conn)
    owners = [provider or await provider_for(conn, u.url, providers) for u in urls]
    added = await queries.download_add_many(conn, request_id, dest, [
        queries.NewDownload(owner.id, u.url, checksum=checksum, login_user=u.user,
                            login_secret=u.password, size_origin="catalog")
        for u, owner in zip(urls, owners, strict=True)])
    asked = Asked()
    for one, owner in zip(added, owners, strict=True):
        await _settle(conn, request_id, one, owner, dest, True, asked)
    return asked


async def queue_products(
    conn: Any, request_id: int, provider: Provider, products: Sequence[ProductRef], *,
    dest: str, login: SplitUrl | None = None, revive: bool = True,
    offline_in: float = 60.0,
) -> Asked:
    """Insert one download per product a catalog found (inside the caller's transaction).

    A catalog name is sanitised; one that another download of the folder already has (daily
    folders that reuse a file name) is left for the transfer to choose (`name_<id>`). A
    product the catalog reports offline waits `offline_in` seconds before it is looked at.
    """
    added = await queries.download_add_many(conn, request_id, dest, [
        queries.NewDownload(
            provider.id, p.url, name=(sanitize(p.name) if p.name else "") or None,
            size=p.size, checksum=p.checksum, login_user=login.user if login else None,
            login_secret=login.password if login else None,
            size_origin="catalog" if p.size_binding else "server", product_id=p.id,
            offline_in=None if p.online else offline_in)
        for p in products], revive=revive)
    asked = Asked()
    for one in added:
        await _settle(conn, request_id, one, provider, dest, revive, asked)
    return asked


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


def check_dest(dest: str | None) -> None:
    """UsageError unless `dest` (of a row inserted with psql) is empty or absolute: a
    relative one would be a folder under the daemon's working directory."""
    if dest and not Path(dest).is_absolute():
        raise UsageError(f"dest {dest!r} is not an absolute path")


async def resolve(conn: Any, request: Request, default_dest: Path) -> \
        tuple[str, str | None, Asked]:
    """Resolve a queued request row (inserted by psql or the CLI): (status, error, what
    became of its products)."""
    if request.search is not None and not request.urls:
        return await fail(conn, request, "catalog searches are not supported yet")
    try:
        check_dest(request.dest)
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
    asked = await queue_urls(conn, request.id, urls, provider=provider, dest=dest,
                             checksum=checksum)
    await queries.request_finish(conn, request.id, "resolved", None, [u.url for u in urls])
    return "resolved", None, asked


async def fail(conn: Any, request: Request, error: str) -> tuple[str, str | None, Asked]:
    """Mark a request failed; logins are taken out of the URLs it keeps."""
    urls = [without_login(u) if isinstance(u, str) else u for u in request.urls or []]
    await queries.request_finish(conn, request.id, "failed", error,
                                 urls if request.urls else None)
    return "failed", error, Asked()
