"""The only module that sends SQL: one async function per statement, `$n` parameters only.

`db` is an asyncpg connection or pool (anything with execute/fetch/fetchrow/fetchval).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import asyncpg

from asyncsat.errors import UsageError
from asyncsat.models import Added, Checksum, Credential, Download, Provider, Request


@dataclass(frozen=True)
class Fence:
    """Who works a claimed row, and in which attempt: every write of the row after its claim
    matches both, so a daemon that lost its lease (paused past it, cut from the database)
    can neither complete nor corrupt a row another daemon took over."""

    owner: str
    attempt: int


_FENCED = " AND status = 'running' AND owner = {o} AND attempts = {a}"


def _changed(result: str) -> bool:
    return result.split()[-1] != "0"

_DOWNLOAD_COLUMNS = """
    d.id, d.request_id, d.provider_id, p.name AS provider, d.url, d.name, d.dest, d.size,
    d.checksum_algo, d.checksum_value, d.status, d.bytes_done, d.attempts, d.failures,
    d.error, d.path, d.etag, d.last_modified, d.login_user, d.login_secret, d.size_origin,
    d.product_id, d.offline_checks, d.ordered_at, d.last_mismatch
"""


def _download(row: Any, *, id_column: str = "id") -> Download:
    checksum = (
        Checksum(row["checksum_algo"], row["checksum_value"])
        if row["checksum_algo"] and row["checksum_value"] else None
    )
    return Download(
        id=row[id_column], request_id=row["request_id"], provider_id=row["provider_id"],
        provider=row["provider"], url=row["url"], name=row["name"], dest=row["dest"],
        size=row["size"], checksum=checksum, status=row["status"], bytes_done=row["bytes_done"],
        attempts=row["attempts"], failures=row["failures"], error=row["error"],
        path=row["path"], etag=row["etag"], last_modified=row["last_modified"],
        login_user=row["login_user"], login_secret=row["login_secret"],
        size_from_server=row["size_origin"] == "server", product_id=row["product_id"],
        offline_checks=row["offline_checks"], ordered_at=row["ordered_at"],
        last_mismatch=row["last_mismatch"],
        claimed_from=row.get("claimed_from") or row["status"],
        sealed_attempt=row.get("sealed_attempt"),
    )


def _provider(row: Any) -> Provider:
    return Provider(
        id=row["id"], name=row["name"], protocol=row["protocol"], url=row["url"],
        settings=dict(row["settings"] or {}), implicit=row["implicit"], paused=row["paused"],
    )


def _request(r: Any) -> Request:
    return Request(id=r["id"], provider_id=r["provider_id"], urls=r["urls"], search=r["search"],
                   dest=r["dest"], checksum=r["checksum"], login_user=r["login_user"],
                   login_secret=r["login_secret"], follow=r["follow"],
                   watermark=r["watermark"], status=r["status"])


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


async def provider_get(db: Any, name: str, *, lock: bool = False) -> Provider | None:
    """A provider by name; `lock`: its row locked until the transaction ends (a change
    made from what it was)."""
    row = await db.fetchrow("SELECT * FROM provider WHERE name = $1"
                            + (" FOR NO KEY UPDATE" if lock else ""), name)
    return _provider(row) if row else None


async def provider_update(db: Any, provider_id: int, url: str | None,
                          settings: dict[str, object]) -> None:
    """A provider's URL and settings: the provider_notify trigger tells running daemons."""
    await db.execute("UPDATE provider SET url = $2, settings = $3 WHERE id = $1",
                     provider_id, url, settings)


async def provider_ensure_implicit(db: Any, name: str, protocol: str, url: str) -> Provider:
    """The implicit provider of a host, created on first use."""
    row = await db.fetchrow(
        "INSERT INTO provider (name, protocol, url, implicit) VALUES ($1, $2, $3, true)"
        " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING *",
        name, protocol, url,
    )
    return _provider(row)


async def provider_pause(db: Any, provider_id: int, paused: bool) -> tuple[int, int]:
    """Pause (or resume) a provider: the provider_notify trigger tells a running daemon.
    (downloads running now, downloads waiting: queued or offline)."""
    await db.execute("UPDATE provider SET paused = $2 WHERE id = $1", provider_id, paused)
    row = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'running') AS running,"
        " count(*) FILTER (WHERE status IN ('queued', 'offline')) AS waiting"
        " FROM download WHERE provider_id = $1",
        provider_id,
    )
    return int(row["running"]), int(row["waiting"])


async def paused_waiting(db: Any, request_id: int | None = None) -> list[tuple[str, int]]:
    """Paused providers with downloads waiting (of one request): (name, downloads)."""
    rows = await db.fetch(
        "SELECT p.name, count(d.id) AS n FROM provider p JOIN download d ON d.provider_id = p.id"
        " WHERE p.paused AND d.status IN ('queued', 'offline')"
        " AND ($1::bigint IS NULL OR d.id IN"
        "  (SELECT download_id FROM request_download WHERE request_id = $1))"
        " GROUP BY p.name ORDER BY p.name",
        request_id,
    )
    return [(r["name"], int(r["n"])) for r in rows]


async def credential_upsert(
    db: Any, provider_id: int, username: str, secret: str, max_connections: int | None,
    *, secret_ref: str | None = None,
) -> None:
    """An account added, or its secret replaced (by a value, or by a reference: `secret`
    is then empty)."""
    await db.execute(
        "INSERT INTO credential (provider_id, username, secret, max_connections, secret_ref)"
        " VALUES ($1, $2, $3, coalesce($4, 2), $5)"
        " ON CONFLICT (provider_id, username) DO UPDATE SET secret = EXCLUDED.secret,"
        " secret_ref = EXCLUDED.secret_ref,"
        " max_connections = coalesce($4, credential.max_connections), enabled = true",
        provider_id, username, secret, max_connections, secret_ref,
    )


async def provider_unfinished(db: Any, provider_id: int) -> tuple[int, int]:
    """(downloads queued, running or offline; requests still to be searched) of a provider."""
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM download WHERE provider_id = $1"
        "  AND status IN ('queued', 'running', 'offline')) AS downloads,"
        " (SELECT count(*) FROM request WHERE provider_id = $1"
        "  AND status IN ('queued', 'following'))"
        " AS requests",
        provider_id,
    )
    return int(row["downloads"]), int(row["requests"])


async def provider_remove(db: Any, provider_id: int) -> tuple[int, int]:
    """Delete a provider, its credentials and its download rows (inside a transaction).

    Unfinished downloads are cancelled first, so that a daemon running one stops it.
    Returns (credentials, downloads) removed.
    """
    await db.execute(
        "UPDATE download SET status = 'cancelled', finished_at = now()"
        " WHERE provider_id = $1 AND status IN ('queued', 'running', 'offline')",
        provider_id,
    )
    await db.execute(
        "UPDATE request SET status = 'cancelled', error = 'its provider was removed'"
        " WHERE provider_id = $1 AND status IN ('queued', 'following')",
        provider_id,
    )
    # a request that had products of this provider only is left with none: it says why
    # (it read `done`, with nothing found): cancelled, as its downloads were
    await db.execute(
        "UPDATE request r SET status = 'cancelled', login_secret = NULL,"
        " error = 'its provider was removed, with its downloads'"
        " WHERE r.status = 'resolved' AND (r.provider_id = $1 OR r.id IN"
        "  (SELECT rd.request_id FROM request_download rd JOIN download d"
        "   ON d.id = rd.download_id WHERE d.provider_id = $1))"
        " AND NOT EXISTS (SELECT 1 FROM request_download rd JOIN download d"
        "  ON d.id = rd.download_id WHERE rd.request_id = r.id AND d.provider_id <> $1)",
        provider_id,
    )
    downloads = await db.execute("DELETE FROM download WHERE provider_id = $1", provider_id)
    credentials = await db.execute("DELETE FROM credential WHERE provider_id = $1",
                                   provider_id)
    await db.execute("DELETE FROM provider WHERE id = $1", provider_id)
    return int(credentials.split()[-1]), int(downloads.split()[-1])


