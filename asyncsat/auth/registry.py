"""One `Auth` per account, chosen by the provider's settings and kept for the daemon's life."""

from __future__ import annotations

import hashlib

import aiohttp

from asyncsat.auth.base import ANONYMOUS, Auth, Login
from asyncsat.auth.m2m import ApiKeySource
from asyncsat.auth.oauth import TokenSource
from asyncsat.logs import Redactor
from asyncsat.models import Provider

DEFAULT_CLIENT_ID = "cdse-public"


class Auths:
    """The token sources of the accounts in use, keyed by account, endpoint and secret.

    A changed password or token endpoint makes a new source; the same account always gets
    the same one, so all its transfers and searches share one token.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._tokens: dict[tuple[str, ...], TokenSource] = {}
        self._keys: dict[tuple[str, ...], ApiKeySource] = {}
        self._session: aiohttp.ClientSession | None = None

    def for_account(self, provider: Provider, key: str, user: str | None,
                    secret: str | None) -> Auth:
        """How requests of the account `key` (a credential, or a URL's own login) log in."""
        self._redactor.add_login(user, secret)
        token_url = provider.settings.get("token_url")
        if not user:
            return ANONYMOUS
        if provider.protocol == "m2m" and provider.url:
            return self._api_key(provider.url, key, user, secret or "")
        if not isinstance(token_url, str) or not token_url:
            return Login(user, secret)
        client_id = str(provider.settings.get("client_id") or DEFAULT_CLIENT_ID)
        digest = hashlib.sha256((secret or "").encode()).hexdigest()
        ident = (key, user, digest, token_url, client_id)
        source = self._tokens.get(ident)
        if source is None:
            source = self._tokens[ident] = TokenSource(
                self._http(), token_url=token_url, client_id=client_id, user=user,
                password=secret or "", on_token=self._redactor.add)
        return source

    def _api_key(self, url: str, key: str, user: str, token: str) -> ApiKeySource:
        root = url if url.endswith("/") else url + "/"
        ident = (key, user, hashlib.sha256(token.encode()).hexdigest(), root)
        source = self._keys.get(ident)
        if source is None:
            source = self._keys[ident] = ApiKeySource(
                self._http(), root=root, user=user, token=token, on_key=self._redactor.add)
        return source

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=60, sock_connect=30),
                headers={"User-Agent": "asyncsat/0.1"})
        return self._session

    async def aclose(self) -> None:
        """Log out of the services that keep sessions (M2M), then close the session."""
        for source in self._keys.values():
            await source.logout()
        if self._session is not None:
            await self._session.close()
            self._session = None
