"""Account slots as leases in PostgreSQL, shared by every daemon on the database.

Every request sent for an account (a transfer, a listing, a search, the token requests
they make) holds a lease on one of the account's slots. The leases live in the `lease`
table: an account's cap is its live leases, counted across all daemons in the statement
that takes one (`asyncsat_take_lease`, `asyncsat_claim`), and a lease that its daemon
stops renewing expires after `lease_timeout` seconds, so the slots of a daemon that died
come back by themselves. This module keeps the accounts' logins (read from the credential
table; never sent to the lease table) and waits for a free slot when a listing needs one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import structlog

from asyncsat import secret_refs
from asyncsat.db import queries
from asyncsat.db.store import Store
from asyncsat.errors import AsyncsatError
from asyncsat.logs import Redactor
from asyncsat.models import Credential, Provider

log = structlog.get_logger()

ANONYMOUS = "anonymous"
ANONYMOUS_CONNECTIONS = 4


@dataclass(frozen=True)
class Login:
    """Who an account logs in as (user None: anonymous)."""

    user: str | None
    secret: str | None = field(repr=False)
    unreadable: str | None = None
    """Why its secret, kept by reference (`env:`, `file:`), could not be read here: a
    request of the account fails saying so (it never goes out without its login)."""


@dataclass(frozen=True)
class Lease:
    """One slot of an account, held in the database until released."""

    id: int
    provider_id: int
    account: str
    """`credential:<id>` or `anonymous`."""
    login: Login


class Accounts:
    """The logins and caps of every provider's accounts, as the credential table has them."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._logins: dict[str, Login] = {}
        self._caps: dict[int, int] = {}
        self._account_caps: dict[int, dict[str, int]] = {}

    def load(self, provider: Provider, credentials: list[Credential]) -> None:
        enabled = [c for c in credentials if c.enabled]
        for c in enabled:
            self._logins[f"credential:{c.id}"] = login = self._login(provider, c)
            self._redactor.add_login(c.username, login.secret)
        if enabled:
            caps = {f"credential:{c.id}": c.max_connections for c in enabled}
        else:
            cap = provider.settings.get("max_connections", ANONYMOUS_CONNECTIONS)
            ok = isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1
            caps = {ANONYMOUS: cap if ok and isinstance(cap, int) else ANONYMOUS_CONNECTIONS}
        self._caps[provider.id] = sum(caps.values())
        self._account_caps[provider.id] = caps

    def _login(self, provider: Provider, c: Credential) -> Login:
        """A credential's login, its secret read now when it is kept by reference (at each
        load: a rotated file or a daemon's new environment is taken up)."""
        if c.secret_ref is None:
            return Login(c.username, c.secret)
        try:
            return Login(c.username, secret_refs.read(c.secret_ref))
        except AsyncsatError as exc:
            why = (f"the secret of credential {c.username} of {provider.name} "
                   f"({c.secret_ref}) cannot be read here: {exc.message}")
            account = f"credential:{c.id}"
            if self._logins.get(account, Login(None, None)).unreadable != why:
                log.error("credential secret unreadable", provider=provider.name,
                          user=c.username, ref=c.secret_ref, error=exc.message)
            return Login(c.username, None, unreadable=why)

    def login(self, account: str) -> Login:
        """The login of an account (anonymous for one unknown: a credential removed)."""
        return self._logins.get(account, Login(None, None))

    def capacity(self, provider_id: int) -> int:
        return self._caps.get(provider_id, 0)

    def caps(self, provider_id: int) -> dict[str, int]:
        """The cap of each of a provider's accounts (none known: empty)."""
        return dict(self._account_caps.get(provider_id, {}))


