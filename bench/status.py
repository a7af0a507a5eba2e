"""`status` on a million downloads: the queries it runs, and the command itself.

    .venv/bin/python bench/status.py --rows 1000000

A throwaway PostgreSQL (fsync on) gets the asyncsat schema and `--rows` downloads over 4
providers and 1000 requests (90% done, 5% queued, 2% failed, 1% offline, 1% cancelled,
1% running; each request's products share one status), VACUUM ANALYZE. Each query
function `status` calls is timed (median of `--runs`, on one connection): the first
page, a deep page (`--before`), a page of one status, the counts behind the
"older not shown" line, the totals of the unfinished downloads, the unfinished requests;
then `asyncsat status` and `asyncsat status --json --limit 100` as a user runs them
(wall time of the process, median).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncsat.db import queries
from asyncsat.db.pool import apply_schema, connect
from tests.servers import PgCluster


async def load(dsn: str, rows: int) -> None:
    conn = await connect(dsn)
    try:
        await apply_schema(conn, always=True)
        await conn.execute(
            "INSERT INTO provider (name, protocol, url)"
            " SELECT 'p' || g, 'http', 'http://h' || g || '/' FROM generate_series(1, 4) g;"
            " INSERT INTO request (urls, status) SELECT ARRAY['http://x/' || g], 'resolved'"
            "  FROM generate_series(1, 1000) g;"
            " ALTER TABLE download DISABLE TRIGGER USER")
        await conn.execute(
            "INSERT INTO download (request_id, provider_id, url, name, dest, status, size,"
            " bytes_done, not_before, owner, lease_expires)"
            " SELECT 1 + g % 1000, 1 + g % 4, 'http://h/' || g, 'f' || g, '/d',"
            "  CASE WHEN g % 100 < 90 THEN 'done' WHEN g % 100 < 95 THEN 'queued'"
            "   WHEN g % 100 < 97 THEN 'failed' WHEN g % 100 < 98 THEN 'offline'"
            "   WHEN g % 100 < 99 THEN 'cancelled' ELSE 'running' END,"
            "  1000000, CASE WHEN g % 100 < 90 THEN 1000000 ELSE 0 END,"
            "  now() - interval '1 hour', 'gone', now() + interval '1 hour'"
            " FROM generate_series(1, $1::int) g", rows)
        await conn.execute(
            "ALTER TABLE download ENABLE TRIGGER USER;"
            " INSERT INTO request_download (request_id, download_id)"
            "  SELECT request_id, id FROM download")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def timed(runs: int, call: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        await call()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def command(dsn: str, home: str, runs: int, *args: str) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", home,
                        "status", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cluster = PgCluster(durable=True).init()
    try:
        cluster.psql("CREATE DATABASE bench OWNER asyncsat")
        dsn = cluster.dsn("bench")
        t0 = time.monotonic()
        await load(dsn, args.rows)
        print(f"{args.rows} downloads loaded in {time.monotonic() - t0:.1f} s", flush=True)
        conn = await connect(dsn)
        deep = args.rows // 10
        try:
            cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("first page (100)", lambda: queries.status_rows(
                    conn, limit=100, newest_first=True)),
                (f"deep page (--before {deep})", lambda: queries.status_rows(
                    conn, limit=100, newest_first=True, before=deep)),
                ("--status failed page", lambda: queries.status_rows(
                    conn, statuses=["failed"], limit=100, newest_first=True, before=deep)),
                ("count older than page 1", lambda: queries.status_count(
                    conn, before=args.rows - 100)),
                ("count --status failed", lambda: queries.status_count(
                    conn, statuses=["failed"])),
                ("totals of unfinished", lambda: queries.progress_totals(
                    conn, unfinished=True)),
                ("totals of all (get --wait)", lambda: queries.progress_totals(conn)),
                ("unfinished requests", lambda: queries.request_rows(conn, unfinished=True)),
                ("all requests (--requests)", lambda: queries.request_rows(conn)),
            ]
            print(f"{'query':>30}  {'median ms':>10}")
            for label, call in cases:
                print(f"{label:>30}  {await timed(args.runs, call):>10.2f}", flush=True)
        finally:
            await conn.close()
        with tempfile.TemporaryDirectory() as home:
            for cmd in ([], ["--json", "--limit", "100"], ["--status", "failed"]):
                label = "asyncsat status " + " ".join(cmd)
                ms = command(dsn, home, args.runs, *cmd)
                print(f"{label:>30}  {ms:>10.2f}", flush=True)
    finally:
        cluster.destroy()


if __name__ == "__main__":
    asyncio.run(main())
