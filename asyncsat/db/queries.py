"""The only module that sends SQL: one async function per statement, `$n` parameters only.

`db` is an asyncpg connection or pool (anything with execute/fetch/fetchrow/fetchval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from asyncsat.errors import UsageError
from asyncsat.models import Checksum, Credential, Download, Provider, Request

DAEMON_LOCK = 0x61737974  # advisory lock held by the one running daemon

_DOWNLOAD_COLUMNS = """
    d.id, d.request_id, d.provider_id, p.name AS provider, d.url, d.name, d.dest, d.size,
    d.checksum_algo, d.checksum_value, d.status, d.bytes_done, d.attempts, d.failures,
    d.error, d.path, d.etag, d.last_modified, d.login_user, d.login_secret, d.size_origin
"""


def _download(row: Any) -> Download:
    checksum = (
        Checksum(row["checksum_algo"], row["checksum_value"])
        if row["checksum_algo"] and row["checksum_value"] else None
    )
    return Download(
        id=row["id"], request_id=row["request_id"], provider_id=row["provider_id"],
        provider=row["provider"], url=row["url"], name=row["name"], dest=row["dest"],
        size=row["size"], checksum=checksum, status=row["status"], bytes_done=row["bytes_done"],
        attempts=row["attempts"], failures=row["failures"], error=row["error"],
        path=row["path"], etag=row["etag"], last_modified=row["last_modified"],
        login_user=row["login_user"], login_secret=row["login_secret"],
        size_from_server=row["size_origin"] == "server",
    )


def _provider(row: Any) -> Provider:
    return Provider(
        id=row["id"], name=row["name"], protocol=row["protocol"], url=row["url"],
        settings=dict(row["settings"] or {}), implicit=row["implicit"],
    )


def _request(r: Any) -> Request:
    return Request(id=r["id"], provider_id=r["provider_id"], urls=r["urls"], search=r["search"],
                   dest=r["dest"], checksum=r["checksum"], login_user=r["login_user"],
                   login_secret=r["login_secret"])


# -- providers and credentials ------------------------------------------------------------

async def provider_add(
    db: Any, name: str, protocol: str, url: str | None, settings: dict[str, object]
) -> Provider:
    try:
        row = await db.fetchrow(
            "INSERT INTO provider (name, protocol, url, settings) VALUES ($1, $2, $3, $4)"
            " RETURNING *",
            name, protocol, url, settings,
        )
    except asyncpg.UniqueViolationError:
        raise UsageError(f"provider {name!r} already exists") from None
    except asyncpg.CheckViolationError:
        raise UsageError(
            f"invalid provider name {name!r}: use letters, digits, '.', '_' and '-'"
        ) from None
    return _provider(row)


async def provider_list(db: Any) -> list[Provider]:
    return [_provider(r) for r in await db.fetch("SELECT * FROM provider ORDER BY name")]


async def provider_get(db: Any, name: str) -> Provider | None:
    row = await db.fetchrow("SELECT * FROM provider WHERE name = $1", name)
    return _provider(row) if row else None


async def provider_ensure_implicit(db: Any, name: str, protocol: str, url: str) -> Provider:
    """The implicit provider of a host, created on first use."""
    row = await db.fetchrow(
        "INSERT INTO provider (name, protocol, url, implicit) VALUES ($1, $2, $3, true)"
        " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING *",
        name, protocol, url,
    )
    return _provider(row)


async def credential_upsert(
    db: Any, provider_id: int, username: str, secret: str, max_connections: int | None
) -> None:
    await db.execute(
        "INSERT INTO credential (provider_id, username, secret, max_connections)"
        " VALUES ($1, $2, $3, coalesce($4, 2))"
        " ON CONFLICT (provider_id, username) DO UPDATE SET secret = EXCLUDED.secret,"
        " max_connections = coalesce($4, credential.max_connections), enabled = true",
        provider_id, username, secret, max_connections,
    )


async def credential_list(db: Any) -> list[dict[str, object]]:
    rows = await db.fetch(
        "SELECT c.id, p.name AS provider, c.username AS user, c.max_connections, c.enabled"
        " FROM credential c JOIN provider p ON p.id = c.provider_id ORDER BY p.name, c.username"
    )
    return [dict(r) for r in rows]


async def accounts(db: Any) -> list[tuple[Provider, list[Credential]]]:
    """Every provider with its enabled credentials (the input of slot sizing)."""
    providers = await provider_list(db)
    rows = await db.fetch("SELECT * FROM credential WHERE enabled ORDER BY id")
    by_provider: dict[int, list[Credential]] = {}
    for r in rows:
        by_provider.setdefault(r["provider_id"], []).append(Credential(
            id=r["id"], provider_id=r["provider_id"], username=r["username"],
            secret=r["secret"], max_connections=r["max_connections"], enabled=r["enabled"],
        ))
    return [(p, by_provider.get(p.id, [])) for p in providers]


# -- requests -------------------------------------------------------------------------------

async def request_insert(
    db: Any, *, provider_id: int | None, urls: Sequence[str] | None,
    search: dict[str, object] | None, dest: str | None, checksum: str | None, status: str,
    login_user: str | None = None, login_secret: str | None = None,
) -> int:
    value: int = await db.fetchval(
        "INSERT INTO request (provider_id, urls, search, dest, checksum, status, login_user,"
        " login_secret) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        provider_id, list(urls) if urls is not None else None, search, dest, checksum, status,
        login_user, login_secret,
    )
    return value


async def request_lock_queued(
    db: Any, limit: int = 20, exclude: Sequence[int] = ()
) -> list[Request]:
    """Lock queued requests for resolution (inside a transaction), but those in `exclude`."""
    rows = await db.fetch(
        "SELECT * FROM request WHERE status = 'queued' AND NOT id = ANY($2::bigint[])"
        " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit, list(exclude),
    )
    return [
        _request(r) for r in rows
    ]


async def request_lock(db: Any, request_id: int) -> Request | None:
    """Lock one request that is still queued (inside a transaction); None otherwise."""
    r = await db.fetchrow(
        "SELECT * FROM request WHERE id = $1 AND status = 'queued' FOR UPDATE", request_id)
    if r is None:
        return None
    return _request(r)


async def request_scrub(db: Any, request_id: int, urls: Sequence[str | None] | None) -> None:
    """Forget the logins of a request that left the queue unresolved."""
    await db.execute(
        "UPDATE request SET urls = coalesce($2, urls), login_secret = NULL WHERE id = $1",
        request_id, list(urls) if urls is not None else None,
    )


async def request_status(db: Any, request_id: int) -> str | None:
    value: str | None = await db.fetchval("SELECT status FROM request WHERE id = $1",
                                          request_id)
    return value


async def provider_by_id(db: Any, provider_id: int) -> Provider | None:
    row = await db.fetchrow("SELECT * FROM provider WHERE id = $1", provider_id)
    return _provider(row) if row else None


async def request_finish(
    db: Any, request_id: int, status: str, error: str | None,
    urls: Sequence[str | None] | None,
) -> None:
    await db.execute(
        "UPDATE request SET status = $2, error = $3, urls = coalesce($4, urls),"
        " login_secret = NULL WHERE id = $1",
        request_id, status, error, list(urls) if urls is not None else None,
    )


async def download_add(
    db: Any, *, request_id: int, provider_id: int, url: str, name: str | None, dest: str,
    size: int | None, checksum: Checksum | None, login_user: str | None,
    login_secret: str | None, size_origin: str = "catalog",
) -> int:
    """Queue a product once; asking again for a failed or cancelled one queues it again.

    A `name` another product of the folder already has (daily folders reusing a file name,
    two searches queueing at once) is left for the transfer to choose (`name_<id>`).
    """
    args = (request_id, provider_id, url, name, dest, size,
            checksum.algo if checksum else None, checksum.value if checksum else None,
            login_user, login_secret, size_origin)
    if name is None:
        download_id: int = await db.fetchval(_DOWNLOAD_ADD, *args)
    else:
        try:
            async with db.transaction():  # a savepoint: the caller's transaction goes on
                download_id = await db.fetchval(_DOWNLOAD_ADD, *args)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "download_file_unique":
                raise
            download_id = await db.fetchval(_DOWNLOAD_ADD, *args[:3], None, *args[4:])
    await db.execute(
        "INSERT INTO request_download (request_id, download_id) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING",
        request_id, download_id,
    )
    return download_id


_DOWNLOAD_ADD = (
    "INSERT INTO download (request_id, provider_id, url, name, dest, size, checksum_algo,"
    " checksum_value, login_user, login_secret, size_origin)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    " ON CONFLICT (provider_id, md5(url)) DO UPDATE SET"
    "  status = CASE WHEN download.status IN ('failed', 'cancelled') THEN 'queued'"
    "           ELSE download.status END,"
    "  failures = CASE WHEN download.status IN ('failed', 'cancelled') THEN 0"
    "             ELSE download.failures END,"
    "  not_before = now(),"
    # a failed product asked for again takes the new checksum (the old one may be a typo)
    "  checksum_algo = CASE WHEN download.status IN ('failed', 'cancelled')"
    "   AND EXCLUDED.checksum_algo IS NOT NULL THEN EXCLUDED.checksum_algo"
    "   ELSE coalesce(download.checksum_algo, EXCLUDED.checksum_algo) END,"
    "  checksum_value = CASE WHEN download.status IN ('failed', 'cancelled')"
    "   AND EXCLUDED.checksum_value IS NOT NULL THEN EXCLUDED.checksum_value"
    "   ELSE coalesce(download.checksum_value, EXCLUDED.checksum_value) END,"
    "  login_user = coalesce(EXCLUDED.login_user, download.login_user),"
    "  login_secret = coalesce(EXCLUDED.login_secret, download.login_secret)"
    " RETURNING id"
)


# -- the daemon's claims and state changes ----------------------------------------------------

async def release_running(db: Any) -> int:
    """At start-up: rows left running by a dead process go back to the queue."""
    result: str = await db.execute(
        "UPDATE download SET status = 'queued', not_before = now() WHERE status = 'running'"
    )
    return int(result.split()[-1])


async def queued_providers(db: Any) -> list[tuple[int, int, float | None]]:
    """(provider_id, rows due now, seconds until the next row not yet due) per provider."""
    rows = await db.fetch(
        "SELECT provider_id, count(*) FILTER (WHERE not_before <= now()) AS due,"
        " extract(epoch FROM min(not_before) FILTER (WHERE not_before > now()) - now())::float8"
        " AS wait FROM download WHERE status = 'queued' GROUP BY provider_id ORDER BY provider_id"
    )
    return [(r["provider_id"], r["due"], r["wait"]) for r in rows]


async def pending_work(db: Any) -> bool:
    """True while any request or download waits to be processed."""
    value: bool = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM request WHERE status = 'queued')"
        " OR EXISTS (SELECT 1 FROM download WHERE status IN ('queued', 'running'))"
    )
    return value


async def claim(db: Any, provider_id: int, limit: int, default_dest: str) -> list[Download]:
    """Mark up to `limit` due rows of a provider running, oldest first.

    A row inserted without a destination gets the daemon's default one, so that the
    unique file index sees the folder it is really written to.
    """
    rows = await db.fetch(
        f"""
        WITH picked AS (
            SELECT id FROM download
            WHERE status = 'queued' AND provider_id = $1 AND not_before <= now()
            ORDER BY not_before, id LIMIT $2 FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE download d SET status = 'running', attempts = d.attempts + 1,
                started_at = now(), finished_at = NULL, dest = coalesce(d.dest, $3),
                -- a row inserted with a name and no dest: another product of the default
                -- folder may have that name; the transfer then picks `name_<id>`
                name = CASE WHEN d.dest IS NULL AND EXISTS (
                    SELECT 1 FROM download o WHERE o.provider_id = d.provider_id
                    AND o.id <> d.id AND coalesce(o.dest, '') = $3 AND o.name = d.name)
                    THEN NULL ELSE d.name END
            FROM picked WHERE d.id = picked.id RETURNING d.*
        )
        SELECT {_DOWNLOAD_COLUMNS} FROM claimed d JOIN provider p ON p.id = d.provider_id
        ORDER BY d.id
        """,
        provider_id, limit, default_dest,
    )
    return [_download(r) for r in rows]


async def download_named(
    db: Any, download_id: int, *, name: str, size: int | None, etag: str | None,
    last_modified: str | None,
) -> bool:
    """Record what the server told at the start of a file: name, size and validators.

    A size from a catalog or a user stays; one the server announced is replaced.
    False (nothing written) when another download of the same folder has that name.
    """
    try:
        await db.execute(
            "UPDATE download SET name = $2, etag = $4, last_modified = $5,"
            " size = CASE WHEN size IS NULL OR size_origin = 'server'"
            "  THEN coalesce($3, size) ELSE size END,"
            " size_origin = CASE WHEN size IS NULL THEN 'server' ELSE size_origin END"
            " WHERE id = $1",
            download_id, name, size, etag, last_modified,
        )
    except asyncpg.UniqueViolationError:
        return False
    return True


async def download_progress(db: Any, download_id: int, bytes_done: int) -> None:
    await db.execute(
        "UPDATE download SET bytes_done = $2 WHERE id = $1 AND status = 'running'",
        download_id, bytes_done,
    )


async def download_done(db: Any, download_id: int, *, size: int, path: str) -> None:
    await db.execute(
        "UPDATE download SET status = 'done', bytes_done = $2, size = $2, path = $3,"
        " error = NULL, failures = 0, finished_at = now() WHERE id = $1",
        download_id, size, path,
    )


async def download_requeue(
    db: Any, download_id: int, *, error: str | None, failures: int, bytes_done: int,
    delay: float,
) -> None:
    """Back to the queue, due after `delay` seconds (a retry, or a clean stop)."""
    await db.execute(
        "UPDATE download SET status = 'queued', error = $2, failures = $3, bytes_done = $4,"
        " not_before = now() + make_interval(secs => $5)"
        " WHERE id = $1 AND status = 'running'",
        download_id, error, failures, bytes_done, delay,
    )


async def download_end(
    db: Any, download_id: int, *, status: str, error: str, failures: int, bytes_done: int
) -> None:
    """A final failure: `failed` or `offline`."""
    await db.execute(
        "UPDATE download SET status = $2, error = $3, failures = $4, bytes_done = $5,"
        " finished_at = now() WHERE id = $1 AND status = 'running'",
        download_id, status, error, failures, bytes_done,
    )


async def download_status(db: Any, download_id: int) -> str | None:
    value: str | None = await db.fetchval("SELECT status FROM download WHERE id = $1", download_id)
    return value


# -- user commands ----------------------------------------------------------------------------

async def status_rows(db: Any, request_id: int | None = None) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT d.id, d.request_id, p.name AS provider, d.name, d.url, d.status, d.bytes_done,"
        " d.size, d.attempts, d.error, d.path, d.dest, d.checksum_algo, d.checksum_value,"
        " d.created_at, d.updated_at, d.finished_at"
        " FROM download d JOIN provider p ON p.id = d.provider_id"
        " WHERE $1::bigint IS NULL OR d.request_id = $1 OR d.id IN"
        "  (SELECT download_id FROM request_download WHERE request_id = $1)"
        " ORDER BY d.id",
        request_id,
    )
    return [dict(r) for r in rows]


async def requests_unresolved(db: Any, request_id: int | None = None) -> list[dict[str, Any]]:
    """Requests not (yet) turned into downloads: queued, or failed with their reason."""
    rows = await db.fetch(
        "SELECT id, status, urls, search, error FROM request"
        " WHERE status IN ('queued', 'failed') AND ($1::bigint IS NULL OR id = $1)"
        " ORDER BY id",
        request_id,
    )
    return [dict(r) for r in rows]


async def request_exists(db: Any, request_id: int) -> bool:
    value: bool = await db.fetchval("SELECT EXISTS (SELECT 1 FROM request WHERE id = $1)",
                                    request_id)
    return value


async def request_state(db: Any, request_id: int) -> tuple[str, str | None, dict[str, int]]:
    """(request status, request error, count of its downloads by status)."""
    req = await db.fetchrow("SELECT status, error FROM request WHERE id = $1", request_id)
    rows = await db.fetch(
        "SELECT d.status, count(*) AS n FROM download d JOIN request_download rd"
        " ON rd.download_id = d.id WHERE rd.request_id = $1 GROUP BY d.status",
        request_id,
    )
    return req["status"], req["error"], {r["status"]: r["n"] for r in rows}


async def downloads_missing(db: Any, ids: Sequence[int]) -> list[int]:
    rows = await db.fetch(
        "SELECT i FROM unnest($1::bigint[]) AS i WHERE NOT EXISTS"
        " (SELECT 1 FROM download WHERE id = i)",
        list(ids),
    )
    return [r["i"] for r in rows]


async def retry(db: Any, ids: Sequence[int] | None) -> int:
    """Queue failed, cancelled or offline downloads again (all failed ones when `ids` is None)."""
    result: str = await db.execute(
        "UPDATE download SET status = 'queued', failures = 0, error = NULL, not_before = now(),"
        " finished_at = NULL"
        " WHERE ($1::bigint[] IS NULL AND status = 'failed')"
        "    OR (id = ANY($1::bigint[]) AND status IN ('failed', 'cancelled', 'offline'))",
        list(ids) if ids is not None else None,
    )
    return int(result.split()[-1])


async def cancel(db: Any, ids: Sequence[int]) -> int:
    result: str = await db.execute(
        "UPDATE download SET status = 'cancelled', finished_at = now()"
        " WHERE id = ANY($1::bigint[]) AND status IN ('queued', 'running', 'offline')",
        list(ids),
    )
    return int(result.split()[-1])


async def download_counts(db: Any) -> dict[str, int]:
    """How many downloads there are in each status."""
    rows = await db.fetch("SELECT status, count(*) AS n FROM download GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


async def daemon_serving(db: Any) -> bool:
    """True when a daemon holds the single-daemon lock (tested without keeping it)."""
    value: bool = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND objid = $1::bigint::oid AND objsubid = 1)",
        DAEMON_LOCK,
    )
    return value


async def try_daemon_lock(db: Any) -> bool:
    """Take the single-daemon lock on this connection (session-level)."""
    value: bool = await db.fetchval("SELECT pg_try_advisory_lock($1)", DAEMON_LOCK)
    return value
