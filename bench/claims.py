"""Claims per second and claim latency with many queued downloads and several daemons.

    .venv/bin/python bench/claims.py --rows 1000000 --daemons 1 2 4 8

A throwaway PostgreSQL (Debian's server binaries, fsync on) gets the asyncsat schema and
`--rows` queued downloads spread over `--providers` providers, each with one credential of
`--cap` connections. Each simulated daemon (a registered `daemon` row and its own
connection, as `asyncsat run` has) loops: claim up to its share of the free slots of a
provider (`asyncsat_claim`), then run each slot as a transfer of no length would: its body
is in (`download_sealing`, which hands the slot over to the provider's next due row in the
same statement, `asyncsat_hand_over`), its row done (fenced), and on with the next row of
the slot. The latency of claims and of hand-overs (p50, p99, max), rows per second, and the
PostgreSQL CPU per row (user+system time of the server's backends, read from /proc) are
printed for each daemon count. Nothing is downloaded: this measures the coordination, not
the network.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncsat.db import queries
from asyncsat.db.pool import apply_schema, connect
from asyncsat.db.queries import Fence
from tests.servers import PgCluster

TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pids: list[int]) -> float:
    """Seconds of CPU the given server processes used so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


async def load(dsn: str, rows: int, providers: int, cap: int) -> list[int]:
    conn = await connect(dsn)
    try:
        await apply_schema(conn, always=True)
        ids = []
        for n in range(providers):
            p = await queries.provider_add(conn, f"p{n}", "http", f"http://h{n}.example/", {})
            await queries.credential_upsert(conn, p.id, f"u{n}", "pw", cap)
            ids.append(p.id)
        per = rows // providers
        for pid in ids:
            await conn.execute(
                "INSERT INTO download (provider_id, url, dest, name)"
                " SELECT $1::bigint, 'http://h.example/' || $1::bigint || '/' || g, '/d',"
                " 'f' || g"
                " FROM generate_series(1, $2) g", pid, per)
        await conn.execute("ANALYZE")
        return ids
    finally:
        await conn.close()


async def daemon(dsn: str, name: str, providers: list[int], stop_at: float,
                 latencies: list[float], claims: list[int], handovers: list[float],
                 share: int, hand_over: bool) -> tuple[int, Any]:
    """One simulated daemon: claim a provider's free slots, then run each slot as the
    daemon does: the body is in (`download_sealing`: with `hand_over`, the slot goes to the
    next due row, claimed in the same statement; else it is given back, for the next
    claim), the row done; on with the next row of the slot. Returns its backend's pid and
    its connection, still open (its CPU is read before it ends)."""
    conn = await connect(dsn, name=f"bench {name}")
    await queries.daemon_register(conn, name, host="bench", pid=os.getpid(), version="bench",
                                  lease_timeout=30)
    pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    turn = 0
    first = True  # (a session's first claim compiles the functions and plans: left out)
    while time.monotonic() < stop_at:
        provider = providers[turn % len(providers)]
        turn += 1
        began = time.perf_counter()
        got = await queries.claim(conn, name, provider, share, 30.0, "/d")
        if not first:
            latencies.append(time.perf_counter() - began)
        first = False
        slots = collections.deque(got)
        while slots and time.monotonic() < stop_at:
            download, _account, lease_id = slots.popleft()
            fence = Fence(name, download.attempts)
            began = time.perf_counter()
            sealed = await queries.download_sealing(
                conn, download.id, fence, lease_id, lease_seconds=30.0, default_dest="/d",
                hand_over=hand_over)
            if hand_over:
                handovers.append(time.perf_counter() - began)
            await queries.downloads_done(conn, [queries.Done(download.id, fence, 0, "/d/x")])
            claims.append(1)
            if sealed.following:  # (no run asked for: the next row alone)
                slots.append(sealed.following[0])
    return pid, conn


async def measure(dsn: str, providers: list[int], daemons: int, seconds: float,
                  cap: int, hand_over: bool) -> dict[str, Any]:
    latencies: list[float] = []
    handovers: list[float] = []
    claims: list[int] = []
    stop_at = time.monotonic() + seconds
    share = max(1, cap * len(providers) // daemons)
    names = [f"d{daemons}-{i}-{int(hand_over)}" for i in range(daemons)]
    began = time.monotonic()
    ran = await asyncio.gather(*(daemon(dsn, n, providers, stop_at, latencies, claims,
                                        handovers, share, hand_over) for n in names))
    elapsed = time.monotonic() - began
    cpu = backend_cpu([pid for pid, _conn in ran])
    for name, (_pid, conn) in zip(names, ran, strict=True):
        await queries.daemon_gone(conn, name)
        await conn.close()
    rows = sum(claims)
    ms = sorted(x * 1000 for x in latencies) or [0.0]
    hand = sorted(x * 1000 for x in handovers) or [0.0]
    return {
        "daemons": daemons, "rows": rows, "rows/s": rows / elapsed,
        "claims": len(latencies), "claim p50": statistics.median(ms), "claim p99": _p99(ms),
        "claim max": max(ms), "hand-overs": len(handovers),
        "hand-over p50": statistics.median(hand), "hand-over p99": _p99(hand),
        "PG CPU ms/row": 1000 * cpu / max(1, rows),
    }


def _p99(ms: list[float]) -> float:
    return ms[int(len(ms) * 0.99) - 1] if len(ms) >= 100 else max(ms)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--providers", type=int, default=4)
    ap.add_argument("--cap", type=int, default=4, help="connections per credential")
    ap.add_argument("--daemons", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=10.0, help="per daemon count")
    args = ap.parse_args()
    cluster = PgCluster(durable=True).init()
    try:
        cluster.psql("CREATE DATABASE bench OWNER asyncsat")
        dsn = cluster.dsn("bench")
        t0 = time.monotonic()
        providers = await load(dsn, args.rows, args.providers, args.cap)
        print(f"{args.rows} queued downloads over {args.providers} providers "
              f"(cap {args.cap} each) loaded in {time.monotonic() - t0:.1f} s", flush=True)
        cols = ["daemons", "rows", "rows/s", "claims", "claim p50", "claim p99", "claim max",
                "hand-overs", "hand-over p50", "hand-over p99", "PG CPU ms/row"]
        for hand_over in (True, False):
            print("\n" + ("slots handed over to the next row (as the daemon runs)" if hand_over
                          else "every slot given back and claimed again"), flush=True)
            print("  ".join(f"{c:>13}" for c in cols))
            for n in args.daemons:
                r = await measure(dsn, providers, n, args.seconds, args.cap, hand_over)
                print("  ".join(f"{r[c]:>13.2f}" if isinstance(r[c], float) else
                                f"{r[c]:>13}" for c in cols), flush=True)
    finally:
        cluster.destroy()


if __name__ == "__main__":
    asyncio.run(main())
