"""The plans PostgreSQL picks for the hot and the listing statements, on 200,000 downloads.

Every statement is run the way the code runs it (the functions of `asyncsat.db.queries`, the
claim function `asyncsat_claim` itself), with `auto_explain` loaded in the session: each
statement executed, those inside the claim's PL/pgSQL too (`log_nested_statements`), sends
its plan with the rows it really read (`log_analyze`) to the client as a LOG message. No SQL
is copied here. Each test asserts which index answers, that `download` is never read
sequentially, and how many rows were examined: a page of 50 reads about 50 rows, however
deep and whatever the filter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest

from asyncsat.db import queries
from asyncsat.db.pool import apply_schema, connect
from tests.servers import PgCluster

ROWS = 200_000
PER_REQUEST = 1_000  # request k has the downloads (k - 1) * 1000 + 1 .. k * 1000
FAILED = 500         # the oldest downloads failed: a backward scan of the key finds them last
RUNNING = 2_000      # provider 1's, their daemon gone: due to be taken over
QUEUED = 30_000      # the newest, due now, over the 4 providers
OFFLINE = 5_000      # waiting to be looked at again in an hour


@pytest.fixture(scope="module")
def big(pg: PgCluster) -> Iterator[str]:
    """A database of ROWS downloads (mostly done), the DSN of its superuser."""
    name = f"plans_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name} OWNER asyncsat")

    async def load() -> None:
        conn = await connect(pg.dsn(name))
        try:
            await apply_schema(conn, always=True)
            await conn.execute(
                "INSERT INTO provider (name, protocol, url)"
                " SELECT 'p' || g, 'http', 'http://h' || g || '/' FROM generate_series(1, 4) g;"
                f" INSERT INTO request (urls, status) SELECT ARRAY['http://h/' || g], 'resolved'"
                f"  FROM generate_series(1, {ROWS // PER_REQUEST}) g;"
                # a bulk load: the history and NOTIFY triggers are no part of what is measured
                " ALTER TABLE download DISABLE TRIGGER USER")
            await conn.execute(
                "INSERT INTO download (request_id, provider_id, url, name, dest, status, size,"
                "  bytes_done, not_before, owner, lease_expires)"
                f" SELECT (g - 1) / {PER_REQUEST} + 1, CASE WHEN s = 'running' THEN 1"
                "  ELSE 1 + g % 4 END, 'http://h/' || g, 'f' || g, '/d', s, 1000, 0,"
                "  CASE WHEN s = 'offline' THEN now() + interval '1 hour'"
                "   ELSE now() - interval '1 hour' END,"
                "  CASE WHEN s = 'running' THEN 'gone' END,"
                "  CASE WHEN s = 'running' THEN now() - interval '1 minute' END"
                " FROM generate_series(1, $1::int) g, LATERAL (SELECT CASE"
                "  WHEN g <= $2 THEN 'failed'"
                "  WHEN g > $1 - $5 THEN 'queued'"
                "  WHEN g > $1 - $5 - $4 THEN 'offline'"
                "  WHEN g > $1 - $5 - $4 - $3 THEN 'running'"
                "  ELSE 'done' END AS s) st",
                ROWS, FAILED, RUNNING, OFFLINE, QUEUED)
            await conn.execute(
                "ALTER TABLE download ENABLE TRIGGER USER;"
                " INSERT INTO request_download (request_id, download_id)"
                "  SELECT request_id, id FROM download")
            await conn.execute("VACUUM ANALYZE download")
            await conn.execute("VACUUM ANALYZE request_download")
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    asyncio.run(load())
    yield pg.dsn(name, user="postgres")  # LOAD 'auto_explain' takes a superuser
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class _Rollback(Exception):
    """Raised to undo a claim."""


class Explained:
    """A connection whose statements report their plans (auto_explain, analyzed)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.plans: list[dict[str, Any]] = []
        conn.add_log_listener(self._log)

    def _log(self, _conn: Any, message: Any) -> None:
        text = message.message
        if text.startswith("duration:") and "plan:" in text:
            self.plans.append(json.loads(text.split("plan:", 1)[1]))

    async def run(self, call: Awaitable[Any]) -> tuple[Any, list[dict[str, Any]]]:
        """The result of `call`, and the plans of its statements that read `download`."""
        self.plans.clear()
        result = await call
        return result, [p for p in self.plans if _nodes_on(p["Plan"], "download")]


