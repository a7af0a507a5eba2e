"""Where an account's login may go (`sends_login`): the provider's own servers only."""

from __future__ import annotations

import pytest

from asyncsat.auth.hosts import sends_login
from asyncsat.models import Provider


def _provider(url: str | None, **settings: object) -> Provider:
    return Provider(id=1, name="p", protocol="http", url=url, settings=dict(settings))


@pytest.mark.parametrize(("provider", "url", "sent"), [
    (_provider("https://data.example.org/a/"), "https://data.example.org/b/x.zip", True),
    (_provider("https://data.example.org/a/"), "https://DATA.example.org:443/x", True),
    (_provider("https://data.example.org/a/"), "http://data.example.org/x", False),
    (_provider("https://data.example.org/a/"), "https://evil.example.net/x", False),
    (_provider("http://127.0.0.1:8765/a/"), "http://127.0.0.1:8768/x", False),
    (_provider("http://127.0.0.1:8765/a/"), "http://127.0.0.1:8765/other/x", True),
    (_provider("ftp://ftp.example.org/pub/"), "ftp://ftp.example.org:21/x.nc", True),
    (_provider("https://catalogue.example.eu/odata/v1",
               download_url="https://download.example.eu/odata/v1"),
     "https://download.example.eu/odata/v1/Products(1)/$value", True),
    (_provider("https://api.example.org/", auth_hosts=["cdn.example.org"]),
     "https://cdn.example.org:8443/x", True),
    (_provider("https://api.example.org/", auth_hosts=["cdn.example.org:443"]),
     "https://cdn.example.org:8443/x", False),
    (_provider("https://api.example.org/", auth_hosts=["cdn.example.org:443"]),
     "https://cdn.example.org/x", True),
    # a provider with no server of its own: the user binds each URL to it
    (_provider(None), "https://anywhere.example.net/x", True),
    (_provider(None, auth_hosts=["a.example.org"]), "https://b.example.org/x", False),
    (_provider("https://data.example.org/"), "not a url", False),
])
def test_a_login_goes_to_the_providers_own_servers_only(
        provider: Provider, url: str, sent: bool) -> None:
    assert sends_login(provider, url) is sent


@pytest.mark.parametrize("named", ["[::1]:8768", "[::1]", "[::1]:8768".upper()])
def test_auth_hosts_names_an_ipv6_host_as_a_url_writes_it(named: str) -> None:
    """`get --provider` suggests `auth_hosts=["<the URL's host:port>"]`, brackets and all
    for an IPv6 address: that entry lets the login go there (it matched only the unbracketed
    `::1:8768`, which the suggestion never shows)."""
    provider = _provider("http://[::1]:8765/a/", auth_hosts=[named])
    assert sends_login(provider, "http://[::1]:8768/x")
    assert not sends_login(provider, "http://[::2]:8768/x")


def test_a_provider_url_that_cannot_be_read_sends_the_login_nowhere() -> None:
    """A provider's URL that does not parse (written with psql: a port out of range) is no
    provider without servers: its login goes nowhere, not everywhere."""
    provider = _provider("https://data.example.org:99999/a/")
    assert not sends_login(provider, "https://evil.example.net/x")
    assert not sends_login(provider, "https://data.example.org/x")
