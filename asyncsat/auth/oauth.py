"""Bearer tokens of one account from an OAuth2 token endpoint (CDSE's Keycloak and the like).

One `TokenSource` per account, shared by every transfer and catalog call of that account:
the password grant once, then the refresh grant before the token expires, one request in
flight at a time. Tokens live in memory only and are registered with the log redactor. A
token every transfer shares means one session per account at the provider, never one per
file (CDSE counts each new token as a session and bans accounts that open too many).

The token request is sent by whichever caller needs the token; every caller holds an
account slot, so the token request holds one too (the contract).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from asyncsat.auth.base import Auth
from asyncsat.errors import AuthError, RetryableError, TransferError
from asyncsat.transfer.http import error_for_status, map_exceptions, stay_home

REFUSAL_MEMORY = 30.0
"""Seconds a refused login is remembered: callers meanwhile fail at once, without asking."""


class TokenSource(Auth):
    """Access tokens for one user of one token endpoint."""

    def __init__(
        self, session: aiohttp.ClientSession, *, token_url: str, client_id: str, user: str,
        password: str, on_token: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.user = user
        self.password = password
        self._session = session
        self._token_url = token_url
        self._client_id = client_id
        self._on_token = on_token
        self._clock = clock
        self._lock = asyncio.Lock()
        self._access: str | None = None
        self._expires = 0.0
        self._refresh: str | None = None
        self._refresh_expires = 0.0
        self._refused: tuple[float, AuthError] | None = None
        self.grants: dict[str, int] = {"password": 0, "refresh_token": 0}
        """Grants sent, by type (for the benchmark and the tests)."""

    def __repr__(self) -> str:
        return f"TokenSource(user={self.user!r}, token_url={self._token_url!r})"

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token()}"}

    def rejected(self, sent: Mapping[str, str]) -> bool:
        header = sent.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        if self._access is not None and header == f"Bearer {self._access}":
            self._access = None  # the server disowns it before its time: renew it
        return True

    async def token(self) -> str:
        """A token valid for a while yet; at most one grant request in flight."""
        if self._fresh():
            assert self._access is not None
            return self._access
        async with self._lock:
            if not self._fresh():
                await self._renew()
            assert self._access is not None
            return self._access

    def _fresh(self) -> bool:
        return self._access is not None and self._clock() < self._expires

    async def _renew(self) -> None:
        if self._refused is not None and self._clock() < self._refused[0]:
            raise self._refused[1]
        if self._refresh is not None and self._clock() < self._refresh_expires:
            try:
                await self._grant({"grant_type": "refresh_token",
                                   "refresh_token": self._refresh})
                return
            except AuthError:
                pass  # the refresh token was revoked or the session ended: log in again
        try:
            await self._grant({"grant_type": "password", "username": self.user,
                               "password": self.password or ""})
        except AuthError as exc:
            self._refused = (self._clock() + REFUSAL_MEMORY, exc)
            raise

    async def _grant(self, form: dict[str, str | None]) -> None:
        kind = str(form["grant_type"])
        self.grants[kind] += 1
        data = {k: v for k, v in form.items() if v is not None}
        data["client_id"] = self._client_id
        sent_at = self._clock()
        with map_exceptions():
            async with self._session.post(self._token_url, data=data,
                                          middlewares=(stay_home,)) as response:
                body = await response.read()
                if response.status >= 400:
                    raise self._error(kind, response, body)
        answer = _json(body)
        access = answer.get("access_token")
        if not isinstance(access, str) or not access:
            raise RetryableError("the token endpoint answered without an access token")
        self._access = access
        self._on_token(access)
        lifetime = _seconds(answer.get("expires_in"), 300.0)
        # renewed a little before it ends: a fifth of its life, at most a minute
        self._expires = sent_at + lifetime - min(60.0, lifetime / 5)
        refresh = answer.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self._on_token(refresh)
            self._refresh = refresh
            refresh_life = _seconds(answer.get("refresh_expires_in"), lifetime)
            self._refresh_expires = sent_at + refresh_life - min(60.0, refresh_life / 5)
        else:
            self._refresh = None
        self._refused = None

    def _error(self, kind: str, response: aiohttp.ClientResponse, body: bytes) -> TransferError:
        answer = _json(body)
        reason = str(answer.get("error_description") or answer.get("error") or "").strip()
        if response.status in (400, 401) and answer.get("error") in (
                "invalid_grant", "invalid_client", "unauthorized_client", "invalid_request"):
            who = f"the login of {self.user}" if kind == "password" else "the refresh token"
            return AuthError(f"the token endpoint refused {who}: {reason or response.status}")
        return error_for_status(response.status, response.reason or "",
                                response.headers.get("Retry-After"), reason[:200])


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _seconds(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default
