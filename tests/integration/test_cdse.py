"""CDSE searches end to end: the daemon in-process against the CDSE emulator (tests/cdse.py).

Every test queues a search the way `asyncsat search` does, runs the daemon, and checks what
reached the catalogue, what landed on disk and what the rows say.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import zipfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from asyncsat import daemon
from asyncsat.catalogs.base import Filter, Query
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.db.pool import connect
from asyncsat.logs import Redactor
from tests.cdse import CdseEmulator, EmuProduct
from tests.helpers import FAST, add_provider, drain, rows, sql
from tests.helpers import request_summary_of as summary
from tests.helpers import search_request as search

USER, PASSWORD = "ana@example.eu", "s3cret-Pa55"
T0 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
COAST = [(8.0, 43.0), (9.0, 43.0), (9.0, 44.0), (8.0, 44.0), (8.0, 43.0)]
ELSEWHERE = [(20.0, 60.0), (21.0, 60.0), (21.0, 61.0), (20.0, 61.0), (20.0, 60.0)]


def payload(size: int = 50_000) -> bytes:
    """A real zip (the payload check reads its central directory)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.SAFE/manifest.safe", "<xfdu/>")
        zf.writestr("x.SAFE/band.bin", os.urandom(size))
    return buf.getvalue()


def s2(n: int, *, start: datetime | None = None, **kw: Any) -> EmuProduct:
    attributes = kw.pop("attributes", {"productType": "S2MSI1C", "cloudCover": 10.0})
    return EmuProduct(f"S2A_MSIL1C_2024030{n % 10}T100000_N0510_R{n:03d}_T32TQM.SAFE",
                      kw.pop("data", None) or payload(), start=start or T0 + timedelta(hours=n),
                      footprint=kw.pop("footprint", COAST), attributes=attributes, **kw)


async def cdse_provider(dsn: str, emu: CdseEmulator, *, connections: int = 4,
                        password: str = PASSWORD, **settings: object) -> int:
    conn = await connect(dsn)
    try:
        p = await queries.provider_add(conn, "cdse", "odata", emu.catalogue_url, {
            "token_url": emu.token_url, "download_url": emu.download_url, **FAST, **settings})
        await queries.credential_upsert(conn, p.id, USER, password, connections)
        return p.id
    finally:
        await conn.close()




def files(settings: Settings) -> set[str]:
    folder = settings.default_dest / "cdse"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture
async def emu() -> Any:
    server = await CdseEmulator(users={USER: PASSWORD}).start()
    yield server
    await server.stop()


