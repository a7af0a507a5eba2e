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


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """`app` on 127.0.0.1, on a port of its own: (its runner, the port)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


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
        self._runner, self.port = await _serve(app)
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


class TokenServer:
    """A token endpoint at /token that answers 307 to `where` (a redirect that keeps the
    method and the body), recording every body it or its target receives."""

    def __init__(self) -> None:
        self.bodies: list[tuple[int, str]] = []
        self.where = ""
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> TokenServer:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/login-token", self._token)  # (M2M's login)
        app.router.add_post("/moved", self._moved)
        self._runner, self.port = await _serve(app)
        return self

    async def _token(self, request: web.Request) -> web.Response:
        self.bodies.append((self.port, await request.text()))
        raise web.HTTPTemporaryRedirect(self.where)

    async def _moved(self, request: web.Request) -> web.Response:
        self.bodies.append((self.port, await request.text()))
        return web.json_response({"access_token": "tok-1", "expires_in": 300,
                                  "data": "api-key-1", "errorCode": None})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_a_login_posted_to_a_token_endpoint_does_not_follow_it_elsewhere() -> None:
    """The password grant's body (the account's password) and M2M's login (its token) are
    not posted again to another server a 307 points to: aiohttp re-sends a 307's body to
    any origin. The same server's redirect is followed as before."""
    import aiohttp

    from asyncsat.auth.m2m import ApiKeySource
    from asyncsat.auth.oauth import TokenSource
    from asyncsat.errors import TransferError

    home, other = await TokenServer().start(), await TokenServer().start()
    try:
        async with aiohttp.ClientSession() as session:
            for target, ok in ((f"http://127.0.0.1:{home.port}/moved", True),
                               (f"http://127.0.0.1:{other.port}/moved", False)):
                home.where = target
                oauth = TokenSource(session, token_url=f"http://127.0.0.1:{home.port}/token",
                                    client_id="c", user="alice", password="pw-of-alice",
                                    on_token=lambda _t: None)
                m2m = ApiKeySource(session, root=f"http://127.0.0.1:{home.port}/",
                                   user="bob", token="token-of-bob", on_key=lambda _k: None)
                for source in (oauth, m2m):
                    if ok:
                        assert await source.headers()
                    else:
                        with pytest.raises(TransferError, match="another server"):
                            await source.headers()
    finally:
        await home.stop()
        await other.stop()
    assert other.bodies == []
    assert [port for port, _ in home.bodies].count(home.port) == 6
