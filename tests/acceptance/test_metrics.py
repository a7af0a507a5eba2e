"""`asyncsat run --metrics-port`: Prometheus figures scraped while real transfers run, and
the Grafana dashboard built on them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from asyncsat.errors import RetryableError
from asyncsat.metrics import Metrics
from tests.conftest import DaemonProcess, cli
from tests.ftpserver import FtpServer
from tests.helpers import FAST, add_provider, queue, rows, sql
from tests.servers import FileServer, free_port

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Figures:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def figure(figures: Figures, name: str, **labels: str) -> float:
    return figures.get((name, frozenset(labels.items())), 0.0)


async def until(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_metrics_move_while_transfers_run(
        server: FileServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    slow = os.urandom(2_000_000)
    server.add("slow.bin", slow, rate=500_000)
    server.add("cut.bin", os.urandom(200_000), drop_after=[50_000])
    await add_provider(dsn, "local", server.base, settings=FAST,
                       credentials=[("u", "pw-metrics-1", 2)])
    dest = tmp_path / "dest"
    port = free_port()
    proc = DaemonProcess(dsn, tmp_path / "home", "--metrics-port", str(port))
    daemons.append(proc)
    served = await proc.wait_for(lambda line: line["event"] == "metrics served")
    assert served["url"] == f"http://127.0.0.1:{port}/metrics"

    idle = await scrape(port)
    deadline = time.monotonic() + 10  # the engine sizes the slots on its first turn
    while figure(idle, "asyncsat_slots_free", provider="local") != 2:
        assert time.monotonic() < deadline, "the slots were never sized"
        await asyncio.sleep(0.05)
        idle = await scrape(port)
    assert figure(idle, "asyncsat_slots_total", provider="local") == 2

    await queue(dsn, server.url("slow.bin"), dest=dest)
    part = dest / "local" / "slow.bin.part"
    await until(lambda: part.exists() and part.stat().st_size > 300_000, "the slow transfer")
    first = await scrape(port)
    assert figure(first, "asyncsat_transfers_active", provider="local") == 1
    assert figure(first, "asyncsat_slots_free", provider="local") == 1
    moved = figure(first, "asyncsat_downloaded_bytes_total", provider="local")
    assert 0 < moved < len(slow)
    await asyncio.sleep(0.5)
    second = await scrape(port)
    assert figure(second, "asyncsat_downloaded_bytes_total", provider="local") > moved

    await queue(dsn, server.url("cut.bin"), server.url("missing.bin"), dest=dest)
    await proc.wait_for(lambda line: line["event"] == "download failed", timeout=30)

    async def finished() -> bool:
        return all(r["status"] in ("done", "failed") for r in await rows(dsn))

    deadline = time.monotonic() + 30
    while not await finished():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the task's last lines run after the row is written
    final = await scrape(port)
    assert figure(final, "asyncsat_downloads_total", provider="local", status="done") == 2
    assert figure(final, "asyncsat_downloads_total", provider="local", status="failed") == 1
    assert figure(final, "asyncsat_retries_total", provider="local", reason="transient") == 1
    assert figure(final, "asyncsat_downloaded_bytes_total", provider="local") == \
        len(slow) + 200_000
    assert figure(final, "asyncsat_transfers_active", provider="local") == 0
    assert figure(final, "asyncsat_slots_free", provider="local") == 2
    assert figure(final, "asyncsat_listener_reconnects_total") == 0

    # the LISTEN connection is cut: the daemon reconnects
    await sql(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
              " WHERE application_name = 'asyncsat listener'")
    await proc.wait_for(lambda line: line["event"] == "database connection restored")
    assert figure(await scrape(port), "asyncsat_listener_reconnects_total") == 1
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0


async def test_catalog_latency_is_observed(dsn: str, tmp_path: Path,
                                           daemons: list[DaemonProcess]) -> None:
    with FtpServer(users={"carol": "pw-carol-2"}) as ftp:
        ftp.delay["MLSD"] = 0.3
        for day in (1, 2):
            ftp.add(f"sst/sst_2024030{day}.nc", os.urandom(1000))
        port = free_port()
        proc = DaemonProcess(dsn, tmp_path / "home", "--metrics-port", str(port))
        daemons.append(proc)
        await proc.wait_for(lambda line: line["event"] == "metrics served")
        await queue(dsn, ftp.url("sst/*.nc", user="carol", password="pw-carol-2"),
                    dest=tmp_path / "dest")
        await proc.wait_for(lambda line: line["event"] == "request resolved")
        figures = await scrape(port)
    [(provider, count)] = [(dict(labels)["provider"], value)
                           for (name, labels), value in figures.items()
                           if name == "asyncsat_catalog_request_seconds_count"
                           and dict(labels)["outcome"] == "ok"]
    assert provider == f"127.0.0.1_{ftp.port}" and count == 1
    seconds = figure(figures, "asyncsat_catalog_request_seconds_sum", provider=provider,
                     outcome="ok")
    assert 0.3 <= seconds < 10
    assert figure(figures, "asyncsat_catalog_request_seconds_bucket", provider=provider,
                  outcome="ok", le="0.25") == 0


async def test_a_taken_port_is_one_line_and_exit_1(dsn: str, tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda *_a: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        r = await asyncio.to_thread(cli, "run", "--metrics-port", str(port), dsn=dsn,
                                    home=tmp_path)
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert r.returncode == 1
    assert re.fullmatch(rf"asyncsat: error: cannot serve metrics on 127\.0\.0\.1:{port}: "
                        r".+\n", r.stderr), r.stderr
    bad = await asyncio.to_thread(cli, "run", "--metrics-port", "70000", dsn=dsn, home=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_the_dashboard_queries_only_metrics_the_daemon_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\basyncsat_[a-z_]+", expr)}
    metrics = Metrics()
    metrics.watch_slots(lambda: [("p", 1, 2)])
    metrics.transfer_started("p")
    metrics.downloaded("p", 10)
    metrics.download_ended("p", "done")
    metrics.retried("p", RetryableError("reset"))
    metrics.catalog_request("p", 0.1, ok=True)
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    assert used and used <= exported, used - exported
    for name in ("asyncsat_downloaded_bytes_total", "asyncsat_downloads_total",
                 "asyncsat_transfers_active", "asyncsat_slots_free", "asyncsat_retries_total",
                 "asyncsat_catalog_request_seconds_bucket",
                 "asyncsat_listener_reconnects_total"):
        assert name in used, name