async def test_criteria_reach_the_catalogue_and_select_the_products(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    wanted = emu.add(s2(1))
    emu.add(s2(2, attributes={"productType": "S2MSI2A", "cloudCover": 5.0}))  # wrong type
    emu.add(s2(3, attributes={"productType": "S2MSI1C", "cloudCover": 55.0}))  # too cloudy
    emu.add(s2(4, footprint=ELSEWHERE))  # outside the area
    emu.add(s2(5, start=T0 - timedelta(days=3)))  # before the start
    emu.add(s2(6, collection="SENTINEL-1"))  # another collection
    pid = await cdse_provider(dsn, emu)
    rid = await search(dsn, pid, Query(
        "SENTINEL-2", start=T0, end=T0 + timedelta(days=1), bbox=(8.2, 43.2, 8.8, 43.8),
        filters=(Filter("productType", "=", "S2MSI1C"), Filter("cloudCover", "<=", "20"))))
    await drain(settings)
    assert files(settings) == {wanted.name.removesuffix(".SAFE") + ".SAFE.zip"}
    searched = [r for r in emu.requests if r["path"] == "/odata/v1/Products"]
    where = searched[0]["query"]["$filter"]
    assert "Collection/Name eq 'SENTINEL-2'" in where and "OData.CSC.Intersects" in where
    assert "att/OData.CSC.DoubleAttribute/Value le 20.0" in where
    assert searched[0]["query"]["$orderby"] == "ContentDate/Start asc"
    done = await summary(dsn, rid)
    assert (done["status"], done["products"], done["done"]) == ("done", 1, 1)
    row = (await rows(dsn))[0]
    assert row["checksum_algo"] == "blake3"  # the catalogue's digest, verified


@pytest.mark.parametrize("count, page, knobs", [
    (5, 2, {}),                                  # short last page
    (4, 2, {"next_link_on_last_page": True}),    # a next link to an empty page
    (5, 2, {"next_links": False}),               # no next links: paged by $skip
    (1, 100, {}),                                # one page
    (0, 100, {}),                                # nothing at all
])
async def test_paging(dsn: str, settings: Settings, count: int, page: int,
                      knobs: dict[str, bool]) -> None:
    emu = await CdseEmulator(users={USER: PASSWORD}, **knobs).start()
    try:
        for n in range(count):
            emu.add(s2(n, data=payload(2000)))
        pid = await cdse_provider(dsn, emu, page_size=page)
        rid = await search(dsn, pid, Query("SENTINEL-2"))
        await drain(settings)
    finally:
        await emu.stop()
    assert len(files(settings)) == count
    state = await summary(dsn, rid)
    assert state["products"] == count and state["status"] == "done"
    assert not [r for r in emu.requests if r.get("status") == 422]


async def test_a_long_search_queues_its_products_while_it_pages_on(
        dsn: str, settings: Settings) -> None:
    emu = await CdseEmulator(users={USER: PASSWORD}, hold_pages_from=200).start()
    try:
        for n in range(250):
            emu.add(s2(n, data=payload(2000)))
        pid = await cdse_provider(dsn, emu, page_size=100)
        rid = await search(dsn, pid, Query("SENTINEL-2"))
        await drain(settings)
    finally:
        await emu.stop()
    [last_page] = [r for r in emu.requests
                   if r["path"].endswith("/Products") and r["query"].get("$skip") == "200"]
    first_file = min(r["t"] for r in emu.requests if r["path"].startswith("/download/"))
    # the products of the first pages were downloading before the last page was answered
    assert first_file < last_page["answered"] < last_page["t"] + 5
    assert len(files(settings)) == 250
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 250, 250)
    gets = Counter(r["path"] for r in emu.requests
                   if r["path"].startswith("/download/") and r.get("status") == 200)
    assert len(gets) == 250 and set(gets.values()) == {1}  # each product fetched once


async def test_a_search_past_the_skip_cap_goes_on_in_time_windows(
        dsn: str, settings: Settings) -> None:
    emu = await CdseEmulator(users={USER: PASSWORD}, max_skip=4).start()
    try:
        # 13 products, three sharing one start time across a window boundary
        starts = [T0 + timedelta(minutes=n) for n in range(10)] + [T0 + timedelta(minutes=5)] * 3
        for n, start in enumerate(starts):
            emu.add(s2(n + 10, start=start, data=payload(1000)))
        pid = await cdse_provider(dsn, emu, page_size=2, max_skip=4)
        rid = await search(dsn, pid, Query("SENTINEL-2"))
        await drain(settings)
    finally:
        await emu.stop()
    skips = [int(r["query"].get("$skip", 0)) for r in emu.requests
             if r["path"] == "/odata/v1/Products"]
    assert max(skips) <= 4  # the server's cap was never passed (it answers 422 beyond)
    state = await summary(dsn, rid)
    assert state["products"] == 13 and state["done"] == 13
    assert len(files(settings)) == 13


