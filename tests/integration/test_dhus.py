"""DHuS hubs end to end: the daemon in-process against the DHuS emulator (tests/dhus.py)."""

from __future__ import annotations

import asyncio
import io
import os
import zipfile
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from asyncsat import daemon
from asyncsat.catalogs.base import Filter, Query
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.logs import Redactor
from tests.dhus import DhusEmulator, DhusProduct
from tests.helpers import FAST, drain, rows, sql
from tests.helpers import request_summary_of as summary
from tests.helpers import search_request as search

USER, PASSWORD = "hubuser", "hub-Pa55word"
T0 = datetime(2024, 3, 1, 10, tzinfo=UTC)
HERE = [(8.0, 43.0), (9.0, 43.0), (9.0, 44.0), (8.0, 44.0), (8.0, 43.0)]
FAR = [(20.0, 60.0), (21.0, 60.0), (21.0, 61.0), (20.0, 61.0), (20.0, 60.0)]


def payload(size: int = 30_000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.SAFE/manifest.safe", "<xfdu/>")
        zf.writestr("x.SAFE/band.bin", os.urandom(size))
    return buf.getvalue()


def s2(n: int, **kw: Any) -> DhusProduct:
    return DhusProduct(f"S2A_MSIL1C_2024030{n % 10}T100000_N0510_R{n:03d}_T32TQM_X{n}",
                       kw.pop("data", None) or payload(), begin=kw.pop("begin",
                                                                       T0 + timedelta(hours=n)),
                       footprint=kw.pop("footprint", HERE), cloud=kw.pop("cloud", 5.0), **kw)


async def hub_provider(dsn: str, emu: DhusEmulator, *, connections: int = 2,
                       password: str = PASSWORD, **settings: object) -> int:
    conn = await connect(dsn)
    try:
        p = await queries.provider_add(conn, "hub", "dhus", emu.url, {**FAST, **settings})
        await queries.credential_upsert(conn, p.id, USER, password, connections)
        return p.id
    finally:
        await conn.close()




@pytest.fixture
async def emu() -> Any:
    server = await DhusEmulator(users={USER: PASSWORD}).start()
    yield server
    await server.stop()


async def test_criteria_reach_the_hub_and_md5_is_verified(
        dsn: str, settings: Settings, emu: DhusEmulator) -> None:
    wanted = emu.add(s2(1))
    emu.add(s2(2, producttype="S2MSI2A"))
    emu.add(s2(3, cloud=60.0))
    emu.add(s2(4, footprint=FAR))
    emu.add(s2(5, begin=T0 - timedelta(days=10)))
    emu.add(s2(6, platform="Sentinel-1", producttype="GRD"))
    pid = await hub_provider(dsn, emu)
    rid = await search(dsn, pid, Query(
        "Sentinel-2", start=T0, end=T0 + timedelta(days=2), bbox=(8.2, 43.2, 8.8, 43.8),
        filters=(Filter("producttype", "=", "S2MSI1C"),
                 Filter("cloudcoverpercentage", "<=", "20"))))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["name"] == wanted.title + ".zip"
    assert row["checksum_algo"] == "md5" and row["checksum_value"] == wanted.md5
    q = next(r for r in emu.requests if r["path"].endswith("/search"))["query"]["q"]
    assert "cloudcoverpercentage:[0 TO 20]" in q and 'footprint:"Intersects(POLYGON' in q
    assert (await summary(dsn, rid))["status"] == "done"


@pytest.mark.parametrize("count", [0, 1, 100, 101, 250])
async def test_paging_with_rows_of_at_most_100_and_the_single_entry_quirk(
        dsn: str, settings: Settings, emu: DhusEmulator, count: int) -> None:
    for n in range(count):
        emu.add(s2(n, data=payload(100), begin=T0 + timedelta(minutes=n)))
    pid = await hub_provider(dsn, emu, page_size=500)
    rid = await search(dsn, pid, Query("Sentinel-2"))
    await drain(settings, timeout=120)
    state = await summary(dsn, rid)
    assert state["products"] == count and state["done"] == count
    pages = [r for r in emu.requests if r["path"].endswith("/search")]
    assert all(int(r["query"]["rows"]) <= 100 for r in pages)


async def test_an_archived_product_is_ordered_once_and_downloaded_when_restored(
        dsn: str, settings: Settings) -> None:
    emu = await DhusEmulator(users={USER: PASSWORD}, restore_delay=1.0).start()
    try:
        archived = emu.add(s2(1, online=False))
        emu.add(s2(2))
        pid = await hub_provider(dsn, emu, offline_interval=0.4, archive_quota="20/12h")
        rid = await search(dsn, pid, Query("Sentinel-2"))

        async def done() -> bool:
            return (await summary(dsn, rid))["done"] == 2

        await asyncio.wait_for(daemon.serve(settings, Redactor(), until=done), 40)
    finally:
        await emu.stop()
    assert [o[1] for o in emu.orders] == [archived.uuid]  # ordered once
    row = next(r for r in await rows(dsn) if r["name"].startswith(archived.title))
    assert row["attempts"] == 1  # the waits used no attempt
    [order] = await sql(dsn, "SELECT account, download_id FROM archive_order")
    assert order["download_id"] == row["id"]


async def test_the_archive_quota_is_kept_across_a_restart(
        dsn: str, settings: Settings) -> None:
    emu = await DhusEmulator(users={USER: PASSWORD}, restore_delay=600).start()
    try:
        for n in range(4):
            emu.add(s2(n, online=False))
        pid = await hub_provider(dsn, emu, offline_interval=0.2, archive_quota="2/1h")
        await search(dsn, pid, Query("Sentinel-2"))
        await drain(settings)  # finds them offline: an idle run does not wait

        async def all_looked_at() -> bool:
            checks = await sql(dsn, "SELECT min(offline_checks) AS n FROM download")
            return checks[0]["n"] >= 2

        await asyncio.wait_for(daemon.serve(settings, Redactor(), until=all_looked_at), 30)
        assert len(emu.orders) == 2  # the quota: two orders per hour
        # a restart, and every product due for a look at once: the quota still holds
        await sql(dsn, "UPDATE download SET not_before = now()")

        async def looked_again() -> bool:
            checks = await sql(dsn, "SELECT min(offline_checks) AS n FROM download")
            return checks[0]["n"] >= 3

        await asyncio.wait_for(daemon.serve(settings, Redactor(), until=looked_again), 30)
    finally:
        await emu.stop()
    assert len(emu.orders) == 2 and len({o[1] for o in emu.orders}) == 2  # none twice
    waiting = await rows(dsn)
    assert all(r["status"] == "offline" for r in waiting)
    assert sum("archive quota" in (r["error"] or "") for r in waiting) == 2


async def test_the_hubs_quota_refusal_waits_without_ordering_more(
        dsn: str, settings: Settings) -> None:
    emu = await DhusEmulator(users={USER: PASSWORD}, quota=1, restore_delay=600).start()
    try:
        for n in range(3):
            emu.add(s2(n, online=False))
        pid = await hub_provider(dsn, emu, offline_interval=0.2)
        await search(dsn, pid, Query("Sentinel-2"))
        await drain(settings)

        async def refused() -> bool:
            return emu.quota_refused[USER] >= 1

        await asyncio.wait_for(daemon.serve(settings, Redactor(), until=refused), 30)
        tries = len(emu.orders) + emu.quota_refused[USER]
        await asyncio.wait_for(daemon.serve(settings, Redactor(),
                                            until=_after(1.0)), 30)
    finally:
        await emu.stop()
    assert len(emu.orders) == 1
    # after the refusal, the wait covers the quota window: no more orders were tried
    assert len(emu.orders) + emu.quota_refused[USER] == tries
    assert {r["status"] for r in await rows(dsn)} == {"offline"}


def _after(seconds: float) -> Any:
    deadline = asyncio.get_running_loop().time() + seconds

    async def until() -> bool:
        return asyncio.get_running_loop().time() >= deadline

    return until


async def test_concurrent_flow_limits_are_throttling(dsn: str, settings: Settings) -> None:
    emu = await DhusEmulator(users={USER: PASSWORD}, max_flows_per_user=2).start()
    try:
        for n in range(6):
            emu.add(s2(n, data=payload(200_000), rate=1_000_000.0))
        pid = await hub_provider(dsn, emu, connections=4)
        rid = await search(dsn, pid, Query("Sentinel-2"))
        await drain(settings)
    finally:
        await emu.stop()
    assert emu.flows_refused[USER] > 0
    state = await summary(dsn, rid)
    assert (state["done"], state["failed"]) == (6, 0)


async def test_an_xml_error_served_with_200_is_never_done(
        dsn: str, settings: Settings, emu: DhusEmulator) -> None:
    emu.add(s2(1, xml_error_body=True, md5="0" * 32))
    pid = await hub_provider(dsn, emu)
    await search(dsn, pid, Query("Sentinel-2"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed"
    assert not list((settings.default_dest / "hub").glob("*.zip"))


async def test_an_older_hubs_500_for_offline_products_is_offline(
        dsn: str, settings: Settings) -> None:
    emu = await DhusEmulator(users={USER: PASSWORD}, old_offline=True).start()
    try:
        emu.add(s2(1, online=False))
        pid = await hub_provider(dsn, emu, offline_interval=60)
        await search(dsn, pid, Query("Sentinel-2"))
        await drain(settings)
    finally:
        await emu.stop()
    [row] = await rows(dsn)
    assert (row["status"], row["attempts"]) == ("offline", 0)


async def test_wrong_credentials_fail_the_request_without_the_secret(
        dsn: str, settings: Settings, emu: DhusEmulator,
        capsys: pytest.CaptureFixture[str]) -> None:
    emu.add(s2(1))
    pid = await hub_provider(dsn, emu, password="Nope-wrong-77")
    rid = await search(dsn, pid, Query("Sentinel-2"))
    await drain(settings)
    state = await summary(dsn, rid)
    assert state["status"] == "failed" and "401" in state["error"]
    out = capsys.readouterr()
    assert "Nope-wrong-77" not in out.out + out.err + state["error"]


async def test_the_same_wrong_md5_twice_is_bad_at_the_source(
        dsn: str, settings: Settings, emu: DhusEmulator) -> None:
    emu.add(s2(1, md5="f" * 32))
    pid = await hub_provider(dsn, emu)
    await search(dsn, pid, Query("Sentinel-2"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and row["attempts"] == 2
    assert row["error"].startswith("bad at the source (the same wrong checksum twice)")