async def credential_update(db: Any, provider_id: int, username: str,
                            max_connections: int | None, enabled: bool | None) -> \
        tuple[int, bool, int] | None:
    """Change an account's cap or use (None: kept): (its cap, whether it is enabled, the
    provider's other enabled credentials), None when it has none of that user. The
    credential_notify trigger tells running daemons."""
    row = await db.fetchrow(
        "WITH c AS (UPDATE credential SET max_connections = coalesce($3, max_connections),"
        " enabled = coalesce($4, enabled) WHERE provider_id = $1 AND username = $2"
        " RETURNING id, max_connections, enabled)"
        " SELECT c.max_connections, c.enabled, (SELECT count(*) FROM credential o"
        "  WHERE o.provider_id = $1 AND o.enabled AND o.id <> c.id) AS others FROM c",
        provider_id, username, max_connections, enabled)
    return None if row is None else (row["max_connections"], row["enabled"], row["others"])


async def has_enabled_credential(db: Any, provider_id: int) -> bool:
    return bool(await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM credential WHERE provider_id = $1 AND enabled)",
        provider_id))


async def credential_remove(db: Any, provider_id: int, username: str) -> bool:
    result: str = await db.execute(
        "DELETE FROM credential WHERE provider_id = $1 AND username = $2",
        provider_id, username,
    )
    return result != "DELETE 0"


async def credential_list(db: Any) -> list[dict[str, object]]:
    rows = await db.fetch(
        "SELECT c.id, p.name AS provider, c.username AS user, c.max_connections, c.enabled,"
        " c.secret_ref"
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
            secret_ref=r["secret_ref"],
        ))
    return [(p, by_provider.get(p.id, [])) for p in providers]


# -- requests -------------------------------------------------------------------------------

async def request_insert(
    db: Any, *, provider_id: int | None, urls: Sequence[str] | None,
    search: dict[str, object] | None, dest: str | None, checksum: str | None, status: str,
    login_user: str | None = None, login_secret: str | None = None, follow: bool = False,
) -> int:
    value: int = await db.fetchval(
        "INSERT INTO request (provider_id, urls, search, dest, checksum, status, login_user,"
        " login_secret, follow) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        provider_id, list(urls) if urls is not None else None, search, dest, checksum, status,
        login_user, login_secret, follow,
    )
    return value


async def request_lock_queued(
    db: Any, limit: int = 20, exclude: Sequence[int] = (), daemon_id: str | None = None,
) -> list[Request]:
    """Lock requests to resolve (inside a transaction), but those in `exclude` (this
    daemon's, being resolved) and those another daemon resolves: the queued ones, and the
    standing ones whose next run is due."""
    rows = await db.fetch(
        "SELECT * FROM request WHERE (status = 'queued'"
        "  OR (status = 'following' AND coalesce(next_run, now()) <= now()))"
        " AND NOT id = ANY($2::bigint[])"
        " AND (coalesce(resolving_until <= now(), true) OR resolver = $3)"
        " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit, list(exclude), daemon_id,
    )
    return [
        _request(r) for r in rows
    ]


async def request_lock(db: Any, request_id: int, daemon_id: str) -> Request | None:
    """Lock one request still to resolve, queued or standing, by this daemon (inside a
    transaction); None when it was resolved, failed or cancelled meanwhile, or another
    daemon took it over (this one was paused past its lease)."""
    r = await db.fetchrow(
        "SELECT * FROM request WHERE id = $1 AND status IN ('queued', 'following')"
        " AND (coalesce(resolving_until <= now(), true) OR resolver = $2) FOR UPDATE",
        request_id, daemon_id)
    if r is None:
        return None
    return _request(r)


async def request_resolving(db: Any, request_ids: Sequence[int], daemon_id: str,
                            lease_seconds: float) -> None:
    """These requests are being resolved by this daemon (inside the transaction that picked
    them): the other daemons leave them alone while the heartbeat renews the lease."""
    await db.execute(
        "UPDATE request SET resolver = $2,"
        " resolving_until = now() + make_interval(secs => $3) WHERE id = ANY($1::bigint[])",
        list(request_ids), daemon_id, lease_seconds)


async def request_resolving_renew(db: Any, daemon_id: str, request_ids: Sequence[int],
                                  lease_seconds: float) -> None:
    """The heartbeat of the requests this daemon resolves now (a statement of its own: it
    locks no download row, so it never waits in a circle with a resolve's transaction). A
    mark that lapsed is renewed too while no other daemon took the request; one its search
    cleared as it ended (while this heartbeat was on its way) stays cleared."""
    await db.execute(
        "UPDATE request SET resolving_until = now() + make_interval(secs => $3)"
        " WHERE resolver = $1 AND id = ANY($2::bigint[]) AND resolving_until IS NOT NULL",
        daemon_id, list(request_ids), lease_seconds)


async def request_resolved_by(db: Any, daemon_id: str, request_id: int | None = None) -> None:
    """This daemon no longer resolves the request (None: any of its requests)."""
    await db.execute(
        "UPDATE request SET resolving_until = NULL WHERE resolver = $1"
        " AND resolving_until IS NOT NULL AND ($2::bigint IS NULL OR id = $2)",
        daemon_id, request_id)


