"""A daemon of a release upgrades an older schema as it starts (an operator who restarts
it after `pip install -U` without `asyncsat init` gets a working daemon), never a newer one;
and every change of schema.sql raises its version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db.pool import apply_schema, database_schema_version, schema_sql, schema_version
from asyncsat.logs import Redactor
from tests.helpers import add_provider, queue, rows
from tests.migration.shape import new_database, shape
from tests.servers import FileServer, PgCluster

OLD = Path(__file__).with_name("schema_0_5.sql")
"""The schema of the last release before versions (its daemons record `done` with
`asyncsat_done`; this release's also need `asyncsat_named`)."""

KNOWN = {2: "00258ba85c8ce0d9358c61c6cdb67723908d31bcf1a5c0edf411f392727fe1e3"}
"""schema.sql's SHA-256 for each version: a change of the file must raise its version."""


def test_every_change_of_the_schema_raises_its_version() -> None:
    sql = schema_sql()
    version = schema_version(sql)
    digest = hashlib.sha256(sql.encode()).hexdigest()
    assert KNOWN.get(version) == digest, (
        f"schema.sql changed: raise the version it inserts into asyncsat_schema (now "
        f"{version}) and record the new version's SHA-256 here ({digest})")


async def test_a_daemon_upgrades_an_older_schema_as_it_starts(
        pg: PgCluster, tmp_path: Path) -> None:
    dsn, conn = await new_database(pg)
    (_, fresh) = await new_database(pg)
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
        await daemon.serve(settings, Redactor(), exit_when_idle=True)

        [row] = await rows(dsn)
        assert row["status"] == "done", row["error"]
        assert Path(row["path"]).read_bytes() == data
        assert await database_schema_version(conn) == schema_version(schema_sql())
        await apply_schema(fresh, always=True)
        assert await shape(conn) == await shape(fresh)
    finally:
        await server.stop()
        await conn.close()
        await fresh.close()


async def test_a_newer_schema_is_left_as_it_is(pg: PgCluster) -> None:
    """A daemon of an earlier release (of this one's kind) starting on a database a newer
    release upgraded applies nothing, and an `init` of it never lowers the version."""
    _dsn, conn = await new_database(pg)
    try:
        await apply_schema(conn, always=True)
        await conn.execute("UPDATE asyncsat_schema SET version = 999")
        assert not await apply_schema(conn, always=False, upgrade=True)
        assert await apply_schema(conn, always=True)
        assert await database_schema_version(conn) == 999
        await conn.execute("UPDATE asyncsat_schema SET version = 0")
        assert await apply_schema(conn, always=False, upgrade=True)
        assert not await apply_schema(conn, always=False)  # (commands: empty databases only)
    finally:
        await conn.close()
