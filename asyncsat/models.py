"""Plain data shared by the layers. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Status = Literal["queued", "running", "done", "failed", "cancelled", "offline"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled", "offline"})
PROTOCOLS: tuple[str, ...] = ("http", "ftp", "odata", "dhus", "stac", "m2m")
CATALOG_PROTOCOLS: frozenset[str] = frozenset({"odata", "dhus", "stac", "m2m"})
REQUEST_STATUSES: tuple[str, ...] = (
    "queued", "following", "resolved", "done", "failed", "cancelled")


@dataclass(frozen=True)
class Provider:
    """A data source: a name, a protocol, a base URL and free-form settings."""

    id: int
    name: str
    protocol: str
    url: str | None
    settings: dict[str, object] = field(default_factory=dict)
    implicit: bool = False
    paused: bool = False
    """Paused: no transfer of its downloads starts (the running ones finish)."""


@dataclass(frozen=True)
class Credential:
    """One account of a provider; `max_connections` is what the account allows."""

    id: int | None
    provider_id: int
    username: str | None
    secret: str | None = field(repr=False)
    max_connections: int
    enabled: bool = True
    secret_ref: str | None = None
    """`env:NAME` or `file:PATH`: the secret, read where the daemon runs (`secret_refs`)."""


@dataclass(frozen=True)
class Checksum:
    """An expected digest, `algo` lower-case (md5, sha1, sha256, sha512, sha3_256, blake3)."""

    algo: str
    value: str

    def __str__(self) -> str:
        return f"{self.algo}:{self.value}"


@dataclass(frozen=True)
class Download:
    """One product to fetch, as stored in the `download` table."""

    id: int
    request_id: int | None
    provider_id: int
    provider: str
    url: str
    name: str | None
    dest: str | None
    size: int | None
    checksum: Checksum | None
    status: str
    bytes_done: int
    attempts: int
    failures: int
    error: str | None
    path: str | None
    etag: str | None
    last_modified: str | None
    login_user: str | None = None
    login_secret: str | None = field(default=None, repr=False)
    size_from_server: bool = False
    """`size` was announced by the server, not given by a catalog or a user."""
    product_id: str | None = None
    """The catalog's id of the product (None for a plain URL)."""
    offline_checks: int = 0
    """How many times the product was found offline (the next look comes later each time)."""
    claimed_from: str = "queued"
    """The status the row had when it was claimed: `offline` means look at it again first."""
    ordered_at: datetime | None = None
    """When the product was ordered from the provider's long-term archive (None: never)."""
    last_mismatch: str | None = None
    """The wrong bytes the last attempt received (`md5:<digest>`, `size:<n>`), if any."""
    sealed_attempt: int | None = None
    """The attempt that got as far as sealing its file (it may have renamed it to its final
    name) and was not recorded done: a file at the final name may be this download's own
    only then."""


@dataclass(frozen=True)
class Request:
    """What a user asked for: URLs, or a search (criteria in `search`)."""

    id: int
    provider_id: int | None
    urls: list[str] | None
    search: dict[str, object] | None
    dest: str | None
    checksum: str | None
    login_user: str | None = None
    login_secret: str | None = field(default=None, repr=False)
    """The login of a `get` with a URL pattern, kept apart from its URLs until resolved."""
    follow: bool = False
    """A standing request: searched again every `follow_interval`."""
    watermark: datetime | None = None
    """The newest publication (or sensing) time a standing request has seen."""
    status: str = "queued"


@dataclass(frozen=True)
class Added:
    """A product asked for by a request, as its download row stands after the ask."""

    id: int
    status: str
    dest: str | None
    """The folder the row fetches into (NULL: the daemon's default)."""
    name: str | None
    path: str | None
    """Its final file, once done."""
    first_ask: bool
    """The request had not asked for this product before (a standing request's later runs
    find their own products again)."""
