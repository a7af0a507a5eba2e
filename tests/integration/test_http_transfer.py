"""The daemon against a real loopback HTTP server that injects faults."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.logs import Redactor
from tests.helpers import add_provider, drain, queue, resident, rows, sql
from tests.servers import FileServer


def _final(settings: Settings, provider: str, name: str) -> Path:
    assert settings.dest is not None
    return settings.dest / provider / name


def _parts(settings: Settings) -> list[Path]:
    assert settings.dest is not None
    return list(settings.dest.rglob("*.part"))


def _provider(server: FileServer) -> str:
    return "local"


@pytest.fixture(autouse=True)
async def fast_provider(server: FileServer, dsn: str) -> None:
    """The loopback server as a provider with short backoffs, so that retries are quick."""
    await add_provider(dsn, "local", server.base, {"backoff_initial": 0.05, "backoff_max": 0.5})


def _gets(server: FileServer, name: str) -> list[dict[str, object]]:
    return [r for r in server.requests if r["path"] == f"/files/{name}"]


async def test_resume_after_dropped_connection(server: FileServer, dsn: str,
                                               settings: Settings) -> None:
    data = os.urandom(2_000_000)
    server.add("a.nc", data, drop_after=[700_000, 1_500_000 - 700_000])
    await queue(dsn, server.url("a.nc"))
    await drain(settings)

    final = _final(settings, _provider(server), "a.nc")
    assert final.read_bytes() == data
    gets = _gets(server, "a.nc")
    assert [g["range"] for g in gets] == [None, "bytes=700000-", "bytes=1500000-"]
    assert all(g["if_range"] == server.products["a.nc"].etag for g in gets[1:])
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["bytes_done"] == len(data)
    assert row["attempts"] == 3
    assert not _parts(settings)


@pytest.mark.parametrize("keep", [False, True])
async def test_a_downloaded_file_leaves_the_page_cache_unless_kept(
        server: FileServer, dsn: str, settings: Settings, disk_dir: Path, keep: bool) -> None:
    data = os.urandom(3_000_000)
    server.add("cached.bin", data)
    await queue(dsn, server.url("cached.bin"))
    settings = replace(settings, dest=disk_dir / "dest", keep_page_cache=keep)
    await drain(settings)

    final = _final(settings, _provider(server), "cached.bin")
    if keep:
        assert resident(final) > len(data) // 2  # (all of it, unless memory ran short)
    else:
        assert resident(final) == 0
    assert final.read_bytes() == data


async def test_server_ignoring_range_restarts_from_zero(server: FileServer, dsn: str,
                                                        settings: Settings) -> None:
    data = os.urandom(1_000_000)
    server.add("b.zip.bin", data, drop_after=[400_000], ignore_range=True)
    await queue(dsn, server.url("b.zip.bin"))
    with structlog.testing.capture_logs() as logs:
        await drain(settings)

    assert _final(settings, _provider(server), "b.zip.bin").read_bytes() == data
    gets = _gets(server, "b.zip.bin")
    assert gets[1]["range"] == "bytes=400000-"  # asked to resume, got a 200: not appended
    assert server.bytes_sent == 400_000 + len(data)
    # said when it happens, not only by the `done` line's `restarted`
    [restart] = [e for e in logs if e["event"] == "download restarted from zero"]
    assert restart["kept"] == 400_000 and restart["log_level"] == "warning"


async def test_changed_etag_restarts_with_the_new_file(server: FileServer, dsn: str,
                                                      settings: Settings) -> None:
    old, new = os.urandom(900_000), os.urandom(800_000)
    product = server.add("c.dat", old, drop_after=[300_000])
    await queue(dsn, server.url("c.dat"))

    # after the drop, the provider publishes a new version of the file
    class Swap:
        def __init__(self) -> None:
            self.done = False

    swap = Swap()
    original = server._send

    async def send(request, p):  # type: ignore[no-untyped-def]
        if p is product and product.drop_after == [] and not swap.done and \
                request.headers.get("Range"):
            product.data, product.etag, swap.done = new, '"v2"', True
        return await original(request, p)

    server._send = send  # type: ignore[method-assign]
    await drain(settings)

    assert _final(settings, _provider(server), "c.dat").read_bytes() == new
    gets = _gets(server, "c.dat")
    assert gets[1]["if_range"] is not None and gets[1]["if_range"] != '"v2"'


async def test_a_catalog_named_product_that_changed_before_its_first_progress_write_restarts(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """A row that has its name before the transfer (a catalog's product) and whose first
    attempt is cut before any progress write: the server's validators were recorded before
    the first byte, so the resume sends If-Range and a new version at the source replaces
    the kept bytes instead of being spliced onto them (a review found the splice when the
    validators were deferred to the first progress write)."""
    old = b"A" + os.urandom(599_999)
    new = b"B" + old[1:]  # the first byte only: the overlap check before a resume misses it
    product = server.add("named.zip", old, drop_after=[300_000])
    await sql(dsn, "INSERT INTO download (provider_id, url, name) SELECT id, $1, 'named.zip'"
                   " FROM provider WHERE name = 'local'", server.url("named.zip"))
    original = server._send

    async def send(request, p):  # type: ignore[no-untyped-def]
        if p is product and product.drop_after == [] and request.headers.get("Range"):
            product.data, product.etag = new, '"v2"'  # published between the two attempts
        return await original(request, p)

    server._send = send  # type: ignore[method-assign]
    await drain(replace(settings, progress_interval=30.0))  # no progress write in attempt 1

    assert _final(settings, _provider(server), "named.zip").read_bytes() == new
    gets = _gets(server, "named.zip")
    assert gets[1]["range"] is not None  # a resume was asked...
    assert gets[1]["if_range"] not in (None, '"v2"')  # ...only if the old version is there


async def test_429_waits_for_retry_after(server: FileServer, dsn: str,
                                         settings: Settings) -> None:
    data = os.urandom(100_000)
    server.add("d.tif", b"II*\x00" + data, statuses=[(429, {"Retry-After": "2"}, b"busy")])
    await queue(dsn, server.url("d.tif"))
    await drain(settings)

    gets = _gets(server, "d.tif")
    assert len(gets) == 2
    assert float(gets[1]["t"]) - float(gets[0]["t"]) >= 1.9  # type: ignore[arg-type]
    [row] = await rows(dsn)
    assert row["status"] == "done"


async def test_5xx_then_success_is_retried(server: FileServer, dsn: str,
                                           settings: Settings) -> None:
    data = os.urandom(50_000)
    server.add("e.bin", data, statuses=[(503, {}, b""), (502, {}, b"")])
    await queue(dsn, server.url("e.bin"))
    await drain(replace(settings))
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 3


async def test_checksum_mismatch_fails_after_one_retry(server: FileServer, dsn: str,
                                                       settings: Settings) -> None:
    server.add("f.nc", os.urandom(200_000))
    await queue(dsn, server.url("f.nc"), checksum="md5:" + "0" * 32)
    await drain(settings)

    [row] = await rows(dsn)
    assert row["status"] == "failed"
    assert "md5 mismatch" in row["error"]
    assert row["attempts"] == 2
    assert not _final(settings, _provider(server), "f.nc").exists()
    assert not _parts(settings)


async def test_checksum_match_is_done(server: FileServer, dsn: str, settings: Settings) -> None:
    data = os.urandom(300_000)
    server.add("g.nc", data, drop_after=[100_000])
    digest = hashlib.sha256(data).hexdigest()
    await queue(dsn, server.url("g.nc"), checksum=f"sha256:{digest}")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done"  # the hash covered the bytes kept from the first attempt


async def test_404_fails_at_once(server: FileServer, dsn: str, settings: Settings) -> None:
    await queue(dsn, server.url("missing.zip"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and row["attempts"] == 1
    assert "404" in row["error"]


async def test_html_error_page_is_never_done(server: FileServer, dsn: str,
                                             settings: Settings) -> None:
    page = b"<!DOCTYPE html><html><body>Service unavailable, try later</body></html>"
    server.add("S1A_IW_GRDH.zip", page)
    await queue(dsn, server.url("S1A_IW_GRDH.zip"))
    await drain(replace(settings))
    [row] = await rows(dsn)
    assert row["status"] == "failed"
    assert "HTML" in row["error"]
    assert not _final(settings, _provider(server), "S1A_IW_GRDH.zip").exists()


async def test_truncated_zip_is_never_done(server: FileServer, dsn: str,
                                           settings: Settings) -> None:
    server.add("S2B.zip", b"PK\x03\x04" + os.urandom(5000))
    await queue(dsn, server.url("S2B.zip"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "zip" in row["error"]


async def test_content_disposition_names_the_file(server: FileServer, dsn: str,
                                                  settings: Settings) -> None:
    data = os.urandom(10_000)
    server.add("Products('abc')/$value", data,
               content_disposition='attachment; filename="../../S3A_OL_1.SEN3.zip.bin"')
    await queue(dsn, server.url("Products('abc')/$value"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["name"] == "S3A_OL_1.SEN3.zip.bin"
    assert row["path"] == str(_final(settings, _provider(server), "S3A_OL_1.SEN3.zip.bin"))
    assert Path(row["path"]).read_bytes() == data


async def test_credential_caps_are_never_exceeded(dsn: str, settings: Settings) -> None:
    server = await FileServer(users={"alice": "pw-a", "bob": "pw-b"}).start()
    try:
        await add_provider(dsn, "hub", server.base,
                           credentials=[("alice", "pw-a", 2), ("bob", "pw-b", 1)])
        names = [f"p{i}.bin" for i in range(9)]
        for n in names:
            server.add(n, os.urandom(400_000), rate=1_000_000)
        await queue(dsn, *(server.url(n) for n in names))
        await drain(settings)
    finally:
        await server.stop()
    assert all(r["status"] == "done" for r in await rows(dsn))
    assert server.peak["alice"] == 2 and server.peak["bob"] == 1  # every slot used, none over
    assert server.over_limit == 0
    assert all(r["user"] in ("alice", "bob") for r in server.requests)


async def test_complete_part_file_is_verified_not_refetched(server: FileServer, dsn: str,
                                                            settings: Settings) -> None:
    data = os.urandom(64_000)
    server.add("h.bin", data)
    await queue(dsn, server.url("h.bin"))
    await drain(settings)
    final = _final(settings, _provider(server), "h.bin")
    # simulate a crash after the rename but before the row was marked done
    final.rename(final.with_name("h.bin.part"))
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute("UPDATE download SET status = 'queued'")
    await conn.close()
    await drain(settings)
    assert final.read_bytes() == data
    assert _gets(server, "h.bin")[-1]["range"] == f"bytes={len(data)}-"


async def test_credential_change_resizes_slots_without_restart(dsn: str,
                                                               settings: Settings) -> None:
    import asyncpg

    server = await FileServer(users={"carol": "pw-c"}).start()
    try:
        await add_provider(dsn, "hub", server.base, credentials=[("carol", "pw-c", 1)])
        names = [f"q{i}.bin" for i in range(8)]
        for n in names:
            server.add(n, os.urandom(300_000), rate=600_000)
        await queue(dsn, *(server.url(n) for n in names))
        serving = asyncio.create_task(
            daemon.serve(settings, Redactor(), exit_when_idle=True))
        await asyncio.sleep(0.8)
        assert server.peak["carol"] == 1
        conn = await asyncpg.connect(dsn)
        await conn.execute("UPDATE credential SET max_connections = 3")
        await conn.close()
        await asyncio.wait_for(serving, 30)
    finally:
        await server.stop()
    assert server.peak["carol"] == 3 and server.over_limit == 0
    assert all(r["status"] == "done" for r in await rows(dsn))


async def test_a_lowered_cap_holds_as_soon_as_running_transfers_end(
        dsn: str, settings: Settings) -> None:
    """A slot is handed over to the next file only within the account's cap: lowered with
    SQL, the cap holds from the end of the transfers that were running."""
    server = await FileServer(users={"dave": "pw-d"}).start()
    try:
        await add_provider(dsn, "hub", server.base, credentials=[("dave", "pw-d", 3)])
        names = [f"r{i}.bin" for i in range(9)]
        for n in names:
            server.add(n, os.urandom(200_000), rate=500_000)
        await queue(dsn, *(server.url(n) for n in names))
        serving = asyncio.create_task(
            daemon.serve(settings, Redactor(), exit_when_idle=True))
        for _ in range(100):
            if server.active["dave"] == 3:
                break
            await asyncio.sleep(0.02)
        assert server.active["dave"] == 3
        await sql(dsn, "UPDATE credential SET max_connections = 1")
        lowered = len(server.requests)
        await asyncio.sleep(0.6)  # the three running transfers end (0.4 s each)
        seen = []
        while not serving.done():
            seen.append(server.active["dave"])
            await asyncio.sleep(0.01)
        await serving
    finally:
        await server.stop()
    assert len(server.requests) > lowered + 2  # files were fetched after the change...
    assert max(seen) == 1  # ...one at a time
    assert all(r["status"] == "done" for r in await rows(dsn))


async def test_two_products_with_the_same_name_never_share_a_file(
        server: FileServer, dsn: str, settings: Settings) -> None:
    a, b = os.urandom(200_000), os.urandom(150_000)
    server.add("scene1/TCI.tif", b"II*\x00" + a, rate=400_000)
    server.add("scene2/TCI.tif", b"II*\x00" + b, rate=400_000)
    await queue(dsn, server.url("scene1/TCI.tif"), server.url("scene2/TCI.tif"))
    await drain(settings)
    done = {r["url"].split("/")[-2]: r for r in await rows(dsn)}
    assert {r["status"] for r in done.values()} == {"done"}
    assert done["scene1"]["path"] != done["scene2"]["path"]
    assert Path(done["scene1"]["path"]).read_bytes() == b"II*\x00" + a
    assert Path(done["scene2"]["path"]).read_bytes() == b"II*\x00" + b
    names = {Path(r["path"]).name for r in done.values()}
    assert names in ({"TCI.tif", f"TCI_{r['id']}.tif"} for r in done.values())


async def test_a_stop_while_the_done_row_is_written_still_logs_done(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM lands after the rename, while `done` is being recorded: the row ends done and
    the log says `download done`, never `download queued` for a file that is complete."""
    import signal

    from structlog.testing import capture_logs

    from asyncsat.db import queries

    server.add("S2B_late.nc", os.urandom(50_000))
    recording = asyncio.Event()
    original = queries.downloads_done

    async def slow_done(db: Any, done: Any) -> Any:
        recording.set()
        await asyncio.sleep(0.3)
        return await original(db, done)

    monkeypatch.setattr(queries, "downloads_done", slow_done)
    await queue(dsn, server.url("S2B_late.nc"))
    with capture_logs() as logs:
        serving = asyncio.create_task(daemon.serve(settings, Redactor()))
        await asyncio.wait_for(recording.wait(), 10)
        os.kill(os.getpid(), signal.SIGTERM)  # serve's handler turns it into a clean stop
        await asyncio.wait_for(serving, 10)
    [row] = await rows(dsn)
    assert row["status"] == "done"
    events = [e["event"] for e in logs if e.get("download_id") == row["id"]]
    assert events[-1] == "download done", events
    assert "download queued" not in events


async def test_files_that_end_together_are_recorded_done_together(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small files: their `done` rows are written a few at a time, one statement for
    the files that end within a few milliseconds of each other, and each row gets its own
    size and path."""
    from asyncsat.db import queries

    names = [f"tile_{i:02}.nc" for i in range(40)]
    data = {n: os.urandom(20_000 + i) for i, n in enumerate(names)}
    for n, body in data.items():
        server.add(n, body)
    batches: list[int] = []
    original = queries.downloads_done

    async def counted(db: Any, done: Any) -> Any:
        batches.append(len(done))
        return await original(db, done)

    monkeypatch.setattr(queries, "downloads_done", counted)
    await queue(dsn, *(server.url(n) for n in names))
    await drain(settings)
    got = await rows(dsn)
    assert {r["status"] for r in got} == {"done"} and len(got) == len(names)
    for r in got:
        assert Path(r["path"]).read_bytes() == data[Path(r["path"]).name]
        assert r["size"] == r["bytes_done"] == len(data[Path(r["path"]).name])
    assert sum(batches) == len(names)
    assert len(batches) < len(names), batches


async def test_a_heartbeat_while_done_is_recorded_loses_no_lease(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The `done` write has committed but its answer has not reached the transfer yet (the
    statement still writes a row another transaction held): a heartbeat meanwhile no longer
    finds the row owned, and must not call that a lease lost nor cancel the transfer."""
    from structlog.testing import capture_logs

    from asyncsat.db import queries

    server.add("S3A_slow_answer.nc", os.urandom(40_000))
    original = queries.downloads_done

    async def slow_answer(db: Any, done: Any) -> Any:
        owed = await original(db, done)
        await asyncio.sleep(1.2)  # (several heartbeats)
        return owed

    monkeypatch.setattr(queries, "downloads_done", slow_answer)
    await queue(dsn, server.url("S3A_slow_answer.nc"))
    with capture_logs() as logs:
        await drain(replace(settings, lease_timeout=1.5))  # a heartbeat every 0.5 s
    [row] = await rows(dsn)
    assert row["status"] == "done"
    events = [e["event"] for e in logs if e.get("download_id") == row["id"]]
    assert not [e for e in events if "lease lost" in e], events
    assert events[-1] == "download done", events


async def test_a_done_that_could_not_be_written_is_looked_at_again(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is at its final path but its `done` write fails (the database refuses it):
    the daemon says so, the row goes back to the queue, and the next attempt finds the file
    complete and records it done, without fetching its bytes again."""
    from structlog.testing import capture_logs

    from asyncsat.db import queries

    data = os.urandom(60_000)
    server.add("S2C_refused_once.nc", data)
    original = queries.downloads_done
    refused: list[int] = []

    async def refuse_once(db: Any, done: Any) -> Any:
        if not refused:
            refused.append(len(done))
            raise RuntimeError("the database said no")
        return await original(db, done)

    monkeypatch.setattr(queries, "downloads_done", refuse_once)
    await queue(dsn, server.url("S2C_refused_once.nc"))
    with capture_logs() as logs:
        await drain(replace(settings, lease_timeout=1.5))  # a heartbeat every 0.5 s
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 2
    assert Path(row["path"]).read_bytes() == data
    events = [e["event"] for e in logs if e.get("download_id") == row["id"]]
    assert "download done but not recorded: it is looked at again" in events, events
    assert events[-1] == "download done", events
    gets = _gets(server, "S2C_refused_once.nc")
    assert len(gets) == 2 and gets[1]["range"] == f"bytes={len(data)}-"  # nothing fetched again
