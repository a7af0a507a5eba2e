"""Connection slots: one asyncio.Semaphore per provider, sized from its accounts.

A slot belongs to one credential; no account ever has more transfers than its
`max_connections`. Resizing keeps the leases already out and takes effect as they return.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from asyncsat.models import Credential, Provider

ANONYMOUS_CONNECTIONS = 4


@dataclass(frozen=True)
class Account:
    """Who a slot logs in as (user None: anonymous) and how many connections it allows."""

    key: str
    user: str | None
    secret: str | None = field(repr=False)
    limit: int


def accounts_for(provider: Provider, credentials: list[Credential]) -> list[Account]:
    """The accounts of a provider: its enabled credentials, else one anonymous account."""
    accounts = [
        Account(f"credential:{c.id}", c.username, c.secret, c.max_connections)
        for c in credentials if c.enabled
    ]
    if accounts:
        return accounts
    limit = provider.settings.get("max_connections", ANONYMOUS_CONNECTIONS)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        limit = ANONYMOUS_CONNECTIONS
    return [Account("anonymous", None, None, limit)]


class Lease:
    """One held slot; give it back with `release()` (idempotent)."""

    def __init__(self, slots: ProviderSlots, account: Account) -> None:
        self.account = account
        self._slots: ProviderSlots | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots._release(self)
            self._slots = None


class ProviderSlots:
    """The semaphore of one provider and the accounts its slots are handed out from."""

    def __init__(self, accounts: list[Account]) -> None:
        self._accounts = list(accounts)
        self.capacity = sum(a.limit for a in accounts)
        self._semaphore = asyncio.Semaphore(self.capacity)
        self._debt = 0  # slots to swallow on release after the capacity shrank
        self._in_use: dict[str, int] = {}
        self._returned = asyncio.Event()

    @property
    def held(self) -> int:
        return sum(self._in_use.values())

    def free(self) -> int:
        return max(0, self.capacity - self.held)

    def in_use(self, key: str) -> int:
        return self._in_use.get(key, 0)

    async def acquire(self) -> Lease:
        """Wait for a slot, then take it from the least loaded account with room."""
        while True:
            await self._semaphore.acquire()
            account = self._pick()
            if account is not None:
                return self._take(account)
            # only after a shrink: a permit is left but no account has room; wait for a
            # lease to come back
            self._semaphore.release()
            self._returned.clear()
            await self._returned.wait()

    async def try_acquire(self) -> Lease | None:
        """A slot now, or None; never waits (a free permit is taken without suspending)."""
        account = self._pick()
        if account is None or self._semaphore.locked():
            return None
        await self._semaphore.acquire()
        return self._take(account)

    def _take(self, account: Account) -> Lease:
        self._in_use[account.key] = self._in_use.get(account.key, 0) + 1
        return Lease(self, account)

    def _pick(self) -> Account | None:
        room = [a for a in self._accounts if self.in_use(a.key) < a.limit]
        if not room:
            return None
        return min(room, key=lambda a: (self.in_use(a.key) / a.limit, -a.limit))

    def _release(self, lease: Lease) -> None:
        key = lease.account.key
        self._in_use[key] -= 1
        if not self._in_use[key]:
            del self._in_use[key]
        self._returned.set()
        if self._debt:
            self._debt -= 1
        else:
            self._semaphore.release()

    def resize(self, accounts: list[Account]) -> None:
        """Take new accounts and limits; leases already out stay valid."""
        self._accounts = list(accounts)
        new = sum(a.limit for a in accounts)
        delta, self.capacity = new - self.capacity, new
        while delta > 0 and self._debt:
            self._debt -= 1
            delta -= 1
        for _ in range(max(0, delta)):
            self._semaphore.release()
        # a shrink is paid back by the next releases; until then free() and the
        # per-account limits keep the dispatcher from using the surplus permits
        self._debt += max(0, -delta)
