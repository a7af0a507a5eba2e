"""The HTTP(S) driver (aiohttp): Range/If-Range resume, status codes mapped to asyncsat errors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
import yarl

from asyncsat.errors import (
    AuthError,
    NotFoundError,
    OfflineError,
    PermanentError,
    RetryableError,
    TransferError,
)
from asyncsat.naming import name_from_content_disposition
from asyncsat.transfer.base import Opened, Source, Validator

USER_AGENT = "asyncsat/0.1"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504, 509, 520, 521, 522, 523, 524})
_ERROR_MESSAGE = re.compile(
    r"<message[^>]*>(.*?)</message>|\"(?:message|detail|error)\"\s*:\s*\"([^\"]+)\"", re.S)
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header; None where unknown."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


_FLOWS = re.compile(r"concurrent flows|too many (?:concurrent )?(?:requests|downloads|sessions)",
                    re.I)
_QUOTA = re.compile(r"quota", re.I)
_OFFLINE = re.compile(r"offline|long.term archive|not online", re.I)


def error_for_status(status: int, reason: str, retry_after: str | None, detail: str = "") -> \
        TransferError:
    """The asyncsat error for an HTTP error status.

    Archive hubs (DHuS) say more than their status: a 403 whose reason is a concurrent-flows
    limit is throttling, one about the retrieval quota means the product stays offline
    until the quota frees, and an older hub's 500 "Trying to download an offline product"
    means offline, not broken (as does a catalogue's 409 "Product is offline" for a product
    evicted to its archive after it was found).
    """
    text = f"HTTP {status} {reason}".strip() + (f": {detail}" if detail else "")
    wait = parse_retry_after(retry_after)
    if status in (403, 429) and _FLOWS.search(detail):
        return RetryableError(text, retry_after=wait, throttled=True)
    if status == 403 and _QUOTA.search(detail):
        return OfflineError(text, retry_after=wait, quota=True)
    if status in (409, 500, 503) and _OFFLINE.search(detail):
        return OfflineError(text, retry_after=wait)
    if status in (401, 403):
        return AuthError(text)
    if status in RETRYABLE_STATUS:
        return RetryableError(text, retry_after=parse_retry_after(retry_after),
                              throttled=status in (429, 509))
    if status == 404:
        return NotFoundError(text)
    return PermanentError(text)


@contextmanager
def map_exceptions() -> Iterator[None]:
    """Translate aiohttp and socket errors into asyncsat errors (the edge of the driver)."""
    try:
        yield
    except TransferError:
        raise
    except aiohttp.InvalidURL as exc:
        raise PermanentError(f"invalid URL: {exc}") from None
    except aiohttp.TooManyRedirects:
        raise PermanentError("too many redirects") from None
    except aiohttp.ClientPayloadError as exc:
        raise RetryableError(f"connection broken mid-file: {_cause(exc)}") from None
    except aiohttp.ServerDisconnectedError:
        raise RetryableError("the server closed the connection") from None
    except aiohttp.ClientConnectorError as exc:
        raise RetryableError(f"cannot connect: {exc.os_error.strerror or exc}") from None
    except TimeoutError:  # before OSError, of which it is a subclass
        raise RetryableError("timed out waiting for the server") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise RetryableError(f"network error: {type(exc).__name__}: {exc}") from None


def _cause(exc: BaseException) -> str:
    """The innermost reason, without aiohttp's nested reprs."""
    inner = exc.__cause__ or exc.__context__ or exc
    message = getattr(inner, "message", None) or str(inner)
    return str(message).strip("'\" ") or type(inner).__name__


def _if_range(validator: Validator) -> str | None:
    """If-Range takes a strong ETag or a Last-Modified date (RFC 9110, 13.1.5)."""
    if validator.etag and not validator.etag.startswith("W/"):
        return validator.etag
    return validator.last_modified


@dataclass
class HttpStream:
    """An open HTTP response (None: nothing left to send)."""

    response: aiohttp.ClientResponse | None
    opened: Opened

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """Whatever has arrived (at most `size` bytes), so that nothing received is lost."""
        if self.response is None:
            return
        content = self.response.content
        with map_exceptions():
            while chunk := await content.read(size):
                yield chunk

    async def arrived(self) -> AsyncIterator[bytes]:
        if self.response is None:
            return
        content = self.response.content
        with map_exceptions():
            while True:
                chunk, chunk_end = await content.readchunk()
                if len(chunk) < ARRIVED_LEAST and chunk:  # (a server sending a few bytes at
                    # a time: one piece with what is buffered behind it, not a write each)
                    chunk += content.read_nowait(ARRIVED_LEAST - len(chunk))
                if chunk:
                    yield chunk
                elif not chunk_end:  # (b"" at the end of an HTTP chunk: more may come)
                    return


