"""PostgreSQL connection strings, told to people without their password. Pure."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit


def split_password(dsn: str) -> tuple[str, str | None]:
    """(the DSN without its password, the password or None), for URIs and keyword strings
    (read as `as_uri` reads them: ValueError for a malformed one)."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        password = unquote(parts.password) if parts.password is not None else None
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}@{hostport}" if user else hostport
        query = parse_qsl(parts.query, keep_blank_values=True)
        for key, value in query:
            if key == "password":
                password = value
        kept = urlencode([(k, v) for k, v in query if k != "password"], safe="/")
        # (not urlunsplit: it drops the `//` of an empty host, `postgresql://?host=/run`,
        # and libpq then reads no URI)
        shown = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{kept}" if kept else "") + \
            (f"#{parts.fragment}" if parts.fragment else "")
        return shown, password or None
    pairs = _keywords(dsn)  # (keywords: `host=db password='it\\'s' dbname=x`)
    password = next((value for key, value in pairs if key == "password"), None)
    kept = " ".join(f"{key}={_quoted(value)}" for key, value in pairs if key != "password")
    return kept, password or None


_URI_PREFIXES = ("postgresql://", "postgres://")
_ANY_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
CLIENT_ONLY = frozenset({
    "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "hostaddr", "gssencmode", "gssdelegation",
    "channel_binding", "sslcompression", "sslsni", "sslcertmode", "requirepeer",
    "require_auth", "load_balance_hosts", "replication", "fallback_application_name",
    "client_encoding",
})
"""libpq's keywords that asyncpg does not read: it would send them to the server as
settings, which refuses them at every connection."""


def as_uri(dsn: str) -> str:
    """The DSN as a `postgresql://` URI, the only form asyncpg reads: a URI as it is, the
    keyword form that psql also takes (`host=db dbname=x user=me`) as a URI with those
    keywords in its query (`postgresql://?host=db&dbname=x&user=me`). ValueError, saying
    what is wrong without the DSN's text (it may hold a password), for anything else."""
    if dsn.startswith(_URI_PREFIXES):
        parts = urlsplit(dsn)
        _check_ports(parts.netloc)
        _check_keywords(key for key, _ in parse_qsl(parts.query, keep_blank_values=True))
        return dsn
    if _ANY_URI.match(dsn):
        raise ValueError("a DSN URI begins with postgresql:// or postgres://")
    pairs = _keywords(dsn)
    if not pairs:
        raise ValueError("a DSN is a postgresql:// URI or keywords (host=... dbname=...)")
    _check_keywords(key for key, _ in pairs)
    return "postgresql://?" + urlencode(pairs, quote_via=quote)


def _check_ports(netloc: str) -> None:
    """Each host's port a number (several hosts: `h1:5432,h2:5433`)."""
    for host in netloc.rpartition("@")[2].split(","):
        port = host.partition("]")[2] if host.startswith("[") else host
        port = port.rpartition(":")[2] if ":" in port else ""
        if port and not port.isdigit():
            raise ValueError("a port of the DSN URI is not a number")


def _check_keywords(keys: Iterable[str]) -> None:
    for key in keys:
        if key in CLIENT_ONLY:
            raise ValueError(f"the DSN keyword {key!r} is not one asyncpg reads: leave it out")


def _keywords(dsn: str) -> list[tuple[str, str]]:
    """The pairs of a keyword DSN, read as libpq reads them (conninfo_parse): a value runs
    to the next white space, a backslash escapes the next character, and a value that
    begins with a quote runs to the next unescaped quote."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i == n:
            return pairs
        start = i
        while i < n and dsn[i] != "=" and not dsn[i].isspace():
            i += 1
        key = dsn[start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if not re.fullmatch(r"\w+", key) or i == n or dsn[i] != "=":
            raise ValueError("a DSN is a postgresql:// URI or keywords (host=... dbname=...)")
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i == n:
                    raise ValueError("a quoted value of the DSN has no closing quote")
                if dsn[i] == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                elif dsn[i] == "'":
                    i += 1
                    break
                else:
                    value.append(dsn[i])
                    i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                else:
                    value.append(dsn[i])
                    i += 1
        pairs.append((key, "".join(value)))


def describe(dsn: str) -> str:
    """`postgresql://user@host:5432/db` (no password), for log lines and `status`."""
    return split_password(dsn)[0]


def _quoted(value: str) -> str:
    """A keyword's value as libpq reads it back: quoted when it must be."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
