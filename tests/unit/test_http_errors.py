"""How HTTP answers map to asyncsat errors (aioresponses: no server needed for these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from unittest.mock import Mock

import aiohttp
import pytest
from aioresponses import aioresponses

from asyncsat.auth.base import Login
from asyncsat.errors import (
    AuthError,
    OfflineError,
    PermanentError,
    RetryableError,
    TransferError,
)
from asyncsat.transfer.base import Source, Validator
from asyncsat.transfer.http import HttpDriver, parse_content_range, parse_retry_after

URL = "https://hub.example/odata/v1/Products('x')/$value"


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 does not pass the `stream_writer` that aiohttp 3.14 requires
    (pnuckowski/aioresponses#289, fix pending in #288); give it one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", Mock(output_size=0))
        super().__init__(*args, **kwargs)


async def _open(status: int, **kw: object) -> TransferError:
    driver = HttpDriver.create()
    try:
        with aioresponses() as mock:
            mock.get(URL, status=status, response_class=_Response, **kw)  # type: ignore[arg-type]
            with pytest.raises(TransferError) as info:
                async with driver.open(Source(URL, Login("u", "secret-pw")), 0, Validator()):
                    pass
            return info.value
    finally:
        await driver.aclose()


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
async def test_server_errors_are_retryable(status: int) -> None:
    err = await _open(status)
    assert type(err) is RetryableError and not err.throttled
    assert err.message.startswith(f"HTTP {status}")


async def test_429_is_throttling_with_retry_after() -> None:
    err = await _open(429, headers={"Retry-After": "17"},
                      body='{"trace-id":"1","code":"DAT-ZIP-100",'
                           '"message":"Max session number exceeded"}')
    assert isinstance(err, RetryableError) and err.throttled and err.retry_after == 17
    assert "Max session number exceeded" in err.message


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures(status: int) -> None:
    err = await _open(status, headers={"cause-message": "Unauthorized access"})
    assert isinstance(err, AuthError)
    assert "Unauthorized access" in err.message
    assert "secret-pw" not in err.message


async def test_dhus_flow_limits_quota_and_offline_answers() -> None:
    flows = await _open(403, headers={"cause-message": 'Maximum number of 4 concurrent flows '
                                      'achieved by the user "u"'})
    assert isinstance(flows, RetryableError) and flows.throttled
    quota = await _open(403, headers={"cause-message": "offline products retrieval quota "
                                      "exceeded (20 fetches max)"})
    assert isinstance(quota, OfflineError) and quota.quota and not quota.ordered
    old = await _open(500, body='<error xmlns="m"><code/><message xml:lang="en">'
                                "Trying to download an offline product</message></error>")
    assert isinstance(old, OfflineError) and not old.quota
    accepted = await _open(202)
    assert isinstance(accepted, OfflineError) and accepted.ordered


@pytest.mark.parametrize("status", [400, 404, 410])
async def test_client_errors_are_permanent(status: int) -> None:
    err = await _open(status, body='<error xmlns="m"><code/><message xml:lang="en">'
                                   "Product not found</message></error>")
    assert isinstance(err, PermanentError)
    assert "Product not found" in err.message


async def test_network_errors_are_retryable() -> None:
    err = await _open(200, exception=aiohttp.ServerDisconnectedError())
    assert isinstance(err, RetryableError)
    err = await _open(200, exception=TimeoutError())
    assert isinstance(err, RetryableError) and "timed out" in err.message


def test_retry_after_and_content_range_parsing() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Thu, 01 Jan 2026 12:01:00 GMT", now) == 60
    assert parse_retry_after("soon") is None
    assert parse_content_range("bytes 100-199/1000") == (100, 1000)
    assert parse_content_range("bytes */1000") == (None, 1000)
    assert parse_content_range("bytes 0-9/*") == (0, None)
    assert parse_content_range("garbage") == (None, None)
