"""PostgreSQL connection strings, told to people without their password. Pure."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

# keyword/value form: `host=db port=5432 password='it''s' dbname=x`
_KEYWORD = re.compile(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")


def split_password(dsn: str) -> tuple[str, str | None]:
    """(the DSN without its password, the password or None), for URIs and keyword strings."""
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
        return urlunsplit((parts.scheme, netloc, parts.path, kept, parts.fragment)), \
            password or None
    password = None
    kept_pairs = []
    for match in _KEYWORD.finditer(dsn):
        key, value = match.group(1), match.group(2)
        if key == "password":
            password = _unquote_keyword(value)
        else:
            kept_pairs.append(f"{key}={value}")
    return " ".join(kept_pairs), password or None


_PAIR = r"\w+\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']*)"
_KEYWORDS = re.compile(rf"\s*{_PAIR}(?:\s+{_PAIR})*\s*")
"""A whole keyword DSN: pairs apart by white space (so that no input backtracks long)."""
_SCHEMES = ("postgresql", "postgres")


def as_uri(dsn: str) -> str:
    """The DSN as a `postgresql://` URI, the only form asyncpg reads: a URI as it is, the
    keyword form that psql also takes (`host=db dbname=x user=me`) as a URI with those
    keywords in its query (`postgresql://?host=db&dbname=x&user=me`). ValueError, saying
    what is wrong without the DSN itself (it may hold a password), for anything else."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"a DSN URI begins with postgresql://, not {parts.scheme}://")
        parts.port  # noqa: B018 (ValueError for a port that is not a number)
        return dsn
    if not _KEYWORDS.fullmatch(dsn):
        raise ValueError("a DSN is a postgresql:// URI or keywords (host=... dbname=...)")
    pairs = [(m.group(1), _unquote_keyword(m.group(2))) for m in _KEYWORD.finditer(dsn)]
    return "postgresql://?" + urlencode(pairs, quote_via=quote)


def _unquote_keyword(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def describe(dsn: str) -> str:
    """`postgresql://user@host:5432/db` (no password), for log lines and `status`."""
    return split_password(dsn)[0]
