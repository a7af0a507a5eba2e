"""JSON over HTTP for catalog APIs (OData, STAC, ...): auth, error mapping, one session.

Every call is sent while the caller holds a slot of the account. A 401 to a token is
renewed once and the call repeated; errors become asyncsat errors with the server's own
reason (a 400 naming the filter it could not parse, a 429 with its Retry-After).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog

from asyncsat.auth.base import Auth
from asyncsat.errors import AuthError, PermanentError, RetryableError
from asyncsat.retry import Policy, decide
from asyncsat.transfer.http import USER_AGENT, error_for_status, keep_home, map_exceptions

log = structlog.get_logger("asyncsat")

MAX_BODY = 64 << 20
"""A catalog page larger than this is refused (a misbehaving server, not a page)."""


class JsonClient:
    """GET and POST of JSON documents; the session is made on first use."""

    def __init__(self, *, timeout: float = 120.0) -> None:
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout, sock_connect=30),
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
        return self._session

    async def get(self, url: str, auth: Auth, params: dict[str, str] | None = None, *,
                  policy: Policy | None = None) -> Any:
        return await self.send("GET", url, auth, params=params, policy=policy)

    async def post(self, url: str, auth: Auth, body: Any, *,
                   policy: Policy | None = None) -> Any:
        return await self.send("POST", url, auth, body=body, policy=policy)

    async def send(self, method: str, url: str, auth: Auth, *,
                   params: dict[str, str] | None = None, body: Any = None,
                   headers: dict[str, str] | None = None, policy: Policy | None = None) -> Any:
        """The decoded JSON answer; asyncsat errors for error statuses and non-JSON.

        With a `policy`, transient faults of this one call (429 with Retry-After, 5xx,
        timeouts, dropped connections) are retried as downloads are, so that one bad
        moment in a search of a thousand pages costs a page, not the search.
        """
        failures = 0
        while True:
            try:
                return await self._send(method, url, auth, params=params, body=body,
                                        headers=headers)
            except RetryableError as exc:
                if policy is None or isinstance(exc, AuthError):
                    raise
                decision = decide(exc, failures, False, policy)
                if decision.action != "retry":
                    raise
                failures = decision.failures
                log.warning("catalog call retried", url=shown(url), error=exc.message,
                            retry_in=round(decision.delay, 2))
                await asyncio.sleep(decision.delay)

    async def _send(self, method: str, url: str, auth: Auth, *,
                    params: dict[str, str] | None, body: Any,
                    headers: dict[str, str] | None) -> Any:
        with map_exceptions():
            sent = await auth.headers()
            status, reason, retry_after, raw = await self._once(
                method, url, {**sent, **(headers or {})}, params, body)
            if status == 401 and auth.rejected(sent):
                sent = await auth.headers()
                status, reason, retry_after, raw = await self._once(
                    method, url, {**sent, **(headers or {})}, params, body)
        if status >= 400:
            raise error_for_status(status, reason, retry_after, _detail(raw))
        try:
            return json.loads(raw)
        except ValueError:
            raise RetryableError(f"the catalog answered HTTP {status} with no JSON "
                                 f"({len(raw)} bytes)") from None

    async def probe(self, method: str, url: str, auth: Auth) -> tuple[int, dict[str, str], str]:
        """One request whose answer is read as it is: (status, headers, the start of the
        body as text). For APIs that speak in status codes (an archive order's 202)."""
        with map_exceptions():
            for renewal in (True, False):
                sent = await auth.headers()
                async with self._http().request(method, url, headers=sent,
                                                middlewares=_home(url, sent)) as response:
                    if response.status == 401 and renewal and auth.rejected(sent):
                        continue  # a token renewed once, the same request again
                    body = await response.content.read(4096)
                    return (response.status, dict(response.headers),
                            body.decode("utf-8", "replace"))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, method: str, url: str, headers: dict[str, str],
                    params: dict[str, str] | None, body: Any) -> tuple[int, str, str | None, bytes]:
        async with self._http().request(method, url, params=params, json=body,
                                        headers=headers,
                                        middlewares=_home(url, headers)) as response:
            buffer = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                buffer += chunk
                if len(buffer) > MAX_BODY:
                    raise PermanentError(
                        f"the catalog page at {shown(url)} is larger than {MAX_BODY} bytes")
            raw = bytes(buffer)
            return (response.status, response.reason or "", response.headers.get("Retry-After"),
                    raw)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _home(url: str, sent: dict[str, str]) -> tuple[aiohttp.ClientMiddlewareType, ...] | None:
    """The middleware that keeps a login header of its own (M2M's key) on `url`'s origin
    through redirects; None (the session's: none) when the headers hold no such one."""
    home = keep_home(url, sent)
    return None if home is None else (home,)


def shown(url: str) -> str:
    """A URL fit for a log line: no query (it may hold a token)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def same_origin(url: str, root: str) -> bool:
    """True when `url` is on the host of `root`, with no weaker scheme: a next link that
    points elsewhere is followed without the account's credentials."""
    a, b = urlsplit(url), urlsplit(root)
    return (a.hostname or "").lower() == (b.hostname or "").lower() and \
        a.port == b.port and (a.scheme == b.scheme or a.scheme == "https")


def _detail(raw: bytes) -> str:
    """The server's reason in one short line: OData/FastAPI `detail`, STAC `description`,
    `message`, `error`; else the start of the body."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return " ".join(raw[:200].decode("utf-8", "replace").split())
    found = _find_message(doc)
    return " ".join(found.split())[:300] if found else ""


def _find_message(doc: Any) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, list):
        return "; ".join(m for m in (_find_message(d) for d in doc[:3]) if m)
    if isinstance(doc, dict):
        for key in ("detail", "description", "message", "msg", "error_description", "error"):
            if key in doc:
                inner = _find_message(doc[key])
                if inner:
                    loc = doc.get("loc")
                    where = ".".join(str(x) for x in loc) if isinstance(loc, list) else ""
                    return f"{where}: {inner}" if where else inner
    return ""