async def test_token_expiring_mid_transfer_then_a_drop_resumes_under_a_fresh_token(
        dsn: str, settings: Settings) -> None:
    emu = await CdseEmulator(users={USER: PASSWORD}, token_lifetime=2.0).start()
    try:
        data = payload(3_000_000)
        product = emu.add(s2(1, data=data, rate=1_000_000.0, drop_after=[2_200_000]))
        pid = await cdse_provider(dsn, emu)
        await search(dsn, pid, Query("SENTINEL-2"))
        await drain(settings)
    finally:
        await emu.stop()
    final = settings.default_dest / "cdse" / (product.name + ".zip")
    assert hashlib.md5(final.read_bytes()).hexdigest() == hashlib.md5(data).hexdigest()
    downloads = [r for r in emu.requests if r["path"].endswith("/$value")]
    assert len(downloads) == 2
    assert downloads[0]["range"] is None and downloads[1]["range"] == "bytes=2200000-"
    assert downloads[0]["token"] != downloads[1]["token"]  # resumed under a renewed token
    assert emu.grants[(USER, "refresh_token")] >= 1 and emu.grants[(USER, "password")] == 1
    row = (await rows(dsn))[0]
    assert row["status"] == "done" and row["attempts"] == 2


async def test_a_token_rejected_before_its_time_is_renewed_once_and_the_file_resumes(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    data = payload(2_000_000)
    product = emu.add(s2(1, data=data, rate=800_000.0, drop_after=[600_000]))
    pid = await cdse_provider(dsn, emu)
    await search(dsn, pid, Query("SENTINEL-2"))

    async def expire_when_dropped() -> None:
        while not any(r["path"].endswith("/$value") for r in emu.requests):
            await asyncio.sleep(0.01)
        emu.expire_tokens()  # the server disowns the token while the first try runs

    expiring = asyncio.create_task(expire_when_dropped())
    await drain(settings)
    await expiring
    assert (settings.default_dest / "cdse" / (product.name + ".zip")).read_bytes() == data
    tries = [r for r in emu.requests if r["path"].endswith("/$value")]
    assert [r["range"] for r in tries] == [None, "bytes=600000-", "bytes=600000-"]
    assert tries[1]["token"] == tries[0]["token"] != tries[2]["token"]  # 401, renewed, resumed
    assert emu.grants[(USER, "password")] + emu.grants[(USER, "refresh_token")] == 2


async def test_one_token_for_many_parallel_downloads(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    for n in range(12):
        emu.add(s2(n, data=payload(300_000), rate=2_000_000.0))
    pid = await cdse_provider(dsn, emu, connections=4)
    await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings)
    assert len(files(settings)) == 12
    assert emu.grants[(USER, "password")] == 1 and emu.peak[USER] == 4
    tokens = {r["token"] for r in emu.requests if r["path"].endswith("/$value")}
    assert len(tokens) == 1


async def test_a_wrong_password_fails_the_request_with_one_line_and_no_secret(
        dsn: str, settings: Settings, emu: CdseEmulator, capsys: pytest.CaptureFixture[str],
) -> None:
    emu.add(s2(1))
    pid = await cdse_provider(dsn, emu, password="Wrong-Pa55word")
    rid = await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings)
    state = await summary(dsn, rid)
    assert state["status"] == "failed" and "\n" not in state["error"]
    assert "refused the login of ana@example.eu" in state["error"]
    assert emu.grants[(USER, "password")] == 0
    assert not files(settings)
    out = capsys.readouterr()
    everything = out.out + out.err + str(await sql(dsn, "SELECT error FROM request"))
    assert "Wrong-Pa55word" not in everything


async def test_session_caps_answered_with_429_are_waited_out(dsn: str, settings: Settings) -> None:
    emu = await CdseEmulator(users={USER: PASSWORD}, max_downloads_per_user=2,
                             retry_after="0").start()
    try:
        for n in range(6):
            emu.add(s2(n, data=payload(200_000), rate=1_000_000.0))
        pid = await cdse_provider(dsn, emu, connections=4)
        await search(dsn, pid, Query("SENTINEL-2"))
        await drain(settings)
    finally:
        await emu.stop()
    assert emu.rejected[USER] > 0  # the cap was hit ...
    assert len(files(settings)) == 6  # ... and waited out: never a failure
    assert all(r["status"] == "done" and r["error"] is None for r in await rows(dsn))


