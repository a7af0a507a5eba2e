"""Catalog searches through the command line and the daemon as processes."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.cdse import CdseEmulator
from tests.conftest import DaemonProcess, cli
from tests.helpers import sql
from tests.integration.test_cdse import PASSWORD, USER, s2

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def emu() -> Any:
    server = await CdseEmulator(users={USER: PASSWORD}).start()
    yield server
    await server.stop()


async def run(*args: str, dsn: str, home: Path, **kw: Any) -> Any:
    return await asyncio.to_thread(cli, *args, dsn=dsn, home=home, **kw)


async def add_cdse(emu: CdseEmulator, dsn: str, home: Path, *extra: str) -> None:
    added = await run("provider", "add", "cdse", "--preset", "cdse", "--url", emu.catalogue_url,
                      "--set", f"token_url={emu.token_url}",
                      "--set", f"download_url={emu.download_url}",
                      "--set", "backoff_initial=0.05", "--set", "backoff_max=0.3", *extra,
                      dsn=dsn, home=home)
    assert added.returncode == 0, added.stderr
    cred = await run("credential", "add", "cdse", "--user", USER, "--password-stdin",
                     "--max-connections", "4", dsn=dsn, home=home, input=PASSWORD + "\n")
    assert cred.returncode == 0, cred.stderr


async def test_presets_fill_protocol_url_and_settings(dsn: str, tmp_path: Path) -> None:
    for name in ("cdse", "cdse-stac", "earth-search", "usgs"):
        done = await run("provider", "add", name, "--preset", name, dsn=dsn, home=tmp_path)
        assert done.returncode == 0, done.stderr
    given = await run("provider", "add", "mine", "--preset", "cdse", "--url",
                      "https://example.org/odata/v1/", "--set", "page_size=20",
                      dsn=dsn, home=tmp_path)
    assert given.returncode == 0, given.stderr
    listed = {p["name"]: p for p in json.loads(
        (await run("provider", "list", "--json", dsn=dsn, home=tmp_path)).stdout)}
    assert listed["cdse"]["protocol"] == "odata"
    assert listed["cdse"]["url"] == "https://catalogue.dataspace.copernicus.eu/odata/v1/"
    assert "identity.dataspace.copernicus.eu" in listed["cdse"]["settings"]["token_url"]
    assert listed["earth-search"]["protocol"] == "stac"
    assert listed["usgs"]["protocol"] == "m2m"
    # options given as well win
    assert listed["mine"]["url"] == "https://example.org/odata/v1/"
    assert listed["mine"]["settings"]["page_size"] == 20
    assert listed["mine"]["settings"]["token_url"] == listed["cdse"]["settings"]["token_url"]


@pytest.mark.parametrize("args, words", [
    (["--wkt", "NOT A SHAPE"], "invalid --wkt"),
    (["--filter", "cloudCover<=cloudy"], "compares numbers"),
    (["--filter", "cloudCover"], "invalid filter"),
    (["--filter", "cloudCover<=nan"], "compares numbers"),
    (["--start", "yesterday"], "invalid start time"),
    (["--bbox", "1,2,3"], "invalid bbox"),
])
async def test_bad_searches_exit_2_with_one_line_and_write_nothing(
        dsn: str, tmp_path: Path, args: list[str], words: str) -> None:
    added = await run("provider", "add", "cdse", "--preset", "cdse", dsn=dsn, home=tmp_path)
    assert added.returncode == 0
    done = await run("search", "cdse", "--collection", "SENTINEL-2", *args,
                     dsn=dsn, home=tmp_path)
    assert done.returncode == 2 and words in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout
    assert await sql(dsn, "SELECT * FROM request") == []


async def test_search_wait_downloads_and_reports_the_request(
        dsn: str, tmp_path: Path, emu: CdseEmulator) -> None:
    for n in range(3):
        emu.add(s2(n))
    emu.add(s2(7, attributes={"productType": "S2MSI2A", "cloudCover": 1.0}))
    await add_cdse(emu, dsn, tmp_path)
    dest = tmp_path / "dest"
    done = await run("search", "cdse", "--collection", "SENTINEL-2", "--filter",
                     "productType=S2MSI1C", "--filter", "cloudCover<=20", "--bbox",
                     "8.1,43.1,8.9,43.9", "--dest", str(dest), "--wait", dsn=dsn, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((dest / "cdse").glob("*.zip"))) == 3
    assert done.stdout.count("done ") == 3
    [req] = json.loads((await run("status", "--requests", "--json",
                                  dsn=dsn, home=tmp_path)).stdout)
    assert {k: req[k] for k in ("status", "products", "done", "failed", "error")} == \
        {"status": "done", "products": 3, "done": 3, "failed": 0, "error": None}
    text = (await run("status", "--requests", dsn=dsn, home=tmp_path)).stdout
    assert "SENTINEL-2" in text and " done " in text
    assert PASSWORD not in text + done.stdout + done.stderr


async def test_search_wait_exits_1_when_a_product_fails(
        dsn: str, tmp_path: Path, emu: CdseEmulator) -> None:
    emu.add(s2(1))
    emu.add(s2(2, checksums=[("MD5", "f" * 32)]))
    await add_cdse(emu, dsn, tmp_path)
    done = await run("search", "cdse", "--collection", "SENTINEL-2", "--wait",
                     dsn=dsn, home=tmp_path)
    assert done.returncode == 1
    assert "md5 mismatch" in done.stdout
    [req] = json.loads((await run("status", "--requests", "--json",
                                  dsn=dsn, home=tmp_path)).stdout)
    assert req["status"] == "failed" and "1 product(s) failed" in req["error"]


async def test_a_standing_request_survives_a_daemon_kill_and_queues_nothing_twice(
        dsn: str, tmp_path: Path, emu: CdseEmulator, daemons: list[DaemonProcess]) -> None:
    now = datetime.now(UTC)
    emu.add(s2(1, published=now - timedelta(hours=1)))
    await add_cdse(emu, dsn, tmp_path, "--set", "follow_interval=1")
    queued = await run("search", "cdse", "--collection", "SENTINEL-2", "--follow",
                       dsn=dsn, home=tmp_path)
    assert queued.returncode == 0 and "standing search" in queued.stderr
    first = DaemonProcess(dsn, tmp_path)
    daemons.append(first)
    await first.wait_for(lambda line: line["event"] == "download done")
    await first.wait_for(lambda line: line["event"] == "request followed")
    first.signal(signal.SIGKILL)
    first.wait()

    emu.add(s2(2, published=datetime.now(UTC)))
    second = DaemonProcess(dsn, tmp_path)
    daemons.append(second)
    await second.wait_for(lambda line: line["event"] == "download done", timeout=30)
    [req] = json.loads((await run("status", "--requests", "--json",
                                  dsn=dsn, home=tmp_path)).stdout)
    assert (req["status"], req["products"], req["done"]) == ("following", 2, 2)
    assert len([r for r in emu.requests if r["path"].endswith("/$value")]) == 2

    cancelled = await run("cancel", "--request", str(req["id"]), dsn=dsn, home=tmp_path)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    await asyncio.sleep(1.5)  # past follow_interval: no run happens any more
    searches = len([r for r in emu.requests if r["path"] == "/odata/v1/Products"])
    await asyncio.sleep(1.5)
    assert len([r for r in emu.requests if r["path"] == "/odata/v1/Products"]) == searches
    [req] = json.loads((await run("status", "--requests", "--json",
                                  dsn=dsn, home=tmp_path)).stdout)
    assert req["status"] == "cancelled"
