"""Real servers on loopback for tests and benchmarks.

`FileServer` is an aiohttp server that behaves like a product provider: Range and
If-Range, ETag and Last-Modified, 206/416, basic auth, per-user connection counting,
and injectable faults (dropped connections, 429 with Retry-After, 5xx, ignored Range,
changed content, bandwidth caps). `PgCluster` runs a throwaway PostgreSQL server that
tests can stop and start again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

from aiohttp import web


@dataclass
class Product:
    """One file served at /files/<name>, with the faults to inject for it."""

    data: bytes = b""
    path: Path | None = None  # serve from disk (large files) instead of `data`
    etag: str | None = None
    last_modified: float = 1_700_000_000.0
    content_disposition: str | None = None
    ignore_range: bool = False
    drop_after: list[int] = field(default_factory=list)  # per response: bytes, then drop
    statuses: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    rate: float | None = None  # bytes/s per connection
    no_length: bool = False

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path else len(self.data)

    def digest(self, algo: str = "md5") -> str:
        h = hashlib.new(algo)
        if self.path:
            with self.path.open("rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        else:
            h.update(self.data)
        return h.hexdigest()

    def read(self, start: int, end: int) -> bytes:
        if self.path is None:
            return self.data[start:end]
        with self.path.open("rb") as f:
            f.seek(start)
            return f.read(end - start)


class FileServer:
    """An HTTP provider on 127.0.0.1, started with `await server.start()`."""

    def __init__(self, *, users: dict[str, str] | None = None,
                 max_per_user: int | None = None, chunk: int = 64 * 1024) -> None:
        self.products: dict[str, Product] = {}
        self.users = users or {}
        self.max_per_user = max_per_user
        self.chunk = chunk
        self.requests: list[dict[str, object]] = []
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.over_limit = 0
        self.bytes_sent = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scheme = "http"
        self.app = web.Application()
        self.app.router.add_get("/files/{name:.+}", self.handle)

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/files/"

    def url(self, name: str, *, user: str | None = None, password: str | None = None) -> str:
        login = f"{user}:{password}@" if user else ""
        return f"{self.scheme}://{login}127.0.0.1:{self.port}/files/{name}"

    def add(self, name: str, data: bytes | None = None, **kw: object) -> Product:
        product = Product(data=data or b"", **kw)  # type: ignore[arg-type]
        if product.etag is None:
            product.etag = '"' + hashlib.md5(product.data or name.encode()).hexdigest()[:16] + '"'
        self.products[name] = product
        return product

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> FileServer:
        """Serve on loopback; over HTTPS with `ssl_context`."""
        self.scheme = "https" if ssl_context is not None else "http"
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _user(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else "!bad"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        self.requests.append({"path": request.path, "range": request.headers.get("Range"),
                              "if_range": request.headers.get("If-Range"), "user": user,
                              "t": time.monotonic()})
        key = user or "anonymous"
        self.active[key] += 1
        self.peak[key] = max(self.peak[key], self.active[key])
        try:
            if self.max_per_user is not None and self.active[key] > self.max_per_user:
                self.over_limit += 1
                return web.Response(status=429, headers={"Retry-After": "1"},
                                    text="Max session number exceeded")
            if self.users and (user is None or user == "!bad"):
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})
            product = self.products.get(request.match_info["name"])
            if product is None:
                return web.Response(status=404, text="not found")
            if product.statuses:
                status, headers, body = product.statuses.pop(0)
                if status != 200:
                    return web.Response(status=status, headers=headers, body=body)
            return await self._send(request, product)
        finally:
            self.active[key] -= 1

    async def _send(self, request: web.Request, product: Product) -> web.StreamResponse:
        size = product.size
        start, status = 0, 200
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        fresh = if_range is None or if_range in (product.etag,
                                                 formatdate(product.last_modified, usegmt=True))
        if range_header and not product.ignore_range and fresh:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
        headers = {"ETag": product.etag or "",
                   "Last-Modified": formatdate(product.last_modified, usegmt=True),
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if product.content_disposition:
            headers["Content-Disposition"] = product.content_disposition
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        if not product.no_length:
            response.content_length = size - start
        await response.prepare(request)
        drop = product.drop_after.pop(0) if product.drop_after else None
        await self._stream(request, response, product, start, size, drop)
        return response

    async def _stream(self, request: web.Request, response: web.StreamResponse,
                      product: Product, start: int, size: int, drop: int | None) -> None:
        pos, sent = start, 0
        began = time.monotonic()
        while pos < size:
            n = min(self.chunk, size - pos)
            if drop is not None and sent + n > drop:
                n = drop - sent
                if n:
                    await response.write(product.read(pos, pos + n))
                    self.bytes_sent += n
                # let the client read what was sent (a real drop comes at a random time
                # after the last delivered bytes), then cut the connection
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError  # end the handler; the client sees a short body
            if product.rate:  # each chunk leaves when the rate allows it: the last byte
                # goes out at the end of the transfer, and the answer ends with it
                ahead = (sent + n) / product.rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await response.write(product.read(pos, pos + n))
            pos, sent = pos + n, sent + n
            self.bytes_sent += n
        await response.write_eof()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for version in ("18", "17", "16", "15"):
        candidate = f"/usr/lib/postgresql/{version}/bin/{name}"
        if os.path.exists(candidate):
            return candidate
    raise RuntimeError(f"{name} not found: install PostgreSQL (apt-get install postgresql)")


class PgCluster:
    """A throwaway PostgreSQL server on 127.0.0.1 that tests can stop and start.

    Runs as the `postgres` system user when the tests run as root. The role `asyncsat`
    is a non-superuser that owns the databases the tests use.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        """Keep fsync and synchronous commits (benchmarks); tests trade them for speed."""
        self.root = Path(tempfile.mkdtemp(prefix="asyncsat-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.root)

    def init(self) -> PgCluster:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        self.start()
        self.psql("CREATE ROLE asyncsat LOGIN NOSUPERUSER CREATEDB")
        return self

    def start(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.root / "log"),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
                  + ("" if self.durable else
                     " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"),
                  "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")

    def psql(self, sql: str, db: str = "postgres", user: str = "postgres") -> str:
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", db,
             "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
            check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def dsn(self, db: str, user: str = "asyncsat") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

