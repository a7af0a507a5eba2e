"""DSNs told to people without their password, in both libpq forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncsat.config import Settings
from asyncsat.dsn import as_uri, split_password
from asyncsat.errors import ConfigError


@pytest.mark.parametrize(("dsn", "shown", "password"), [
    ("postgresql://ops:s3cr%40t@db.example:5433/asyncsat?sslmode=require",
     "postgresql://ops@db.example:5433/asyncsat?sslmode=require", "s3cr@t"),
    ("postgresql://ops@db.example/asyncsat", "postgresql://ops@db.example/asyncsat", None),
    ("postgres://db.example/asyncsat?password=qp-secret&user=ops",
     "postgres://db.example/asyncsat?user=ops", "qp-secret"),
    ("postgresql://postgres:@/postgres?host=/run/asyncsat",
     "postgresql://postgres@/postgres?host=/run/asyncsat", None),
    ("host=db.example port=5432 password='it\\'s secret' dbname=asyncsat user=ops",
     "host=db.example port=5432 dbname=asyncsat user=ops", "it's secret"),
    ("host=db password=plain dbname=x", "host=db dbname=x", "plain"),
])
def test_split_password(dsn: str, shown: str, password: str | None) -> None:
    assert split_password(dsn) == (shown, password)


def test_settings_name_their_database() -> None:
    home = Path("/srv/asyncsat")
    assert Settings(home=home).database == "embedded PostgreSQL in /srv/asyncsat/pg"
    remote = Settings(dsn="postgresql://ops:pw-42@db:5432/sat", home=home).database
    assert remote == "PostgreSQL postgresql://ops@db:5432/sat"


@pytest.mark.parametrize(("dsn", "uri"), [
    ("postgresql://ops@db.example/asyncsat", "postgresql://ops@db.example/asyncsat"),
    ("postgres://db.example/asyncsat?user=ops", "postgres://db.example/asyncsat?user=ops"),
    ("host=db.example port=5432 password='it\\'s secret' dbname=asyncsat user=ops",
     "postgresql://?host=db.example&port=5432&password=it%27s%20secret&dbname=asyncsat"
     "&user=ops"),
    ("host=/run/postgresql dbname=asyncsat", "postgresql://?host=%2Frun%2Fpostgresql"
     "&dbname=asyncsat"),
])
def test_a_dsn_is_given_to_asyncpg_as_a_uri(dsn: str, uri: str) -> None:
    """asyncpg reads URIs only; psql's keyword form works too, as the URI's query."""
    assert as_uri(dsn) == uri


@pytest.mark.parametrize("dsn", [
    "not a dsn", "mysql://ops:pw@db/x", "postgresql://ops:pw@db:port/x", "host=db junk",
    "host='unclosed password=pw",
])
def test_a_malformed_dsn_is_bad_input_that_names_no_password(dsn: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"ASYNCSAT_DSN": dsn})
    assert "pw" not in str(raised.value)
    assert str(raised.value).startswith("invalid dsn: ")
