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
    # several hosts (asyncpg tries them in turn)
    ("postgresql://ops@db1:5432,db2:5433,[::1]:5434/asyncsat",
     "postgresql://ops@db1:5432,db2:5433,[::1]:5434/asyncsat"),
    # values as libpq reads them: to the next white space, backslash escapes
    ("host=db password=a\\\\b", "postgresql://?host=db&password=a%5Cb"),
    ("host=db password=a\\ b", "postgresql://?host=db&password=a%20b"),
    ("host=db password=it's", "postgresql://?host=db&password=it%27s"),
    ("host=db password='a://b' dbname=x", "postgresql://?host=db&password=a%3A%2F%2Fb&dbname=x"),
    ("host = db  dbname =x user= ''", "postgresql://?host=db&dbname=x&user="),
])
def test_a_dsn_is_given_to_asyncpg_as_a_uri(dsn: str, uri: str) -> None:
    """asyncpg reads URIs only; psql's keyword form works too, as the URI's query."""
    assert as_uri(dsn) == uri


@pytest.mark.parametrize("dsn", [
    "not a dsn", "mysql://ops:pw@db/x", "postgresql://ops:pw@db:port/x", "host=db junk",
    "host='unclosed password=pw", "postgresql://ops:pw#x@db:5432/x",
    "host=db password=pw connect_timeout=5", "postgresql://ops:pw@db/x?keepalives=1",
    "a=   " * 200 + "'pw",
])
def test_a_malformed_dsn_is_bad_input_that_names_no_password(dsn: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"ASYNCSAT_DSN": dsn})
    assert "pw" not in str(raised.value)
    assert str(raised.value).startswith("invalid dsn: ")


def test_a_dsn_given_as_keywords_is_shown_as_a_uri_libpq_reads() -> None:
    """`postgresql://?host=...`: the `//` of the empty host stays (without it psql reads
    no URI: `db dsn` and `db psql` broke on keyword DSNs)."""
    shown, password = split_password(as_uri("host=/run/pg dbname=x password='p w'"))
    assert (shown, password) == ("postgresql://?host=/run/pg&dbname=x", "p w")
    assert split_password("postgresql:///x?host=/run/pg") == ("postgresql:///x?host=/run/pg",
                                                              None)