class Leases:
    """Takes and gives back leases for one daemon."""

    def __init__(self, store: Store, accounts: Accounts, owner: str, seconds: float,
                 freed: asyncio.Event) -> None:
        self._store = store
        self._accounts = accounts
        self.owner = owner
        self.seconds = seconds
        self._freed = freed
        self.held: dict[int, int] = {}
        """Leases this daemon holds, per provider (for the metrics)."""
        self._holders: dict[int, tuple[int | None, int]] = {}
        """Per live lease: the download it is for (None: a listing or a search), and its
        provider."""
        self._unreleased: dict[int, int | None] = {}
        """Leases given back whose statement met a lost connection (lease id: its
        download): sent again after the next heartbeat (`release_again`)."""

    def wrap(self, lease_id: int, provider_id: int, account: str,
             download_id: int | None = None) -> Lease:
        """A lease the claim statement took (a transfer's: for `download_id`)."""
        self.held[provider_id] = self.held.get(provider_id, 0) + 1
        self._holders[lease_id] = (download_id, provider_id)
        return Lease(lease_id, provider_id, account, self._accounts.login(account))

    def handed_over(self, lease: Lease, download_id: int) -> None:
        """The lease went on to the next download (`asyncsat_hand_over`; a run's last)."""
        self._holders[lease.id] = (download_id, lease.provider_id)

    def holds(self, lease: Lease, download_id: int) -> bool:
        """Whether the lease is still this download's (not handed on, not given back)."""
        return self._holders.get(lease.id, (None, 0))[0] == download_id

    async def take(self, provider_id: int) -> Lease:
        """A slot of the provider's accounts, waiting until one is free (a freed lease
        wakes the wait; a slow poll covers a notification lost with the connection)."""
        while True:
            self._freed.clear()
            taken = await self._store.call(queries.lease_take, self.owner, provider_id,
                                           self.seconds)
            if taken is not None:
                return self.wrap(taken[0], provider_id, taken[1])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), timeout=2.0)

    def given_back(self, lease: Lease, download_id: int | None = None) -> bool:
        """Count a lease as given back (a statement that recorded an outcome deleted it
        too); False when it already was, or went on to another download."""
        if lease.id not in self._holders or self._holders[lease.id][0] != download_id:
            return False
        del self._holders[lease.id]
        self.held[lease.provider_id] = max(0, self.held.get(lease.provider_id, 1) - 1)
        return True

    def forget(self, download_ids: set[int]) -> None:
        """The leases of these downloads ended in the database (their rows were put back):
        no longer held here."""
        for lease_id, (holder, provider_id) in list(self._holders.items()):
            if holder in download_ids:
                del self._holders[lease_id]
                self.held[provider_id] = max(0, self.held.get(provider_id, 1) - 1)

    async def release(self, lease: Lease, download_id: int | None = None) -> None:
        """Give a slot back; a transfer's lease only while it is still that download's.
        Never waits for the database: one that is away gets the statement again after
        the next heartbeat (`release_again`)."""
        if self.given_back(lease, download_id):
            sent, _ = await self._store.once(queries.lease_release, lease.id, download_id)
            if not sent:
                self._unreleased[lease.id] = download_id

    async def release_again(self) -> None:
        """Send the give-backs that met a lost connection again (the heartbeat renews every
        lease of the daemon: one left behind would hold its slot for as long as the daemon
        runs). A lease that ends tells every daemon (NOTIFY): the claims wake."""
        for lease_id, download_id in list(self._unreleased.items()):
            sent, _ = await self._store.once(queries.lease_release, lease_id, download_id)
            if not sent:
                return
            del self._unreleased[lease_id]


class Renewal:
    """When a daemon cut from the database must let its transfers go.

    A lease lapses `seconds` after its last renewal, counted by the database from a moment
    after the renewal was sent; another daemon may then take its download over and open a
    connection of its own. A daemon that cannot renew (the database is restarting, or out
    of reach) stops its transfers `margin` before that moment, so that the two connections
    never run together and the account's cap holds; the rows are resumed from their `.part`
    by whichever daemon claims them next. Times are `time.monotonic()` seconds.
    """

    def __init__(self, seconds: float, now: float) -> None:
        self.seconds = seconds
        self.every = max(0.2, seconds / 3)
        """Seconds between two heartbeats."""
        self.margin = min(2.0, seconds / 4)
        self._renewed = now
        self._let_go = False

    @property
    def deadline(self) -> float:
        """The last moment the leases surely hold (less the margin) without a renewal."""
        return self._renewed + self.seconds - self.margin

    def wait(self, now: float) -> float:
        """Seconds until the next heartbeat; also how long that heartbeat may take (it may
        not outlast the deadline)."""
        if self._let_go:
            return self.every
        return max(0.05, min(self.every, self.deadline - now))

    def renewed(self, sent: float) -> None:
        """A heartbeat sent at `sent` went through."""
        self._renewed = sent
        self._let_go = False

    def lapsing(self, now: float) -> bool:
        """True once when the deadline has passed without a renewal."""
        if self._let_go or now < self.deadline:
            return False
        self._let_go = True
        return True