@pytest.fixture
async def ex(big: str) -> AsyncIterator[Explained]:
    conn = await connect(big)
    explained = Explained(conn)
    await conn.execute(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
        " SET auto_explain.log_analyze = on; SET auto_explain.log_timing = off;"
        " SET auto_explain.log_format = json; SET auto_explain.log_nested_statements = on;"
        " SET client_min_messages = log")
    yield explained
    await conn.close()


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _nodes_on(plan: dict[str, Any], table: str) -> list[dict[str, Any]]:
    return [n for n in _walk(plan) if n.get("Relation Name") == table]


def _indexes(plans: list[dict[str, Any]]) -> set[str]:
    return {n["Index Name"] for p in plans for n in _walk(p["Plan"]) if "Index Name" in n}


def _examined(plans: list[dict[str, Any]], table: str = "download") -> int:
    """Rows of `table` the plans read: returned plus thrown away by a filter, every loop."""
    return sum((n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)
                + n.get("Rows Removed by Index Recheck", 0)) * n.get("Actual Loops", 1)
               for p in plans for n in _nodes_on(p["Plan"], table))


def _no_seq_scan(plans: list[dict[str, Any]]) -> None:
    assert plans, "no statement read download"
    for p in plans:
        seq = [n for n in _nodes_on(p["Plan"], "download") if n["Node Type"] == "Seq Scan"]
        assert not seq, f"Seq Scan on download in {p['Query Text'][:200]!r}"


async def test_status_pages_read_their_rows_only_however_deep(ex: Explained) -> None:
    first, plans = await ex.run(queries.status_rows(ex.conn, limit=50, newest_first=True))
    assert [r["id"] for r in first] == list(range(ROWS, ROWS - 50, -1))
    _no_seq_scan(plans)
    assert "download_pkey" in _indexes(plans)
    assert _examined(plans) <= 50

    deep, plans = await ex.run(queries.status_rows(ex.conn, limit=50, newest_first=True,
                                                   before=1_234))
    assert [r["id"] for r in deep] == list(range(1_233, 1_183, -1))
    _no_seq_scan(plans)
    assert "download_pkey" in _indexes(plans)
    assert _examined(plans) <= 50


async def test_status_by_status_reads_one_index_range_per_status(ex: Explained) -> None:
    # the failed downloads are the oldest 500: backwards along the key, 199,500 rows first
    failed, plans = await ex.run(queries.status_rows(ex.conn, statuses=["failed"], limit=50,
                                                     newest_first=True))
    assert [r["id"] for r in failed] == list(range(FAILED, FAILED - 50, -1))
    _no_seq_scan(plans)
    assert "download_status_idx" in _indexes(plans)
    assert _examined(plans) <= 2 * 50  # the range, then the page's rows by key

    both, plans = await ex.run(queries.status_rows(
        ex.conn, statuses=["failed", "running"], limit=50, newest_first=True, before=163_020))
    assert [r["id"] for r in both] == [
        *range(163_019, 163_000, -1), *range(FAILED, FAILED - 31, -1)]
    assert {r["status"] for r in both} == {"failed", "running"}
    _no_seq_scan(plans)
    assert "download_status_idx" in _indexes(plans)
    assert _examined(plans) <= 3 * 50  # each status's range cut at 50, then the page's rows

    # `status --watch` runs the same statements every second: after 5 runs of a prepared
    # statement PostgreSQL may keep a generic plan (when it costs no more than the custom
    # ones): the 7th run must still read a range of the index
    for _ in range(7):
        count, plans = await ex.run(queries.status_count(ex.conn, statuses=["failed"],
                                                         before=100))
        assert count == 99
        _no_seq_scan(plans)
        assert _indexes(plans) == {"download_status_idx"}
        assert _examined(plans) <= 99
        failed, plans = await ex.run(queries.status_rows(
            ex.conn, statuses=["failed"], limit=50, newest_first=True, before=300))
        assert [r["id"] for r in failed] == list(range(299, 249, -1))
        _no_seq_scan(plans)
        assert _examined(plans) <= 2 * 50


