"""The exception tree. Library exceptions are translated into these at the edges.

The docstring of each class is its default message.
"""

from __future__ import annotations


class AsyncsatError(Exception):
    """asyncsat failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(AsyncsatError):
    """Bad usage or bad input (exit code 2)."""


class ConfigError(UsageError):
    """Invalid configuration."""


class DatabaseError(AsyncsatError):
    """The database could not be reached or refused a statement."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached, or is starting up: it may answer later."""


class LeaseLost(AsyncsatError):
    """Another daemon took this download over: this one's lease lapsed (it was paused, or
    cut from the database). Nothing more is written for it here."""


class CatalogError(AsyncsatError):
    """A catalog search failed."""


class TransferError(AsyncsatError):
    """A transfer failed."""


class RetryableError(TransferError):
    """A transient fault: the transfer is retried later.

    `retry_after` is the delay the server asked for, in seconds, if any; `throttled`
    marks a rate or connection limit, which does not use up the retry budget.
    """

    def __init__(
        self, message: str | None = None, *, retry_after: float | None = None,
        throttled: bool = False,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.throttled = throttled


class DiskFullError(RetryableError):
    """No space left on the destination's file system: the `.part` is kept and the download
    waits for room (no attempt of the retry budget is used)."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, throttled=True)


class AuthError(RetryableError):
    """The server refused the login (retried once, then permanent)."""


class VerificationError(RetryableError):
    """The whole file arrived but is not the product: bytes received are no progress.

    `evidence` names what was received (`md5:<digest>`, `size:<bytes>`): the same wrong
    evidence twice means the provider holds a bad copy, and fetching it again cannot help.
    """

    def __init__(self, message: str | None = None, *, evidence: str | None = None) -> None:
        super().__init__(message)
        self.evidence = evidence


class SizeError(VerificationError):
    """The size of the downloaded file is not the announced one."""


class ChecksumError(VerificationError):
    """The checksum of the downloaded file does not match (retried once, then permanent)."""


class PayloadError(VerificationError):
    """The server sent something that is not the product (an error page, a broken archive)."""


class PermanentError(TransferError):
    """A permanent fault: retrying cannot help."""


class NotFoundError(PermanentError):
    """The file or folder does not exist on the server."""


class OfflineError(TransferError):
    """The product is offline (in a long-term archive) and must be ordered first.

    `retry_after`: when the provider says it will be available, in seconds, if it does.
    `ordered`: this very request placed the order (a DHuS 202). `orderable`: the catalog can
    order it (`Catalog.order`), within the account's archive quota. `quota`: the provider
    refused an order because the account's retrieval quota is used up. Waiting for it uses
    no attempt.
    """

    def __init__(self, message: str | None = None, *, retry_after: float | None = None,
                 ordered: bool = False, orderable: bool = False, quota: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.ordered = ordered
        self.orderable = orderable
        self.quota = quota
