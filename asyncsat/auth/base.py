"""The auth seam: what a transfer or a catalog call needs to authorise its requests.

A driver asks its `Auth` for the headers of each request and tells it when the server
rejected them; the `Auth` decides whether a renewed credential can help (a token that
expired) or not (a wrong password). Drivers never see where a token comes from.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field

from asyncsat.errors import PermanentError


class Auth:
    """Anonymous access; the base of every way to log in."""

    user: str | None = None
    """The account's name, for FTP logins and for messages (never a secret)."""
    password: str | None = None
    """The FTP (or HTTP basic) password, if the account has one."""

    async def headers(self) -> dict[str, str]:
        """The HTTP headers that authorise one request (fetching a token when needed)."""
        return {}

    def rejected(self, sent: Mapping[str, str]) -> bool:
        """The server refused the request sent with `sent` headers (HTTP 401).

        True when the same request may succeed with fresh headers (the token expired):
        the caller asks `headers()` again and repeats the request once.
        """
        return False


ANONYMOUS = Auth()


@dataclass(frozen=True, eq=False)
class Login(Auth):
    """A user and a password: an FTP login, or HTTP basic authentication."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)

    async def headers(self) -> dict[str, str]:
        if not self.user:
            return {}
        if ":" in self.user:
            raise PermanentError("a user name cannot contain ':' (RFC 7617)")
        token = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
