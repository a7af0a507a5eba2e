"""Connections: the pool for queries, single connections for LISTEN, schema application."""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from typing import Any

import asyncpg

from asyncsat.errors import DatabaseError, DatabaseUnavailable

SCHEMA_LOCK = 0x61737973  # advisory lock key taken while the schema is applied

# errors that mean "the server is gone for now", as opposed to a bad statement
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # a pooled connection the server cut in the middle of an operation can report this
    # ("cannot switch to state N; another operation is in progress") on its next use
    asyncpg.InternalClientError,
    TimeoutError,
)
CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
"""A transaction PostgreSQL aborted for the others' sake: run again, it goes through."""


def schema_sql() -> str:
    """The schema shipped inside the package (the top-level schema.sql links to it)."""
    return resources.files("asyncsat").joinpath("schema.sql").read_text(encoding="utf-8")


def schema_version(sql: str) -> int:
    """The version schema.sql records (`asyncsat_schema`)."""
    found = re.search(r"INSERT INTO asyncsat_schema \(version\) VALUES \((\d+)\)", sql)
    if found is None:
        raise DatabaseError("schema.sql records no version")
    return int(found.group(1))


async def database_schema_version(conn: Any) -> int | None:
    """The version of the schema a database has: None for none, 0 for one made before
    schema versions (0.5 and earlier)."""
    made, versioned = await conn.fetchrow(
        "SELECT to_regclass('download') IS NOT NULL, to_regclass('asyncsat_schema') IS NOT NULL")
    if not made:
        return None
    if not versioned:
        return 0
    version: int = await conn.fetchval("SELECT version FROM asyncsat_schema")
    return version


async def _init_connection(conn: Any) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(dsn: str, *, timeout: float = 10.0, name: str = "asyncsat") -> Any:
    """One connection with the jsonb codec (used for LISTEN and the CLI); `name` is its
    application_name, what `pg_stat_activity` shows of it. DatabaseUnavailable when the
    server cannot be reached or is not ready yet (it may be later), DatabaseError when it
    refuses (a bad login, no such database)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout,
                                     server_settings={"application_name": name})
    except (*CONNECTION_ERRORS, asyncpg.TooManyConnectionsError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from None
    try:
        await _init_connection(conn)
    except BaseException as exc:
        conn.terminate()
        if isinstance(exc, CONNECTION_ERRORS):  # (cut right after it was made)
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
        raise
    return conn


async def alive(conn: Any) -> bool:
    """Whether a connection still answers (after an error: was the connection lost?)."""
    if conn.is_closed():
        return False
    try:
        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
    except Exception:
        return False
    return True


async def _keep(conn: Any) -> None:
    """A connection going back to the pool keeps its session: the daemon leaves nothing in
    one (no LISTEN, no session setting, advisory locks only for a transaction), and asyncpg
    has already rolled back a transaction left open. asyncpg's default reset would send a
    query (unlisten, reset all, unlock all) at every release: a round trip per statement."""


async def create_pool(dsn: str, *, size: int = 4, idle_in_transaction: float = 30.0) -> Any:
    """The pool used for every query of the daemon.

    A daemon paused in the middle of a transaction (SIGSTOP, a frozen VM) would hold its
    locks and stop every other daemon's claims: the server ends such a session after
    `idle_in_transaction` seconds (the lease timeout), and its locks with it.

    DatabaseUnavailable when the server cannot be reached or is not ready yet (it may be
    later), DatabaseError when it refuses (a bad login, no such database).
    """
    try:
        return await asyncpg.create_pool(
            dsn, min_size=1, max_size=size, init=_init_connection, reset=_keep, timeout=10,
            max_inactive_connection_lifetime=60,
            server_settings={
                "application_name": "asyncsat daemon",
                "idle_in_transaction_session_timeout": str(int(idle_in_transaction * 1000)),
            },
        )
    except (*CONNECTION_ERRORS, asyncpg.TooManyConnectionsError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL: {exc}") from None


async def apply_schema(conn: Any, *, always: bool) -> bool:
    """Apply schema.sql: with `always` (`asyncsat init`), else to a database with no schema.
    Never to a database of a newer release (its functions would be replaced with this
    release's): DatabaseError. Returns applied."""
    if not always and await database_schema_version(conn) is not None:
        return False
    sql = schema_sql()
    mine = schema_version(sql)
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        version = await database_schema_version(conn)  # (again: under the lock)
        if version is not None and not always:
            return False  # (made meanwhile)
        if version is not None and version > mine:
            raise DatabaseError(
                f"the database has the schema of a newer asyncsat release (version "
                f"{version}, this release's is {mine}): upgrade asyncsat, not the database")
        await conn.execute(sql)
    return True


async def check_schema(conn: Any) -> None:
    """A daemon's start: the schema applied to a database with none; DatabaseError when the
    database's schema is older than this release's: its daemon needs this release's
    functions (`asyncsat init` upgrades the schema; it is not done at a daemon's start,
    where it would lock tables under the daemons still running). One look at the version
    for a database made already."""
    version = await database_schema_version(conn)
    if version is None:
        if await apply_schema(conn, always=False):  # (looks again, under the schema's lock)
            return
        version = await database_schema_version(conn)  # (made meanwhile, maybe older)
    mine = schema_version(schema_sql())
    if version is not None and version < mine:
        raise DatabaseError(
            f"the database has the schema of an earlier asyncsat release (version {version},"
            f" this release needs {mine}): `asyncsat init` upgrades it")