async def test_empty_checksum_list_and_zero_content_length(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    product = emu.add(s2(1, checksums=[], content_length=0))
    pid = await cdse_provider(dsn, emu)
    await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings)
    row = (await rows(dsn))[0]
    assert row["status"] == "done" and row["checksum_algo"] is None
    assert row["size"] == len(product.data)


async def test_a_checksum_mismatch_is_never_done(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    emu.add(s2(1, checksums=[("MD5", "0" * 32)]))
    pid = await cdse_provider(dsn, emu)
    await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings)
    row = (await rows(dsn))[0]
    assert row["status"] == "failed" and "md5 mismatch" in row["error"]
    assert not files(settings)


async def test_two_overlapping_requests_fetch_a_product_once_and_count_it_in_both(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    for n in range(3):
        emu.add(s2(n))
    pid = await cdse_provider(dsn, emu)
    first = await search(dsn, pid, Query("SENTINEL-2", end=T0 + timedelta(hours=1, minutes=30)))
    second = await search(dsn, pid, Query("SENTINEL-2", start=T0 + timedelta(hours=1)))
    await drain(settings)
    fetched = [r for r in emu.requests if r["path"].endswith("/$value")]
    assert len(fetched) == 3  # product 1 matched both, fetched once
    a, b = await summary(dsn, first), await summary(dsn, second)
    assert (a["products"], a["done"], b["products"], b["done"]) == (2, 2, 2, 2)


async def test_hostile_names_from_the_catalogue_stay_under_dest(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    for name in ("../escape.SAFE", "/etc/passwd", "a\x07b\tc.zip", ".."):
        emu.add(EmuProduct(name, payload(1000), start=T0))
    pid = await cdse_provider(dsn, emu)
    await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings)
    folder = (settings.default_dest / "cdse").resolve()
    done = await rows(dsn)
    assert len(done) == 4 and all(r["status"] == "done" for r in done)
    for r in done:
        path = Path(r["path"]).resolve()
        assert path.parent == folder and all(c.isprintable() for c in path.name)
    assert not Path("/etc/passwd.zip").exists()


async def test_offline_products_wait_without_attempts_and_come_when_online(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    archived = emu.add(s2(1, online=False))
    emu.add(s2(2))
    pid = await cdse_provider(dsn, emu, offline_interval=0.5)
    rid = await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings)  # an idle run does not wait for offline products
    state = {r["name"]: r for r in await rows(dsn)}
    offline = state[archived.name + ".zip"]
    assert (offline["status"], offline["attempts"]) == ("offline", 0)
    assert (await summary(dsn, rid))["offline"] == 1
    archived.online = True

    async def arrived() -> bool:
        return all(r["status"] == "done" for r in await rows(dsn))

    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=arrived), 30)
    row = {r["name"]: r for r in await rows(dsn)}[archived.name + ".zip"]
    assert (row["status"], row["attempts"]) == ("done", 1)
    looks = [r for r in emu.requests if r["path"] == f"/odata/v1/Products({archived.id})"]
    assert looks  # looked at again by its id before the transfer


async def test_follow_queues_products_published_later_and_none_twice(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    now = datetime.now(UTC)
    emu.add(s2(1, published=now - timedelta(hours=2)))
    pid = await cdse_provider(dsn, emu, follow_interval=0.5)
    rid = await search(dsn, pid, Query("SENTINEL-2"), follow=True)
    late: list[EmuProduct] = []

    async def two_runs_then_a_new_product() -> bool:
        state = await summary(dsn, rid)
        if state["done"] == 1 and not late:
            late.append(emu.add(s2(2, published=datetime.now(UTC))))
        return state["done"] == 2

    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=two_runs_then_a_new_product),
                           30)
    state = await summary(dsn, rid)
    assert state["status"] == "following" and state["products"] == 2
    assert len([r for r in emu.requests if r["path"].endswith("/$value")]) == 2
    later = [r["query"]["$filter"] for r in emu.requests if r["path"] == "/odata/v1/Products"]
    assert "PublicationDate ge" not in later[0] and "PublicationDate ge" in later[-1]
    conn = await connect(dsn)
    try:
        ended, _cancelled, _kept = await queries.cancel_request(conn, rid)
    finally:
        await conn.close()
    assert ended and (await summary(dsn, rid))["status"] == "cancelled"


