"""Tests of the USGS M2M emulator itself (tests/m2m.py), so that a bug in the emulator cannot make
the adapter tests lie."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from tests.m2m import M2MEmulator, M2MScene, intersects

T0 = datetime(2024, 6, 1, 10, 12, 30, tzinfo=UTC)
USERS = {"alice": "tok-a", "bob": "tok-b", "carol": "tok-c"}
BUNDLE_L2 = "5e83d14fec7cae84"


def scene(i: int = 0, **kw: Any) -> M2MScene:
    acquired = kw.pop("acquired", T0 + timedelta(days=i))
    display = f"LC09_L2SP_192028_{acquired:%Y%m%d}_{acquired + timedelta(days=8):%Y%m%d}_02_T1"
    return M2MScene(f"LC9192028{acquired:%Y%j}LGN0{i % 10}", display,
                    kw.pop("data", bytes([i % 256]) * (3000 + i)), acquired=acquired, **kw)


@contextlib.asynccontextmanager
async def running(*scenes: M2MScene, **kw: Any) -> AsyncIterator[M2MEmulator]:
    emu = M2MEmulator(users=USERS, no_role={"carol"}, **kw)
    for s in scenes:
        emu.add(s)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


async def call(emu: M2MEmulator, endpoint: str, body: Any = None, key: str | None = None,
               *, method: str = "POST", raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"X-Auth-Token": key} if key else {}
    data = raw if raw is not None else json.dumps({} if body is None else body).encode()
    async with aiohttp.ClientSession() as http, \
            http.request(method, emu.url + endpoint, data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def ok(emu: M2MEmulator, endpoint: str, body: Any, key: str) -> Any:
    status, env = await call(emu, endpoint, body, key)
    assert status == 200 and env["errorCode"] is None, env
    return env["data"]


async def login(emu: M2MEmulator, user: str = "alice") -> str:
    key: str = await ok(emu, "login-token", {"username": user, "token": USERS[user]}, "")
    return key


async def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers or {}) as r:
        return r.status, r.headers, await r.read()


# ---------------------------------------------------------------- authentication

async def test_login_token_envelope_and_errors() -> None:
    async with running() as emu:
        status, env = await call(emu, "login-token", {"username": "alice", "token": "tok-a"})
        assert status == 200 and list(env) == ["requestId", "version", "sessionId", "data",
                                               "errorCode", "errorMessage"]
        assert env["version"] == "stable" and env["errorCode"] is None
        assert re.fullmatch(r"[A-Za-z0-9@]{16}", env["data"]) and isinstance(env["sessionId"], int)
        assert await login(emu) != env["data"]  # a new key per login
        _, bad = await call(emu, "login-token", {"username": "alice", "token": "nope"})
        assert (bad["errorCode"], bad["data"]) == ("AUTH_INVALID", None)
        _, nobody = await call(emu, "login-token", {"username": "eve", "token": "tok-a"})
        assert nobody["errorCode"] == "AUTH_INVALID"
        _, role = await call(emu, "login-token", {"username": "carol", "token": "tok-c"})
        assert role["errorCode"] == "UNAUTHORIZED_USER" and "permissions" in role["errorMessage"]
        _, missing = await call(emu, "login-token", {"username": "alice"})
        assert missing["errorCode"] == "INPUT_PARAMETER_INVALID"
        _, get = await call(emu, "login-token", {"username": "alice", "token": "tok-a"},
                            method="GET")
        assert get["errorCode"] == "INPUT_PARAMETER_INVALID"  # POST only
        assert emu.logins == ["alice", "alice"]
        assert all("token" not in r["body"] for r in emu.requests)  # the secret is not kept
        assert emu.requests[0]["body"] == {"username": "alice"}
        assert [r["error"] for r in emu.requests] == [
            None, None, "AUTH_INVALID", "AUTH_INVALID", "UNAUTHORIZED_USER",
            "INPUT_PARAMETER_INVALID", "INPUT_PARAMETER_INVALID"]


async def test_keys_missing_unknown_logged_out() -> None:
    async with running(scene()) as emu:
        body = {"datasetName": "landsat_ot_c2_l2"}
        _, env = await call(emu, "scene-search", body)
        assert env["errorCode"] == "AUTH_UNAUTHROIZED"  # sic, as the service spells it
        _, env = await call(emu, "scene-search", body, "not-a-key")
        assert env["errorCode"] == "AUTH_KEY_INVALID" and env["sessionId"] is None
        key = await login(emu)
        assert (await ok(emu, "scene-search", body, key))["totalHits"] == 1
        status, env = await call(emu, "logout", raw=b"null", key=key)  # landsatxplore sends null
        assert status == 200 and env["errorCode"] is None and env["data"] is None
        _, env = await call(emu, "scene-search", body, key)
        assert env["errorCode"] == "AUTH_KEY_INVALID"
        assert emu.logouts == ["alice"]
        assert [r["api_key"] for r in emu.requests[-2:]] == [key, key]


async def test_key_lifetime_slides_and_expires() -> None:
    async with running(scene(), api_key_lifetime=0.8) as emu:
        key, body = await login(emu), {"datasetName": "landsat_ot_c2_l2"}
        for _ in range(4):  # each call restarts the key's lifetime
            await asyncio.sleep(0.3)
            await ok(emu, "scene-search", body, key)
        await asyncio.sleep(0.9)
        status, env = await call(emu, "scene-search", body, key)
        assert status == 200 and env == {"errorCode": "AUTH_EXPIRED",
                                         "errorMessage": "API key has expired due to inactivity",
                                         "data": None, "requestId": 0, "sessionId": None,
                                         "version": None}
        _, env = await call(emu, "logout", key=key)
        assert env["errorCode"] == "AUTH_EXPIRED" and emu.logouts == []
        # logging in again while still sending the stale key fails; without it, it works
        _, env = await call(emu, "login-token", {"username": "alice", "token": "tok-a"}, key)
        assert env["errorCode"] == "AUTH_EXPIRED"
        fresh = await login(emu)
        await ok(emu, "scene-search", body, fresh)
        emu.expire_api_keys()
        _, env = await call(emu, "scene-search", body, fresh)
        assert env["errorCode"] == "AUTH_EXPIRED"


async def test_endpoints_and_bodies() -> None:
    async with running() as emu:
        key = await login(emu)
        status, env = await call(emu, "login", {"username": "alice", "password": "pw"})
        assert (status, env["errorCode"], env["errorMessage"]) == (404, "NOT_FOUND",
                                                                   "Invalid Endpoint")
        assert "password" not in emu.requests[-1]["body"]
        assert (emu.requests[-1]["status"], emu.requests[-1]["error"]) == (404, "NOT_FOUND")
        _, env = await call(emu, "scene-search", raw=b"{not json", key=key)
        assert env["errorCode"] == "INPUT_FORMAT"
        _, env = await call(emu, "scene-search", raw=b"[1, 2]", key=key)
        assert env["errorCode"] == "INPUT_FORMAT"
        _, env = await call(emu, "scene-search", {"datasetName": "nope"}, key)
        assert env["errorCode"] == "DATASET_INVALID"
        _, env = await call(emu, "scene-search", {}, key)
        assert env["errorCode"] == "DATASET_INVALID"
        # GET with a JSON body works like POST (landsatxplore and usgsxplore do that)
        status, env = await call(emu, "scene-search", {"datasetName": "LANDSAT_OT_C2_L2"}, key,
                                 method="GET")
        assert status == 200 and env["data"]["totalHits"] == 0
        answers = await asyncio.gather(*(call(emu, "download-retrieve", {}, key)
                                         for _ in range(3)))
        assert len({env["requestId"] for _, env in answers}) == 3


async def test_concurrent_requests_rate_limit() -> None:
    async with running(max_concurrent_requests=1, api_delay=0.2) as emu:
        key, other = await login(emu), await login(emu, "bob")
        results = await asyncio.gather(call(emu, "download-retrieve", {}, key),
                                       call(emu, "download-retrieve", {}, key),
                                       call(emu, "download-retrieve", {}, other))
        codes = sorted(str(env["errorCode"]) for _, env in results)
        assert codes == ["None", "None", "RATE_LIMIT"]  # per user


# ---------------------------------------------------------------- scene-search

def test_intersects() -> None:
    assert intersects((8, 43, 9, 44), (8.5, 43.5, 10, 45))
    assert intersects((8, 43, 9, 44), (9, 44, 10, 45))  # a shared corner
    assert not intersects((8, 43, 9, 44), (9.01, 43, 10, 44))
    assert not intersects((8, 43, 9, 44), (8, 44.5, 9, 45))
    assert intersects((179, 0, 180, 1), (170, 0, -170, 1))  # across the antimeridian
    assert intersects((-180, 0, -179, 1), (170, 0, -170, 1))
    assert not intersects((0, 0, 1, 1), (170, 0, -170, 1))


async def test_scene_search_filters() -> None:
    a = scene(0, bounds=(8.0, 43.0, 9.0, 44.0), cloud=5.0)
    b = scene(1, bounds=(20.0, 50.0, 21.0, 51.0), cloud=50.0)
    c = scene(2, cloud=None)
    d = scene(3, dataset="landsat_ot_c2_l1", cloud=1.0)
    async with running(a, b, c, d) as emu:
        key = await login(emu)

        async def ids(flt: dict[str, Any] | None = None, **kw: Any) -> list[str]:
            body = {"datasetName": "landsat_ot_c2_l2", "sceneFilter": flt, **kw}
            return [r["entityId"] for r in (await ok(emu, "scene-search", body, key))["results"]]

        assert await ids() == [c.entity_id, b.entity_id, a.entity_id]  # newest first
        assert await ids(sortDirection="ASC") == [a.entity_id, b.entity_id, c.entity_id]
        mbr = {"filterType": "mbr", "lowerLeft": {"latitude": 43.5, "longitude": 8.5},
               "upperRight": {"latitude": 45, "longitude": 10}}
        assert await ids({"spatialFilter": mbr}) == [c.entity_id, a.entity_id]
        geo = {"filterType": "geojson", "geoJson": {"type": "Polygon", "coordinates": [
            [[20.5, 50.5], [22, 50.5], [22, 52], [20.5, 50.5]]]}}
        assert await ids({"spatialFilter": geo}) == [b.entity_id]
        # dates only, times discarded: the day of `b` matches whatever the hour
        day = (T0 + timedelta(days=1)).date().isoformat()
        assert await ids({"acquisitionFilter": {"start": day, "end": day}}) == [b.entity_id]
        assert await ids({"acquisitionFilter": {"start": f"{day}T23:59:59",
                                                "end": f"{day} 00:00:00"}}) == [b.entity_id]
        assert await ids({"acquisitionFilter": {"start": day}}) == [c.entity_id, b.entity_id]
        assert await ids({"cloudCoverFilter": {"min": 0, "max": 10}}) == [a.entity_id]
        assert await ids({"cloudCoverFilter": {"max": 10, "includeUnknown": True}}) == [
            c.entity_id, a.entity_id]
        assert await ids({"cloudCoverFilter": {"min": 5, "max": 50}}) == [b.entity_id,
                                                                         a.entity_id]
        assert await ids({"ingestFilter": {"end": (T0 + timedelta(days=8)).date().isoformat()}}
                         ) == [a.entity_id]
        l1 = await ok(emu, "scene-search", {"datasetName": "landsat_ot_c2_l1"}, key)
        assert [r["entityId"] for r in l1["results"]] == [d.entity_id]
        for bad in [{"spatialFilter": {"filterType": "mbr", "lowerLeft": mbr["lowerLeft"]}},
                    {"acquisitionFilter": {"start": "June 1st"}}, "x"]:
            _, env = await call(emu, "scene-search", {"datasetName": "landsat_ot_c2_l2",
                                                      "sceneFilter": bad}, key)
            assert env["errorCode"] == "INPUT_PARAMETER_INVALID", bad


async def test_scene_search_result_fields() -> None:
    a = scene(0, bounds=(8.25, 43.5, 9.75, 44.25), cloud=7.456,
              published=datetime(2024, 6, 9, 14, 20, 23, tzinfo=UTC))
    async with running(a) as emu:
        key = await login(emu)
        data = await ok(emu, "scene-search", {"datasetName": "landsat_ot_c2_l2"}, key)
        r = data["results"][0]
        assert r["entityId"] == a.entity_id and r["displayId"] == a.display_id
        assert r["cloudCover"] == "7.46"  # a string, as the service sends it
        assert r["temporalCoverage"] == {"startDate": "2024-06-01 00:00:00",
                                         "endDate": "2024-06-01 00:00:00"}
        assert r["publishDate"] == "2024-06-09 14:20:23"
        assert r["spatialBounds"] == {"type": "Polygon", "coordinates": [[
            [8.25, 43.5], [8.25, 44.25], [9.75, 44.25], [9.75, 43.5], [8.25, 43.5]]]}
        assert r["metadata"] == [] and r["browse"][0]["thumbnailPath"].startswith("https://")
        full = await ok(emu, "scene-search", {"datasetName": "landsat_ot_c2_l2",
                                              "metadataType": "full"}, key)
        assert full["results"][0]["metadata"][0]["value"] == a.display_id
        assert data["totalHitsAccuracy"] == "approximate" and data["numExcluded"] == 0


async def test_scene_search_paging() -> None:
    scenes = [scene(i) for i in range(7)]
    async with running(*scenes, max_results_cap=3) as emu:
        key = await login(emu)

        async def page(start: int, size: int | str = 2) -> dict[str, Any]:
            data: dict[str, Any] = await ok(emu, "scene-search", {
                "datasetName": "landsat_ot_c2_l2", "maxResults": size,
                "startingNumber": start, "sortDirection": "ASC"}, key)
            return data

        first = await page(1)
        assert [first[k] for k in ("recordsReturned", "totalHits", "startingNumber",
                                   "nextRecord")] == [2, 7, 1, 3]
        seen, start = [], 1
        while True:  # the safe loop: stop when start + returned passes totalHits
            p = await page(start)
            seen += [r["entityId"] for r in p["results"]]
            if p["startingNumber"] + p["recordsReturned"] > p["totalHits"]:
                break
            start = p["nextRecord"]
        assert seen == [s.entity_id for s in scenes]
        last = await page(7)
        assert (last["recordsReturned"], last["nextRecord"]) == (1, 7)  # capped at totalHits
        ambiguous = await page(5)  # ends one short of the end, yet says nextRecord == totalHits
        assert (ambiguous["recordsReturned"], ambiguous["nextRecord"]) == (2, 7)
        beyond = await page(20)
        assert (beyond["results"], beyond["nextRecord"]) == ([], 7)
        assert (await page(1, 100))["recordsReturned"] == 3  # max_results_cap
        assert (await page(1, "2"))["recordsReturned"] == 2
        assert (await ok(emu, "scene-search", {"datasetName": "landsat_ot_c2_l2"},
                         key))["recordsReturned"] == 3  # default 100, capped
        for bad in [0, -1, "x"]:
            _, env = await call(emu, "scene-search", {"datasetName": "landsat_ot_c2_l2",
                                                      "maxResults": bad}, key)
            assert env["errorCode"] == "INPUT_PARAMETER_INVALID"


# ---------------------------------------------------------------- download-options

async def test_download_options() -> None:
    a, b = scene(0), scene(1, available=False)
    c, d = scene(2, dataset="landsat_ot_c2_l1"), scene(3, dataset="Other_Dataset")
    async with running(a, b, c, d) as emu:
        key = await login(emu)
        opts = await ok(emu, "download-options", {"datasetName": "landsat_ot_c2_l2",
                                                  "entityIds": [a.entity_id, b.entity_id,
                                                                "nope", c.entity_id]}, key)
        bundle, folder, other, _ = opts
        assert bundle == {"id": BUNDLE_L2, "displayId": a.display_id, "entityId": a.entity_id,
                          "datasetId": "5e83d14f2fc39685", "available": True,
                          "filesize": len(a.data),
                          "productName": "Landsat Collection 2 Level-2 Product Bundle",
                          "productCode": "D697", "bulkAvailable": True, "downloadSystem": "dds",
                          "secondaryDownloads": []}
        assert folder["productName"] == "Landsat Collection 2 Level-2 Band File"
        assert folder["downloadSystem"] == "folder" and folder["filesize"] == 0
        bands = folder["secondaryDownloads"]
        assert [s["entityId"] for s in bands] == [
            f"L2SR_{a.display_id}_SR_B4_TIF", f"L2SR_{a.display_id}_SR_B5_TIF",
            f"L2ST_{a.display_id}_ST_B10_TIF"]
        assert bands[2]["displayId"] == f"{a.display_id}_ST_B10.TIF"
        assert other["entityId"] == b.entity_id and other["available"] is False
        one = await ok(emu, "download-options", {"datasetName": "landsat_ot_c2_l2",
                                                 "entityIds": f"{a.entity_id},{b.entity_id}"},
                       key)  # a comma-separated string works too
        assert len(one) == 4
        g = await ok(emu, "download-options", {"datasetName": "other_dataset",
                                               "entityIds": [d.entity_id]}, key)
        assert [(o["productName"], o["downloadSystem"]) for o in g] == [
            ("Standard Download", "dds")]  # another dataset: one bundle, no band files
        l1 = await ok(emu, "download-options", {"datasetName": "landsat_ot_c2_l1",
                                                "entityIds": [c.entity_id]}, key)
        assert l1[0]["productName"] == "Landsat Collection 2 Level-1 Product Bundle"
        assert l1[1]["secondaryDownloads"][0]["entityId"] == f"L1_{c.display_id}_B4_TIF"
        assert await ok(emu, "download-options", {"datasetName": "landsat_ot_c2_l2",
                                                  "entityIds": ["nope"]}, key) is None


# ---------------------------------------------------------------- download-request and retrieve

async def test_download_request_available_now() -> None:
    a = scene(0)
    async with running(a) as emu:
        key = await login(emu)
        body = {"downloads": [{"entityId": a.entity_id, "productId": BUNDLE_L2}],
                "label": "run-1"}
        status, env = await call(emu, "download-request", body, key)
        data = env["data"]
        assert status == 200 and env["errorCode"] is None
        (avail,) = data["availableDownloads"]
        assert data["preparingDownloads"] == [] and data["failed"] == []
        assert data["newRecords"] == {str(avail["downloadId"]): "run-1"}
        assert data["duplicateProducts"] == [] and data["numInvalidScenes"] == 0
        assert avail["eulaCode"] is None and avail["entityId"] == a.entity_id
        assert avail["url"].startswith(f"http://127.0.0.1:{emu.port}/download/")
        token = avail["url"].rsplit("/download/", 1)[1]
        assert set(json.loads(base64.b64decode(token))) == {"id", "contactId"}
        user, ip = data["remainingLimits"]
        assert user["username"] == "alice" and user["recentDownloadCount"] == 14999
        assert ip["limitType"] == "ip" and ip["unattemptedDownloadCount"] == 19999
        assert emu.download_requests[0]["label"] == "run-1"
        # asked again while not complete: a duplicate, same downloadId, a fresh URL
        again = await ok(emu, "download-request", body, key)
        assert again["newRecords"] == [] and again["duplicateProducts"] == data["newRecords"]
        (dup,) = again["availableDownloads"]
        assert dup["downloadId"] == avail["downloadId"] and dup["url"] != avail["url"]
        status, headers, got = await fetch(avail["url"])  # no auth header needed
        assert status == 200 and got == a.data
        assert headers["Content-Disposition"] == f'attachment; filename="{a.display_id}.tar"'


async def test_download_request_preparing_then_retrieved() -> None:
    a, b = scene(0, prepare_time=0.8), scene(1)
    async with running(a, b) as emu:
        key = await login(emu)
        data = await ok(emu, "download-request", {"downloads": [
            {"entityId": a.entity_id, "productId": BUNDLE_L2},
            {"entityId": b.entity_id, "productId": BUNDLE_L2}]}, key)
        (prep,), (avail,) = data["preparingDownloads"], data["availableDownloads"]
        assert prep["entityId"] == a.entity_id and "/download-staging/" in prep["url"]
        labels = set(data["newRecords"].values())
        (label,) = labels  # no label given: one default for the request
        assert re.fullmatch(r"m2m_\d+_\d{14}", label)
        status, headers, _ = await fetch(prep["url"])
        assert status == 503 and headers["Retry-After"] == "30"
        got = await ok(emu, "download-retrieve", {"label": label}, key)
        assert [r["entityId"] for r in got["requested"]] == [a.entity_id]
        assert [r["entityId"] for r in got["available"]] == [b.entity_id]
        assert got["queueSize"] == 1 and got["eulas"] == []
        rec = got["available"][0]
        assert (rec["statusCode"], rec["statusText"], rec["label"]) == ("A", "Available", label)
        assert rec["collectionName"] == "Landsat 8-9 OLI/TIRS C2 L2"
        assert rec["downloadId"] == avail["downloadId"] and rec["filesize"] == len(b.data)
        await asyncio.sleep(0.9)
        got = await ok(emu, "download-retrieve", {"label": label}, key)
        assert got["requested"] == [] and got["queueSize"] == 0
        assert {r["entityId"] for r in got["available"]} == {a.entity_id, b.entity_id}
        url = next(r["url"] for r in got["available"] if r["entityId"] == a.entity_id)
        assert (await fetch(url))[2] == a.data
        assert (await fetch(prep["url"]))[2] == a.data  # the staging URL works once ready
        # completed downloads are no longer listed; other labels and users see nothing
        got = await ok(emu, "download-retrieve", {"label": label}, key)
        assert [r["entityId"] for r in got["available"]] == [b.entity_id]
        assert (await ok(emu, "download-retrieve", {"label": "other"}, key))["available"] == []
        other = await login(emu, "bob")
        assert (await ok(emu, "download-retrieve", {}, other))["available"] == []
        # a completed product asked for again is a new record
        data = await ok(emu, "download-request", {"downloads": [
            {"entityId": a.entity_id, "productId": BUNDLE_L2}], "label": "again"}, key)
        assert list(data["newRecords"].values()) == ["again"]


async def test_download_request_failures_and_limits() -> None:
    a, b = scene(0), scene(1, available=False)
    async with running(a, b, rate_limits=(2, 20000, 20000)) as emu:
        key = await login(emu)
        data = await ok(emu, "download-request", {"downloads": [
            {"entityId": a.entity_id, "productId": "0000000000000000"},
            {"entityId": b.entity_id, "productId": BUNDLE_L2},
            {"entityId": "nope", "productId": BUNDLE_L2}], "label": "x"}, key)
        assert data["numInvalidScenes"] == 3 and len(data["failed"]) == 3
        assert data["newRecords"] == [] and data["availableDownloads"] == []
        _, env = await call(emu, "download-request", {"downloads": [], "label": "x" * 51}, key)
        assert env["errorCode"] == "INPUT_PARAMETER_INVALID"
        _, env = await call(emu, "download-request", {"downloads": "x"}, key)
        assert env["errorCode"] == "INPUT_PARAMETER_INVALID"
        opts = await ok(emu, "download-options", {"datasetName": "landsat_ot_c2_l2",
                                                  "entityIds": [a.entity_id]}, key)
        b4, b5, _ = ({"entityId": s["entityId"], "productId": s["id"]}
                     for s in opts[1]["secondaryDownloads"])
        bundle = {"entityId": a.entity_id, "productId": BUNDLE_L2}
        for downloads, left in [([bundle], 1), ([bundle], 1), ([b4], 0)]:  # a duplicate: free
            data = await ok(emu, "download-request", {"downloads": downloads}, key)
            assert data["remainingLimits"][0]["recentDownloadCount"] == left
        _, env = await call(emu, "download-request", {"downloads": [b5]}, key)
        assert env["errorCode"] == "RATE_LIMIT_USER_DL"
        assert len(emu.download_requests) == 5  # the one refused for its limits too


async def test_pending_and_unattempted_limits() -> None:
    a, b = scene(0, prepare_time=0.6), scene(1)
    async with running(a, b, rate_limits=(100, 1, 1)) as emu:
        key = await login(emu)
        one = {"downloads": [{"entityId": a.entity_id, "productId": BUNDLE_L2}]}
        two = {"downloads": [{"entityId": b.entity_id, "productId": BUNDLE_L2}]}
        await ok(emu, "download-request", one, key)
        _, env = await call(emu, "download-request", two, key)  # one pending
        assert env["errorCode"] == "RATE_LIMIT_USER_DL"
        await asyncio.sleep(0.7)
        _, env = await call(emu, "download-request", two, key)  # one available, not attempted
        assert env["errorCode"] == "RATE_LIMIT_USER_DL"
        (rec,) = (await ok(emu, "download-retrieve", {}, key))["available"]
        async with aiohttp.ClientSession() as http, http.get(rec["url"]) as r:
            assert r.status == 200  # attempted, even if not read to the end
        data = await ok(emu, "download-request", two, key)
        assert len(data["availableDownloads"]) == 1


async def test_band_files_are_downloadable() -> None:
    a = scene(0)
    async with running(a) as emu:
        key = await login(emu)
        opts = await ok(emu, "download-options", {"datasetName": "landsat_ot_c2_l2",
                                                  "entityIds": [a.entity_id]}, key)
        band = opts[1]["secondaryDownloads"][2]
        data = await ok(emu, "download-request", {"downloads": [
            {"entityId": band["entityId"], "productId": band["id"]}], "label": "bands"}, key)
        status, headers, got = await fetch(data["availableDownloads"][0]["url"])
        assert status == 200 and len(got) == band["filesize"]
        assert f'filename="{a.display_id}_ST_B10.TIF"' in headers["Content-Disposition"]


# ---------------------------------------------------------------- the file host

async def available_url(emu: M2MEmulator, s: M2MScene, key: str) -> str:
    data = await ok(emu, "download-request", {"downloads": [
        {"entityId": s.entity_id, "productId": BUNDLE_L2}], "label": "f"}, key)
    url: str = data["availableDownloads"][0]["url"]
    return url


async def test_ranges_and_hostile_names() -> None:
    a = scene(0, data=bytes(range(256)) * 40, filename='../../evil".tar')
    async with running(a) as emu:
        url = await available_url(emu, a, await login(emu))
        status, headers, body = await fetch(url, {"Range": "bytes=1000-"})
        assert status == 206 and body == a.data[1000:]
        assert headers["Content-Range"] == f"bytes 1000-{len(a.data) - 1}/{len(a.data)}"
        assert headers["Content-Disposition"] == 'attachment; filename="../../evil_.tar"'
        status, _, body = await fetch(url, {"Range": "bytes=10-19"})
        assert status == 206 and body == a.data[10:20]
        status, headers, _ = await fetch(url, {"Range": f"bytes={len(a.data)}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(a.data)}"
        etag = headers.get("ETag") or (await fetch(url))[1]["ETag"]
        status, _, body = await fetch(url, {"Range": "bytes=5-", "If-Range": etag})
        assert status == 206 and body == a.data[5:]
        status, _, body = await fetch(url, {"Range": "bytes=5-", "If-Range": '"other"'})
        assert status == 200 and body == a.data  # changed: the whole file
        assert [g["range"] for g in emu.file_gets][:2] == ["bytes=1000-", "bytes=10-19"]
        assert {g["entity_id"] for g in emu.file_gets} == {a.entity_id}
        assert [g["status"] for g in emu.file_gets] == [206, 206, 416, 200, 206, 200]


async def test_urls_expire_and_unknown_ones() -> None:
    a = scene(0)
    async with running(a, url_lifetime=0.6) as emu:
        key = await login(emu)
        url = await available_url(emu, a, key)
        await asyncio.sleep(0.7)
        status, _, body = await fetch(url)
        assert status == 403 and b"expired" in body
        fresh = await available_url(emu, a, key)  # asked again (a duplicate): a new URL
        assert fresh != url and (await fetch(fresh))[0] == 200
        url = await available_url(emu, a, key)
        emu.expire_urls()
        assert (await fetch(url))[0] == 403
        assert (await fetch(f"http://127.0.0.1:{emu.port}/download/bm9wZQ=="))[0] == 404
        assert (await fetch(url.replace("/download/", "/download-staging/")))[0] == 404


async def test_drops_rate_and_peak() -> None:
    a = scene(0, data=bytes(range(256)) * 800, rate=400_000.0, drop_after=[50_000])
    async with running(a) as emu:
        url = await available_url(emu, a, await login(emu))
        got = bytearray()
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(url) as r:
                    assert r.status == 200
                    async for block in r.content.iter_any():
                        got += block
        assert bytes(got) == a.data[:50_000]
        retrieve = await ok(emu, "download-retrieve", {"label": "f"}, await login(emu))
        assert len(retrieve["available"]) == 1  # a cut transfer does not complete it
        began = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(fetch(url, {"Range": f"bytes={len(got)}-"})
                                         for _ in range(3)))
        assert all(r[0] == 206 and r[2] == a.data[50_000:] for r in results)
        assert asyncio.get_running_loop().time() - began > 0.3  # 154 kB at 400 kB/s
        assert emu.peak_file_gets == 3 and emu.active_file_gets == 0
        retrieve = await ok(emu, "download-retrieve", {"label": "f"}, await login(emu))
        assert retrieve["available"] == []  # served to the end: complete
