"""No silent downgrade: a redirect from https:// to http:// is refused (the row says why)
unless the provider allows it. Loopback servers: HTTPS ones (a trustme CA, trusted by the CLI
through SSL_CERT_FILE) and a plain HTTP one."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from tests.conftest import cli
from tests.servers import FileServer


class Redirector:
    """An HTTPS server that answers /to/<path> with a 302 to `target + path`."""

    def __init__(self, tls: ssl.SSLContext, target: str) -> None:
        self.tls = tls
        self.target = target
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> Redirector:
        app = web.Application()
        app.router.add_get("/to/{path:.+}", self._redirect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def _redirect(self, request: web.Request) -> web.Response:
        # a pre-signed target, as object stores hand out
        raise web.HTTPFound(self.target + request.match_info["path"] + "?X-Signature=sig-5150")

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}/to/{path}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, dict[str, str]]:
    """A server TLS context for 127.0.0.1, and the environment that makes the CLI trust it."""
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context, {"SSL_CERT_FILE": str(path)}


@pytest.fixture
async def https_server(tls: tuple[ssl.SSLContext, dict[str, str]]) -> AsyncIterator[FileServer]:
    srv = await FileServer().start(tls[0])
    yield srv
    await srv.stop()


async def test_https_to_http_redirect_is_refused_unless_allowed(
        server: FileServer, tls: tuple[ssl.SSLContext, dict[str, str]], dsn: str,
        tmp_path: Path) -> None:
    data = os.urandom(3000)
    server.add("S1A.zip.bin", data)
    dest = tmp_path / "dest"
    downgrade = await Redirector(tls[0], server.base).start()

    def run(*args: str) -> tuple[int, str, str]:
        done = cli(*args, dsn=dsn, home=tmp_path, env=tls[1])
        return done.returncode, done.stdout, done.stderr

    try:
        code, out, err = await asyncio.to_thread(run, "get", downgrade.url("S1A.zip.bin"),
                                                 "--dest", str(dest), "--wait")
        assert code == 1, err
        [row] = json.loads((await asyncio.to_thread(run, "status", "--json"))[1])
        assert row["status"] == "failed" and row["attempts"] == 1  # permanent: not retried
        origin = f"https://127.0.0.1:{downgrade.port}"
        assert row["error"] == (
            f"refused a redirect from https to http ({origin}/to/S1A.zip.bin -> "
            f"{server.base}S1A.zip.bin): the file would travel unencrypted; set "
            "allow_insecure_redirects=true on the provider to allow it")
        assert server.requests == []  # refused before it was followed
        assert "sig-5150" not in out + err

        code, _out, err = await asyncio.to_thread(
            run, "provider", "add", "mirror", "--protocol", "http", "--url", origin + "/",
            "--set", "allow_insecure_redirects=true")
        assert code == 0, err
        code, _out, err = await asyncio.to_thread(
            run, "get", downgrade.url("S1A.zip.bin"), "--provider", "mirror", "--dest",
            str(dest), "--wait")
    finally:
        await downgrade.stop()
    assert code == 0, err
    assert (dest / "mirror" / "S1A.zip.bin").read_bytes() == data
    assert server.requests[-1]["path"] == "/files/S1A.zip.bin"


async def test_https_to_https_redirect_is_followed(
        https_server: FileServer, tls: tuple[ssl.SSLContext, dict[str, str]], dsn: str,
        tmp_path: Path) -> None:
    data = os.urandom(3000)
    https_server.add("S2B.zip.bin", data)
    hop = await Redirector(tls[0], https_server.base).start()
    try:
        r = await asyncio.to_thread(cli, "get", hop.url("S2B.zip.bin"), "--dest",
                                    str(tmp_path / "d"), "--wait", dsn=dsn, home=tmp_path,
                                    env=tls[1])
    finally:
        await hop.stop()
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / f"127.0.0.1_{hop.port}" / "S2B.zip.bin").read_bytes() == data
