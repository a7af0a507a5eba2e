"""schema.sql upgrades a database made by an earlier release to the same shape as a new one."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from asyncsat.db.pool import apply_schema
from tests.migration.shape import new_database, shape
from tests.servers import PgCluster

OLD = Path(__file__).with_name("schema_0_1.sql")


async def test_upgrade_from_0_1_matches_a_fresh_schema(pg: PgCluster) -> None:
    (_, fresh), (_, old) = await new_database(pg), await new_database(pg)
    try:
        await apply_schema(fresh, always=True)
        await old.execute(OLD.read_text())
        provider = await old.fetchval(
            "INSERT INTO provider (name, protocol, url) VALUES ('p', 'http', 'http://h/')"
            " RETURNING id")
        await old.execute("INSERT INTO download (provider_id, url, size) VALUES ($1, $2, 10)",
                          provider, "http://h/a.nc")
        await apply_schema(old, always=True)
        await apply_schema(old, always=True)  # and again: idempotent
        assert await shape(old) == await shape(fresh)
        # rows survive (0.1 sizes came from servers: not binding), and the new index keeps
        # URLs unique
        row = await old.fetchrow("SELECT size, size_origin FROM download")
        assert (row["size"], row["size_origin"]) == (10, "server")
        try:
            await old.execute("INSERT INTO download (provider_id, url) VALUES ($1, $2)",
                              provider, "http://h/a.nc")
        except asyncpg.UniqueViolationError:
            pass
        else:
            raise AssertionError("a second row for the same URL was accepted")
    finally:
        await fresh.close()
        await old.close()