async def request_scrub(db: Any, request_id: int, urls: Sequence[str | None] | None) -> None:
    """Forget the logins of a request that left the queue unresolved (not of one another
    daemon took over: it still needs them)."""
    await db.execute(
        "UPDATE request SET urls = coalesce($2, urls), login_secret = NULL WHERE id = $1"
        " AND status NOT IN ('queued', 'following')",
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


async def request_follow_next(
    db: Any, request_id: int, *, watermark: Any, interval: float, urls: None = None
) -> None:
    """A standing request ran: its watermark moves on (never past now: one product dated in
    the future would make every later run search from then on; one that an earlier release
    left in the future comes back to now), its next run is due in `interval`."""
    await db.execute(
        "UPDATE request SET status = 'following', error = NULL, runs = runs + 1,"
        " watermark = CASE WHEN greatest(watermark, $2) > now() THEN now()"
        "  ELSE greatest(watermark, $2) END,"
        " next_run = now() + make_interval(secs => $3)"
        " WHERE id = $1",
        request_id, watermark, interval,
    )


async def request_retry_later(db: Any, request_id: int, error: str, delay: float) -> None:
    """A standing request whose run failed stays standing; the error shows until a run works."""
    await db.execute(
        "UPDATE request SET error = $2, next_run = now() + make_interval(secs => $3)"
        " WHERE id = $1 AND status = 'following'",
        request_id, error, delay,
    )


async def request_product_count(db: Any, request_id: int) -> int:
    value: int = await db.fetchval(
        "SELECT count(*) FROM request_download WHERE request_id = $1", request_id)
    return value


async def request_product_keys(db: Any, request_id: int) -> set[str]:
    """The products a request has already: their catalog ids, else their URLs."""
    rows = await db.fetch(
        "SELECT coalesce(d.product_id, d.url) AS key FROM request_download rd"
        " JOIN download d ON d.id = rd.download_id WHERE rd.request_id = $1", request_id)
    return {r["key"] for r in rows}


async def next_request_due(db: Any, exclude: Sequence[int] = (),
                           daemon_id: str | None = None) -> float | None:
    """Seconds until the next standing request is to be searched again, or a queued one may
    be taken (another daemon resolves it: when its mark lapses; another daemon's
    transaction held it: now), None: none; but those in `exclude` (being searched here:
    their next run is set when they end). The marks of `daemon_id` (this daemon's, as
    `request_lock_queued` reads them) put nothing off: a search that just ended here may
    not have cleared its mark yet."""
    value: float | None = await db.fetchval(
        "SELECT extract(epoch FROM min(greatest("
        "  CASE WHEN status = 'following' THEN coalesce(next_run, now()) ELSE now() END,"
        "  CASE WHEN resolving_until > now() AND resolver IS DISTINCT FROM $2"
        "   THEN resolving_until END)) - now())::float8"
        " FROM request WHERE status IN ('following', 'queued')"
        " AND NOT id = ANY($1::bigint[])", list(exclude), daemon_id)
    return None if value is None else max(0.0, value)


async def download_add(
    db: Any, *, request_id: int, provider_id: int, url: str, name: str | None, dest: str,
    size: int | None, checksum: Checksum | None, login_user: str | None,
    login_secret: str | None, size_origin: str = "catalog", product_id: str | None = None,
    offline_in: float | None = None, revive: bool = True,
) -> Added:
    """Queue a product once, known by its catalog id (else its URL); count it in the request.

    Asking again for a failed or cancelled product queues it again (`revive`; a standing
    request's later runs do not). A product found again with another URL (pre-signed
    ones change) takes the new one. `offline_in`: the catalog reports it offline, to be
    looked at again in that many seconds. A `name` another product of the folder already
    has (daily folders reusing a file name) is left for the transfer to choose (`name_<id>`).
    What to do about a done product whose file is gone, or one asked into another folder,
    is the caller's to decide (it looks at files): the row as it stands is returned.
    """
    args = (request_id, provider_id, url, name, dest, size,
            checksum.algo if checksum else None, checksum.value if checksum else None,
            login_user, login_secret, size_origin, product_id,
            "offline" if offline_in is not None else "queued", offline_in or 0.0, revive)
    if name is None:
        row = await db.fetchrow(_DOWNLOAD_ADD, *args)
    else:
        try:
            async with db.transaction():  # a savepoint: the caller's transaction goes on
                row = await db.fetchrow(_DOWNLOAD_ADD, *args)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "download_file_unique":
                raise
            row = await db.fetchrow(_DOWNLOAD_ADD, *args[:3], None, *args[4:])
    linked = await db.fetchval(
        "INSERT INTO request_download (request_id, download_id) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING download_id",
        request_id, row["id"],
    )
    return Added(id=row["id"], status=row["status"], dest=row["dest"], name=row["name"],
                 path=row["path"], first_ask=linked is not None)


async def download_refetch(db: Any, download_id: int, dest: str | None) -> str | None:
    """A done product whose file is gone is fetched again from zero, into `dest` (None: its
    own folder). Another download of that folder may own its name: the transfer then names
    it. The row's status after (`queued`; else it was not done)."""
    args = (download_id, dest)
    try:
        async with db.transaction():  # a savepoint: the caller's transaction goes on
            value: str | None = await db.fetchval(_REFETCH, *args, True)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "download_file_unique":
            raise
        value = await db.fetchval(_REFETCH, *args, False)
    return value


_REFETCH = (
    "UPDATE download SET status = 'queued', dest = coalesce($2, dest), path = NULL,"
    " name = CASE WHEN $3 THEN name END, bytes_done = 0, failures = 0, error = NULL,"
    " etag = NULL, last_modified = NULL, rate = NULL, not_before = now(), finished_at = NULL"
    " WHERE id = $1 AND status = 'done' RETURNING status"
)


async def copy_owed(db: Any, request_id: int, download_id: int, dest: str) -> None:
    """The request wants the product in `dest`, not the folder its download fetches into:
    the daemon puts it there (a hard link, else a copy) once it is done."""
    await db.execute(
        "UPDATE request_download SET dest = $3 WHERE request_id = $1 AND download_id = $2",
        request_id, download_id, dest,
    )


async def copies_made(db: Any, download_id: int) -> None:
    await db.execute(
        "UPDATE request_download SET dest = NULL WHERE download_id = $1 AND dest IS NOT NULL",
        download_id,
    )


def _on_conflict(revive: str) -> str:
    """What asking again for a product that has a row does to it (`revive`: the parameter
    that says whether a failed or cancelled one is queued again)."""
    revived = f"({revive} AND download.status IN ('failed', 'cancelled'))"
    return (
        " ON CONFLICT (provider_id, md5(coalesce('id:' || product_id, url))) DO UPDATE SET"
        f"  status = CASE WHEN {revived} THEN EXCLUDED.status ELSE download.status END,"
        f"  failures = CASE WHEN {revived} THEN 0 ELSE download.failures END,"
        f"  last_mismatch = CASE WHEN {revived} THEN NULL ELSE download.last_mismatch END,"
        # a product found again keeps its retry time (a Retry-After is not cut short)
        f"  not_before = CASE WHEN {revived} THEN EXCLUDED.not_before"
        "   ELSE download.not_before END,"
        # a catalog product keeps its identity when its URL changes (pre-signed URLs expire)
        "  url = CASE WHEN download.product_id IS NOT NULL THEN EXCLUDED.url"
        "   ELSE download.url END,"
        # a failed product asked for again takes the new checksum (the old one may be a typo)
        f"  checksum_algo = CASE WHEN {revived}"
        "   AND EXCLUDED.checksum_algo IS NOT NULL THEN EXCLUDED.checksum_algo"
        "   ELSE coalesce(download.checksum_algo, EXCLUDED.checksum_algo) END,"
        f"  checksum_value = CASE WHEN {revived}"
        "   AND EXCLUDED.checksum_value IS NOT NULL THEN EXCLUDED.checksum_value"
        "   ELSE coalesce(download.checksum_value, EXCLUDED.checksum_value) END,"
        "  login_user = coalesce(EXCLUDED.login_user, download.login_user),"
        "  login_secret = coalesce(EXCLUDED.login_secret, download.login_secret)"
    )


_DOWNLOAD_ADD = (
    "INSERT INTO download (request_id, provider_id, url, name, dest, size, checksum_algo,"
    " checksum_value, login_user, login_secret, size_origin, product_id, status, not_before,"
    " offline_checks)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
    "  now() + make_interval(secs => $14), ($13 = 'offline')::int)"
    + _on_conflict("$15") + " RETURNING id, status, dest, name, path"
)

# Many products of one request in one statement. A name that another product of the folder
# has (or an earlier one of the same batch) is left for the transfer to choose, as
# `download_add` does after a unique violation; the rows come back in the order asked.
_DOWNLOAD_ADD_MANY = (
    "WITH new AS (SELECT * FROM unnest($4::bigint[], $5::text[], $6::text[], $7::bigint[],"
    "  $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],"
    "  $14::float8[]) WITH ORDINALITY AS n(provider_id, url, name, size, checksum_algo,"
    "  checksum_value, login_user, login_secret, size_origin, product_id, offline_in, ord)),"
    " ready AS (SELECT n.*, md5(coalesce('id:' || n.product_id, n.url)) AS key,"
    "  CASE WHEN n.name IS NOT NULL AND row_number() OVER (PARTITION BY n.provider_id, n.name"
    "   ORDER BY n.ord) = 1 AND NOT EXISTS (SELECT 1 FROM download o"
    "   WHERE o.provider_id = n.provider_id AND coalesce(o.dest, '') = $2 AND o.name = n.name"
    "   AND md5(coalesce('id:' || o.product_id, o.url))"
    "    <> md5(coalesce('id:' || n.product_id, n.url)))"
    "  THEN n.name END AS free_name FROM new n),"
    " added AS (INSERT INTO download (request_id, provider_id, url, name, dest, size,"
    "  checksum_algo, checksum_value, login_user, login_secret, size_origin, product_id,"
    "  status, not_before, offline_checks)"
    "  SELECT $1, provider_id, url, free_name, $2, size, checksum_algo, checksum_value,"
    "   login_user, login_secret, size_origin, product_id,"
    "   CASE WHEN offline_in IS NULL THEN 'queued' ELSE 'offline' END,"
    "   now() + make_interval(secs => coalesce(offline_in, 0)), (offline_in IS NOT NULL)::int"
    "  FROM ready ORDER BY ord"
    + _on_conflict("$3") +
    "  RETURNING id, status, dest, name, path, provider_id,"
    "   md5(coalesce('id:' || product_id, url)) AS key),"
    " linked AS (INSERT INTO request_download (request_id, download_id)"
    "  SELECT $1, id FROM added ON CONFLICT DO NOTHING RETURNING download_id)"
    " SELECT a.id, a.status, a.dest, a.name, a.path, l.download_id IS NOT NULL AS first_ask"
    " FROM ready r JOIN added a ON a.provider_id = r.provider_id AND a.key = r.key"
    " LEFT JOIN linked l ON l.download_id = a.id ORDER BY r.ord"
)


@dataclass(frozen=True)
class NewDownload:
    """A product a request asks for (see `download_add`)."""

    provider_id: int
    url: str
    name: str | None = None
    size: int | None = None
    checksum: Checksum | None = None
    login_user: str | None = None
    login_secret: str | None = field(default=None, repr=False)
    size_origin: str = "catalog"
    product_id: str | None = None
    offline_in: float | None = None

    @property
    def key(self) -> tuple[int, str]:
        return (self.provider_id,
                f"id:{self.product_id}" if self.product_id is not None else self.url)


async def download_add_many(db: Any, request_id: int, dest: str, new: Sequence[NewDownload],
                            *, revive: bool = True) -> list[Added]:
    """`download_add` for many products of one request (inside the caller's transaction),
    in one statement: the row of each, in order. A product asked twice is one row (the
    second ask is not a first)."""
    firsts: dict[tuple[int, str], int] = {}
    for i, n in enumerate(new):
        firsts.setdefault(n.key, i)
    unique = [new[i] for i in firsts.values()]
    rows: list[Any] | None = None
    if unique:
        c = [n.checksum for n in unique]
        try:
            async with db.transaction():  # a savepoint: the caller's transaction goes on
                rows = await db.fetch(
                    _DOWNLOAD_ADD_MANY, request_id, dest, revive,
                    [n.provider_id for n in unique], [n.url for n in unique],
                    [n.name for n in unique], [n.size for n in unique],
                    [x.algo if x else None for x in c], [x.value if x else None for x in c],
                    [n.login_user for n in unique], [n.login_secret for n in unique],
                    [n.size_origin for n in unique], [n.product_id for n in unique],
                    [n.offline_in for n in unique])
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "download_file_unique":
                raise
            # another request took a name meanwhile: one product at a time, as it decides
    if rows is not None:
        found = [Added(id=r["id"], status=r["status"], dest=r["dest"], name=r["name"],
                       path=r["path"], first_ask=r["first_ask"]) for r in rows]
    else:
        found = [await download_add(
            db, request_id=request_id, provider_id=n.provider_id, url=n.url, name=n.name,
            dest=dest, size=n.size, checksum=n.checksum, login_user=n.login_user,
            login_secret=n.login_secret, size_origin=n.size_origin, product_id=n.product_id,
            offline_in=n.offline_in, revive=revive) for n in unique]
    by_key = dict(zip(firsts, found, strict=True))
    return [by_key[n.key] if firsts[n.key] == i else replace(by_key[n.key], first_ask=False)
            for i, n in enumerate(new)]


# -- the daemon's claims and state changes ----------------------------------------------------

async def queued_providers(db: Any) -> list[tuple[int, int, float | None, float | None]]:
    """Per provider not paused and with work: (id, rows due now (counted up to 1000),
    seconds until the next queued row is due, seconds until the next offline row is to be
    looked at again). Running rows whose daemon stopped renewing their lease are due (taken
    over); the next lease to lapse counts as a wait.

    Each figure is an index probe per provider (`download_due_idx`, `download_wait_idx`,
    `download_running_idx`),
    never a scan of the queue: the dispatcher asks at every turn, with a million rows too.
    """
    rows = await db.fetch(
        "SELECT p.id AS provider_id,"
        " (SELECT count(*) FROM (SELECT 1 FROM download d WHERE d.provider_id = p.id"
        "   AND d.status IN ('queued', 'offline') AND d.not_before <= now()"
        "   ORDER BY d.not_before LIMIT 1000) x)"
        " + (SELECT count(*) FROM (SELECT 1 FROM download d WHERE d.provider_id = p.id"
        "   AND d.status = 'running' AND d.lease_expires <= now()"
        "   ORDER BY d.lease_expires LIMIT 1000) y) AS due,"
        " extract(epoch FROM least("
        "  (SELECT d.not_before FROM download d WHERE d.provider_id = p.id"
        "    AND d.status IN ('queued', 'offline') AND d.status = 'queued'"
        "    AND d.not_before > now() ORDER BY d.not_before LIMIT 1),"
        "  (SELECT d.lease_expires FROM download d WHERE d.provider_id = p.id"
        "    AND d.status = 'running' AND d.lease_expires > now()"
        "    ORDER BY d.lease_expires LIMIT 1)) - now())::float8 AS wait,"
        " extract(epoch FROM (SELECT d.not_before FROM download d WHERE d.provider_id = p.id"
        "    AND d.status IN ('queued', 'offline') AND d.status = 'offline'"
        "    AND d.not_before > now() ORDER BY d.not_before LIMIT 1) - now())::float8"
        "  AS offline_wait"
        # a paused provider starts nothing: its rows neither count nor wake the loop
        " FROM provider p WHERE NOT p.paused ORDER BY p.id"
    )
    return [(r["provider_id"], r["due"], r["wait"], r["offline_wait"]) for r in rows
            if r["due"] or r["wait"] is not None or r["offline_wait"] is not None]


async def pending_work(db: Any) -> bool:
    """True while any request or download waits to be processed. The queued downloads of
    a paused provider wait for its resume, and so do its running ones that no daemon works
    any more (their lease lapsed; the claim takes them over only once it resumes): neither
    is work to drain."""
    value: bool = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM request WHERE status = 'queued')"
        " OR EXISTS (SELECT 1 FROM download d WHERE"
        "  (d.status = 'running' AND d.lease_expires > now())"
        "  OR (d.status IN ('queued', 'running')"
        "   AND d.provider_id NOT IN (SELECT id FROM provider WHERE paused)))"
    )
    return value


