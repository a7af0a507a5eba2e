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