async def test_transient_faults_in_a_long_search_cost_a_page_not_the_search(
        dsn: str, settings: Settings) -> None:
    emu = CdseEmulator(users={USER: PASSWORD})
    calls = [0]

    @web.middleware
    async def flaky(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/odata/v1/Products":
            calls[0] += 1
            if calls[0] % 4 == 0:  # every fourth catalogue call fails
                return web.Response(status=503, text="Service Unavailable")
        return await handler(request)

    emu.app.middlewares.append(flaky)
    await emu.start()
    try:
        for n in range(20):
            emu.add(s2(n, data=payload(1000)))
        pid = await cdse_provider(dsn, emu, page_size=1)
        rid = await search(dsn, pid, Query("SENTINEL-2"))
        await drain(settings)
    finally:
        await emu.stop()
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 20, 20)
    pages = [r for r in emu.requests if r["path"] == "/odata/v1/Products"]
    failed = calls[0] // 4
    # each failed call was repeated once (the emulator logs those too), never the search
    assert len(pages) == 20 + failed and failed >= 4
    assert sorted({int(p["query"].get("$skip", 0)) for p in pages}) == list(range(20))


async def test_a_follow_run_waiting_for_a_slot_does_not_spin_the_loop(
        dsn: str, settings: Settings, emu: CdseEmulator,
        monkeypatch: pytest.MonkeyPatch) -> None:
    emu.add(s2(1, data=payload(2_000_000), rate=1_000_000.0,
               published=datetime.now(UTC) - timedelta(hours=1)))
    pid = await cdse_provider(dsn, emu, connections=1, follow_interval=0.2)
    rid = await search(dsn, pid, Query("SENTINEL-2"), follow=True)
    turns = [0]
    due = queries.next_request_due

    async def counted(db: Any, exclude: Any = (), daemon_id: Any = None) -> float | None:
        turns[0] += 1
        return await due(db, exclude, daemon_id)

    monkeypatch.setattr(queries, "next_request_due", counted)

    async def done() -> bool:
        return (await summary(dsn, rid))["done"] == 1

    # the follow's second run is due while the one slot carries a 2 s transfer
    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=done), 30)
    assert turns[0] < 60  # a loop spinning while the run waits turns thousands of times