ARRIVED_LEAST = 64 << 10
"""A piece of a body read as it arrived smaller than this takes what is buffered behind it,
up to this size."""


class HttpDriver:
    """Downloads over HTTP(S) with one shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @classmethod
    def create(cls, *, connect_timeout: float = 30.0, read_timeout: float = 60.0) -> HttpDriver:
        """A driver with its own session; the slots, not the connector, limit concurrency."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            middlewares=(_refuse_downgrade,),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                          sock_read=read_timeout),
            auto_decompress=False,
            read_bufsize=256 * 1024,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        return cls(session)

    async def aclose(self) -> None:
        await self._session.close()

    @asynccontextmanager
    async def open(self, source: Source, offset: int, validator: Validator) -> \
            AsyncIterator[HttpStream]:
        with map_exceptions():
            stream = await self._start(source, offset, validator)
        try:
            yield stream  # the caller's own errors pass through untranslated
        finally:
            if stream.response is not None:
                stream.response.release()

    async def _start(self, source: Source, offset: int, validator: Validator) -> HttpStream:
        if offset <= 0:
            response = await self._get(source, {})
            return HttpStream(response, self._opened(response))
        headers = {"Range": f"bytes={offset}-"}
        if_range = _if_range(validator)
        if if_range:
            headers["If-Range"] = if_range
        response = await self._get(source, headers, ok_416=True)
        if response.status == 416:
            _, total = parse_content_range(response.headers.get("Content-Range"))
            response.release()
            if total == offset:  # the part file already holds the whole file
                return HttpStream(None, Opened(offset=offset, total=total, validator=validator))
        else:
            opened = self._opened(response)
            if not validator.differs(opened.validator) or opened.offset == 0:
                return HttpStream(response, opened)
            response.release()
        # the file changed or the range is unusable: start again from zero
        response = await self._get(source, {})
        return HttpStream(response, self._opened(response))

    async def _get(self, source: Source, headers: dict[str, str], *, ok_416: bool = False,
                   ) -> aiohttp.ClientResponse:
        auth, url = source.auth, _target(source.url)
        # (None: the session's middleware; a provider that allows redirects to http: none)
        follows: tuple[aiohttp.ClientMiddlewareType, ...] | None = \
            () if source.allow_insecure_redirects else None
        sent = await auth.headers()
        response = await self._session.get(url, headers={**sent, **headers},
                                           middlewares=_with(follows, keep_home(url, sent)))
        if response.status == 401 and auth.rejected(sent):
            # a token that expired (or was revoked) before its time: one renewal, same
            # request; a resume goes on from the same offset under the new token
            response.release()
            sent = await auth.headers()
            response = await self._session.get(
                url, headers={**sent, **headers},
                middlewares=_with(follows, keep_home(url, sent)))
        if response.status >= 400 and not (ok_416 and response.status == 416):
            detail = await _error_detail(response)
            response.release()
            if source.expires and response.status in (401, 403, 404, 410):
                # a prepared link that lapsed: the next attempt asks the catalog for a new
                # one and resumes from the .part
                raise RetryableError(f"the prepared download link was refused (HTTP "
                                     f"{response.status}): a new one is asked for")
            raise error_for_status(response.status, response.reason or "",
                                   response.headers.get("Retry-After"), detail)
        return response

    @staticmethod
    def _opened(response: aiohttp.ClientResponse) -> Opened:
        headers = response.headers
        name = name_from_content_disposition(headers.get("Content-Disposition"))
        validator = Validator(etag=headers.get("ETag"), last_modified=headers.get("Last-Modified"))
        if response.status == 206:
            first, total = parse_content_range(headers.get("Content-Range"))
            if first is None:
                response.release()
                raise RetryableError("the server sent a partial answer without Content-Range")
            return Opened(offset=first, total=total, name=name, validator=validator)
        if response.status == 202:  # an archive hub took the request as an order (DHuS LTA)
            response.release()
            raise OfflineError("the product is offline: the server accepted an order from its "
                               "long-term archive (HTTP 202)", ordered=True,
                               retry_after=parse_retry_after(headers.get("Retry-After")))
        if response.status != 200:
            response.release()
            raise PermanentError(f"unexpected HTTP {response.status} {response.reason or ''}")
        return Opened(offset=0, total=response.content_length, name=name, validator=validator)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})

