"""The transfer-driver seam: what every protocol driver (HTTP, FTP, ...) provides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from asyncsat.auth.base import ANONYMOUS, Auth


@dataclass(frozen=True)
class Source:
    """Where a product is (no secret in the URL) and how its requests are authorised."""

    url: str
    auth: Auth = ANONYMOUS

    @property
    def user(self) -> str | None:
        return self.auth.user

    @property
    def password(self) -> str | None:
        return self.auth.password
    allow_insecure_redirects: bool = False
    """Follow a redirect from https:// to http:// (refused by default)."""
    expires: bool = False
    """A link the catalog prepared for a while (USGS M2M): a refusal means it lapsed, and
    the next attempt asks for a new one instead of failing."""


@dataclass(frozen=True)
class Validator:
    """What identifies a version of a remote file, to resume only the same version."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    def differs(self, other: Validator) -> bool:
        """True when both sides know a validator of the same kind and they differ."""
        if self.etag and other.etag:
            return self.etag != other.etag
        if self.last_modified and other.last_modified:
            return self.last_modified != other.last_modified
        return False


@dataclass(frozen=True)
class Opened:
    """What the server answered when the transfer started."""

    offset: int
    """Where the body starts in the file: the requested offset, or 0 for the whole file."""
    total: int | None
    """Size of the whole remote file, when the server tells it."""
    name: str = ""
    """The file name the server gives (Content-Disposition), sanitised, or ""."""
    validator: Validator = field(default_factory=Validator)


@dataclass(frozen=True)
class RemoteEntry:
    """One entry of a remote directory listing."""

    name: str
    size: int | None = None
    is_dir: bool = False


class Folders(Protocol):
    """A logged-in session that lists folders of one server."""

    async def listing(self, url: str) -> list[RemoteEntry]:
        """The entries of the folder at `url`; NotFoundError when there is none."""
        ...


class Stream(Protocol):
    """An open transfer: its metadata and its body, in chunks."""

    @property
    def opened(self) -> Opened: ...

    def chunks(self, size: int) -> AsyncIterator[bytes]: ...

    def arrived(self) -> AsyncIterator[bytes]:
        """The body as the connection delivers it, what arrived together not joined into
        one bytes object (a small body held whole: no copy of it)."""
        ...


class Driver(Protocol):
    """One driver per scheme. Errors are raised as asyncsat.errors.TransferError subclasses."""

    def open(
        self, source: Source, offset: int, validator: Validator
    ) -> AbstractAsyncContextManager[Stream]:
        """Start sending the file from `offset` (0 = whole file).

        When `validator` is set and the remote file no longer matches it, or the server
        cannot resume, the stream starts at 0 (`opened.offset == 0`).
        """
        ...

    async def aclose(self) -> None:
        """Release sessions and connections."""
        ...