async def test_requests_statuses_when_cancelled_or_finished(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    emu.add(s2(1))
    pid = await cdse_provider(dsn, emu)
    finished = await search(dsn, pid, Query("SENTINEL-2"))
    await drain(settings)
    conn = await connect(dsn)
    try:
        ended, cancelled, _kept = await queries.cancel_request(conn, finished)
        assert (ended, cancelled) == (False, 0)  # a finished request stays as it ended
        assert (await summary(dsn, finished))["status"] == "done"
        emu.add(s2(2, start=T0 + timedelta(days=5)))
        later = await search(dsn, pid, Query("SENTINEL-2", start=T0 + timedelta(days=4)))
    finally:
        await conn.close()
    await sql(dsn, "UPDATE request SET status = 'resolved' WHERE id = $1", later)
    product = emu.products[next(iter(p for p in emu.products if emu.products[p].name.startswith(
        "S2A_MSIL1C_20240302")))]
    [row] = await sql(dsn, "INSERT INTO download (provider_id, url, product_id, status)"
                      " VALUES ($1, $2, $3, 'queued') RETURNING id", pid,
                      f"{emu.download_url}Products({product.id})/$value", product.id)
    await sql(dsn, "INSERT INTO request_download VALUES ($1, $2)", later, row["id"])
    await sql(dsn, "UPDATE download SET status = 'cancelled' WHERE id = $1", row["id"])
    assert (await summary(dsn, later))["status"] == "cancelled"  # none done, all cancelled


async def test_a_standing_request_ends_when_its_limit_is_reached(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    for n in range(3):
        emu.add(s2(n, published=datetime.now(UTC)))
    pid = await cdse_provider(dsn, emu, follow_interval=0.2)
    rid = await search(dsn, pid, Query("SENTINEL-2", limit=2), follow=True)
    await drain(settings)
    state = await summary(dsn, rid)
    assert (state["status"], state["products"], state["done"]) == ("done", 2, 2)


async def test_a_product_found_again_keeps_its_retry_time(dsn: str, emu: CdseEmulator) -> None:
    pid = await cdse_provider(dsn, emu)
    rid = await search(dsn, pid, Query("SENTINEL-2"))
    conn = await connect(dsn)
    try:
        added = await queries.download_add(
            conn, request_id=rid, provider_id=pid, url="https://h/a", name="a.zip", dest="/d",
            size=None, checksum=None, login_user=None, login_secret=None, product_id="p-1")
        first = added.id
        await conn.execute("UPDATE download SET not_before = now() + interval '1 hour'"
                           " WHERE id = $1", first)
        added_again = await queries.download_add(
            conn, request_id=rid, provider_id=pid, url="https://h/a-signed?x=1", name="a.zip",
            dest="/d", size=None, checksum=None, login_user=None, login_secret=None,
            product_id="p-1", revive=False)
        again = added_again.id
        row = await conn.fetchrow("SELECT url, not_before > now() + interval '50 minutes'"
                                  " AS later FROM download WHERE id = $1", first)
    finally:
        await conn.close()
    assert again == first  # the same product, known by its catalog id
    assert row["url"] == "https://h/a-signed?x=1" and row["later"]


async def test_a_search_just_ended_here_is_due_on_its_timer_not_when_its_mark_lapses(
        dsn: str, db: Any) -> None:
    """A search that ended here clears its mark (`resolving_until`) in a statement of its
    own, after it told the loop: the loop may ask when the next run is due first. Its own
    mark must not put the run off until the mark lapses (a lease later: a standing search
    then ran every 30 s instead of every 0.3 s, and a test failed now and then)."""
    await add_provider(dsn, "hub", "http://127.0.0.1:9/")
    await db.execute(
        "INSERT INTO request (provider_id, search, status, follow, next_run, resolver,"
        " resolving_until) SELECT id, '{}', 'following', true, now() + interval '0.3 s',"
        " 'me', now() + interval '30 s' FROM provider")
    mine = await queries.next_request_due(db, (), "me")
    assert mine is not None and mine < 1.0, mine
    theirs = await queries.next_request_due(db, (), "another")  # (left to that daemon)
    assert theirs is not None and theirs > 25, theirs


async def test_a_standing_search_runs_on_time_while_wake_ups_keep_coming(
        dsn: str, settings: Settings, emu: CdseEmulator) -> None:
    """The loop looks at the requests on their timers whatever else wakes it: a stream of
    wake-ups (slots freed by other daemons' transfers) must not put a standing search off."""
    emu.add(s2(1, published=datetime.now(UTC) - timedelta(hours=2)))
    pid = await cdse_provider(dsn, emu, follow_interval=0.3)
    await search(dsn, pid, Query("SENTINEL-2"), follow=True)

    async def wake_ups() -> None:
        conn = await connect(dsn)
        try:
            while True:
                await conn.execute("""NOTIFY asyncsat, '{"type": "slot", "provider_id": 0}'""")
                await asyncio.sleep(0)  # a wake-up at every turn of the loop
        finally:
            await conn.close()

    def searches() -> int:
        return sum(r["path"] == "/odata/v1/Products" for r in emu.requests)

    async def three_runs() -> bool:
        return searches() >= 3

    noise = asyncio.create_task(wake_ups())
    try:
        await asyncio.wait_for(daemon.serve(settings, Redactor(), until=three_runs), 10)
    finally:
        noise.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await noise
    assert searches() >= 3
