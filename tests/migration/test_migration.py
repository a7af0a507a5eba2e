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


async def test_upgrade_from_0_4_replaces_the_claim_function(pg: PgCluster) -> None:
    """0.4's claim returned four columns; the new one returns the claimed rows whole (its
    result type changed, so the upgrade drops and creates it, in the schema's transaction)."""
    (_, fresh), (_, old) = await new_database(pg), await new_database(pg)
    try:
        await apply_schema(fresh, always=True)
        await old.execute(OLD.with_name("schema_0_4.sql").read_text())
        provider = await old.fetchval(
            "INSERT INTO provider (name, protocol, url) VALUES ('p', 'http', 'http://h/')"
            " RETURNING id")
        await old.execute("INSERT INTO download (provider_id, url, size) VALUES ($1, $2, 10)",
                          provider, "http://h/a.nc")
        await apply_schema(old, always=True)
        await apply_schema(old, always=True)
        assert await shape(old) == await shape(fresh)
        result = "SELECT pg_get_function_result('asyncsat_claim'::regproc)"
        assert await old.fetchval(result) == await fresh.fetchval(result)
        await old.execute("INSERT INTO daemon (id, host, pid, version, lease_timeout)"
                          " VALUES ('d1', 'h', 1, 'test', 30)")
        [row] = await old.fetch("SELECT * FROM asyncsat_claim('d1', $1, 5, 30, '/data')",
                                provider)
        assert (row["url"], row["status"], row["dest"], row["attempts"], row["provider"]) == \
            ("http://h/a.nc", "running", "/data", 1, "p")
    finally:
        await fresh.close()
        await old.close()


async def test_upgrade_from_the_previous_release_keeps_its_rows_adopting(
        pg: PgCluster) -> None:
    """Schema 7 records which attempt may have renamed a file (`sealed_attempt`): a later
    attempt takes a file at the final name for its own only then. Rows of the previous
    release that ran an attempt may have: they keep adopting, as they did; done rows and
    rows never tried do not. A daemon of the previous release still names its files (its
    call of `asyncsat_named` has one argument fewer)."""
    (_, fresh), (_, old) = await new_database(pg), await new_database(pg)
    try:
        await apply_schema(fresh, always=True)
        await old.execute(OLD.with_name("schema_0_6.sql").read_text())
        provider = await old.fetchval(
            "INSERT INTO provider (name, protocol, url) VALUES ('p', 'http', 'http://h/')"
            " RETURNING id")
        for name, status, attempts in [("run", "running", 1), ("again", "queued", 2),
                                       ("done", "done", 1), ("new", "queued", 0)]:
            await old.execute("INSERT INTO download (provider_id, url, name, status, attempts)"
                              " VALUES ($1, $2, $3, $4, $5)",
                              provider, f"http://h/{name}.nc", name, status, attempts)
        await apply_schema(old, always=True)
        await apply_schema(old, always=True)  # and again: the rows are not marked anew
        assert await shape(old) == await shape(fresh)
        marked = {r["name"]: r["sealed_attempt"]
                  for r in await old.fetch("SELECT name, sealed_attempt FROM download")}
        assert marked == {"run": 1, "again": 2, "done": None, "new": None}
        await old.execute("INSERT INTO daemon (id, host, pid, version, lease_timeout)"
                          " VALUES ('d1', 'h', 1, 'test', 30)")
        claimed = await old.fetch("SELECT * FROM asyncsat_claim('d1', $1, 5, 30, '/data')",
                                  provider)
        # (the running row of a daemon of the previous release is taken over at once)
        assert {r["name"]: r["sealed_attempt"] for r in claimed} == \
            {"run": 1, "again": 2, "new": None}
        row = next(r for r in claimed if r["name"] == "new")
        assert await old.fetchval(  # (the previous release's call: seven arguments)
            "SELECT asyncsat_named($1, 'd1', $2, ARRAY['new.nc'], 10, NULL, NULL)",
            row["download_id"], row["attempts"]) == "new.nc"
        assert await old.fetchval("SELECT sealed_attempt FROM download WHERE id = $1",
                                  row["download_id"]) is None  # (named at its start)
    finally:
        await fresh.close()
        await old.close()
