"""Fault hunt: nasty but realistic provider and operator behaviours against the daemon.

Each test names a fault found by hunting for it; each pins the behaviour that handles it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from asyncsat import daemon, logs
from asyncsat.config import Settings
from asyncsat.logs import Redactor
from asyncsat.transfer.http import HttpDriver
from asyncsat.transfer.runner import OVERLAP
from tests.conftest import cli
from tests.helpers import FAST, add_provider, drain, queue, rows, sql
from tests.servers import FileServer, Product


class HuntServer(FileServer):
    """FileServer with more faults: redirects, stalls, wrong ranges, no validators.

    Every request is also recorded raw (target as sent, Authorization header).
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.raw: list[dict[str, Any]] = []
        self.redirects: dict[str, tuple[int, str]] = {}  # /go/<name> -> (status, Location)
        self.stall: dict[str, list[tuple[int, float]]] = {}  # per response: (bytes, seconds)
        self.no_validators: set[str] = set()
        self.shift_start: dict[str, int] = {}  # 206 answers start this many bytes earlier
        self.cap_range: dict[str, int] = {}  # 206 answers carry at most this many bytes
        self.app.router.add_get("/go/{name:.+}", self.redirect)

    def _record(self, request: web.Request) -> None:
        self.raw.append({"target": request.raw_path, "path": request.path,
                         "auth": request.headers.get("Authorization"),
                         "range": request.headers.get("Range")})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        return await super().handle(request)

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if self.users and self._user(request) in (None, "!bad"):
            return web.Response(status=401)
        status, location = self.redirects[request.match_info["name"]]
        return web.Response(status=status, headers={"Location": location})

    async def _send(self, request: web.Request, product: Product) -> web.StreamResponse:
        name = request.match_info["name"]
        size = product.size
        start, status = 0, 200
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        fresh = if_range is None or if_range in (product.etag,
                                                 formatdate(product.last_modified, usegmt=True))
        if range_header and not product.ignore_range and fresh:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start = max(0, start - self.shift_start.get(name, 0))
            status = 206
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if name not in self.no_validators:
            headers["ETag"] = product.etag or ""
            headers["Last-Modified"] = formatdate(product.last_modified, usegmt=True)
        if product.content_disposition:
            headers["Content-Disposition"] = product.content_disposition
        end = size
        if status == 206:
            end = min(size, start + self.cap_range.get(name, size))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        if not product.no_length:
            response.content_length = end - start
        await response.prepare(request)
        stalls = self.stall.get(name)
        if stalls:
            after, seconds = stalls.pop(0)
            await response.write(product.read(start, start + after))
            self.bytes_sent += after
            await asyncio.sleep(seconds)
            start += after
        drop = product.drop_after.pop(0) if product.drop_after else None
        await self._stream(request, response, product, start, end, drop)
        return response


@pytest.fixture
async def hunt() -> AsyncIterator[HuntServer]:
    srv = await HuntServer().start()
    yield srv
    await srv.stop()


@pytest.fixture(autouse=True)
async def local_provider(hunt: HuntServer, dsn: str) -> None:
    """The hunt server as provider `local`, with short backoffs."""
    await add_provider(dsn, "local", f"http://127.0.0.1:{hunt.port}/", FAST)


@pytest.fixture
def captured_logs() -> Iterator[tuple[Redactor, io.StringIO]]:
    """structlog configured as `asyncsat run` does it, writing into a buffer."""
    redactor, out = Redactor(), io.StringIO()
    logs.configure(redactor, fmt="json", level="debug", stream=out)
    yield redactor, out
    logs.reset()


def _final(settings: Settings, name: str, provider: str = "local") -> Path:
    assert settings.dest is not None
    return settings.dest / provider / name


def _parts(settings: Settings) -> list[Path]:
    assert settings.dest is not None
    return list(settings.dest.rglob("*.part"))



