"""An API key in a header of its own (M2M's `X-Auth-Token`) stays on the server it was sent
to, as aiohttp keeps `Authorization`: a redirect to another origin goes without it, in a
transfer and in a catalog call. aiohttp drops only Authorization, Cookie and
Proxy-Authorization across origins; the key went along to wherever the redirect pointed.
Two real loopback servers: the provider's, which redirects, and another one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from asyncsat.auth.base import Auth
from asyncsat.catalogs.client import JsonClient
from asyncsat.transfer.base import Source, Validator
from asyncsat.transfer.http import HttpDriver


class KeyAuth(Auth):
    user = "usgs-user"

    async def headers(self) -> dict[str, str]:
        return {"X-Auth-Token": "api-key-7731"}


class Server:
    """/to?where=<url> answers 302 to it; /file and /json answer, recording the key seen."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> Server:
        app = web.Application()
        app.router.add_get("/to", self._to)
        app.router.add_get("/file", self._file)
        app.router.add_get("/json", self._json)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _note(self, request: web.Request) -> None:
        self.seen.append((request.path, request.headers.get("X-Auth-Token")))

    async def _to(self, request: web.Request) -> web.Response:
        self._note(request)
        raise web.HTTPFound(request.query["where"])

    async def _file(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.Response(body=b"x" * 100)

    async def _json(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.json_response({"ok": True})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Server, Server]]:
    home, other = await Server().start(), await Server().start()
    yield home, other
    await home.stop()
    await other.stop()


async def test_a_transfer_redirected_elsewhere_leaves_the_api_key_home(
        servers: tuple[Server, Server]) -> None:
    home, other = servers
    driver = HttpDriver.create()
    try:
        for target in (home.url("/file"), other.url("/file")):
            url = home.url("/to") + "?where=" + target
            async with driver.open(Source(url, KeyAuth()), 0, Validator()) as stream:
                assert stream.response is not None
                await stream.response.read()
    finally:
        await driver.aclose()
    assert home.seen == [("/to", "api-key-7731"), ("/file", "api-key-7731"),
                         ("/to", "api-key-7731")]
    assert other.seen == [("/file", None)]


async def test_a_catalog_call_redirected_elsewhere_leaves_the_api_key_home(
        servers: tuple[Server, Server]) -> None:
    home, other = servers
    client = JsonClient()
    try:
        for target in (home.url("/json"), other.url("/json")):
            assert await client.get(home.url("/to"), KeyAuth(), {"where": target}) == \
                {"ok": True}
        await client.probe("GET", home.url("/to") + "?where=" + other.url("/json"), KeyAuth())
    finally:
        await client.aclose()
    assert home.seen == [("/to", "api-key-7731"), ("/json", "api-key-7731")] + \
        [("/to", "api-key-7731")] * 2
    assert other.seen == [("/json", None)] * 2
