"""`NOTIFY asyncsat_done`: one JSON payload per product that ends done, and the README's
listener example receives it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from asyncsat.config import Settings
from asyncsat.db.pool import connect
from tests.helpers import add_provider, drain, queue, rows, sql
from tests.servers import FileServer

README = Path(__file__).parents[2] / "README.md"


async def test_done_downloads_notify_with_their_facts(server: FileServer, dsn: str,
                                                      settings: Settings) -> None:
    data = os.urandom(20_000)
    product = server.add("S2A_ready.zip.bin", data)
    server.add("other.bin", os.urandom(100))
    received: list[dict[str, Any]] = []
    conn = await connect(dsn)
    try:
        await conn.add_listener("asyncsat_done",
                                lambda *args: received.append(json.loads(args[-1])))
        first = await queue(dsn, server.url("S2A_ready.zip.bin"),
                            checksum=f"md5:{product.digest()}")
        second = await queue(dsn, server.url("S2A_ready.zip.bin"), server.url("gone.bin"))
        await drain(settings)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # anything more would have come by now
    finally:
        await conn.close()
    done = {r["url"].rsplit("/", 1)[-1]: r for r in await rows(dsn)}
    assert done["gone.bin"]["status"] == "failed"
    ready = done["S2A_ready.zip.bin"]
    provider = f"127.0.0.1_{server.port}"
    path = settings.default_dest / provider / "S2A_ready.zip.bin"
    assert received == [{
        "download_id": ready["id"], "request_id": first, "request_ids": [first, second],
        "provider": provider, "name": "S2A_ready.zip.bin", "path": str(path),
        "size": len(data), "checksum": f"md5:{product.digest()}",
    }]
    assert path.read_bytes() == data

    # a row already done does not announce itself again when touched
    conn = await connect(dsn)
    try:
        await conn.add_listener("asyncsat_done",
                                lambda *args: received.append(json.loads(args[-1])))
        await conn.execute("UPDATE download SET status = 'done' WHERE status = 'done'")
        await asyncio.sleep(0.3)
    finally:
        await conn.close()
    assert len(received) == 1


def _readme_listener() -> str:
    text = README.read_text()
    start = text.index("In Python (asyncpg)")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert code is not None
    return code.group(1)


async def test_the_readme_listener_receives_done_products(server: FileServer, dsn: str,
                                                         settings: Settings) -> None:
    data = os.urandom(5000)
    server.add("for_the_app.nc", data)
    listener = subprocess.Popen([sys.executable, "-c", _readme_listener()],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "ASYNCSAT_DSN": dsn})
    try:
        deadline = time.monotonic() + 20
        while not (await sql(dsn, "SELECT 1 FROM pg_stat_activity"
                             " WHERE query LIKE 'LISTEN %asyncsat_done%'")):
            assert listener.poll() is None, listener.communicate()
            assert time.monotonic() < deadline, "the example never listened"
            await asyncio.sleep(0.05)
        await queue(dsn, server.url("for_the_app.nc"))
        await drain(settings)
        assert listener.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(listener.stdout.readline), 10)
    finally:
        listener.kill()
        listener.communicate()
    [row] = await rows(dsn)
    path = settings.default_dest / f"127.0.0.1_{server.port}" / "for_the_app.nc"
    assert line.split() == [str(row["id"]), str(path), str(len(data))]


async def test_a_product_that_many_requests_asked_for_is_done_and_announced(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """1,500 requests ask for one product: all their ids would not fit a NOTIFY payload
    (8000 bytes), and the row could never be recorded done. The payload names the first
    200 and says the list is cut; the product is done."""
    data = os.urandom(10_000)
    server.add("popular.nc", data)
    await add_provider(dsn, "hub", server.base)
    # the requests and their one download, as 1,500 resolved requests leave them
    [made] = await sql(
        dsn, "WITH r AS (INSERT INTO request (urls, status) SELECT ARRAY[$1], 'resolved'"
             "  FROM generate_series(1, 1500) RETURNING id),"
             " d AS (INSERT INTO download (request_id, provider_id, url)"
             "  SELECT min(r.id), (SELECT id FROM provider), $1 FROM r RETURNING id),"
             " l AS (INSERT INTO request_download (request_id, download_id)"
             "  SELECT r.id, d.id FROM r, d)"
             " SELECT min(r.id) AS first FROM r", server.url("popular.nc"))
    first = made["first"]
    received: list[dict[str, Any]] = []
    conn = await connect(dsn)
    try:
        await conn.add_listener("asyncsat_done",
                                lambda *args: received.append(json.loads(args[-1])))
        await drain(settings)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert Path(row["path"]).read_bytes() == data
    [payload] = received
    assert payload["download_id"] == row["id"] and payload["request_id"] == first
    assert len(payload["request_ids"]) == 200 and payload["request_ids"][0] == first
    assert payload["request_ids_truncated"] is True