async def test_status_notes_read_the_unfinished_downloads_only(ex: Explained) -> None:
    totals, plans = await ex.run(queries.progress_totals(ex.conn, unfinished=True))
    assert (totals["queued"], totals["running"], totals["offline"]) == \
        (QUEUED, RUNNING, OFFLINE)
    _no_seq_scan(plans)
    assert "download_status_idx" in _indexes(plans)
    assert _examined(plans) <= QUEUED + RUNNING + OFFLINE

    # the requests with a product unfinished or failed: request 1 (failed) and the newest
    rows, plans = await ex.run(queries.request_rows(ex.conn, unfinished=True))
    unfinished = QUEUED + OFFLINE + RUNNING
    assert [r["id"] for r in rows] == [1, *range(ROWS // PER_REQUEST - unfinished // PER_REQUEST
                                                 + 1, ROWS // PER_REQUEST + 1)]
    assert "download_status_idx" in _indexes(plans)

    one, plans = await ex.run(queries.request_rows(ex.conn, 7))
    assert [(r["id"], r["products"], r["done"]) for r in one] == [(7, PER_REQUEST, PER_REQUEST)]
    _no_seq_scan(plans)
    assert {"request_download_pkey", "download_pkey"} <= _indexes(plans)
    assert _examined(plans) <= PER_REQUEST + 10


async def test_the_claim_reads_its_due_rows_by_index(ex: Explained) -> None:
    daemon = uuid.uuid4().hex
    await queries.daemon_register(ex.conn, daemon, host="h", pid=1, version="t",
                                  lease_timeout=30)
    # the claim runs its statements with generic plans (its own SET plan_cache_mode),
    # whatever the session asks for: the index answers either way
    for mode in ("force_custom_plan", "force_generic_plan"):
        await ex.conn.execute(f"SET plan_cache_mode = {mode}")
        for provider, was, index in ((2, "queued", "download_due_idx"),
                                     (1, "running", "download_running_idx")):
            with contextlib.suppress(_Rollback):
                async with ex.conn.transaction():
                    claimed, plans = await ex.run(
                        queries.claim(ex.conn, daemon, provider, 4, 30.0, "/d"))
                    assert [d.claimed_from for d, _a, _l in claimed] == [was] * 4
                    # the statements that pick the rows (the FOR loops of asyncsat_claim)
                    picks = [p for p in plans
                             if p["Query Text"].lstrip("( ").startswith("WITH taken_over")]
                    assert picks, [p["Query Text"][:80] for p in plans]
                    _no_seq_scan(plans)
                    assert index in _indexes(picks), (mode, provider, picks)
                    # the 4 rows claimed, in index order (lease expiry, id; due time, id),
                    # and at most as many of the other kind, locked in the same statement
                    assert _examined(picks) <= 8, (mode, provider, picks)
                    raise _Rollback  # the next claim finds the same rows


async def test_the_dispatcher_summary_probes_the_indexes(ex: Explained) -> None:
    due, plans = await ex.run(queries.queued_providers(ex.conn))
    # provider 1: 1000 queued (counted up to 1000) and 1000 running to take over (idem)
    assert [(p, n) for p, n, _w, _o in due] == [(1, 2000), (2, 1000), (3, 1000), (4, 1000)]
    _no_seq_scan(plans)
    assert {"download_due_idx", "download_running_idx"} <= _indexes(plans)
    # due rows are counted up to 1000 per provider (and 1000 running ones to take over)
    assert _examined(plans) <= 4 * (1000 + 1000 + 3) + OFFLINE + 4


async def test_the_dispatcher_wait_probe_skips_the_offline_rows(ex: Explained) -> None:
    _due, plans = await ex.run(queries.queued_providers(ex.conn))
    removed = sum(n.get("Rows Removed by Filter", 0) * n.get("Actual Loops", 1)
                  for p in plans for n in _nodes_on(p["Plan"], "download"))
    assert removed <= 10


async def test_the_done_write_reads_its_rows_by_key(ex: Explained) -> None:
    """50 files recorded done in one statement, again and again (a prepared statement goes
    to a generic plan after its fifth run): each time by the rows' key, a few reads per
    row (the locked pass, the look for a lost answer, the history row's key check)."""
    running = [r["id"] for r in await ex.conn.fetch(
        "SELECT id FROM download WHERE status = 'running' ORDER BY id LIMIT 50")]
    done = [queries.Done(i, queries.Fence("gone", 0), 1000, f"/d/p1/f{i}") for i in running]
    for _ in range(8):
        with contextlib.suppress(_Rollback):
            async with ex.conn.transaction():
                owed, plans = await ex.run(queries.downloads_done(ex.conn, done))
                assert all(o is not None for o in owed)
                _no_seq_scan(plans)
                # every read of download is by the row's key (alone, or with its status)
                reads = [n for p in plans for n in _nodes_on(p["Plan"], "download")
                         if n["Node Type"] != "ModifyTable"]
                assert reads and all("(id = " in n.get("Index Cond", "") for n in reads), \
                    [(n["Node Type"], n.get("Index Cond")) for n in reads]
                assert _examined(plans) <= 6 * len(done), _examined(plans)
                raise _Rollback
