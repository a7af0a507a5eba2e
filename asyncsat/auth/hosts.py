"""Where an account's login may go: the provider's own servers, never any URL a row holds."""

from __future__ import annotations

from urllib.parse import urlsplit

from asyncsat.models import Provider

_PORTS = {"http": 80, "https": 443, "ftp": 21, "ftps": 21}


def _origin(url: str) -> tuple[str, int | None] | None:
    """(host, port) of a URL, the scheme's port when none is written; None without a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _PORTS.get(parts.scheme)


LOGIN_SPREAD = ("a login in the URLs of a request with a pattern goes with each of them: "
                "give URLs of one server (host and port), or one request per server")


def one_server(urls: list[str]) -> bool:
    """Whether the URLs are all on one server (host and port): a login given in one of a
    request's URLs goes with each of them."""
    return len({_origin(u) for u in urls}) <= 1


def login_hosts(provider: Provider) -> tuple[frozenset[tuple[str, int | None]], frozenset[str]]:
    """The origins a provider's login goes to (its URL's and its `download_url`'s: host and
    port), and the hosts its `auth_hosts` setting names (any port; `host:port` for one; an
    IPv6 address with or without its brackets)."""
    origins = {o for u in (provider.url, provider.settings.get("download_url"))
               if isinstance(u, str) and (o := _origin(u)) is not None}
    named = provider.settings.get("auth_hosts")
    hosts = {str(h).lower() for h in named} if isinstance(named, list) else set()
    return frozenset(origins), frozenset(hosts)


def sends_login(provider: Provider, url: str) -> bool:
    """Whether a request to `url` may carry the login of one of the provider's accounts: a
    URL on one of its servers (`login_hosts`). A provider with none (no URL, no
    `auth_hosts`) has no servers of its own: the user binds each URL to it."""
    origins, hosts = login_hosts(provider)
    if not origins and not hosts and not provider.url and \
            not provider.settings.get("download_url"):  # (a URL that cannot be read: none)
        return True
    origin = _origin(url)
    if origin is None:
        return False
    host, port = origin
    name = f"[{host}]" if ":" in host else host  # (an IPv6 address as a URL writes it)
    return origin in origins or bool(
        {host, name, f"{host}:{port}", f"{name}:{port}"} & hosts)
