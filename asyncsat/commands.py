"""One coroutine per CLI command. Input is validated before anything is written."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from asyncsat import checksums, daemon, intake, provider_settings, secret_refs
from asyncsat.auth.hosts import LOGIN_SPREAD, one_server, sends_login
from asyncsat.catalogs.base import Filter, Query, parse_bbox, parse_time
from asyncsat.catalogs.ftp_tree import layout
from asyncsat.catalogs.templates import split_pattern
from asyncsat.config import Settings
from asyncsat.db import embedded, queries
from asyncsat.db.pool import connect
from asyncsat.dsn import split_password
from asyncsat.errors import AsyncsatError, UsageError
from asyncsat.logs import Redactor
from asyncsat.models import TERMINAL, Provider
from asyncsat.naming import SplitUrl, ftp_path, unique_name
from asyncsat.presets import preset
from asyncsat.render import (
    PLACED,
    STATUS_PAGE,
    DbProgress,
    ProgressBar,
    asked_line,
    request_progress_table,
    request_summary,
    requests_lines,
    status_table,
    totals_line,
)
from asyncsat.transfer.files import placed


def _emit(data: object) -> None:
    print(json.dumps(data, default=str, indent=None))


# -- schema, providers, credentials ---------------------------------------------------------

async def init(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    async with daemon.connection(settings, init=True):
        pass
    print("asyncsat schema is up to date")
    return 0


def _setting(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"invalid --set {text!r}: use KEY=VALUE")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


async def provider_add(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    given = dict(_setting(s) for s in args.set)
    if args.preset:
        known = preset(args.preset)
        protocol = args.protocol or known.protocol
        url = args.url or known.url
        given = {**known.settings, **given}  # options given as well win
    elif not args.protocol:
        raise UsageError("give --protocol (and --url), or --preset")
    else:
        protocol, url = args.protocol, args.url
    config = provider_settings.validate(protocol, given)
    if url is not None:
        _check_url(url, protocol)
    async with daemon.connection(settings) as conn:
        if url is not None:
            _url_free(url, await queries.provider_list(conn))
        provider = await queries.provider_add(conn, args.name, protocol, url, config)
    print(f"provider {provider.name} added")
    return 0


async def provider_set(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    """Change a provider's URL or settings in place: its credentials, requests and download
    rows stay (`remove` then `add` would delete them). Running daemons apply the change at
    once (the provider_notify trigger); rows queued already keep the URL they were given."""
    given = dict(_setting(s) for s in args.set)
    dropped = set(args.unset)
    if args.url is None and not given and not dropped:
        raise UsageError("nothing to change: give --url, --set KEY=VALUE or --unset KEY")
    if both := sorted(dropped & set(given)):
        raise UsageError(f"setting {both[0]} is both set and unset")
    async with daemon.connection(settings) as conn, conn.transaction():
        provider = await queries.provider_get(conn, args.name, lock=True)
        if provider is None:
            raise UsageError(f"unknown provider {args.name!r}")
        if args.url is not None:
            _check_url(args.url, provider.protocol)
        known = provider_settings.KEYS.get(provider.protocol, {})
        for key in sorted(dropped):  # (a key written with psql, unknown, goes too)
            if key not in known and key not in provider.settings:
                raise UsageError(f"unknown setting {key!r} for {provider.protocol} providers; "
                                 "known: " + ", ".join(sorted(known)))
        if args.url is not None and provider.implicit:
            raise UsageError(f"provider {provider.name} is the implicit provider of its "
                             "host: its URL is the host's")
        config = provider_settings.validate(provider.protocol, {
            **{k: v for k, v in provider.settings.items() if k not in dropped}, **given})
        if args.url is not None:
            _url_free(args.url, [p for p in await queries.provider_list(conn)
                                 if p.id != provider.id])
        url = provider.url if args.url is None else args.url
        await queries.provider_update(conn, provider.id, url, config)
    changes = ([f"URL {url}"] if url != provider.url else []) + [
        f"{k}={json.dumps(config[k])}" for k in sorted(given)
        if provider.settings.get(k, _UNSET) != config[k]] + [
        f"{k} back to its default" for k in sorted(dropped) if k in provider.settings]
    print(f"provider {provider.name}: " + ("; ".join(changes) if changes else "no change")
          + ("" if not changes or url == provider.url else
             " (downloads queued already keep their URLs; those off its servers now go "
             "without its accounts' login)"))
    return 0


_UNSET = object()


def _check_url(url: str, protocol: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises for a port out of range or not a number)
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https", "ftp", "ftps") or not parts.hostname:
        raise UsageError(f"invalid provider URL {url!r}: use http(s):// or ftp:// with a host")
    ftp = parts.scheme in ("ftp", "ftps")
    if ftp != (protocol == "ftp"):
        raise UsageError(f"invalid provider URL {url!r}: a {protocol} provider's URL is "
                         + ("ftp:// or ftps://" if protocol == "ftp" else "http(s)://"))
    if parts.username or parts.password:
        raise UsageError("put logins in a credential (asyncsat credential add), not the URL")


def _url_free(url: str, providers: list[Provider]) -> None:
    """No other explicit provider has the same base URL (as `get` matches them)."""
    key = url.rstrip("/").lower()
    same = next((p for p in providers
                 if p.url and not p.implicit and p.url.rstrip("/").lower() == key), None)
    if same is not None:
        raise UsageError(f"provider {same.name} already has the URL {same.url}: "
                         "one URL, one provider")


async def provider_list(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    async with daemon.connection(settings) as conn:
        providers = await queries.provider_list(conn)
    if args.json:
        _emit([{"name": p.name, "protocol": p.protocol, "url": p.url, "settings": p.settings,
                "implicit": p.implicit, "paused": p.paused} for p in providers])
        return 0
    if not providers:
        print("no providers")
    for p in providers:
        print(f"{p.name:<24} {p.protocol:<6} {p.url or '-'}" + ("  (implicit)" if p.implicit
                                                                 else "")
              + ("  (paused)" if p.paused else ""))
    return 0


async def provider_pause(args: argparse.Namespace, settings: Settings,
                         redactor: Redactor) -> int:
    """No new transfer of the provider starts; the running ones finish."""
    return await _pause(args.name, settings, paused=True)


async def provider_resume(args: argparse.Namespace, settings: Settings,
                          redactor: Redactor) -> int:
    return await _pause(args.name, settings, paused=False)


async def _pause(name: str, settings: Settings, *, paused: bool) -> int:
    async with daemon.connection(settings) as conn, conn.transaction():
        provider = await queries.provider_get(conn, name)
        if provider is None:
            raise UsageError(f"unknown provider {name!r}")
        was = provider.paused
        running, waiting = await queries.provider_pause(conn, provider.id, paused)
    if paused:
        print(f"provider {name} " + ("is paused already" if was else "paused")
              + f": no new transfer starts; {running} running transfer(s) finish, "
              f"{waiting} waiting download(s) wait for asyncsat provider resume {name}")
    else:
        print(f"provider {name} " + ("resumed" if was else "was not paused")
              + f": {waiting} waiting download(s) start as its connections allow")
    return 0


async def provider_remove(args: argparse.Namespace, settings: Settings,
                          redactor: Redactor) -> int:
    async with daemon.connection(settings) as conn, conn.transaction():
        provider = await queries.provider_get(conn, args.name)
        if provider is None:
            raise UsageError(f"unknown provider {args.name!r}")
        downloads, requests = await queries.provider_unfinished(conn, provider.id)
        if (downloads or requests) and not args.force:
            raise UsageError(
                f"provider {provider.name} has {downloads} unfinished download(s) (queued, "
                f"running or offline) and {requests} queued request(s): cancel them, "
                "or remove it with --force")
        credentials, rows = await queries.provider_remove(conn, provider.id)
    print(f"provider {provider.name} removed, with {credentials} credential(s) and {rows} "
          f"download row(s)" + (f", {downloads} of them unfinished" if downloads else "")
          + (f"; {requests} queued request(s) cancelled" if requests else "")
          + "; files on disk are kept")
    return 0


def _read_secret(args: argparse.Namespace) -> str:
    if args.password_env:
        value = os.environ.get(args.password_env)
        if not value:
            raise UsageError(f"environment variable {args.password_env} is not set or empty")
        return value
    if args.password_file:
        try:
            text = Path(args.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UsageError(f"cannot read password file {args.password_file}: {reason}") from None
        source = f"password file {args.password_file}"
    else:
        text = sys.stdin.readline()
        source = "standard input"
    line = text.splitlines()[0] if text else ""
    if not line:
        raise UsageError(f"no password on the first line of {source}")
    return line


async def credential_add(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    if not args.user.strip() or any(ord(c) < 32 or ord(c) == 127 for c in args.user):
        # a line break would end FTP's USER command early (and the next line be sent as a
        # command of its own) or break the Basic header
        raise UsageError(f"invalid user {args.user!r}: give a name without control "
                         "characters")
    ref = secret_refs.check(args.password_ref) if args.password_ref else None
    secret = "" if ref else _read_secret(args)
    redactor.add_login(args.user, secret)
    async with daemon.connection(settings) as conn:
        provider = await queries.provider_get(conn, args.provider)
        if provider is None:
            raise UsageError(f"unknown provider {args.provider!r}")
        await queries.credential_upsert(conn, provider.id, args.user, secret,
                                        args.max_connections, secret_ref=ref)
    print(f"credential {args.user} for {args.provider} saved"
          + (f" (its password is read from {ref} where a daemon runs)" if ref else ""))
    return 0


async def credential_set(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    """An account's cap, or whether it is used, changed without its secret; running daemons
    apply it at once (the credential's trigger)."""
    if args.max_connections is None and args.enabled is None:
        raise UsageError("nothing to change: give --max-connections N, --disable or --enable")
    async with daemon.connection(settings) as conn, conn.transaction():
        provider = await queries.provider_get(conn, args.provider)
        if provider is None:
            raise UsageError(f"unknown provider {args.provider!r}")
        changed = await queries.credential_update(conn, provider.id, args.user,
                                                  args.max_connections, args.enabled)
        if changed is None:
            raise UsageError(f"provider {provider.name} has no credential for user "
                             f"{args.user!r}")
    cap, enabled, others = changed
    line = (f"credential {args.user} of {provider.name}: {cap} connection(s), "
            + ("enabled" if enabled else "disabled (running transfers finish)"))
    if not enabled and not others:
        line += (f"; provider {provider.name} has no enabled credential left: its downloads "
                 f"go out anonymously (asyncsat provider pause {provider.name} holds them)")
    print(line)
    return 0


async def credential_remove(args: argparse.Namespace, settings: Settings,
                            redactor: Redactor) -> int:
    async with daemon.connection(settings) as conn:
        provider = await queries.provider_get(conn, args.provider)
        if provider is None:
            raise UsageError(f"unknown provider {args.provider!r}")
        if not await queries.credential_remove(conn, provider.id, args.user):
            raise UsageError(f"provider {provider.name} has no credential for user "
                             f"{args.user!r}")
    print(f"credential {args.user} of {provider.name} removed")
    return 0


async def credential_list(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    async with daemon.connection(settings) as conn:
        rows = await queries.credential_list(conn)
    if args.json:
        _emit([{k: r[k] for k in ("provider", "user", "max_connections", "enabled",
                                  "secret_ref")} for r in rows])
        return 0
    if not rows:
        print("no credentials")
    for r in rows:
        state = "enabled" if r["enabled"] else "disabled"
        print(f"{r['provider']:<24} {r['user']:<24} {r['max_connections']:>3} connections  {state}"
              + (f"  (password from {r['secret_ref']})" if r["secret_ref"] else ""))
    return 0


# -- work -----------------------------------------------------------------------------------

def _dest(given: str | None, settings: Settings) -> Path:
    """The folder a request's files go to; UsageError when a file stands in its way here (a
    folder that does not exist yet is made by the daemon; whether the daemon may write it
    is the daemon's to find: it may run as another user, on another host)."""
    dest = Path(given).expanduser().absolute() if given else settings.default_dest
    for folder in (dest, *dest.parents):
        try:
            there = folder.exists()
        except OSError:  # (this user may not look there; the daemon's user may write there)
            break
        if there:
            if not folder.is_dir():
                raise UsageError(f"--dest {dest}: {folder} is a file, not a folder")
            break
    return dest


async def get(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    urls = intake.parse_urls(args.urls)
    for u in urls:
        redactor.add_login(u.user, u.password)
    checksum = checksums.parse(args.checksum) if args.checksum else None
    if checksum is not None and len(urls) != 1:
        raise UsageError("--checksum applies to exactly one URL")
    dest = _dest(args.dest, settings)
    patterns = [u for u in urls if intake.is_pattern(u.url)]
    if patterns:
        if checksum is not None:
            raise UsageError("--checksum cannot apply to a URL pattern")
        for u in patterns:
            split_pattern(ftp_path(u.url))
    async with daemon.connection(settings) as conn:
        provider = None
        if args.provider:
            provider = await queries.provider_get(conn, args.provider)
            if provider is None:
                raise UsageError(f"unknown provider {args.provider!r}")
            await _logins_stay_home(conn, provider, urls)
        if patterns:  # the daemon lists the folders: the request waits for it, queued
            login = next((u for u in urls if u.user), None)
            if login is not None and not one_server([u.url for u in urls]):
                raise UsageError(LOGIN_SPREAD)
            request_id = await queries.request_insert(
                conn, provider_id=provider.id if provider else None,
                urls=[u.url for u in urls], search=None, dest=str(dest), checksum=None,
                status="queued", login_user=login.user if login else None,
                login_secret=login.password if login else None)
            print(f"request {request_id}: queued; its patterns are expanded by listing",
                  file=sys.stderr)
            return await _wait(settings, redactor, request_id, conn) if args.wait else 0
        async with conn.transaction():
            request_id = await queries.request_insert(
                conn, provider_id=provider.id if provider else None, urls=[u.url for u in urls],
                search=None, dest=str(dest), checksum=str(checksum) if checksum else None,
                status="resolved")
            asked = await intake.queue_urls(conn, request_id, urls, provider=provider,
                                            dest=str(dest), checksum=checksum)
        placed = intake.deliver(asked.links)  # after the commit: the rows are what they say
        print(redactor(asked_line(request_id, asked, placed, dest)), file=sys.stderr)
        failed = any(how not in PLACED for _link, how in placed)
        if not args.wait:
            return 1 if failed else 0
        result = await _wait(settings, redactor, request_id, conn)
    return 1 if failed else result


async def _wait(settings: Settings, redactor: Redactor, request_id: int,
                connection: Any | None = None) -> int:
    """Wait for a request's downloads (done here when no daemon serves the database), on
    `connection` if one is open, and print where each one is."""
    async with contextlib.AsyncExitStack() as stack:
        conn = connection if connection is not None else \
            await stack.enter_async_context(daemon.connection(settings))

        async def request_final() -> bool:
            return await queries.request_settled(conn, request_id, sorted(TERMINAL))

        live = await _live(conn)
        alone = not live
        if live:  # they share the work; this command waits for them to finish it
            print(f"{_daemons(live)} serve{'s' if len(live) == 1 else ''} this database: "
                  "waiting for the downloads to finish", file=sys.stderr)
            display = DbProgress(sys.stderr, every=settings.progress_log_interval)

            async def show(now: Any) -> None:
                display.show(request_id, await queries.progress_totals(now, request_id),
                             await queries.status_rows(now, request_id, statuses=["running"]),
                             await _held_back(now, request_id))

            went: list[str] = []

            def note(text: str) -> None:
                went.append(text)
                print(redactor(text), file=sys.stderr)

            settled = await daemon.wait_for_request(settings, request_id, tick=show,
                                                    note=note, served=_watched)
            if went:  # (the database restarted meanwhile: this connection went with it)
                conn = await stack.enter_async_context(daemon.connection(settings))
            if not settled:  # (a daemon that died: its rows are taken over as any daemon's)
                display.clear()
                print("no daemon serves this database any more: this command does the work "
                      "itself", file=sys.stderr)
                alone = True
        if alone:
            await daemon.serve(settings, redactor, until=request_final, sink=ProgressBar())
        rows = await queries.status_rows(conn, request_id)
        status, error, _counts = await queries.request_state(conn, request_id)
        wanted = await queries.request_dest(conn, request_id)
    if status is None:  # (deleted with psql while this command waited)
        print(f"request {request_id} no longer exists: it was deleted", file=sys.stderr)
        return 1
    if status == "failed":
        print(f"request {request_id} failed: {redactor(error or 'no reason given')}",
              file=sys.stderr)
        return 1
    if not rows:
        print(f"request {request_id}: nothing matched, nothing to download", file=sys.stderr)
        return 1
    failed = 0
    for r in rows:
        if r["status"] == "done":
            path, there = _done_path(r, wanted)
            print(f"done    {path}" + ("" if there else f" (not put into {wanted}: see the "
                                                         "daemon's log)"))
            failed += not there
        else:
            failed += 1
            print(f"{r['status']:<7} {r['url']}: {r['error'] or 'not finished'}")
    return 0 if rows and not failed else 1


async def _logins_stay_home(conn: Any, provider: Provider,
                            urls: list[SplitUrl]) -> None:
    """UsageError for a URL given `--provider` off the provider's servers while it has an
    account: its login would not go there (`sends_login`), and the user meant it to."""
    away = next((u.url for u in urls if not u.user and not sends_login(provider, u.url)),
                None)
    if away is not None and await queries.has_enabled_credential(conn, provider.id):
        host = urlsplit(away).netloc
        raise UsageError(
            f"{away} is not on a server of provider {provider.name}"
            + (f" ({provider.url})" if provider.url else "") + ": its "
            f"accounts' login is sent to its own servers only; to send it to {host}, "
            f"asyncsat provider set {provider.name} --set 'auth_hosts=[\"{host}\"]'")


def _done_path(row: dict[str, Any], wanted: str | None) -> tuple[str, bool]:
    """Where a request finds a done product: its download's file, or (asked into another
    folder) the link or copy made there. (path, whether it is where the request wants it)."""
    if wanted is None or row["dest"] is None or Path(wanted) == Path(row["dest"]) or \
            not row["name"]:
        return row["path"], True
    target = Path(wanted) / row["provider"] / row["name"]
    # (someone else's file at the name is not the product: it took the other name there)
    for there in (target, target.with_name(unique_name(row["name"], row["id"]))):
        if row["path"] is not None and placed(Path(row["path"]), there):
            return str(there), True
    return row["path"], False


async def search(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    filters = tuple(Filter.parse(f) for f in args.filter)
    query = Query(
        collection=args.collection.strip(), start=parse_time(args.start, "start"),
        end=parse_time(args.end, "end"), bbox=parse_bbox(args.bbox) if args.bbox else None,
        wkt=args.wkt, filters=filters, limit=args.limit)
    query = Query.from_json(query.to_json())  # the same checks as a request inserted by psql
    dest = _dest(args.dest, settings)
    async with daemon.connection(settings) as conn:
        provider = await queries.provider_get(conn, args.provider)
        if provider is None:
            raise UsageError(f"unknown provider {args.provider!r}")
        _check_search(provider, query)  # what the daemon would refuse, refused now
        request_id = await queries.request_insert(
            conn, provider_id=provider.id, urls=None, search=query.to_json(), dest=str(dest),
            checksum=None, status="queued", follow=args.follow)
    what = "standing search" if args.follow else "search"
    print(f"request {request_id}: {what} of {provider.name} queued", file=sys.stderr)
    return await _wait(settings, redactor, request_id) if args.wait else 0


def _check_search(provider: Provider, query: Query) -> None:
    """UsageError for a search the provider's catalog cannot run (nothing is written)."""
    if provider.protocol == "ftp":
        layout(provider, query)
    elif provider.protocol == "odata":
        from asyncsat.catalogs import odata

        odata.check(query)
    elif provider.protocol == "stac":
        from asyncsat.catalogs import stac

        stac.check(query)
    elif provider.protocol == "dhus":
        from asyncsat.catalogs import dhus

        dhus.check(query)
    elif provider.protocol == "m2m":
        from asyncsat.catalogs import m2m

        m2m.check(query)
    else:
        raise UsageError(f"catalog searches of {provider.protocol} providers are not "
                         "supported yet")


async def _held_back(conn: Any, request_id: int) -> str | None:
    """Why a request's downloads do not move, if something holds them back."""
    paused = await queries.paused_waiting(conn, request_id)
    if paused:
        names = ", ".join(name for name, _n in paused)
        return f"paused provider(s) {names}: their downloads wait for asyncsat provider resume"
    return None


def _status_json(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    path = row["path"]
    if path is None and row["name"]:
        dest = Path(row["dest"]) if row["dest"] else settings.default_dest
        path = str(dest / row["provider"] / row["name"])
    return {
        "id": row["id"], "request_id": row["request_id"], "provider": row["provider"],
        "name": row["name"], "url": row["url"], "status": row["status"],
        "bytes_done": row["bytes_done"], "size": row["size"], "rate": row["rate"],
        "attempts": row["attempts"],
        "error": row["error"], "path": path,
        "checksum": f"{row['checksum_algo']}:{row['checksum_value']}"
        if row["checksum_algo"] else None,
        "created_at": row["created_at"].isoformat(), "updated_at": row["updated_at"].isoformat(),
        # an offline product: when it is looked at again
        "next_check": row["not_before"].isoformat() if row["status"] == "offline" else None,
    }


JSON_CHUNK = 10_000
"""Rows read per statement while `status --json` prints every download."""


async def status(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    statuses = args.status or None
    database = settings.database
    if not settings.dsn and not embedded.created(settings.home):
        database += " (created just now, empty: is --home right?)"
    async with daemon.connection(settings) as conn:
        if args.request is not None and not await queries.request_exists(conn, args.request):
            raise UsageError(f"no request {args.request}")
        if args.requests:
            return await _requests(conn, args, database, redactor)
        while True:
            if args.json:
                running = await _status_json_rows(conn, args, statuses, settings)
                if running and not await _serving(conn):
                    sys.stdout.flush()  # (the array first: the note does not cut into it)
                    print(await _daemon_line(conn, args.request, False), file=sys.stderr)
            else:
                await _status_text(conn, args, statuses, database, redactor)
            if not args.watch:
                return 0
            sys.stdout.flush()
            await asyncio.sleep(1.0)


async def _status_json_rows(conn: Any, args: argparse.Namespace, statuses: list[str] | None,
                            settings: Settings) -> bool:
    """Print `status --json` (the contract: one array; every download unless --limit),
    newest first; True when a row is running. Without --limit the rows are read a chunk
    at a time by keyset from one snapshot, and printed as they come: a million rows take
    neither a million rows of memory nor an inconsistent view."""
    if args.limit is not None:
        rows = await queries.status_rows(conn, args.request, statuses=statuses,
                                         limit=args.limit, newest_first=True,
                                         before=args.before)
        _emit([_status_json(r, settings) for r in rows])
        return any(r["status"] == "running" for r in rows)
    running, before, first = False, args.before, True
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        while True:
            rows = await queries.status_rows(conn, args.request, statuses=statuses,
                                             limit=JSON_CHUNK, newest_first=True,
                                             before=before)
            for r in rows:
                print("[" if first else ", ", end="")
                print(json.dumps(_status_json(r, settings), default=str), end="")
                first = False
            running = running or any(r["status"] == "running" for r in rows)
            if len(rows) < JSON_CHUNK:
                break
            before = rows[-1]["id"]
    print("[]" if first else "]")
    return running


async def _status_text(conn: Any, args: argparse.Namespace, statuses: list[str] | None,
                       database: str, redactor: Redactor) -> None:
    """`status` for a person: the newest page of downloads (--limit, else STATUS_PAGE), the
    count of older ones and the command that shows them, the unfinished requests."""
    page = args.limit if args.limit is not None else STATUS_PAGE
    rows = await queries.status_rows(conn, args.request, statuses=statuses, limit=page,
                                     newest_first=True, before=args.before)
    if args.watch and sys.stdout.isatty():
        print("\x1b[H\x1b[2J", end="")
    print(f"database: {database}")
    serving = await _serving(conn)
    for line in await _status_notes(conn, args.request, serving):
        print(redactor(line))
    print(redactor(status_table(rows, stalled=not serving)))
    if len(rows) == page:
        older = await queries.status_count(conn, args.request, statuses=statuses,
                                           before=rows[-1]["id"])
        if older:
            why = "--limit" if args.limit is not None else f"{page} per page"
            print(f"... {older} older download(s) not shown ({why}); next page: "
                  + _next_page(args, rows[-1]["id"]))
    if statuses is None and args.limit is None and args.before is None:
        summaries = [request_summary(r) for r in
                     await queries.request_rows(conn, args.request, unfinished=True)]
        pending = requests_lines(summaries)
        if pending:  # requests still listed, searched, followed, or failed
            print(redactor(pending))


def _next_page(args: argparse.Namespace, last: int) -> str:
    """The `status` command that shows the page after the one whose last row is `last`."""
    words = ["asyncsat", "status"]
    if args.request is not None:
        words += ["--request", str(args.request)]
    for s in args.status or []:
        words += ["--status", s]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    return " ".join([*words, "--before", str(last)])


async def _status_notes(conn: Any, request_id: int | None, serving: bool) -> list[str]:
    """Lines under `database:`: whether a daemon serves it, and what holds the queue back."""
    lines = [await _daemon_line(conn, request_id, serving)]
    totals = totals_line(await queries.progress_totals(conn, request_id, unfinished=True)) \
        if serving else None
    if totals is not None:
        lines.append(totals)
    lines += [f"paused: provider {name} ({n} waiting download(s)): asyncsat provider resume "
              f"{name}" for name, n in await queries.paused_waiting(conn, request_id)]
    return lines


async def _daemon_line(conn: Any, request_id: int | None, serving: bool) -> str:
    """`daemon: ...`: rows marked running with no daemon are stalled, not running."""
    if serving:
        live = await _live(conn)
        return "daemon: serving this database (" + "; ".join(
            f"{d['id'][:8]} on {d['host']} pid {d['pid']}: {_doing(d)}" for d in live) + ")"
    counts = await queries.progress_totals(conn, request_id, unfinished=True)
    line = "daemon: none serves this database"
    if counts.get("running"):
        line += (f"; {counts['running']} download(s) marked running are stalled (left by a "
                 "daemon that did not stop cleanly): asyncsat run resumes them from their "
                 ".part files")
    elif counts.get("queued"):
        line += f"; {counts['queued']} queued download(s) wait for asyncsat run"
    return line


async def _check_ids(conn: Any, ids: list[int]) -> None:
    missing = await queries.downloads_missing(conn, ids)
    if missing:
        raise UsageError("no download " + ", ".join(str(i) for i in missing))


_NOTHING_TO_RETRY = {
    "done": "is done and its file is in place", "queued": "is queued already",
    "running": "is running",
}
_NOTHING_TO_CANCEL = {
    "done": "is done", "failed": "has failed", "cancelled": "is cancelled already",
}


async def _change(conn: Any, ids: list[int], change: Any) -> tuple[list[int], dict[int, str]]:
    """Apply `change(conn, ids)`; (ids it changed, status of each id it left alone)."""
    async with conn.transaction():
        before = await queries.download_statuses(conn, ids)
        await change(conn, ids)
        after = await queries.download_statuses(conn, ids)
    changed = [i for i in dict.fromkeys(ids) if before[i] != after[i]]
    return changed, {i: before[i] for i in dict.fromkeys(ids) if i not in changed}


async def retry(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    if args.failed == bool(args.ids):
        raise UsageError("give either download ids or --failed")
    async with daemon.connection(settings) as conn:
        if args.failed:
            count = await queries.retry(conn, None)
            print(f"{count} download(s) queued again" if count else
                  "no failed download: nothing to retry")
            return 0
        await _check_ids(conn, args.ids)
        gone: dict[int, str] = {}

        async def retry_or_fetch_again(conn: Any, ids: list[int]) -> None:
            await queries.retry(conn, ids)
            # a done download whose file is gone (deleted, moved away) is fetched again
            for i, path in (await queries.download_files(conn, ids)).items():
                if not Path(path).exists():
                    await queries.download_refetch(conn, i, None)
                    gone[i] = path

        changed, left = await _change(conn, args.ids, retry_or_fetch_again)
    print(f"{len(changed)} download(s) queued again" +
          (": " + ", ".join(f"{i} (done, but its file {gone[i]} was gone)" if i in gone
                            else str(i) for i in changed) if changed else ""))
    for i, status in left.items():
        print(f"download {i} {_NOTHING_TO_RETRY.get(status, 'is ' + status)}: nothing to retry")
    return 0


async def _requests(conn: Any, args: argparse.Namespace, database: str,
                    redactor: Redactor) -> int:
    while True:
        rows = [request_summary(r) for r in await queries.request_rows(conn, args.request)]
        if args.json:
            _emit(rows)
        else:
            if args.watch and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(f"database: {database}")
            print(await _daemon_line(conn, args.request, await _serving(conn)))
            print(redactor(request_progress_table(rows, redactor)))
        if not args.watch:
            return 0
        sys.stdout.flush()
        await asyncio.sleep(1.0)


async def cancel(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    if args.request is not None:
        if args.ids:
            raise UsageError("give either download ids or --request ID")
        async with daemon.connection(settings) as conn:
            if not await queries.request_exists(conn, args.request):
                raise UsageError(f"no request {args.request}")
            async with conn.transaction():
                ended, cancelled, kept = await queries.cancel_request(conn, args.request)
        if not ended:
            print(f"request {args.request} had already ended; {cancelled} download(s) "
                  "cancelled")
            return 0
        extra = f" ({kept} kept: other requests want them)" if kept else ""
        print(f"request {args.request} cancelled: {cancelled} download(s) cancelled{extra}")
        return 0
    if not args.ids:
        raise UsageError("give download ids, or --request ID")
    async with daemon.connection(settings) as conn:
        await _check_ids(conn, args.ids)
        changed, left = await _change(conn, args.ids, queries.cancel)
    print(f"{len(changed)} download(s) cancelled" +
          (": " + ", ".join(str(i) for i in changed) if changed else ""))
    for i, status in left.items():
        print(f"download {i} {_NOTHING_TO_CANCEL.get(status, 'is ' + status)}: "
              "nothing to cancel")
    return 0


def _doing(d: dict[str, Any]) -> str:
    """`3 running` / `3 running, searching request 7`: what a live daemon is doing. Small
    files are claimed in runs that take one connection in turn: `64 running on 4
    connections` when the rows running outnumber them (the others wait their turn)."""
    ids = d.get("resolving") or []
    running, connections = d["running"], d.get("connections", d["running"])
    on = f" on {connections} connection{'s' if connections != 1 else ''}" \
        if running > connections else ""
    return f"{running} running{on}" + (
        f", searching request{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"
        if ids else "")


async def _live(conn: Any) -> list[dict[str, Any]]:
    """The daemons whose heartbeat is fresh, but those of this host whose process is gone
    (killed since their last heartbeat: no need to wait for their lease to lapse)."""
    here, space = socket.gethostname(), daemon.machine()
    return [d for d in await queries.live_daemons(conn)
            if d["host"] != here or d["machine"] != space or not space
            or daemon.process_alive(d["pid"])]


async def _serving(conn: Any) -> bool:
    """True while a daemon serves the database."""
    return bool(await _live(conn))


async def _watched(conn: Any) -> bool:
    """Whether `get --wait` still has a daemon to wait for: one serving the database, or one
    of this host whose process runs, whatever its heartbeat's age (back from a database
    that was away longer than its lease timeout, it has not beaten again yet)."""
    if await _serving(conn):
        return True
    space = daemon.machine()
    return bool(space) and any(
        d["machine"] == space and daemon.process_alive(d["pid"])
        for d in await queries.unstopped_daemons_on(conn, socket.gethostname()))


def _daemons(live: list[dict[str, Any]]) -> str:
    """`2 daemons` / `a daemon` for messages."""
    return f"{len(live)} daemons" if len(live) > 1 else "a daemon"


async def check(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    """A health check for systemd, Docker and monitoring."""
    async with daemon.connection(settings) as conn:
        live = await _live(conn)
    if not live:
        raise AsyncsatError("no daemon serves this database")
    print(f"ok: the database answers and {_daemons(live)} serve{'s' if len(live) == 1 else ''}"
          " it")
    for d in live:
        print(f"  daemon {d['id']} on {d['host']} (pid {d['pid']}, {d['version']}), "
              f"{_doing(d)}, heartbeat {d['heartbeat_at']:%H:%M:%S}")
    return 0


# -- the database ----------------------------------------------------------------------------

async def db_dsn(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    """The DSN to give psql: the embedded server's (started when needed), or the configured
    one without its password."""
    shown, password = split_password(await daemon.resolve_dsn(settings))
    print(shown)
    if password:
        print("the password is left out: give it in PGPASSWORD or ~/.pgpass, or run "
              "asyncsat db psql", file=sys.stderr)
    return 0


async def db_psql(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    """Replace this process with psql on the database (its password in the environment,
    never on the command line that `ps` shows)."""
    shown, password = split_password(await daemon.resolve_dsn(settings))
    program = shutil.which("psql") if settings.dsn else \
        embedded.psql_program() or shutil.which("psql")
    if program is None:
        raise AsyncsatError("psql is not installed (apt-get install postgresql-client)")
    extra = list(args.psql_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, [program, "--dbname", shown, *extra], env)


async def db_stop(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    """Stop the embedded server, unless a daemon serves it."""
    if settings.dsn:
        raise UsageError(f"this command line uses {settings.database}, not an embedded "
                         "server: stop it with its own tools")
    where = settings.home / "pg"
    dsn = embedded.running_dsn(settings.home)
    if dsn is None:
        print(f"the embedded PostgreSQL in {where} is not running: nothing to stop")
        return 0
    conn = await connect(dsn)
    try:
        serving = await _live(conn)
    finally:
        await conn.close()
    if serving:
        raise AsyncsatError(f"a daemon serves the embedded PostgreSQL in {where}: stop the "
                            "daemon first")
    await asyncio.to_thread(embedded.stop_server, settings.home)
    print(f"stopped the embedded PostgreSQL in {where}")
    return 0


async def run(args: argparse.Namespace, settings: Settings, redactor: Redactor) -> int:
    port = args.metrics_port or settings.metrics_port
    await daemon.serve(settings, redactor, exit_when_idle=args.exit_when_idle,
                       metrics_at=(settings.metrics_host, port) if port else None)
    return 0
