"""Helpers shared by the integration and acceptance tests."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
from pathlib import Path
from typing import Any

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import apply_schema, connect
from asyncsat.logs import Redactor


async def queue(dsn: str, *urls: str, dest: Path | None = None, checksum: str | None = None,
                provider: str | None = None) -> int:
    """Insert a request row the way a psql user would; returns its id."""
    conn = await connect(dsn)
    try:
        provider_id = None
        if provider:
            found = await queries.provider_get(conn, provider)
            assert found is not None
            provider_id = found.id
        return await queries.request_insert(
            conn, provider_id=provider_id, urls=list(urls), search=None,
            dest=str(dest) if dest else None, checksum=checksum, status="queued")
    finally:
        await conn.close()


FAST = {"backoff_initial": 0.05, "backoff_max": 0.3}
"""Provider settings for tests: retries within a fraction of a second."""


async def schema_database(cluster: Any, name: str) -> str:
    """A new database of `cluster` (a tests.servers.PgCluster) with asyncsat's schema: its
    DSN."""
    cluster.psql(f"CREATE DATABASE {name} OWNER asyncsat")
    dsn: str = cluster.dsn(name)
    conn = await connect(dsn)
    try:
        await apply_schema(conn, always=True)
    finally:
        await conn.close()
    return dsn


async def sql(dsn: str, query: str, *args: object) -> list[Any]:
    """Run one statement on its own connection; the rows it returns."""
    conn = await connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def named_row(dsn: str, settings: Settings, url: str, name: str | None,
                    size: int | None = None, checksum: tuple[str, str] | None = None) -> int:
    """A download row of provider `local` inserted with psql, naming its file (and its size,
    as a catalog does; no name: as a URL's row); its id."""
    algo, value = checksum or (None, None)
    [row] = await sql(
        dsn, "INSERT INTO download (provider_id, url, name, size, checksum_algo,"
             " checksum_value, dest) SELECT id, $1, $2, $3, $4, $5, $6 FROM provider"
             " WHERE name = 'local' RETURNING id",
        url, name, size, algo, value, str(settings.dest))
    return int(row["id"])


def local_folder(settings: Settings) -> Path:
    """Where the files of provider `local` land."""
    assert settings.dest is not None
    return settings.dest / "local"


async def drain(settings: Settings, timeout: float = 60) -> None:
    """Run the daemon in this process until the queue is empty."""
    await asyncio.wait_for(daemon.serve(settings, Redactor(), exit_when_idle=True), timeout)


async def rows(dsn: str) -> list[dict[str, Any]]:
    conn = await connect(dsn)
    try:
        return await queries.status_rows(conn)
    finally:
        await conn.close()


async def add_provider(dsn: str, name: str, url: str, settings: dict[str, object] | None = None,
                       credentials: list[tuple[str, str, int]] | None = None,
                       protocol: str = "http") -> None:
    conn = await connect(dsn)
    try:
        p = await queries.provider_add(conn, name, protocol, url, settings or {})
        for user, secret, n in credentials or []:
            await queries.credential_upsert(conn, p.id, user, secret, n)
    finally:
        await conn.close()


async def search_request(dsn: str, provider_id: int, query: Any, *, follow: bool = False,
                         dest: Path | None = None) -> int:
    """Insert a search request the way `asyncsat search` does; returns its id."""
    conn = await connect(dsn)
    try:
        return await queries.request_insert(
            conn, provider_id=provider_id, urls=None, search=query.to_json(),
            dest=str(dest) if dest else None, checksum=None, status="queued", follow=follow)
    finally:
        await conn.close()


async def request_summary_of(dsn: str, request_id: int) -> dict[str, Any]:
    """A request as `status --requests --json` shows it."""
    from asyncsat.render import request_summary

    conn = await connect(dsn)
    try:
        return request_summary((await queries.request_rows(conn, request_id))[0])
    finally:
        await conn.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident(path: Path, start: int = 0, end: int | None = None) -> int:
    """Bytes of `path` between `start` and `end` that are in the page cache (mincore(2) on
    a mapping of the file, which reads no page in)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    first = start // mmap.PAGESIZE
    last = pages if end is None else end // mmap.PAGESIZE
    return sum(vec[i] & 1 for i in range(first, last)) * mmap.PAGESIZE