async def _wait_until(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never met")


# -- redirects ----------------------------------------------------------------------------------


async def test_same_host_redirect_is_followed_and_resumed(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    data = os.urandom(800_000)
    hunt.add("S2A_MSIL1C.nc", data, drop_after=[300_000])
    hunt.redirects["S2A_MSIL1C.nc"] = (302, "/files/S2A_MSIL1C.nc")
    await queue(dsn, f"http://127.0.0.1:{hunt.port}/go/S2A_MSIL1C.nc")
    await drain(settings)

    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "S2A_MSIL1C.nc").read_bytes() == data
    files = [r for r in hunt.raw if r["path"].startswith("/files/")]
    assert [r["range"] for r in files] == [None, "bytes=300000-"]  # Range survives the 302


async def test_cross_host_redirect_does_not_leak_the_login(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """CDSE-like: the catalogue host (with a login) redirects to a download host."""
    catalogue = await HuntServer(users={"alice": "pw-alice-123"}).start()
    try:
        data = os.urandom(200_000)
        hunt.add("S1A_IW_GRDH.nc", data)
        catalogue.redirects["S1A_IW_GRDH.nc"] = (
            302, f"http://127.0.0.1:{hunt.port}/files/S1A_IW_GRDH.nc")
        await add_provider(dsn, "cat", f"http://127.0.0.1:{catalogue.port}/", FAST,
                           credentials=[("alice", "pw-alice-123", 2)])
        await queue(dsn, f"http://127.0.0.1:{catalogue.port}/go/S1A_IW_GRDH.nc")
        await drain(settings)
    finally:
        await catalogue.stop()
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "S1A_IW_GRDH.nc", "cat").read_bytes() == data
    assert catalogue.raw[0]["auth"] is not None
    assert [r["auth"] for r in hunt.raw] == [None]  # never sent to the other host


async def test_redirect_loop_fails_permanently(hunt: HuntServer, dsn: str,
                                               settings: Settings) -> None:
    hunt.redirects["loop.nc"] = (302, "/go/loop.nc")
    await queue(dsn, f"http://127.0.0.1:{hunt.port}/go/loop.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "redirect" in row["error"]
    assert row["attempts"] == 1


# -- lengths, ranges, validators ----------------------------------------------------------------


async def test_chunked_body_cut_early_is_resumed(hunt: HuntServer, dsn: str,
                                                 settings: Settings) -> None:
    data = os.urandom(600_000)
    hunt.add("chunked.nc", data, no_length=True, drop_after=[250_000])
    await queue(dsn, hunt.url("chunked.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "chunked.nc").read_bytes() == data
    # no size to verify the result: the resume starts 4 kB early and checks the overlap
    assert [r["range"] for r in hunt.raw] == [None, f"bytes={250_000 - OVERLAP}-"]


async def test_a_small_chunked_body_of_known_size_is_held_whole_across_its_chunks(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """A body sent in HTTP chunks (no Content-Length) whose size the row knows (a catalog's)
    is held whole as its chunks arrive: read past the end of each HTTP chunk to the end."""
    data = os.urandom(300_000)
    hunt.add("held.nc", data, no_length=True)
    await sql(dsn, "INSERT INTO download (provider_id, url, name, dest, size)"
                   " SELECT id, $1, 'held.nc', $2, $3 FROM provider",
              hunt.url("held.nc"), str(settings.dest), len(data))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 1, row["error"]
    assert _final(settings, "held.nc").read_bytes() == data
    assert [r["range"] for r in hunt.raw] == [None]  # (one request: nothing was cut)


async def _fetched_from(
        serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        name: str, size: int, dsn: str, settings: Settings) -> dict[str, Any]:
    """One file of a known size (a catalog's) fetched by the daemon from a raw server
    (`serve` answers the request byte by byte as a test needs): its row at the end."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await sql(dsn, "INSERT INTO download (provider_id, url, name, dest, size)"
                       " SELECT id, $1, $2, $3, $4 FROM provider",
                  f"http://127.0.0.1:{port}/{name}", name, str(settings.dest), size)
        await drain(settings)
    finally:
        server.close()
        await server.wait_closed()
    [row] = await rows(dsn)
    return row


async def test_a_held_body_reads_on_past_an_http_chunk_end_that_comes_alone(
        dsn: str, settings: Settings) -> None:
    """The end of an HTTP chunk may reach the client after the chunk's bytes were read
    (its CRLF in a later packet): aiohttp then tells an empty piece at a chunk's end. A
    held body reads on to the real end, in one attempt."""
    data = os.urandom(200_000)
    half = len(data) // 2

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n" % half + data[:half])
        await writer.drain()
        await asyncio.sleep(0.2)  # (the client has read the chunk's bytes by now)
        writer.write(b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"%x\r\n" % (len(data) - half) + data[half:] + b"\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    row = await _fetched_from(serve, "split.nc", len(data), dsn, settings)
    assert row["status"] == "done" and row["attempts"] == 1, row["error"]
    assert _final(settings, "split.nc").read_bytes() == data


async def test_a_held_body_sent_a_byte_at_a_time_is_written_in_few_pieces(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server sending a small body in HTTP chunks of one byte: the held body is read in
    pieces of what is buffered (not one write, and one turn of the loop, per byte)."""
    from asyncsat.transfer import files

    data = os.urandom(200_000)
    body = b"".join(b"1\r\n" + data[i:i + 1] + b"\r\n" for i in range(len(data)))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body +
                     b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    writes = 0
    write = files.PartFile.write

    async def counted(self: files.PartFile, chunk: bytes) -> None:
        nonlocal writes
        writes += 1
        await write(self, chunk)

    monkeypatch.setattr(files.PartFile, "write", counted)
    row = await _fetched_from(serve, "bytes.nc", len(data), dsn, settings)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "bytes.nc").read_bytes() == data
    assert writes <= 40, writes  # (200,000 writes before)


async def test_206_with_wrong_start_is_not_appended(hunt: HuntServer, dsn: str,
                                                    settings: Settings) -> None:
    data = os.urandom(500_000)
    hunt.add("shift.nc", data, drop_after=[200_000])
    hunt.shift_start["shift.nc"] = 65_536  # a proxy answering from a block boundary
    await queue(dsn, hunt.url("shift.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "shift.nc").read_bytes() == data


async def test_part_larger_than_the_remote_file_restarts(hunt: HuntServer, dsn: str,
                                                         settings: Settings) -> None:
    old, new = os.urandom(900_000), os.urandom(400_000)
    product = hunt.add("shrunk.nc", old, drop_after=[600_000])
    await queue(dsn, hunt.url("shrunk.nc"))
    original = hunt._send

    async def send(request: web.Request, p: Product) -> web.StreamResponse:
        if request.headers.get("Range"):  # same ETag, smaller file: the server says 416
            product.data = new
        return await original(request, p)

    hunt._send = send  # type: ignore[method-assign]
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "shrunk.nc").read_bytes() == new
    assert row["size"] == len(new)


async def test_resume_without_any_validator(hunt: HuntServer, dsn: str,
                                            settings: Settings) -> None:
    data = os.urandom(700_000)
    hunt.add("bare.nc", data, drop_after=[300_000])
    hunt.no_validators.add("bare.nc")
    await queue(dsn, hunt.url("bare.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "bare.nc").read_bytes() == data
    files = [r for r in hunt.requests if r["path"] == "/files/bare.nc"]
    assert [(r["range"], r["if_range"]) for r in files] == [(None, None),
                                                            ("bytes=300000-", None)]


async def test_stalled_body_times_out_and_resumes(
        hunt: HuntServer, dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """No byte for a long time: the read timeout (60 s by default; 0.5 s here) ends the
    attempt, and the next one resumes from the bytes kept."""
    monkeypatch.setattr(HttpDriver, "create",
                        classmethod(lambda cls: HttpDriver(_short_session())))
    data = os.urandom(400_000)
    hunt.add("stall.nc", data)
    hunt.stall["stall.nc"] = [(150_000, 5.0)]  # far beyond the 0.5 s read timeout
    await queue(dsn, hunt.url("stall.nc"))
    started = time.monotonic()
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert time.monotonic() - started < 10
    assert _final(settings, "stall.nc").read_bytes() == data
    assert [r["range"] for r in hunt.raw] == [None, "bytes=150000-"]
    events = await sql(dsn, "SELECT error FROM download_event WHERE error IS NOT NULL")
    assert any("timed out" in e["error"] for e in events)


def _short_session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=0.5),
        auto_decompress=False, headers={"Accept-Encoding": "identity"})


async def test_server_capping_range_answers_still_completes(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """Some hosts answer `Range: bytes=N-` with a bounded 206 (here 100 kB): every attempt
    moves the file forward, so the retry budget (5) must not run out."""
    data = os.urandom(1_000_000)
    hunt.add("capped.nc", data, drop_after=[50_000])
    hunt.cap_range["capped.nc"] = 100_000
    await queue(dsn, hunt.url("capped.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "capped.nc").read_bytes() == data


async def test_weak_etag_resumes_with_last_modified(hunt: HuntServer, dsn: str,
                                                    settings: Settings) -> None:
    data = os.urandom(500_000)
    hunt.add("weak.nc", data, etag='W/"v1"', drop_after=[200_000])
    await queue(dsn, hunt.url("weak.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "weak.nc").read_bytes() == data
    assert hunt.requests[1]["if_range"] == formatdate(1_700_000_000.0, usegmt=True)


async def test_restart_from_zero_that_never_gets_further_exhausts_the_budget(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """No Range support and a connection cut at the same point every time (a proxy's body
    or time limit): each attempt starts again from zero and dies at 300 kB. That is no
    progress, so the download must fail after max_attempts (5), not retry forever."""
    hunt.add("loop.nc", os.urandom(1_000_000), ignore_range=True, drop_after=[300_000] * 25)
    await queue(dsn, hunt.url("loop.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed", (row["attempts"], row["error"])
    assert row["attempts"] <= 6


async def test_known_size_is_verified_against_a_short_content_length(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """The catalogue says 1 MB; a broken cache serves 300 kB with a matching Content-Length."""
    data = os.urandom(1_000_000)
    hunt.add("S3B_SL_2.nc", data[:300_000])
    await sql(dsn, "INSERT INTO download (provider_id, url, size) SELECT id, $1, $2"
               " FROM provider WHERE name = 'local'", hunt.url("S3B_SL_2.nc"), len(data))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] != "done"
    assert not _final(settings, "S3B_SL_2.nc").exists()


# -- error documents in place of products -------------------------------------------------------

ODATA_ERROR = (b'<?xml version="1.0" encoding="utf-8"?>\n'
               b'<m:error xmlns:m="http://docs.oasis-open.org/odata/ns/metadata">'
               b"<m:code>404</m:code><m:message>Product not found</m:message></m:error>")


async def test_odata_xml_error_with_200_in_place_of_a_zip(hunt: HuntServer, dsn: str,
                                                          settings: Settings) -> None:
    hunt.add("S2B_MSIL2A.zip", ODATA_ERROR)
    await queue(dsn, hunt.url("S2B_MSIL2A.zip"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed"
    assert row["error"] == "the server sent an error document: Product not found"
    assert not _final(settings, "S2B_MSIL2A.zip").exists()


async def test_json_error_with_200_in_place_of_a_zip(hunt: HuntServer, dsn: str,
                                                     settings: Settings) -> None:
    hunt.add("S1B.zip", b'{"detail": "Token expired", "status": 401}')
    await queue(dsn, hunt.url("S1B.zip"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "Token expired" in row["error"]


async def test_odata_value_endpoint_with_200_xml_error_is_never_done(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """CDSE/OData `Products(<uuid>)/$value` with no Content-Disposition: the name has no
    extension, and a namespaced `<m:error>` document passes the content check."""
    hunt.add("Products(8f2c1a)/$value", ODATA_ERROR)
    await queue(dsn, hunt.url("Products(8f2c1a)/$value"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed", row
    assert not _final(settings, "$value").exists()


async def test_empty_200_body_for_a_zip_is_never_done(hunt: HuntServer, dsn: str,
                                                      settings: Settings) -> None:
    hunt.add("S2A_EMPTY.zip", b"")
    await queue(dsn, hunt.url("S2A_EMPTY.zip"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed", row
    assert not _final(settings, "S2A_EMPTY.zip").exists()


async def test_empty_200_body_for_a_product_of_known_size_is_never_done(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    hunt.add("S5P_L2.nc", b"")
    await sql(dsn, "INSERT INTO download (provider_id, url, size) SELECT id, $1, 5000000"
               " FROM provider WHERE name = 'local'", hunt.url("S5P_L2.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] != "done", row


# -- operators: cancel, retry, re-request -------------------------------------------------------


async def _serve(settings: Settings, redactor: Redactor | None = None) -> asyncio.Task[None]:
    return asyncio.create_task(
        daemon.serve(settings, redactor or Redactor(), exit_when_idle=True))


async def test_sql_cancel_stops_the_transfer_and_retry_resumes_from_the_part(
        hunt: HuntServer, dsn: str, settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    hunt.add("S2A_cancel.nc", data, rate=1_000_000)
    await queue(dsn, hunt.url("S2A_cancel.nc"))
    serving = await _serve(settings)
    part = _final(settings, "S2A_cancel.nc").with_suffix(".nc.part")

    async def some_bytes() -> bool:
        return part.exists() and part.stat().st_size >= 400_000

    await _wait_until(some_bytes)
    await sql(dsn, "UPDATE download SET status = 'cancelled'")
    cancelled_at = time.monotonic()
    await asyncio.wait_for(serving, 10)  # nothing left to do: the daemon drains and exits
    assert time.monotonic() - cancelled_at < 2
    assert hunt.active["anonymous"] == 0
    kept = part.stat().st_size
    sent = hunt.bytes_sent
    await asyncio.sleep(0.3)
    assert hunt.bytes_sent == sent and part.stat().st_size == kept  # really stopped
    [row] = await rows(dsn)
    assert row["status"] == "cancelled"
    assert 0 < kept < len(data)

    done = cli("retry", str(row["id"]), dsn=dsn, home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "S2A_cancel.nc").read_bytes() == data
    assert hunt.raw[-1]["range"] == f"bytes={kept}-"


async def test_cli_cancel_of_a_running_download(hunt: HuntServer, dsn: str,
                                                settings: Settings, tmp_path: Path) -> None:
    hunt.add("S1A_cli.nc", os.urandom(5_000_000), rate=500_000)
    await queue(dsn, hunt.url("S1A_cli.nc"))
    serving = await _serve(settings)

    async def running() -> bool:
        return [r["status"] for r in await rows(dsn)] == ["running"]

    await _wait_until(running)
    out = await asyncio.to_thread(cli, "cancel", "1", dsn=dsn, home=tmp_path / "home")
    assert out.returncode == 0, out.stderr
    await asyncio.wait_for(serving, 10)
    [row] = await rows(dsn)
    assert row["status"] == "cancelled"
    history = [r["status"] for r in await sql(
        dsn, "SELECT status FROM download_event WHERE download_id = 1 ORDER BY id")]
    assert history == ["queued", "running", "cancelled"]


async def test_re_request_with_a_corrected_checksum_uses_it(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """An operator typo in a checksum: the download fails; asking again with the right
    checksum must not keep checking against the wrong one."""
    data = os.urandom(100_000)
    hunt.add("S2A_sum.nc", data)
    await queue(dsn, hunt.url("S2A_sum.nc"), checksum="md5:" + "0" * 32)
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "md5 mismatch" in row["error"]
    # (the checksum is the user's: not blamed on the source)
    assert row["error"].startswith("the same bytes twice, not those of the checksum given")

    import hashlib

    await queue(dsn, hunt.url("S2A_sum.nc"), checksum="md5:" + hashlib.md5(data).hexdigest())
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]


async def test_bad_url_among_good_ones_fails_the_whole_request(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    hunt.add("good.nc", os.urandom(1000))
    await sql(dsn, "INSERT INTO request (urls) VALUES ($1)",
               [hunt.url("good.nc"), "htp://bad", f"http://127.0.0.1:{hunt.port}:99/x"])
    await drain(settings)
    [req] = await sql(dsn, "SELECT status, error FROM request")
    assert req["status"] == "failed" and "htp://bad" in req["error"]
    assert await rows(dsn) == []


async def test_request_with_search_criteria_only_fails_with_a_reason(
        dsn: str, settings: Settings) -> None:
    await sql(dsn, "INSERT INTO request (search) VALUES ($1)",
               {"collection": "SENTINEL-2", "cloud": 10})
    await drain(settings)
    [req] = await sql(dsn, "SELECT status, error FROM request")
    assert req["status"] == "failed" and "search" in req["error"]


async def test_overlong_signed_url_does_not_crash_the_daemon(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """A pre-signed URL with a long session token (random, so incompressible) next to a
    normal one: the daemon must survive it and still serve the rest of the queue."""
    hunt.add("ok.nc", os.urandom(1000))
    hunt.add("signed.nc", os.urandom(1000))
    token = base64.urlsafe_b64encode(os.urandom(2400)).decode()
    await queue(dsn, hunt.url("signed.nc") + "?X-Amz-Security-Token=" + token)
    await queue(dsn, hunt.url("ok.nc"))
    await drain(settings)
    assert "done" in {r["status"] for r in await rows(dsn)}


async def test_null_url_in_a_psql_request_does_not_crash_the_daemon(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    hunt.add("ok.nc", os.urandom(1000))
    await sql(dsn, "INSERT INTO request (urls) VALUES (ARRAY[$1, NULL])", hunt.url("ok.nc"))
    await queue(dsn, hunt.url("ok.nc"))
    await drain(settings)
    statuses = [r["status"] for r in await sql(dsn, "SELECT status FROM request ORDER BY id")]
    assert statuses == ["failed", "resolved"]


# -- names and URLs ----------------------------------------------------------------------------


async def test_awkward_urls_and_names(hunt: HuntServer, dsn: str, settings: Settings) -> None:
    blobs = {k: os.urandom(3000) for k in range(6)}
    hunt.add("q.nc", blobs[0])
    hunt.add("S2A product (1).nc", blobs[1])
    hunt.add("Ünïcødé_東京.nc", blobs[2])
    hunt.add("folder/", blobs[3])
    long_name = "S1A_" + "x" * 300 + ".nc"
    hunt.add(long_name, blobs[4])
    hunt.add("Products('f00d')/$value", blobs[5],
             content_disposition="attachment; filename*=UTF-8''S3A%20%C3%A9t%C3%A9.SEN3.nc")
    urls = [hunt.url("q.nc") + "?format=nc&bbox=1,2,3,4", hunt.url("S2A%20product%20(1).nc"),
            hunt.url("Ünïcødé_東京.nc"), hunt.url("folder/"), hunt.url(long_name),
            hunt.url("Products('f00d')/$value")]
    await queue(dsn, *urls)
    await drain(settings)
    by_url = {r["url"]: r for r in await rows(dsn)}
    names = {}
    for k, url in enumerate(urls):
        row = by_url[url]
        assert row["status"] == "done", (url, row["error"])
        assert Path(row["path"]).read_bytes() == blobs[k]
        names[k] = row["name"]
    assert names[0] == "q.nc"
    assert names[1] == "S2A product (1).nc"
    assert names[2] == "Ünïcødé_東京.nc"
    assert names[3] == "folder"
    assert names[4].endswith(".nc") and len(names[4].encode()) <= 200
    assert names[5] == "S3A été.SEN3.nc"


async def test_signed_query_string_is_sent_verbatim(hunt: HuntServer, dsn: str,
                                                    settings: Settings) -> None:
    """A pre-signed URL must reach the server byte for byte: a provider that checks an
    HMAC over the raw query refuses a re-encoded one."""
    hunt.add("signed.nc", os.urandom(2000))
    query = ("X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Feu-central-1%2Fs3%2Faws4_request"
             "&X-Amz-Signature=ab%2Bcd%3D&hdnts=exp%3D1700000000~acl%3D%2F%2A")
    await queue(dsn, hunt.url("signed.nc") + "?" + query)
    await drain(settings)
    assert hunt.raw[0]["target"] == "/files/signed.nc?" + query


async def test_many_small_files_respect_the_connection_limit(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    names = [f"S2A_T{i:03d}.nc" for i in range(200)]
    for n in names:
        hunt.add(n, os.urandom(2048), rate=200_000)
    await add_provider(dsn, "tiles", f"http://127.0.0.1:{hunt.port}/files/",
                       {**FAST, "max_connections": 3})
    started = time.monotonic()
    await queue(dsn, *(hunt.url(n) for n in names))
    await drain(settings)
    elapsed = time.monotonic() - started
    result = await rows(dsn)
    assert len(result) == 200 and {r["status"] for r in result} == {"done"}
    assert {r["provider"] for r in result} == {"tiles"}
    assert hunt.peak["anonymous"] == 3
    assert len(hunt.requests) == 200
    assert elapsed < 20


# -- secrets -----------------------------------------------------------------------------------

CRED_PW = "Cr3d-pass-9f2e"
URL_PW = "Url-pass-7b1c"


async def _serve_logged(settings: Settings, redactor: Redactor) -> None:
    await asyncio.wait_for(daemon.serve(settings, redactor, exit_when_idle=True), 30)


async def test_secrets_never_in_logs_or_errors_when_the_server_echoes_them(
        dsn: str, settings: Settings, captured_logs: tuple[Redactor, io.StringIO]) -> None:
    redactor, out = captured_logs
    hub = await HuntServer(users={"alice": CRED_PW, "bob": URL_PW}).start()
    try:
        await add_provider(dsn, "hub", f"http://127.0.0.1:{hub.port}/files/", FAST,
                           credentials=[("alice", CRED_PW, 2)])
        basic_a = "Basic " + base64.b64encode(f"alice:{CRED_PW}".encode()).decode()
        echo = [(403, {"cause-message": f"Authorization: {basic_a} refused"}, b""),
                (403, {}, json.dumps({"detail": f"password={CRED_PW} expired"}).encode())]
        hub.add("a.nc", os.urandom(1000), statuses=list(echo))
        hub.add("b.nc", os.urandom(1000), statuses=[
            (500, {}, f"<error><message>bad login bob:{URL_PW}</message></error>".encode()),
            (403, {}, json.dumps({"message": f"user bob pw {URL_PW} locked"}).encode()),
            (403, {}, b"{}")])
        await queue(dsn, hub.url("a.nc"), hub.url("b.nc", user="bob", password=URL_PW))
        await _serve_logged(settings, redactor)
    finally:
        await hub.stop()
    text = out.getvalue()
    assert "download failed" in text and "download running" in text
    stored = await sql(dsn, "SELECT d.url, d.error, e.error AS event_error FROM download d"
                        " JOIN download_event e ON e.download_id = d.id")
    everything = text + repr([dict(r) for r in stored]) + repr(
        [dict(r) for r in await sql(dsn, "SELECT urls, error FROM request")])
    for secret in (CRED_PW, URL_PW, basic_a.split()[1]):
        assert secret not in everything
    assert hub.raw[0]["auth"] == basic_a  # the login was really sent


async def test_base64_login_echoed_in_an_error_message_is_redacted(
        dsn: str, settings: Settings, captured_logs: tuple[Redactor, io.StringIO]) -> None:
    """Servers echo the credentials they rejected as they received them: base64."""
    redactor, out = captured_logs
    hub = await HuntServer(users={"alice": CRED_PW}).start()
    try:
        await add_provider(dsn, "hub", f"http://127.0.0.1:{hub.port}/files/", FAST,
                           credentials=[("alice", CRED_PW, 2)])
        encoded = base64.b64encode(f"alice:{CRED_PW}".encode()).decode()
        body = json.dumps({"message": f"Invalid credentials 'Basic {encoded}'"}).encode()
        hub.add("c.nc", os.urandom(1000), statuses=[(401, {}, body), (401, {}, body)])
        await queue(dsn, hub.url("c.nc"))
        await _serve_logged(settings, redactor)
    finally:
        await hub.stop()
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "Invalid credentials" in row["error"]
    assert encoded not in row["error"]
    assert encoded not in out.getvalue()


async def test_url_login_of_a_failed_request_is_not_kept_in_the_request_row(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """A psql request with a login in one URL and a typo in another fails as a whole;
    the request row keeps the password in clear."""
    await sql(dsn, "INSERT INTO request (urls) VALUES ($1)",
               [hunt.url("a.nc", user="bob", password=URL_PW), "htps://typo/b.nc"])
    await drain(settings)
    [req] = await sql(dsn, "SELECT status, urls, error FROM request")
    assert req["status"] == "failed"
    assert URL_PW not in repr(req["urls"]) + (req["error"] or "")


async def test_same_name_via_get_and_via_psql_never_share_a_file(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """Two products named TCI.tif land in the same folder: one queued like `get` (dest
    stored), one inserted by psql without a dest (the default folder, the same one)."""
    a, b = b"II*\x00" + os.urandom(600_000), b"II*\x00" + os.urandom(400_000)
    hunt.add("scene1/TCI.tif", a, rate=1_500_000)
    hunt.add("scene2/TCI.tif", b, rate=1_500_000)
    await queue(dsn, hunt.url("scene1/TCI.tif"))
    await sql(dsn, "INSERT INTO download (provider_id, url) SELECT id, $1 FROM provider"
               " WHERE name = 'local'", hunt.url("scene2/TCI.tif"))
    await drain(settings)
    by_scene = {r["url"].split("/")[-2]: r for r in await rows(dsn)}
    assert {r["status"] for r in by_scene.values()} == {"done"}, by_scene
    assert by_scene["scene1"]["path"] != by_scene["scene2"]["path"]
    assert Path(by_scene["scene1"]["path"]).read_bytes() == a
    assert Path(by_scene["scene2"]["path"]).read_bytes() == b


async def test_unusable_destination_is_a_permanent_local_error(
        hunt: HuntServer, dsn: str, settings: Settings, tmp_path: Path) -> None:
    """`dest` points below a regular file (an operator typo): a local, permanent fault,
    not a 'network error' retried max_attempts times."""
    hunt.add("x.nc", os.urandom(1000))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    await queue(dsn, hunt.url("x.nc"), dest=blocker / "sub")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed"
    assert "network" not in row["error"] and row["attempts"] == 1, row["error"]


async def test_a_psql_row_naming_a_file_the_default_folder_already_has(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """A row inserted with a name and no dest is unique until the daemon gives it the
    default folder, where a `get` product already has that name: the claim must not fail
    (it once stopped the daemon at every start); the second product gets `a_<id>.nc`."""
    first, second = os.urandom(3000), os.urandom(4000)
    hunt.add("one/a.nc", first)
    hunt.add("two/a.nc", second)
    assert settings.dest is not None
    await queue(dsn, hunt.url("one/a.nc"), dest=settings.dest)
    await drain(settings)
    await sql(dsn, "INSERT INTO download (provider_id, url, name) SELECT id, $1, 'a.nc'"
               " FROM provider WHERE name = 'local'", hunt.url("two/a.nc"))
    await drain(settings)
    by_url = {r["url"]: r for r in await rows(dsn)}
    one, two = by_url[hunt.url("one/a.nc")], by_url[hunt.url("two/a.nc")]
    assert one["status"] == two["status"] == "done", two["error"]
    assert Path(one["path"]).read_bytes() == first
    assert Path(two["path"]).read_bytes() == second
    assert two["name"] == f"a_{two['id']}.nc"


async def test_a_psql_name_that_sanitizes_to_a_done_products_never_takes_its_file(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """A row inserted by psql with a name that is not a plain file name (`sub/a.nc`, which
    sanitizes to `a.nc`) while a done product owns `a.nc` in the same folder: the done
    product's file is not taken as the new row's part file (it once was, before the name
    was checked), and the new product gets a name of its own."""
    first, second = os.urandom(3000), os.urandom(4000)
    hunt.add("one/a.nc", first)
    hunt.add("two/a.nc", second)
    await queue(dsn, hunt.url("one/a.nc"))
    await drain(settings)
    [done] = await rows(dsn)
    assert Path(done["path"]).read_bytes() == first
    await sql(dsn, "INSERT INTO download (provider_id, url, name, dest) SELECT id, $1,"
                   " 'sub/a.nc', $2 FROM provider WHERE name = 'local'",
              hunt.url("two/a.nc"), str(settings.dest))
    await drain(settings)
    by_url = {r["url"].split("/")[-2]: r for r in await rows(dsn)}
    assert {r["status"] for r in by_url.values()} == {"done"}, by_url
    assert Path(by_url["one"]["path"]).read_bytes() == first  # untouched
    assert Path(by_url["two"]["path"]).read_bytes() == second
    assert by_url["two"]["name"] != "a.nc"


async def test_a_file_that_shrank_under_an_unverifiable_resume_starts_again(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """No length, no validator: the resume overlaps the kept bytes. The server's file now
    ends inside that overlap: the kept part is not this file, so it starts from zero."""
    old, new = os.urandom(300_000), os.urandom(198_000)
    product = hunt.add("shrink.nc", old, no_length=True, drop_after=[200_000])
    hunt.no_validators.add("shrink.nc")
    await queue(dsn, hunt.url("shrink.nc"))
    original = hunt._send

    async def send(request: web.Request, p: Product) -> web.StreamResponse:
        if request.headers.get("Range"):
            product.data = new  # shorter than the 200 kB kept
        return await original(request, p)

    hunt._send = send  # type: ignore[method-assign]
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert _final(settings, "shrink.nc").read_bytes() == new


async def test_a_psql_row_with_an_unknown_checksum_algorithm_fails_at_once_saying_so(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """`checksum_algo = 'foo'` in a download row inserted with psql: one attempt ending
    `failed` with the reason, no `.part` left; it was an "internal error" (a traceback in
    the log) retried max_attempts times."""
    hunt.add("c.nc", os.urandom(1000))
    await sql(dsn, "INSERT INTO download (provider_id, url, checksum_algo, checksum_value)"
                   " SELECT id, $1, 'foo', 'zz' FROM provider WHERE name = 'local'",
              hunt.url("c.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and row["attempts"] == 1, row
    assert "checksum algorithm 'foo'" in row["error"] and "internal" not in row["error"]
    assert _parts(settings) == []


async def test_a_psql_row_with_another_of_hashlibs_algorithms_is_verified(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """`checksum_algo = 'SHA384'` (not one `get --checksum` takes, but hashlib's): the file
    is verified with it, as before the unknown ones were refused; a wrong value fails."""
    good, bad = os.urandom(1000), os.urandom(1000)
    hunt.add("good.nc", good)
    hunt.add("bad.nc", bad)
    await sql(dsn, "INSERT INTO download (provider_id, url, checksum_algo, checksum_value)"
                   " SELECT id, $1, 'SHA384', $2 FROM provider WHERE name = 'local'",
              hunt.url("good.nc"), hashlib.sha384(good).hexdigest())
    await sql(dsn, "INSERT INTO download (provider_id, url, checksum_algo, checksum_value)"
                   " SELECT id, $1, 'sha384', $2 FROM provider WHERE name = 'local'",
              hunt.url("bad.nc"), hashlib.sha384(good).hexdigest())
    await drain(settings)
    by_url = {r["url"]: r for r in await rows(dsn)}
    assert by_url[hunt.url("good.nc")]["status"] == "done", by_url
    assert Path(by_url[hunt.url("good.nc")]["path"]).read_bytes() == good
    assert by_url[hunt.url("bad.nc")]["status"] != "done", by_url


async def test_a_relative_dest_in_a_psql_row_fails_instead_of_landing_in_the_daemons_cwd(
        hunt: HuntServer, dsn: str, settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`dest = 'data'` in a request or download row inserted with psql meant the daemon's
    working directory (`/` under systemd, wherever `get --wait` was started otherwise):
    files landed outside every folder asked for. The row fails, saying why."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    hunt.add("r.nc", os.urandom(1000))
    hunt.add("d.nc", os.urandom(1000))
    await sql(dsn, "INSERT INTO request (urls, dest) VALUES (ARRAY[$1], 'reldir')",
              hunt.url("r.nc"))
    await sql(dsn, "INSERT INTO download (provider_id, url, dest)"
                   " SELECT id, $1, 'reldest' FROM provider WHERE name = 'local'",
              hunt.url("d.nc"))
    await drain(settings)
    [request] = await sql(dsn, "SELECT status, error FROM request")
    assert request["status"] == "failed" and "absolute" in request["error"], request
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "absolute" in row["error"], row
    assert list(cwd.iterdir()) == []


async def test_a_running_row_that_no_daemon_claimed_is_put_back_and_done(
        hunt: HuntServer, dsn: str, settings: Settings) -> None:
    """A row inserted with psql as `running` (no owner, no lease expiry) was renewed by
    nobody and taken over by nobody: `run --exit-when-idle` waited for it for ever. A
    heartbeat puts it back in the queue."""
    body = os.urandom(3000)
    hunt.add("stray.nc", body)
    await sql(dsn, "INSERT INTO download (provider_id, url, status)"
                   " SELECT id, $1, 'running' FROM provider WHERE name = 'local'",
              hunt.url("stray.nc"))
    await drain(replace(settings, lease_timeout=1.5), timeout=30)
    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert Path(row["path"]).read_bytes() == body
