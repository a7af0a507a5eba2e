"""USGS M2M end to end: the daemon in-process against the M2M emulator (tests/m2m.py)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from asyncsat import daemon
from asyncsat.catalogs.base import Filter, Query
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.logs import Redactor
from tests.helpers import FAST, drain, rows, sql
from tests.helpers import request_summary_of as summary
from tests.helpers import search_request as search
from tests.m2m import M2MEmulator, M2MScene

USER, TOKEN = "landsat-fan", "app-token-Zq9x!RtY2w"
T0 = datetime(2024, 6, 1, tzinfo=UTC)


def scene(n: int, **kw: Any) -> M2MScene:
    display = f"LC09_L2SP_195030_202406{n + 1:02d}_20240603_02_T1"
    return M2MScene(f"LC91950302024{150 + n:03d}LGN00", display,
                    kw.pop("data", None) or b"ustar" + os.urandom(40_000),
                    acquired=kw.pop("acquired", T0 + timedelta(days=n)), **kw)


async def m2m_provider(dsn: str, emu: M2MEmulator, token: str = TOKEN,
                       **settings: object) -> int:
    conn = await connect(dsn)
    try:
        p = await queries.provider_add(conn, "usgs", "m2m", emu.url, {**FAST, **settings})
        await queries.credential_upsert(conn, p.id, USER, token, 2)
        return p.id
    finally:
        await conn.close()




@pytest.fixture
async def emu() -> Any:
    server = await M2MEmulator(users={USER: TOKEN}).start()
    yield server
    await server.stop()


async def test_a_search_fetches_the_bundles_named_by_usgs_and_logs_out(
        dsn: str, settings: Settings, emu: M2MEmulator) -> None:
    wanted = [emu.add(scene(n)) for n in range(2)]
    emu.add(scene(2, cloud=80.0))  # too cloudy
    emu.add(scene(3, bounds=(100.0, 10.0, 101.0, 11.0)))  # elsewhere
    emu.add(scene(4, acquired=T0 - timedelta(days=40)))  # too early
    pid = await m2m_provider(dsn, emu)
    rid = await search(dsn, pid, Query(
        "landsat_ot_c2_l2", start=T0, end=T0 + timedelta(days=20), bbox=(8.2, 43.2, 8.8, 43.8),
        filters=(Filter("cloudCover", "<=", "20"),)))
    await drain(settings)
    names = sorted(r["name"] for r in await rows(dsn))
    assert names == sorted(s.display_id + ".tar" for s in wanted)  # Content-Disposition
    state = await summary(dsn, rid)
    assert (state["status"], state["done"]) == ("done", 2)
    assert emu.logins == [USER] and emu.logouts == [USER]  # one key, ended at the stop
    sent = next(r for r in emu.requests if r["endpoint"] == "scene-search")["body"]
    assert sent["sceneFilter"]["cloudCoverFilter"]["max"] == 20
    assert sent["sceneFilter"]["spatialFilter"]["filterType"] == "mbr"


async def test_pages_by_starting_number(dsn: str, settings: Settings, emu: M2MEmulator) -> None:
    for n in range(5):
        emu.add(scene(n))
    pid = await m2m_provider(dsn, emu, page_size=2)
    rid = await search(dsn, pid, Query("landsat_ot_c2_l2"))
    await drain(settings)
    assert (await summary(dsn, rid))["done"] == 5
    starts = [r["body"]["startingNumber"] for r in emu.requests
              if r["endpoint"] == "scene-search"]
    assert starts == [1, 3, 5]


async def test_a_product_being_prepared_waits_offline_then_arrives(
        dsn: str, settings: Settings, emu: M2MEmulator) -> None:
    emu.add(scene(1, prepare_time=1.5))
    pid = await m2m_provider(dsn, emu, offline_interval=0.5)
    rid = await search(dsn, pid, Query("landsat_ot_c2_l2"))
    await drain(settings)  # an idle run does not wait for it
    [row] = await rows(dsn)
    assert (row["status"], row["attempts"]) == ("offline", 0)
    assert "preparing" in row["error"]

    async def arrived() -> bool:
        return (await summary(dsn, rid))["done"] == 1

    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=arrived), 30)
    [row] = await rows(dsn)
    assert (row["status"], row["attempts"]) == ("done", 1)
    assert not [g for g in emu.file_gets if g["path"].startswith("/download-staging/")]


async def test_an_expired_link_mid_file_is_asked_again_and_resumed(
        dsn: str, settings: Settings, emu: M2MEmulator) -> None:
    data = b"ustar" + os.urandom(1_500_000)
    emu.add(scene(1, data=data, rate=1_000_000.0, drop_after=[600_000]))
    pid = await m2m_provider(dsn, emu)
    await search(dsn, pid, Query("landsat_ot_c2_l2"))

    async def expire_once_started() -> None:
        while not emu.file_gets:
            await asyncio.sleep(0.01)
        emu.expire_urls()  # the link lapses while the first try runs

    expiring = asyncio.create_task(expire_once_started())
    await drain(settings)
    await expiring
    [row] = await rows(dsn)
    assert row["status"] == "done"
    assert Path(row["path"]).read_bytes() == data
    good = [g for g in emu.file_gets if g["status"] in (200, 206)]
    assert good[-1]["range"] == "bytes=600000-"  # resumed, not restarted
    assert len(emu.download_requests) >= 2  # a fresh link was asked for


async def test_an_expired_api_key_is_renewed_once(
        dsn: str, settings: Settings, emu: M2MEmulator) -> None:
    for n in range(3):
        emu.add(scene(n))
    pid = await m2m_provider(dsn, emu, page_size=1)
    rid = await search(dsn, pid, Query("landsat_ot_c2_l2"))

    async def expire_after_first_page() -> None:
        while not [r for r in emu.requests if r["endpoint"] == "scene-search"]:
            await asyncio.sleep(0.005)
        emu.expire_api_keys()

    expiring = asyncio.create_task(expire_after_first_page())
    await drain(settings)
    await expiring
    assert (await summary(dsn, rid))["done"] == 3
    assert emu.logins == [USER, USER]


async def test_no_m2m_role_fails_the_request_at_once_saying_what_to_ask_for(
        dsn: str, settings: Settings) -> None:
    emu = await M2MEmulator(users={USER: TOKEN}, no_role={USER}).start()
    try:
        emu.add(scene(1))
        pid = await m2m_provider(dsn, emu)
        rid = await search(dsn, pid, Query("landsat_ot_c2_l2"))
        await drain(settings)
    finally:
        await emu.stop()
    state = await summary(dsn, rid)
    assert state["status"] == "failed"
    assert "Machine-to-Machine (M2M) access" in state["error"]
    assert len(emu.logins) <= 1  # not hammered: a missing role is not retried


async def test_a_wrong_token_fails_the_request_and_stays_secret(
        dsn: str, settings: Settings, emu: M2MEmulator,
        capsys: pytest.CaptureFixture[str]) -> None:
    emu.add(scene(1))
    pid = await m2m_provider(dsn, emu, token="not-the-Token-42")
    rid = await search(dsn, pid, Query("landsat_ot_c2_l2"))
    await drain(settings)
    state = await summary(dsn, rid)
    assert state["status"] == "failed" and "refused the login of landsat-fan" in state["error"]
    out = capsys.readouterr()
    stored = str(await sql(dsn, "SELECT * FROM request"))
    assert "not-the-Token-42" not in out.out + out.err + stored


async def test_a_hostile_file_name_stays_under_dest(
        dsn: str, settings: Settings, emu: M2MEmulator) -> None:
    emu.add(scene(1, filename="../../evil.tar"))
    pid = await m2m_provider(dsn, emu)
    await search(dsn, pid, Query("landsat_ot_c2_l2"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done"
    assert Path(row["path"]) == settings.default_dest / "usgs" / "evil.tar"
