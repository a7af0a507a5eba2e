"""The settings a provider takes (`provider add --set KEY=VALUE`): one table per protocol.

`validate()` refuses a key the protocol does not know, or a value of the wrong type or
range, naming the key, before anything is written. The README's table of provider settings
documents the same keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from asyncsat.catalogs.templates import check_template, split_pattern
from asyncsat.errors import UsageError

Check = Callable[[object], str | None]
"""Returns None when the value is fine, else what it should be."""


def _integer(least: int) -> Check:
    def check(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"a whole number of at least {least}"
        return None

    return check


MAX_SECONDS = 10 * 365 * 86400
"""Ten years: longer delays are mistakes, and past what a clock or an SQL interval can add
(`backoff_max=1e300` made every retry fail in SQL and left its download `running`)."""


def _seconds(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not 0 < value <= MAX_SECONDS:
        return f"a number of seconds greater than 0 and at most {MAX_SECONDS} (ten years)"
    return None


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _text(value: object) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _url(value: object) -> str | None:
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.hostname and "@" not in parts.netloc:
            return None
    return "an http(s):// URL with a host and no login"


def _names(value: object) -> str | None:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return None
    return 'a JSON list of asset keys, such as ["B04", "B08"]'


def _hosts(value: object) -> str | None:
    if isinstance(value, list) and value and all(
            isinstance(v, str) and v and not any(c in v for c in "/@ ") for v in value):
        return None
    return 'a JSON list of host names (host or host:port), such as ["data.example.org"]'


def _layouts(value: object) -> str | None:
    shape = ('a JSON object of collection names and layouts, such as '
             '{"sst": "SST/{date:%Y}/*_{date:%Y%m%d}.nc"}')
    if not isinstance(value, Mapping) or not value:
        return shape
    for name, template in value.items():
        if not isinstance(template, str) or not template.strip():
            return shape
        try:
            check_template(template)
            split_pattern("/" + template.lstrip("/"))
        except UsageError as exc:
            return f"{shape} (collection {name!r}: {exc.message})"
    return None


def _quota(value: object) -> str | None:
    from asyncsat.archive import parse_quota

    try:
        parse_quota(value)
    except UsageError:
        return "COUNT/PERIOD such as '20/12h' (period in s, m, h or d)"
    return None


@dataclass(frozen=True)
class Key:
    """One setting: what its value must be, and what it does (for the README)."""

    check: Check
    doc: str


_COMMON = {
    "max_connections": Key(_integer(1), "connections when the provider has no enabled "
                           "credential (default 4)"),
    "max_attempts": Key(_integer(1), "consecutive failed attempts without progress before "
                        "`failed` (default 5)"),
    "backoff_initial": Key(_seconds, "first retry delay, seconds (default 1)"),
    "backoff_max": Key(_seconds, "longest retry delay, seconds (default 60)"),
    "auth_hosts": Key(_hosts, "hosts besides those of the provider's URL and `download_url` "
                      "that get its accounts' login (default: none)"),
}
_HTTP = {
    "allow_insecure_redirects": Key(_boolean, "follow a redirect from https:// to http:// "
                                    "(default false: refused)"),
}
_CATALOG = {
    "follow_interval": Key(_seconds, "seconds between two runs of a standing request "
                           "(default 900)"),
    "offline_interval": Key(_seconds, "seconds before an offline product is looked at again "
                            "(default 60, growing)"),
    "follow_overlap": Key(_seconds, "how far before its watermark a standing request "
                          "searches again, for products indexed late (default 86400)"),
    "page_size": Key(_integer(1), "products per catalog page (default 100)"),
}
_TOKENS = {
    "token_url": Key(_url, "OAuth2 token endpoint: the credential's user and password are "
                     "exchanged for bearer tokens (password grant, then refresh grant)"),
    "client_id": Key(_text, "OAuth2 client id (default cdse-public)"),
}
_ARCHIVE = {
    "archive_quota": Key(_quota, "orders to the long-term archive an account may send, as "
                         "COUNT/PERIOD (`20/12h`: twenty in any twelve hours)"),
}

KEYS: dict[str, dict[str, Key]] = {
    "http": {**_COMMON, **_HTTP},
    "ftp": {**_COMMON, "collections": Key(_layouts, "named date layouts to search")},
    "odata": {
        **_COMMON, **_HTTP, **_CATALOG, **_ARCHIVE, **_TOKENS,
        "download_url": Key(_url, "base URL of product downloads (default: the provider URL)"),
        "max_skip": Key(_integer(1), "the server's $skip cap (default 10000)"),
    },
    "dhus": {**_COMMON, **_HTTP, **_CATALOG, **_ARCHIVE},
    "stac": {**_COMMON, **_HTTP, **_CATALOG, **_TOKENS,
             "assets": Key(_names, "asset keys to fetch (default: role data, else the only "
                           "asset)")},
    "m2m": {**_COMMON, **_HTTP, **_CATALOG,
            "product": Key(_text, "which download option of a scene to fetch: a product name "
                           "or part of one (default `Product Bundle`)")},
}
"""The known setting keys of each protocol."""


def validate(protocol: str, settings: Mapping[str, object]) -> dict[str, object]:
    """`settings`, checked for `protocol`; UsageError naming the first bad key."""
    known = KEYS.get(protocol, _COMMON)
    for key, value in settings.items():
        spec = known.get(key)
        if spec is None:
            raise UsageError(f"unknown setting {key!r} for {protocol} providers; known: "
                             + ", ".join(sorted(known)))
        wanted = spec.check(value)
        if wanted is not None:
            raise UsageError(f"invalid setting {key}={_show(value)}: must be {wanted}")
    initial, longest = settings.get("backoff_initial"), settings.get("backoff_max")
    if isinstance(initial, int | float) and isinstance(longest, int | float) and \
            longest < initial:
        raise UsageError(f"invalid setting backoff_max={longest}: must be at least "
                         f"backoff_initial ({initial})")
    return dict(settings)


def _show(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