async def claim(
    db: Any, owner: str, provider_id: int, limit: int, lease_seconds: float, default_dest: str,
) -> list[tuple[Download, str, int]]:
    """Claim up to `limit` due rows of a provider into its free slots (counted across all
    daemons, in `asyncsat_claim`): (download, account, lease id) for each, oldest first.
    One statement, which returns the rows as the claim left them."""
    try:
        claimed = await db.fetch("SELECT * FROM asyncsat_claim($1, $2, $3, $4, $5)",
                                 owner, provider_id, limit, lease_seconds, default_dest)
    except asyncpg.LockNotAvailableError:
        return []  # another daemon holds the provider (paused mid-claim?): next turn
    return [(_download(r, id_column="download_id"), r["account"], r["lease_id"])
            for r in claimed]


async def lease_take(db: Any, owner: str, provider_id: int, seconds: float) -> \
        tuple[int, str] | None:
    """One slot of a provider's accounts for a request that is not a transfer (a listing,
    a search): (lease id, account), or None when every slot is taken."""
    try:
        row = await db.fetchrow("SELECT * FROM asyncsat_take_lease($1, $2, $3)",
                                owner, provider_id, seconds)
    except asyncpg.LockNotAvailableError:
        return None  # another daemon holds the provider: as if no slot were free now
    return (row["lease_id"], row["account"]) if row else None


async def lease_release(db: Any, lease_id: int, download_id: int | None = None) -> None:
    """End a lease (a transfer's: only while it is still that download's, not handed on)."""
    await db.execute("DELETE FROM lease WHERE id = $1 AND download_id IS NOT DISTINCT FROM $2",
                     lease_id, download_id)


async def daemon_register(db: Any, daemon_id: str, *, host: str, pid: int, version: str,
                          lease_timeout: float, machine: str = "") -> None:
    await db.execute(
        "INSERT INTO daemon (id, host, pid, version, lease_timeout, machine)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        daemon_id, host, pid, version, lease_timeout, machine,
    )


async def daemons_on_host(db: Any, host: str, machine: str) -> list[tuple[str, int]]:
    """(id, pid) of the daemons of this host and pid namespace (`machine`) that have not
    said they stopped: only there does a pid say whether the daemon lives."""
    rows = await db.fetch(
        "SELECT id, pid FROM daemon WHERE host = $1 AND machine = $2 AND stopped_at IS NULL",
        host, machine)
    return [(r["id"], r["pid"]) for r in rows]


async def daemon_gone(db: Any, daemon_id: str) -> int:
    """A daemon stopped (or died: its process is gone): its leases end now, and its running
    downloads may be taken over at once. Returns how many it was working."""
    result: str = await db.execute(
        "WITH d AS (UPDATE daemon SET stopped_at = coalesce(stopped_at, now()) WHERE id = $1),"
        " l AS (DELETE FROM lease WHERE daemon_id = $1)"
        " UPDATE download SET lease_expires = now() WHERE owner = $1 AND status = 'running'",
        daemon_id,
    )
    return int(result.split()[-1])


