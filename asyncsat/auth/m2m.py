"""The USGS M2M API key of one account: `login-token` with the account's application token.

One key per account, shared by every search and preparation of that account, sent as
`X-Auth-Token`; renewed (one login in flight) when the service says it expired. The key
lives in memory only and is registered with the log redactor; `logout` ends it when the
daemon stops. Every caller holds an account slot, so the login holds one too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from asyncsat.auth.base import Auth
from asyncsat.errors import AuthError, PermanentError, RetryableError, TransferError
from asyncsat.transfer.http import error_for_status, keep_home, map_exceptions, stay_home

EXPIRED = frozenset({"AUTH_EXPIRED", "AUTH_KEY_INVALID"})
"""Error codes that mean: log in again."""
NO_ROLE = (
    "USGS has not granted Machine-to-Machine (M2M) access to {user}: request it in your "
    "USGS ERS profile (https://ers.cr.usgs.gov/profile/access, 'Access Request' for M2M) "
    "and wait for the approval")


def envelope_error(answer: Any, user: str | None) -> TransferError | None:
    """The asyncsat error for an M2M answer whose `errorCode` is set (None when it is not).

    M2M answers HTTP 200 and says what went wrong in its envelope.
    """
    if not isinstance(answer, dict):
        return RetryableError("the M2M API answered without its JSON envelope")
    code = answer.get("errorCode")
    if not code:
        return None
    text = f"{code}: {answer.get('errorMessage') or ''}".strip(": ")
    if code == "UNAUTHORIZED_USER":
        return PermanentError(NO_ROLE.format(user=user or "this account") + f" ({text})")
    if code in ("AUTH_INVALID", "AUTH_UNAUTHROIZED", "AUTH_UNAUTHORIZED") or code in EXPIRED:
        return AuthError(f"USGS refused the login of {user or 'this account'}: {text} (the "
                         "credential's password must be an M2M application token)")
    if code.startswith("RATE_LIMIT"):
        return RetryableError(f"USGS rate limit: {text}", retry_after=60.0, throttled=True)
    if code in ("SERVER_ERROR", "DB_CONNECTION_ERROR", "UNKNOWN", "DOWNLOAD_ERROR"):
        return RetryableError(f"USGS M2M: {text}")
    return PermanentError(f"USGS M2M: {text}")


class ApiKeySource(Auth):
    """The API key of one user of one M2M service."""

    def __init__(self, session: aiohttp.ClientSession, *, root: str, user: str, token: str,
                 on_key: Callable[[str], None]) -> None:
        self.user = user
        self.password = token
        self._session = session
        self._root = root
        self._on_key = on_key
        self._lock = asyncio.Lock()
        self._key: str | None = None
        self.logins = 0

    def __repr__(self) -> str:
        return f"ApiKeySource(user={self.user!r}, root={self._root!r})"

    async def headers(self) -> dict[str, str]:
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    await self._login()
        assert self._key is not None
        return {"X-Auth-Token": self._key}

    def rejected(self, sent: Mapping[str, str]) -> bool:
        key = sent.get("X-Auth-Token")
        if key is None:
            return False
        if key == self._key:
            self._key = None  # the service says it expired: log in again
        return True

    async def _login(self) -> None:
        self.logins += 1
        answer = await self._post("login-token", {"username": self.user,
                                                  "token": self.password or ""}, {})
        error = envelope_error(answer, self.user)
        if error is not None:
            raise error
        key = answer.get("data")
        if not isinstance(key, str) or not key:
            raise RetryableError("the M2M login answered without an API key")
        self._on_key(key)
        self._key = key

    async def logout(self) -> None:
        """End the key at the service (best effort: the daemon is stopping)."""
        key, self._key = self._key, None
        if key is not None:
            with contextlib.suppress(TransferError):
                await self._post("logout", {}, {"X-Auth-Token": key})

    async def _post(self, endpoint: str, body: dict[str, Any],
                    headers: dict[str, str]) -> Any:
        with map_exceptions():
            url = f"{self._root}{endpoint}"
            home = keep_home(url, headers)  # (the key stays on the API's origin)
            # (and the login's body, the account's token, too)
            async with self._session.post(
                    url, json=body, headers=headers,
                    middlewares=(stay_home,) if home is None else (stay_home, home)) \
                    as response:
                if response.status >= 400:
                    raise error_for_status(response.status, response.reason or "",
                                           response.headers.get("Retry-After"))
                try:
                    return await response.json(content_type=None)
                except ValueError:
                    raise RetryableError("the M2M API answered with no JSON") from None
