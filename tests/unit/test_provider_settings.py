"""Provider settings: one table of known keys per protocol, and the README documents it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from asyncsat.errors import UsageError
from asyncsat.models import PROTOCOLS
from asyncsat.provider_settings import KEYS, validate

README = Path(__file__).parents[2] / "README.md"


def _readme_table() -> dict[str, set[str]]:
    """key -> protocols, from the README's table of provider settings."""
    text = README.read_text()
    table = text[text.index("| key | protocols |"):]
    table = table[:table.index("\n\n")]
    out = {}
    for line in table.splitlines()[2:]:
        key, protocols = (c.strip() for c in line.strip("|").split("|")[:2])
        names = set(PROTOCOLS) | set(KEYS) if protocols == "all" else \
            {p.strip() for p in protocols.split(",")}
        out[key.strip("`")] = names
    return out


def test_the_readme_documents_every_key_of_every_protocol() -> None:
    documented = _readme_table()
    assert set(PROTOCOLS) <= set(KEYS)
    for protocol, keys in KEYS.items():
        assert set(keys) == {k for k, ps in documented.items() if protocol in ps}, protocol


@pytest.mark.parametrize(("protocol", "settings"), [
    ("http", {"max_connections": 8, "max_attempts": 3, "backoff_initial": 0.5,
              "backoff_max": 30, "allow_insecure_redirects": True}),
    ("ftp", {"collections": {"sst": "SST/{date:%Y}/*_{date:%Y%m%d}_*.nc"}}),
    ("odata", {"token_url": "https://id.example/token", "client_id": "cdse-public",
               "download_url": "https://dl.example/odata/v1/", "page_size": 50,
               "max_skip": 10000, "follow_interval": 600, "offline_interval": 60,
               "archive_quota": "20/12h"}),
    ("stac", {"assets": ["B04", "B08"], "page_size": 20}),
])
def test_good_settings_pass(protocol: str, settings: dict[str, object]) -> None:
    assert validate(protocol, settings) == settings


@pytest.mark.parametrize(("protocol", "settings", "named"), [
    ("http", {"max_connections": -3}, "max_connections=-3"),
    ("http", {"max_connections": 2.5}, "max_connections=2.5"),
    ("http", {"max_connections": True}, "max_connections=true"),
    ("http", {"max_attempts": "five"}, "max_attempts=five"),
    ("http", {"backoff_initial": 0}, "backoff_initial=0"),
    ("http", {"backoff_initial": 5, "backoff_max": 2}, "backoff_max=2"),
    ("http", {"bogus_key": 1}, "'bogus_key'"),
    ("http", {"collections": {"a": "b/*.nc"}}, "'collections'"),  # an FTP key
    ("ftp", {"allow_insecure_redirects": True}, "'allow_insecure_redirects'"),
    ("ftp", {"collections": {"sst": "SST/{year}/*.nc"}}, "collections="),
    ("ftp", {"collections": ["SST/*.nc"]}, "collections="),
    ("http", {"allow_insecure_redirects": "yes"}, "allow_insecure_redirects=yes"),
    ("odata", {"token_url": "not a url"}, "token_url=not a url"),
    # a password with no user is a login too (it was taken, and shown by provider list)
    ("odata", {"token_url": "https://:pw-only@id.example/token"}, "token_url="),
    ("odata", {"download_url": "https://:pw-only@dl.example/odata/v1"}, "download_url="),
    ("stac", {"assets": "B04"}, "assets=B04"),
])
def test_bad_settings_name_the_key(protocol: str, settings: dict[str, object],
                                   named: str) -> None:
    with pytest.raises(UsageError) as caught:
        validate(protocol, settings)
    assert named in caught.value.message
    assert "\n" not in caught.value.message
    assert re.match(r"(unknown|invalid) setting", caught.value.message)