_DROPPED = frozenset({"authorization", "cookie", "proxy-authorization"})
"""The headers aiohttp itself leaves behind on a redirect to another origin."""


def keep_home(url: str | yarl.URL, sent: Mapping[str, str]) -> \
        aiohttp.ClientMiddlewareType | None:
    """A middleware that keeps the login headers aiohttp does not know (M2M's
    `X-Auth-Token`) on the origin of `url`: a redirect elsewhere (an object store, a CDN)
    goes without them, as it goes without `Authorization`. None when `sent` has none."""
    names = [n for n in sent if n.lower() not in _DROPPED]
    if not names:
        return None
    home = yarl.URL(url).origin()

    async def middleware(request: aiohttp.ClientRequest,
                         handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        if request.url.origin() != home:
            for name in names:
                request.headers.popall(name, None)
        return await handler(request)

    return middleware


async def stay_home(request: aiohttp.ClientRequest,
                    handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """A middleware for requests whose body is a login (a password grant, M2M's token):
    a redirect to another origin (another server, or http:// from https://) is refused
    before it is followed; aiohttp would post the same body there (307, 308)."""
    response = await handler(request)
    target = _redirected_to(request, response)
    if target is not None and target.origin() != request.url.origin():
        response.close()
        raise PermanentError(
            f"{_shown(request.url)} redirected the login to another server "
            f"({_shown(target)}): it is not sent there; point the provider's setting at "
            "that URL if it is the provider's")
    return response


def _redirected_to(request: aiohttp.ClientRequest,
                   response: aiohttp.ClientResponse) -> yarl.URL | None:
    """Where a redirect points (None: no redirect, or no URL aiohttp would follow)."""
    if response.status not in _REDIRECTS:
        return None
    location = response.headers.get("Location") or response.headers.get("URI")
    if not location:
        return None
    try:
        return request.url.join(yarl.URL(location))
    except ValueError:
        return None  # aiohttp refuses a Location that is not a URL by itself


def _with(follows: tuple[aiohttp.ClientMiddlewareType, ...] | None,
          home: aiohttp.ClientMiddlewareType | None) \
        -> tuple[aiohttp.ClientMiddlewareType, ...] | None:
    """The middlewares of a request: `follows` (None: the session's), and `home`."""
    if home is None:
        return follows
    return (*((_refuse_downgrade,) if follows is None else follows), home)


async def _refuse_downgrade(request: aiohttp.ClientRequest,
                            handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """Refuse, before it is followed, a redirect that would drop TLS: the product (and a
    pre-signed URL in the Location) would travel unprotected. A client middleware: it sees
    every hop of a request's redirects (a request of a provider that allows them is sent
    without it). (A trace config did this before: aiohttp then built and sent its trace
    events for every request to look at redirects only, 0.02 ms of CPU per request more
    than this, measured with 2,000 requests to a loopback server.)"""
    response = await handler(request)
    if request.url.scheme != "https":
        return response
    target = _redirected_to(request, response)
    if target is not None and target.scheme == "http":
        response.close()
        raise PermanentError(
            f"refused a redirect from https to http ({_shown(request.url)} -> "
            f"{_shown(target)}): the file would travel unencrypted; set "
            "allow_insecure_redirects=true on the provider to allow it")
    return response


def _shown(url: yarl.URL) -> str:
    """A URL fit for a message: no login, no query (it may hold a signature)."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


def _target(url: str) -> yarl.URL:
    """The URL to send, byte for byte when it is already encoded.

    Re-quoting would turn `%2F` or `%3D` of a pre-signed query into `/` or `=` and break
    its signature. Only a URL that is not valid on the wire (non-ASCII, spaces) is quoted.
    """
    if url.isascii() and url.isprintable() and " " not in url:  # (ASCII: the other
        # white space is not printable)
        return yarl.URL(url, encoded=True)
    return yarl.URL(url)


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    """A short, single-line reason from an error body (OData/JSON errors, cause-message)."""
    cause = response.headers.get("cause-message")
    if cause:
        return cause[:200]
    try:
        async with asyncio.timeout(5):
            body = await response.content.read(2048)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    text = body.decode("utf-8", "replace")
    match = _ERROR_MESSAGE.search(text)
    if match:
        return " ".join((match.group(1) or match.group(2)).split())[:200]
    return ""