async def orphans_requeue(db: Any, daemon_id: str, ids: Sequence[int]) -> list[int]:
    """Put back in the queue rows this daemon owns but no transfer of it works (a claim
    whose answer was lost with the connection, a hand-over answered to a cancelled task),
    and end their leases: the ids put back. A look at an offline product goes back as a
    stopped one does (`download_unclaim`): offline, its attempt given back. Nothing in the
    row tells a look from a transfer once it runs; its history does (the status the claim
    took it from is the last one before `running`)."""
    rows = await db.fetch(
        "WITH w AS (SELECT i AS id, (SELECT e.status FROM download_event e"
        "   WHERE e.download_id = i AND e.status <> 'running' ORDER BY e.id DESC LIMIT 1)"
        "   = 'offline' AS look FROM unnest($2::bigint[]) i),"
        " q AS (UPDATE download d SET owner = NULL, not_before = now(),"
        "  status = CASE WHEN w.look THEN 'offline' ELSE 'queued' END,"
        "  attempts = CASE WHEN w.look THEN greatest(0, d.attempts - 1) ELSE d.attempts END"
        "  FROM w WHERE d.id = w.id AND d.owner = $1 AND d.status = 'running' RETURNING d.id),"
        " l AS (DELETE FROM lease WHERE daemon_id = $1"
        "  AND download_id IN (SELECT id FROM q))"
        " SELECT id FROM q ORDER BY id", daemon_id, list(ids))
    return [r["id"] for r in rows]


async def strays_requeue(db: Any) -> list[int]:
    """Put back in the queue `running` rows with no lease expiry: no daemon claimed them
    (a claim always sets one), so none renews them and none would take them over (a row
    inserted or set so with psql). The ids put back."""
    rows = await db.fetch(
        "UPDATE download SET status = 'queued', owner = NULL, not_before = now()"
        " WHERE status = 'running' AND lease_expires IS NULL RETURNING id")
    return sorted(r["id"] for r in rows)


async def heartbeat(db: Any, daemon_id: str, lease_seconds: float) -> set[int]:
    """Renew a daemon's heartbeat and leases; the ids of the downloads it still owns."""
    rows = await db.fetch(
        "WITH d AS (UPDATE daemon SET heartbeat_at = now() WHERE id = $1),"
        # a lease that lapsed stays lapsed: its slot may be another daemon's by now
        " l AS (UPDATE lease SET expires_at = now() + make_interval(secs => $2)"
        "  WHERE daemon_id = $1 AND expires_at > now())"
        " UPDATE download SET lease_expires = now() + make_interval(secs => $2)"
        " WHERE owner = $1 AND status = 'running' AND lease_expires > now() RETURNING id",
        daemon_id, lease_seconds,
    )
    return {r["id"] for r in rows}


async def unstopped_daemons_on(db: Any, host: str) -> list[dict[str, Any]]:
    """The daemons of a host that never said they stopped, however old their heartbeat
    (one whose database was away longer than its lease timeout is alive all the same)."""
    rows = await db.fetch("SELECT id, pid, machine FROM daemon WHERE host = $1"
                          " AND stopped_at IS NULL", host)
    return [dict(r) for r in rows]


async def live_daemons(db: Any) -> list[dict[str, Any]]:
    """The daemons whose heartbeat is younger than their lease timeout, with what each
    is doing (running downloads and the connections they hold, requests it searches or
    lists)."""
    rows = await db.fetch(
        "SELECT d.id, d.host, d.pid, d.version, d.machine, d.started_at, d.heartbeat_at,"
        " (SELECT count(*) FROM download w WHERE w.owner = d.id AND w.status = 'running')"
        "  AS running,"
        # (the connections its transfers hold: a run's rows share one, in turn)
        " (SELECT count(*) FROM lease l WHERE l.daemon_id = d.id AND l.download_id IS NOT NULL"
        "  AND l.expires_at > now()) AS connections,"
        " array(SELECT r.id FROM request r WHERE r.resolver = d.id"
        "  AND r.resolving_until > now() ORDER BY r.id) AS resolving"
        " FROM daemon d WHERE d.stopped_at IS NULL"
        " AND d.heartbeat_at > now() - make_interval(secs => d.lease_timeout)"
        " ORDER BY d.started_at")
    return [dict(r) for r in rows]


async def download_named(
    db: Any, download_id: int, fence: Fence, *, names: Sequence[str], size: int | None,
    etag: str | None, last_modified: str | None,
) -> str | None:
    """Record what the server told at the start of a file: name, size and validators.

    The name is the first of `names` no other download of the same folder has ('' when
    they all do). A size from a catalog or a user stays; one the server announced is
    replaced. None (nothing written) when the row is no longer this claim's.
    """
    named: str | None = await db.fetchval(
        "SELECT asyncsat_named($1, $2, $3, $4, $5, $6, $7)",
        download_id, fence.owner, fence.attempt, list(names), size, etag, last_modified)
    return named


async def download_progress(
    db: Any, download_id: int, fence: Fence, bytes_done: int, rate: float | None
) -> None:
    """Bytes on disk and bytes per second of a running transfer."""
    await db.execute(
        "UPDATE download SET bytes_done = $2, rate = $3 WHERE id = $1"
        + _FENCED.format(o="$4", a="$5"),
        download_id, bytes_done, rate, fence.owner, fence.attempt,
    )


class Sealed(NamedTuple):
    """What `download_sealing` found and did."""

    owned: bool
    """The row is still this claim's (its file may get its final name)."""
    following: list[tuple[Download, str, int]]
    """The provider's next downloads claimed into the slot, as `claim` gives them: none,
    the next one, or a run of them (`more`), to be run in turn."""
    name: str | None = None
    """With `names`: the name recorded ('' when every one is taken; None when not owned)."""
    lease_left: float | None = None
    """Seconds the row's lease had left when the statement ran (None: not owned)."""


async def download_sealing(
    db: Any, download_id: int, fence: Fence, lease_id: int, *, lease_seconds: float,
    default_dest: str, hand_over: bool, more: int = 0, names: Sequence[str] | None = None,
    size: int | None = None, etag: str | None = None, last_modified: str | None = None,
) -> Sealed:
    """A transfer's body is in: whether the row is still this claim's (checked before the
    file gets its name), and its account slot handed over to the provider's next due row
    (`asyncsat_hand_over`; `hand_over` false, or the row lost: the slot is given back).
    With `names`, a file held whole in memory records its name, size and validators in the
    same statement (`download_named`: nothing of it is on disk yet). With `more`, up to
    that many rows after the next one are claimed too (a run). One statement."""
    rows = await db.fetch(
        # (either way the row records that this attempt may rename its file from now on:
        # `sealed_attempt`, which a later attempt's adoption of a file at the name needs)
        "SELECT o.lease_left > 0 AS owned, o.lease_left, o.named, n.* FROM (SELECT CASE WHEN"
        " $8::text[] IS NULL THEN asyncsat_sealing($1, $2, $3) ELSE (SELECT"
        " extract(epoch FROM lease_expires - now())::float8 FROM download WHERE id = $1"
        + _FENCED.format(o="$2", a="$3") + ") END AS lease_left, CASE WHEN $8::text[] IS NOT"
        " NULL THEN asyncsat_named($1, $2, $3, $8, $9, $10, $11, true) END AS named) o"
        " LEFT JOIN LATERAL asyncsat_hand_over($2, $4, $1, $5, $6,"
        " $7 AND coalesce(o.lease_left > 0, false), $12) WITH ORDINALITY n ON true"
        # (a run in the order claimed: its last row holds the lease)
        " ORDER BY n.ordinality",
        download_id, fence.owner, fence.attempt, lease_id, lease_seconds, default_dest,
        hand_over, None if names is None else list(names), size, etag, last_modified, more)
    row = rows[0]  # (one row at least: the left join keeps it)
    following = [(_download(r, id_column="download_id"), r["account"], r["lease_id"])
                 for r in rows if r["download_id"] is not None]
    owned = bool(row["owned"])
    return Sealed(owned, following, row["named"], row["lease_left"] if owned else None)


