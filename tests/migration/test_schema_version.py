"""A daemon does not start on the schema of an earlier release (it would fail every file:
its statements need this release's functions), `asyncsat init` never applies its schema to
a newer release's database, and every change of schema.sql raises its version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db.pool import (
    apply_schema,
    check_schema,
    database_schema_version,
    schema_sql,
    schema_version,
)
from asyncsat.errors import DatabaseError
from asyncsat.logs import Redactor
from tests.helpers import add_provider, queue, rows
from tests.migration.shape import new_database
from tests.servers import FileServer, PgCluster

OLD = Path(__file__).with_name("schema_0_5.sql")
"""The schema of the last release before versions (its daemons record `done` with
`asyncsat_done`; this release's also need `asyncsat_named`)."""

KNOWN = {
    1: "24b7874fda5b8a1fb345f842e53c7999858fc6bf96d96d626af379a7b07c4e89",
    2: "00258ba85c8ce0d9358c61c6cdb67723908d31bcf1a5c0edf411f392727fe1e3",
    3: "068f39f015bc63348d79a3472985dc9c18f1a1f83b6290bc6882c96204585019",
    4: "12c2e4a5c9988a6845f7927e9c0f0e1c8377b66f6badfa0b6bd278b42d8d3e28",
    5: "087a8ec52a8508fc6e288e3351e7d2f852f7f6e0f2a282aeaf376b7a236bae3a",
    6: "24c55228d143a8033f8c76c7f0dafc57ee7fc1caa6dff0498dbbf20ea72b6185",
    7: "e9aeed0336a10ffa8cab4f0fe6e5b18cc1078d12b7853cb483a268ed2fcc88e7",
    8: "d8f75d737fce18cce3e5c676d8ebcda76f835fd79b08cd1c89bfbd7d6eb36881",
    9: "d54463bd1fcf542bea0804f0de1f0308e3d0a2102773d7e676d0e42f21ff8f6c",
}
"""schema.sql's SHA-256 for each version (append-only): a change of the file must raise its
version."""


def test_every_change_of_the_schema_raises_its_version() -> None:
    sql = schema_sql()
    version = schema_version(sql)
    digest = hashlib.sha256(sql.encode()).hexdigest()
    assert version == max(KNOWN) and KNOWN[version] == digest, (
        f"schema.sql changed: raise the version it inserts into asyncsat_schema (now "
        f"{version}) and record the new version's SHA-256 here ({digest})")


async def test_a_daemon_does_not_start_on_an_older_schema(
        pg: PgCluster, tmp_path: Path) -> None:
    dsn, conn = await new_database(pg)
    server = await FileServer().start()
    try:
        await conn.execute(OLD.read_text())
        assert await database_schema_version(conn) == 0
        await add_provider(dsn, "hub", server.base, {})
        data = os.urandom(20_000)
        server.add("a.nc", data)
        await queue(dsn, server.url("a.nc"))
        settings = Settings(dsn=dsn, home=tmp_path / "home", dest=tmp_path / "dest",
                            shutdown_timeout=5.0)
        with pytest.raises(DatabaseError, match="`asyncsat init` upgrades it"):
            await daemon.serve(settings, Redactor(), exit_when_idle=True)
        assert await rows(dsn) == []  # nothing tried: the request waits
        assert await conn.fetchval("SELECT status FROM request") == "queued"

        assert await apply_schema(conn, always=True)  # `asyncsat init`
        assert await database_schema_version(conn) == schema_version(schema_sql())
        await daemon.serve(settings, Redactor(), exit_when_idle=True)
        [row] = await rows(dsn)
        assert row["status"] == "done", row["error"]
        assert Path(row["path"]).read_bytes() == data
    finally:
        await server.stop()
        await conn.close()


async def test_init_never_applies_its_schema_to_a_newer_releases_database(
        pg: PgCluster) -> None:
    _dsn, conn = await new_database(pg)
    try:
        await apply_schema(conn, always=True)
        await conn.execute("UPDATE asyncsat_schema SET version = 999")
        await conn.execute("CREATE OR REPLACE FUNCTION asyncsat_named(p_id bigint, p_owner"
                           " text, p_attempt integer, p_names text[], p_size bigint, p_etag"
                           " text, p_last_modified text, p_sealing boolean DEFAULT false)"
                           " RETURNS text LANGUAGE sql AS $$ SELECT 'newer' $$")
        with pytest.raises(DatabaseError, match="newer asyncsat release"):
            await apply_schema(conn, always=True)
        assert await conn.fetchval(
            "SELECT asyncsat_named(1, 'd', 1, ARRAY['a'], NULL, NULL, NULL)") == "newer"
        assert await database_schema_version(conn) == 999
        await check_schema(conn)  # (a daemon of this release starts on it)
        assert not await apply_schema(conn, always=False)
    finally:
        await conn.close()
