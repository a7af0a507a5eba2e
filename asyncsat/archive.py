"""Products in a provider's long-term archive: when to look again, and when to order them.

An offline product waits (`offline`, no attempt used) and is looked at again after
`offline_interval`, then ever less often. Where the API can order it (DHuS, M2M), it is
ordered once (never again while that order runs), and no more often than the account's
`archive_quota` allows (`"20/12h"`: twenty orders in any twelve hours), counted in the
database so that a restart does not reset it. The catalog adapters send the orders; this
module decides, and records them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from asyncsat.auth.base import Auth
from asyncsat.catalogs.registry import Catalogs
from asyncsat.db import queries
from asyncsat.db.store import Store
from asyncsat.errors import OfflineError, TransferError, UsageError
from asyncsat.models import Download, Provider
from asyncsat.retry import follow_settings, offline_delay

log = structlog.get_logger("asyncsat")

DEFAULT_WINDOW = 3600.0
"""How long an account sends no order after a quota refusal, when no `archive_quota` says."""
REORDER_AFTER = 86400.0
"""An order older than this that has not brought the product online may be sent again."""
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_QUOTA = re.compile(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smhd])\s*")


@dataclass(frozen=True)
class Quota:
    """At most `count` archive orders per account in any `window` seconds."""

    count: int
    window: float

    def __str__(self) -> str:
        return f"{self.count} per {self.window / 3600:g} h"


def parse_quota(value: object) -> Quota:
    """`"20/12h"`, `"4/1d"`, `"1/30m"`; UsageError otherwise."""
    match = _QUOTA.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match[1]) < 1:
        raise UsageError(f"invalid archive quota {value!r}: use COUNT/PERIOD such as '20/12h' "
                         "(s, m, h or d)")
    window = float(match[2] or 1) * _UNITS[match[3]]
    if window <= 0:
        raise UsageError(f"invalid archive quota {value!r}: the period must be positive")
    return Quota(int(match[1]), window)


def quota_of(provider: Provider) -> Quota | None:
    value = provider.settings.get("archive_quota")
    return parse_quota(value) if value is not None else None


async def _reserve(conn: Any, *, download_id: int, provider_id: int, account: str,
                   window: float, count: int) -> int | None:
    return await queries.archive_reserve(conn, download_id, provider_id, account,
                                         window=window, count=count)


class Archive:
    """Decides how long an offline product waits, and orders it when it may."""

    def __init__(self, store: Store, catalogs: Catalogs) -> None:
        self._store = store
        self._catalogs = catalogs

    async def park(self, d: Download, provider: Provider, exc: OfflineError, auth: Auth,
                   account: str) -> tuple[float, str]:
        """(seconds before the product is looked at again, what happened), ordering it first
        when the catalog can and the account's quota allows. Called holding a slot."""
        delay = offline_delay(d.offline_checks, follow_settings(provider), exc.retry_after)
        window = self._window(provider)
        if exc.ordered:  # the request itself placed the order (a DHuS 202)
            await self._store.call(queries.archive_ordered, d.id, provider.id, account)
            return delay, f"{exc.message}: ordered from the archive"
        if exc.quota:  # the provider refused an order: none from this account for a window
            return await self._refused(d, provider, account, exc, delay, window)
        if not exc.orderable or not self._may_reorder(d):
            return delay, exc.message
        used, frees_in, refused_in = await self._store.call(
            queries.archive_usage, provider.id, account, window)
        if refused_in is not None and refused_in > 0:
            return max(delay, refused_in), (f"{exc.message}: the provider refused an order "
                                            "for its quota; none is sent until it frees")
        quota = quota_of(provider)
        if quota is not None and used >= quota.count:
            return max(delay, frees_in or 0.0), (
                f"{exc.message}: waiting for the archive quota ({used} orders of {quota} "
                "sent by this account)")
        # the order is reserved first, so that concurrent looks never overrun the quota
        reserved = await self._store.transaction(functools.partial(
            _reserve, download_id=d.id, provider_id=provider.id, account=account,
            window=window, count=quota.count if quota is not None else 1 << 30))
        if reserved is None:
            return max(delay, frees_in or window), (
                f"{exc.message}: waiting for the archive quota (of {quota})")
        try:
            eta = await self._catalogs.for_provider(provider).order(d, auth)
        except OfflineError as refused:
            if refused.quota:
                await self._store.call(queries.archive_settle, reserved, d.id, sent=False,
                                       refused=True)
                log.warning("archive order refused for the quota", download_id=d.id,
                            provider=provider.name, wait=window)
                return max(delay, window), f"{refused.message}: the archive quota is used up"
            await self._store.call(queries.archive_settle, reserved, d.id, sent=False)
            raise
        except TransferError as failed:
            await self._store.call(queries.archive_settle, reserved, d.id, sent=False)
            log.warning("archive order failed", download_id=d.id, error=failed.message)
            return delay, f"{exc.message}; the order failed: {failed.message}"
        await self._store.call(queries.archive_settle, reserved, d.id, sent=True)
        log.info("archive order sent", download_id=d.id, provider=provider.name,
                 available_in=eta)
        return (max(delay, eta) if eta else delay), f"{exc.message}: ordered from the archive"

    async def _refused(self, d: Download, provider: Provider, account: str, exc: OfflineError,
                       delay: float, window: float) -> tuple[float, str]:
        await self._store.call(queries.archive_ordered, d.id, provider.id, account,
                               refused=True)
        log.warning("archive order refused for the quota", download_id=d.id,
                    provider=provider.name, wait=window)
        return max(delay, window), f"{exc.message}: the archive quota is used up"

    @staticmethod
    def _window(provider: Provider) -> float:
        quota = quota_of(provider)
        return quota.window if quota is not None else DEFAULT_WINDOW

    @staticmethod
    def _may_reorder(d: Download) -> bool:
        if d.ordered_at is None:
            return True
        return (datetime.now(UTC) - d.ordered_at).total_seconds() > REORDER_AFTER