@dataclass(frozen=True)
class Seal:
    """The body of a row of a run that hands no slot over is in (`downloads_sealed`)."""

    download_id: int
    fence: Fence
    names: tuple[str, str] | None = None
    """A file held whole: the name proposed, and the one taken when another download of
    the folder has it (recorded with its size and validators)."""
    size: int | None = None
    etag: str | None = None
    last_modified: str | None = None


async def downloads_sealed(db: Any, seals: Sequence[Seal]) -> list[Sealed]:
    """For rows of a run whose bodies are in (the run's last row hands the slot over, with
    `download_sealing`): whether each is still its claim's, and how long its lease has
    left; a held file's name recorded too. One statement (`asyncsat_sealed`) for the rows
    nobody else holds now; each of the others alone, waiting for it (5 s at most: then
    `LockNotAvailableError`, at once, the rows after it unsealed; the Batcher then seals
    each of the batch alone, those sealed already again, which changes nothing)."""
    found = await _downloads_sealed(db, seals, wait=False)
    for seal in seals:
        if seal.download_id not in found:  # (not the claim's any more, or held meanwhile)
            found.update(await _downloads_sealed(db, [seal], wait=True))
    sealed = []
    for seal in seals:
        named, left = found.get(seal.download_id, (None, None))
        owned = left is not None and left > 0  # (as `download_sealing` tells it)
        sealed.append(Sealed(owned, [], named, left if owned else None))
    return sealed


async def _downloads_sealed(db: Any, seals: Sequence[Seal], *, wait: bool) -> \
        dict[int, tuple[str | None, float | None]]:
    rows = await db.fetch(
        "SELECT * FROM asyncsat_sealed($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [s.download_id for s in seals], [s.fence.owner for s in seals],
        [s.fence.attempt for s in seals], [s.names[0] if s.names else None for s in seals],
        [s.names[1] if s.names else None for s in seals], [s.size for s in seals],
        [s.etag for s in seals], [s.last_modified for s in seals], wait)
    return {r["sealed_id"]: (r["named"], r["lease_left"]) for r in rows}


@dataclass(frozen=True)
class Done:
    """A transfer whose file is at its final path, to record as done."""

    download_id: int
    fence: Fence
    size: int
    path: str


async def downloads_done(db: Any, done: Sequence[Done]) -> list[list[tuple[int, str]] | None]:
    """Record downloads done, with the copies owed to other requests' folders: for each,
    (request, folder) per copy, or None when the row is no longer this claim's (one the user
    cancelled meanwhile stays cancelled, its owner cleared). (Its lease went on or back when
    its body was in: `download_sealing`.)

    One statement (`asyncsat_done`) for the rows nobody else holds now; a row another
    transaction holds (a heartbeat, a resolve that asks for its product again, a user's
    command) is then written alone, waiting for it: never one row waited for while others
    are held, so no cycle of row locks (a deadlock) can form. A row held for more than 5 s
    raises `LockNotAvailableError` once the others are written.
    """
    recorded = await _downloads_done(db, done, wait=False)
    held: asyncpg.LockNotAvailableError | None = None
    for d in done:
        if d.download_id not in recorded:
            try:
                recorded.update(await _downloads_done(db, [d], wait=True))
            except asyncpg.LockNotAvailableError as exc:  # (held for over 5 s)
                held = exc
    if held is not None:  # not known yet, not lost: the caller writes them again, each
        # alone, and the rows recorded already are found done by their attempt
        raise held
    return [recorded.get(d.download_id) for d in done]


async def _downloads_done(db: Any, done: Sequence[Done], *, wait: bool) -> \
        dict[int, list[tuple[int, str]]]:
    rows = await db.fetch(
        "SELECT * FROM asyncsat_done($1, $2, $3, $4, $5, $6)",
        [d.download_id for d in done], [d.fence.owner for d in done],
        [d.fence.attempt for d in done], [d.size for d in done], [d.path for d in done], wait,
    )
    return {r["done_id"]: list(zip(r["owed_requests"], r["owed_folders"], strict=True))
            for r in rows}


_UNSEALED = (" sealed_attempt = CASE WHEN {u} AND sealed_attempt = {a} THEN NULL"
             " ELSE sealed_attempt END,")
"""An attempt that never tried its file's rename (`unsealed`) takes back the mark it set
when it sealed the file: nothing of it is at the final name (a checksum that failed, a stop
between the two), and a file that appears there later is someone else's."""


async def download_requeue(
    db: Any, download_id: int, fence: Fence, *, error: str | None, failures: int,
    bytes_done: int, delay: float, mismatch: str | None = None, unsealed: bool = False,
) -> bool:
    """Back to the queue, due after `delay` seconds (a retry, or a clean stop); `mismatch`:
    the wrong bytes this attempt received, remembered to tell a bad copy at the source."""
    result: str = await db.execute(
        "UPDATE download SET status = 'queued', error = $2, failures = $3, bytes_done = $4,"
        " not_before = now() + make_interval(secs => $5)," + _UNSEALED.format(u="$9", a="$8")
        + " last_mismatch = coalesce($6, last_mismatch), owner = NULL"
        " WHERE id = $1" + _FENCED.format(o="$7", a="$8"),
        download_id, error, failures, bytes_done, delay, mismatch, fence.owner, fence.attempt,
        unsealed,
    )
    return _changed(result)


async def archive_usage(
    db: Any, provider_id: int, account: str, window: float
) -> tuple[int, float | None, float | None]:
    """An account's archive orders within the last `window` seconds: (orders sent, seconds
    until the oldest leaves the window, seconds until the latest refusal for the quota
    leaves it); None where there is none."""
    row = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE NOT refused) AS used,"
        " extract(epoch FROM min(ordered_at) FILTER (WHERE NOT refused)"
        "  + make_interval(secs => $3) - now())::float8 AS frees_in,"
        " extract(epoch FROM max(ordered_at) FILTER (WHERE refused)"
        "  + make_interval(secs => $3) - now())::float8 AS refused_in"
        " FROM archive_order WHERE provider_id = $1 AND account = $2"
        " AND ordered_at > now() - make_interval(secs => $3)",
        provider_id, account, window,
    )
    return row["used"], row["frees_in"], row["refused_in"]


async def archive_reserve(db: Any, download_id: int, provider_id: int, account: str, *,
                          window: float, count: int) -> int | None:
    """Reserve one of an account's archive orders (inside the caller's transaction): the id
    of the order row, or None when `count` orders were sent within `window` seconds. The
    account's reservations queue on a lock, so that two daemons (or two transfers of one)
    never both take the last order of a quota."""
    await db.execute("SELECT pg_advisory_xact_lock(hashtext('asyncsat archive '"
                     " || $1::bigint || ' ' || $2::text))", provider_id, account)
    value: int | None = await db.fetchval(
        "INSERT INTO archive_order (provider_id, account, download_id)"
        " SELECT $1, $2, $3 WHERE (SELECT count(*) FROM archive_order"
        "  WHERE provider_id = $1 AND account = $2 AND NOT refused"
        "  AND ordered_at > now() - make_interval(secs => $4)) < $5"
        " RETURNING id",
        provider_id, account, download_id, window, count,
    )
    return value


async def archive_settle(db: Any, order_id: int, download_id: int, *, sent: bool,
                         refused: bool = False) -> None:
    """A reserved order was sent (the product's `ordered_at` is set), refused for the
    quota (kept, marked: the account waits), or failed otherwise (given back)."""
    if sent:
        await db.execute("UPDATE download SET ordered_at = now() WHERE id = $1", download_id)
    elif refused:
        await db.execute("UPDATE archive_order SET refused = true WHERE id = $1", order_id)
    else:
        await db.execute("DELETE FROM archive_order WHERE id = $1", order_id)


async def archive_ordered(db: Any, download_id: int, provider_id: int, account: str, *,
                          refused: bool = False) -> None:
    """An order was sent to the archive for this product, by this account (`refused`: and
    the provider refused it for its quota). Not fenced: the order was sent, whoever owns the
    row now, and counts against the account's quota; the row's next owner must know it was
    ordered rather than order it again."""
    await db.execute(
        "WITH o AS (INSERT INTO archive_order (provider_id, account, download_id, refused)"
        " VALUES ($2, $3, $1, $4))"
        " UPDATE download SET ordered_at = CASE WHEN $4 THEN ordered_at ELSE now() END"
        " WHERE id = $1",
        download_id, provider_id, account, refused,
    )


async def download_stopped(
    db: Any, download_id: int, fence: Fence, *, error: str | None, failures: int,
    bytes_done: int, unsealed: bool = False,
) -> str | None:
    """A transfer was stopped: by the daemon's stop (the row goes back to the queue, due
    now) or by the user's cancel (it stays cancelled). Either way the bytes on disk are
    recorded. The row's status after (None: it was removed with its provider)."""
    value: str | None = await db.fetchval(
        "UPDATE download SET bytes_done = $4, owner = NULL," + _UNSEALED.format(u="$7", a="$6")
        + " status = CASE WHEN status = 'running' THEN 'queued' ELSE status END,"
        " error = CASE WHEN status = 'running' THEN $2 ELSE error END,"
        " failures = CASE WHEN status = 'running' THEN $3 ELSE failures END,"
        " not_before = CASE WHEN status = 'running' THEN now() ELSE not_before END"
        " WHERE id = $1 AND status IN ('running', 'cancelled') AND owner = $5"
        " AND attempts = $6 RETURNING status",
        download_id, error, failures, bytes_done, fence.owner, fence.attempt, unsealed,
    )
    return value if value is not None else await download_status(db, download_id)


async def download_end(
    db: Any, download_id: int, fence: Fence, *, status: str, error: str, failures: int,
    bytes_done: int, unsealed: bool = False,
) -> bool:
    """A final failure: `failed`."""
    result: str = await db.execute(
        "UPDATE download SET status = $2, error = $3, failures = $4, bytes_done = $5,"
        + _UNSEALED.format(u="$8", a="$7")
        + " finished_at = now(), owner = NULL WHERE id = $1" + _FENCED.format(o="$6", a="$7"),
        download_id, status, error, failures, bytes_done, fence.owner, fence.attempt, unsealed,
    )
    return _changed(result)


async def download_offline(
    db: Any, download_id: int, fence: Fence, *, error: str, delay: float, bytes_done: int,
) -> bool:
    """The product is offline (archived): look at it again in `delay` seconds. Waiting
    uses no attempt: the one the claim counted is given back."""
    result: str = await db.execute(
        "UPDATE download SET status = 'offline', error = $2, bytes_done = $3,"
        " attempts = greatest(0, attempts - 1), offline_checks = offline_checks + 1,"
        " not_before = now() + make_interval(secs => $4), owner = NULL"
        " WHERE id = $1" + _FENCED.format(o="$5", a="$6"),
        download_id, error, bytes_done, delay, fence.owner, fence.attempt,
    )
    return _changed(result)


async def download_unclaim(db: Any, download_id: int, fence: Fence, *,
                           back_to: str = "queued", unsealed: bool = False) -> str | None:
    """A claim that never transferred, ended as if it had not been made: a row of a run
    whose turn did not come, or that was stopped first (`back_to` queued), or a look at an
    offline product that was stopped (`back_to` offline; `unsealed`: before it tried the
    rename of a file it sealed); due now, no attempt used. One the user cancelled meanwhile
    stays cancelled, its claim ended all the same (no owner, the attempt given back). Its
    status after (None: removed with its provider)."""
    value: str | None = await db.fetchval(
        "UPDATE download SET attempts = greatest(0, attempts - 1), owner = NULL,"
        + _UNSEALED.format(u="$5", a="$3")
        + " status = CASE WHEN status = 'running' THEN $4 ELSE status END,"
        " not_before = CASE WHEN status = 'running' THEN now() ELSE not_before END"
        " WHERE id = $1 AND status IN ('running', 'cancelled') AND owner = $2"
        " AND attempts = $3 RETURNING status", download_id, fence.owner, fence.attempt,
        back_to, unsealed)
    return value if value is not None else await download_status(db, download_id)


async def download_status(db: Any, download_id: int) -> str | None:
    value: str | None = await db.fetchval("SELECT status FROM download WHERE id = $1", download_id)
    return value


# -- user commands ----------------------------------------------------------------------------

STALLED_AFTER = 15
"""Seconds without a progress write after which a running transfer's rate counts as 0."""
# the rate of a running transfer (NULL: not measured yet); none for the others
_LIVE_RATE = (
    "CASE WHEN d.status = 'running' THEN CASE WHEN d.updated_at > now()"
    f" - interval '{STALLED_AFTER} seconds' THEN d.rate ELSE 0 END END"
)


_STATUS_COLUMNS = (
    "d.id, d.request_id, p.name AS provider, d.name, d.url, d.status, d.bytes_done,"
    " d.size, d.attempts, d.error, d.path, d.dest, d.checksum_algo, d.checksum_value,"
    f" d.created_at, d.updated_at, d.finished_at, d.not_before, {_LIVE_RATE} AS rate"
)
_OF_REQUEST = (
    "($1::bigint IS NULL OR d.request_id = $1 OR d.id IN"
    "  (SELECT download_id FROM request_download WHERE request_id = $1))"
)
# the keyset of the pages of `status` (never an OFFSET, which reads every row it skips);
# a bound, never `$n IS NULL OR ...`, so that a generic plan keeps it an index condition
_BEFORE = "coalesce({}::bigint, 9223372036854775807)"


async def status_rows(
    db: Any, request_id: int | None = None, *, statuses: Sequence[str] | None = None,
    limit: int | None = None, newest_first: bool = False, before: int | None = None,
) -> list[dict[str, Any]]:
    """Downloads (of one request), oldest first (or newest first), optionally by status;
    `before`: only those with a smaller id (the next page, newest first).

    A page is an index range, however deep: the primary key backwards; by status, one
    range of `download_status_idx` per status, each cut at `limit` before they are merged.
    """
    order = "d.id DESC" if newest_first else "d.id"
    if statuses and request_id is None and newest_first:
        rows = await db.fetch(
            f"SELECT {_STATUS_COLUMNS} FROM (SELECT x.id FROM unnest($1::text[]) AS u (status)"
            "  CROSS JOIN LATERAL (SELECT x.id FROM download x WHERE x.status = u.status"
            f"   AND x.id < {_BEFORE.format('$3')} ORDER BY x.id DESC LIMIT $2) x"
            "  ORDER BY x.id DESC LIMIT $2) s"
            " JOIN download d ON d.id = s.id JOIN provider p ON p.id = d.provider_id"
            " ORDER BY d.id DESC",
            sorted(set(statuses)), limit, before,
        )
        return [dict(r) for r in rows]
    where, args = _status_where(request_id, statuses, before)
    rows = await db.fetch(
        f"SELECT {_STATUS_COLUMNS} FROM download d JOIN provider p ON p.id = d.provider_id"
        f" WHERE {where} ORDER BY {order} LIMIT ${len(args) + 1}", *args, limit)
    return [dict(r) for r in rows]


def _status_where(request_id: int | None, statuses: Sequence[str] | None,
                  before: int | None) -> tuple[str, list[Any]]:
    """The filter of `status` and its parameters. Only the filters given are in the text:
    a generic plan (a statement run again and again, `status --watch`) of `$n IS NULL OR
    ...` could use no index for them."""
    clauses: list[str] = []
    args: list[Any] = []
    if request_id is not None:
        args.append(request_id)
        clauses.append(f"(d.request_id = ${len(args)} OR d.id IN (SELECT download_id"
                       f" FROM request_download WHERE request_id = ${len(args)}))")
    if statuses:
        args.append(list(statuses))
        clauses.append(f"d.status = ANY(${len(args)}::text[])")
    if before is not None:
        args.append(before)
        clauses.append(f"d.id < ${len(args)}")
    return " AND ".join(clauses) or "true", args


async def status_count(
    db: Any, request_id: int | None = None, *, statuses: Sequence[str] | None = None,
    before: int | None = None,
) -> int:
    """How many downloads `status_rows` would list without a limit."""
    where, args = _status_where(request_id, statuses, before)
    value: int = await db.fetchval(f"SELECT count(*) FROM download d WHERE {where}", *args)
    return value


async def progress_totals(
    db: Any, request_id: int | None = None, *, unfinished: bool = False
) -> dict[str, Any]:
    """The downloads (of one request) as a whole: count per status, `bytes_done` and `size`
    (sums; `unsized` downloads have no size yet), `left` (bytes still to fetch by the
    queued and running ones of known size) and `rate` (bytes/s of the running ones).

    `unfinished`: only the downloads still to fetch (queued, running, offline) are read,
    through `download_status_idx` however many are finished; the counts of done, failed
    and cancelled ones, and the sums, are then those of the unfinished ones (0 and
    partial): what `status` shows, not what `get --wait` follows.
    """
    row = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE d.status = 'queued') AS queued,"
        " count(*) FILTER (WHERE d.status = 'running') AS running,"
        " count(*) FILTER (WHERE d.status = 'offline') AS offline,"
        " count(*) FILTER (WHERE d.status = 'done') AS done,"
        " count(*) FILTER (WHERE d.status = 'failed') AS failed,"
        " count(*) FILTER (WHERE d.status = 'cancelled') AS cancelled,"
        " coalesce(sum(d.bytes_done), 0)::bigint AS bytes_done,"
        " coalesce(sum(d.size), 0)::bigint AS size,"
        " count(*) FILTER (WHERE d.size IS NULL) AS unsized,"
        " coalesce(sum(greatest(d.size - d.bytes_done, 0))"
        "  FILTER (WHERE d.status IN ('queued', 'running')), 0)::bigint AS left,"
        " count(*) FILTER (WHERE d.status IN ('queued', 'running') AND d.size IS NULL)"
        "  AS left_unsized,"
        f" coalesce(sum({_LIVE_RATE}), 0)::float8 AS rate"
        f" FROM download d WHERE {_OF_REQUEST}"
        + (" AND d.status IN ('queued', 'running', 'offline')" if unfinished else ""),
        request_id,
    )
    return dict(row)


async def download_statuses(db: Any, ids: Sequence[int]) -> dict[int, str]:
    """The status of each download (locked until the end of the caller's transaction)."""
    rows = await db.fetch(
        "SELECT id, status FROM download WHERE id = ANY($1::bigint[]) FOR UPDATE", list(ids))
    return {r["id"]: r["status"] for r in rows}


async def request_dest(db: Any, request_id: int) -> str | None:
    value: str | None = await db.fetchval("SELECT dest FROM request WHERE id = $1", request_id)
    return value


async def download_files(db: Any, ids: Sequence[int]) -> dict[int, str]:
    """The final path of each done download among `ids` (locked until the end of the
    caller's transaction)."""
    rows = await db.fetch(
        "SELECT id, path FROM download WHERE id = ANY($1::bigint[]) AND status = 'done'"
        " AND path IS NOT NULL FOR UPDATE", list(ids))
    return {r["id"]: r["path"] for r in rows}


async def request_exists(db: Any, request_id: int) -> bool:
    value: bool = await db.fetchval("SELECT EXISTS (SELECT 1 FROM request WHERE id = $1)",
                                    request_id)
    return value


async def request_state(db: Any, request_id: int) -> \
        tuple[str | None, str | None, dict[str, int]]:
    """(request status, request error, count of its downloads by status); status None: no
    such request (deleted meanwhile)."""
    req = await db.fetchrow("SELECT status, error FROM request WHERE id = $1", request_id)
    if req is None:
        return None, None, {}
    rows = await db.fetch(
        "SELECT d.status, count(*) AS n FROM download d JOIN request_download rd"
        " ON rd.download_id = d.id WHERE rd.request_id = $1 GROUP BY d.status",
        request_id,
    )
    return req["status"], req["error"], {r["status"]: r["n"] for r in rows}


async def request_settled(db: Any, request_id: int, terminal: Sequence[str]) -> bool:
    """The request is resolved and each of its downloads is in a `terminal` status (asked
    at every turn of a `get --wait` that does the work: the newest rows, queued last and
    the last to end, are looked at first, so the answer is found in a row or two)."""
    value: bool | None = await db.fetchval(
        "SELECT r.status <> 'queued' AND NOT EXISTS (SELECT 1 FROM request_download rd"
        " JOIN download d ON d.id = rd.download_id WHERE rd.request_id = r.id"
        " AND d.status <> ALL($2::text[]) ORDER BY rd.download_id DESC LIMIT 1)"
        " FROM request r WHERE r.id = $1", request_id, list(terminal))
    return value is not False  # (a request deleted meanwhile: nothing left to wait for)


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
        " finished_at = NULL, last_mismatch = NULL"
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


async def request_rows(
    db: Any, request_id: int | None = None, *, unfinished: bool = False
) -> list[dict[str, Any]]:
    """Requests with the counts of their products by status, and their bytes.

    `unfinished`: only those `status` lists under its downloads (still to be listed or
    searched, standing, failed, or with a product not finished or failed), found from the
    unfinished downloads (`download_status_idx`, `request_download_download_idx`): the
    requests whose products are all done are not read at all.
    """
    rows = await db.fetch(
        "SELECT r.id, r.status, r.error, r.follow, r.search, r.urls, r.dest, r.created_at,"
        " r.next_run, r.watermark, r.runs,"
        # a request of URLs has no provider of its own: its products' one, when they share it
        " coalesce(p.name, CASE WHEN min(d.provider_id) = max(d.provider_id) THEN"
        "  (SELECT p2.name FROM provider p2 WHERE p2.id = min(d.provider_id)) END) AS provider,"
        " count(d.id) AS products,"
        " count(d.id) FILTER (WHERE d.status = 'done') AS done,"
        " count(d.id) FILTER (WHERE d.status = 'failed') AS failed,"
        " count(d.id) FILTER (WHERE d.status = 'cancelled') AS cancelled,"
        " count(d.id) FILTER (WHERE d.status = 'offline') AS offline,"
        " count(d.id) FILTER (WHERE d.status IN ('queued', 'running')) AS pending,"
        " coalesce(sum(d.bytes_done), 0)::bigint AS bytes_done,"
        " sum(d.size)::bigint AS size,"
        # the first failed product's error: one probe per request (not one per product)
        " (SELECT d2.error FROM download d2"
        "  WHERE d2.id = min(d.id) FILTER (WHERE d.status = 'failed')) AS product_error"
        " FROM request r LEFT JOIN provider p ON p.id = r.provider_id"
        " LEFT JOIN request_download rd ON rd.request_id = r.id"
        " LEFT JOIN download d ON d.id = rd.download_id"
        " WHERE ($1::bigint IS NULL OR r.id = $1)"
        + (" AND (r.status IN ('queued', 'following', 'failed') OR r.id IN"
           "  (SELECT l.request_id FROM download u"
           "   JOIN request_download l ON l.download_id = u.id"
           "   WHERE u.status IN ('queued', 'running', 'offline', 'failed')))"
           if unfinished else "")
        + " GROUP BY r.id, p.name ORDER BY r.id",
        request_id,
    )
    return [dict(r) for r in rows]


async def cancel_request(db: Any, request_id: int) -> tuple[bool, int, int]:
    """Cancel a request (a standing one stops) and its unfinished downloads that no other
    live request wants. (request ended now, downloads cancelled, downloads kept)."""
    # a request that has ended (resolved, every product finished) stays as it ended
    ended: str = await db.execute(
        "UPDATE request r SET status = 'cancelled', login_secret = NULL, next_run = NULL"
        " WHERE id = $1 AND (status IN ('queued', 'following') OR (status = 'resolved'"
        "  AND EXISTS (SELECT 1 FROM request_download rd JOIN download d"
        "   ON d.id = rd.download_id WHERE rd.request_id = r.id"
        "   AND d.status IN ('queued', 'running', 'offline'))))", request_id)
    rows = await db.fetch(
        "SELECT d.id, EXISTS (SELECT 1 FROM request_download o JOIN request r"
        "  ON r.id = o.request_id WHERE o.download_id = d.id AND r.id <> $1"
        "  AND r.status IN ('queued', 'following', 'resolved')) AS shared"
        " FROM request_download rd JOIN download d ON d.id = rd.download_id"
        " WHERE rd.request_id = $1 AND d.status IN ('queued', 'running', 'offline')",
        request_id)
    mine = [r["id"] for r in rows if not r["shared"]]
    count = await cancel(db, mine) if mine else 0
    return ended.split()[-1] != "0", count, len(rows) - len(mine)
