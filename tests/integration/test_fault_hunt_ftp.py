"""Fault hunt over FTP: hostile but realistic servers and operators against the FTP driver,
the FTP catalog (URL patterns and date-templated searches) and the daemon around them.

Each test names a fault found by hunting for it. Unmarked tests pin behaviour verified to
work; `xfail(strict=True)` tests demonstrate a bug, named with its cause in `reason`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aioftp
import asyncpg
import pytest
from structlog.testing import capture_logs

from asyncsat import daemon
from asyncsat.auth.base import Login
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.logs import Redactor
from asyncsat.transfer.base import RemoteEntry, Source, Validator
from asyncsat.transfer.ftp import FtpDriver
from asyncsat.transfer.runner import OVERLAP
from tests.conftest import DaemonProcess, cli
from tests.ftpserver import FtpServer, TlsFtpServer
from tests.helpers import FAST, add_provider, drain, queue, rows, sql

USER, PASSWORD = "ocean", "0cean-pw-4242"


@pytest.fixture
def ftp() -> Iterator[FtpServer]:
    with FtpServer(users={USER: PASSWORD}, anonymous=True) as server:
        yield server



async def _requests(dsn: str) -> list[asyncpg.Record]:
    return await sql(dsn, "SELECT id, status, error, urls FROM request ORDER BY id")


async def _wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _serve_until(settings: Settings, until: Callable[[], Awaitable[bool]],
                       timeout: float = 20) -> None:
    """The daemon in this process until `until()` (checked at every turn of its loop)."""
    await asyncio.wait_for(daemon.serve(settings, Redactor(), until=until), timeout)


async def _resolve_with_transfers_parked(settings: Settings, dsn: str, ftp: FtpServer,
                                         transfers: int, timeout: float = 20) -> None:
    """Run the daemon until every request is resolved and `transfers` transfers wait for
    their SIZE reply (held back by the server); then stop it. Transfers are stopped while
    they wait for a reply, never as one arrives (see the test of a swallowed cancellation)."""
    ftp.delay["SIZE"] = 30.0

    def parked() -> bool:
        return len(ftp.sent_commands("SIZE")) >= transfers

    async def wake_when_parked() -> None:
        await _wait_until(parked, "the transfers to wait for SIZE", timeout)
        await sql(dsn, "NOTIFY asyncsat")  # a turn of the daemon's loop, to check `until`

    async def done() -> bool:
        pending = await sql(dsn, "SELECT 1 FROM request WHERE status = 'queued'")
        return not pending and parked()

    waker = asyncio.create_task(wake_when_parked())
    try:
        await _serve_until(settings, done, timeout)
    finally:
        waker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waker
        del ftp.delay["SIZE"]


def _dest(settings: Settings, provider: str) -> Path:
    assert settings.dest is not None
    return settings.dest / provider


def _mlsd_refused(ftp: FtpServer, times: int = 20) -> None:
    """A server that only knows LIST (RFC 959 only, like many old or embedded servers)."""
    ftp.script["MLSD"] = ['500 Command "MLSD" not understood.'] * times


def _files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- listings in the formats real servers send ------------------------------------------------


async def test_iis_dos_style_listing_is_understood(ftp: FtpServer) -> None:
    _mlsd_refused(ftp)
    ftp.listings["LIST", "win"] = (
        b"03-01-24  12:00PM       <DIR>          old\r\n"
        b"03-01-24  12:05PM              1234 sst_20240301.nc\r\n"
        b"02-28-24  09:59AM            123456 sst 20240228.nc\r\n")
    entries = await FtpDriver(read_timeout=5).list_dir(
        Source(ftp.base + "win/", Login(USER, PASSWORD)))
    assert sorted(entries, key=lambda e: e.name) == [
        RemoteEntry("old", None, is_dir=True), RemoteEntry("sst 20240228.nc", 123456),
        RemoteEntry("sst_20240301.nc", 1234)]


async def test_dos_style_listing_with_four_digit_years_is_understood(ftp: FtpServer) -> None:
    _mlsd_refused(ftp)
    ftp.listings["LIST", "win"] = (
        b"03/01/2024  12:00 PM    <DIR>          old\r\n"
        b"03/01/2024  12:05 PM             1,234 sst_20240301.nc\r\n")
    entries = await FtpDriver(read_timeout=5).list_dir(
        Source(ftp.base + "win/", Login(USER, PASSWORD)))
    assert sorted(entries, key=lambda e: e.name) == [
        RemoteEntry("old", None, is_dir=True), RemoteEntry("sst_20240301.nc", 1234)]


async def test_list_with_a_total_header_line_is_understood(ftp: FtpServer) -> None:
    _mlsd_refused(ftp)
    ftp.listings["LIST", "feed"] = (
        b"total 16\r\n"
        b"-rw-r--r--   1 ftp      ftp          1234 Mar 01 12:00 sst_20240301.nc\r\n"
        b"drwxr-xr-x   2 ftp      ftp          4096 Mar 01 12:00 old\r\n")
    entries = await FtpDriver(read_timeout=5).list_dir(
        Source(ftp.base + "feed/", Login(USER, PASSWORD)))
    assert sorted(entries, key=lambda e: e.name) == [
        RemoteEntry("old", None, is_dir=True), RemoteEntry("sst_20240301.nc", 1234)]


async def test_a_non_utf8_name_does_not_hide_the_rest_of_the_folder(ftp: FtpServer) -> None:
    ftp.listings["MLSD", "feed"] = (
        b"type=file;size=5;modify=20240301120000; sst_20240301.nc\r\n"
        b"type=file;size=7;modify=20240301120000; caf\xe9.nc\r\n")
    entries = await FtpDriver(read_timeout=5).list_dir(
        Source(ftp.base + "feed/", Login(USER, PASSWORD)))
    assert RemoteEntry("sst_20240301.nc", 5) in entries


async def test_mlsd_without_size_facts_still_downloads_whole_files(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = {f"sst_2024030{i}.nc": b"CDF\x01" + os.urandom(30_000 + i) for i in (1, 2)}
    for name, body in data.items():
        ftp.add(f"feed/{name}", body)
    ftp.listings["MLSD", "feed"] = b"".join(
        f"type=file;modify=20240301120000;perm=r; {name}\r\n".encode() for name in data)
    await add_provider(dsn, "nosize", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "feed/*.nc")
    await drain(settings)
    got = {r["name"]: r for r in await rows(dsn)}
    assert set(got) == set(data)
    for name, row in got.items():
        assert row["status"] == "done" and row["size"] == len(data[name])
        assert Path(row["path"]).read_bytes() == data[name]


@pytest.mark.parametrize("mlsd", [True, False])
async def test_directories_matched_by_a_glob_are_not_queued(
        ftp: FtpServer, dsn: str, settings: Settings, mlsd: bool) -> None:
    ftp.add("feed/sst_1.nc", b"CDF\x01" + os.urandom(5000))
    ftp.add("feed/sst_2.nc/inside.nc", b"CDF\x01inside")  # a folder whose name matches
    if not mlsd:
        _mlsd_refused(ftp)
    await add_provider(dsn, "dirs", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "feed/sst_*.nc")
    await drain(settings)
    assert [(r["name"], r["status"]) for r in await rows(dsn)] == [("sst_1.nc", "done")]


async def test_a_symlinked_file_in_a_list_listing_is_downloaded(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = b"CDF\x01" + os.urandom(40_000 - 4)
    ftp.add("nrt/sst_20240301.nc", data)
    os.symlink("sst_20240301.nc", ftp.root / "nrt" / "latest.nc")
    _mlsd_refused(ftp)
    await add_provider(dsn, "links", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "nrt/latest*")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert Path(row["path"]).read_bytes() == data


async def test_a_symlinked_folder_in_a_list_listing_is_not_queued(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("nrt/sst_20240301.nc", b"CDF\x01" + os.urandom(1000))
    ftp.add("2024/03/01/x.nc", b"CDF\x01x")
    os.symlink("../2024/03/01", ftp.root / "nrt" / "today")
    _mlsd_refused(ftp)
    await add_provider(dsn, "links", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "nrt/*")
    await drain(settings)
    assert [(r["name"], r["status"]) for r in await rows(dsn)] == \
        [("sst_20240301.nc", "done")]


async def test_symlinks_in_an_mlsd_listing_are_followed(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = b"CDF\x01" + os.urandom(20_000)
    ftp.add("nrt/sst_20240301.nc", data)
    os.symlink("sst_20240301.nc", ftp.root / "nrt" / "latest.nc")
    await add_provider(dsn, "links", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "nrt/*.nc")
    await drain(settings)
    got = {r["name"]: r for r in await rows(dsn)}
    assert set(got) == {"latest.nc", "sst_20240301.nc"}
    assert all(r["status"] == "done" and Path(r["path"]).read_bytes() == data
               for r in got.values())


async def test_hostile_names_in_a_listing_cannot_escape_the_destination(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    """A listing naming `../../x` or `.hidden/../..`: only the last segment counts, and the
    product is fetched from the listed folder, never written outside DEST/<provider>/."""
    good = b"CDF\x01" + os.urandom(3000)
    ftp.add("feed/ok.nc", good)
    ftp.listings["MLSD", "feed"] = (
        b"type=file;size=3004; ok.nc\r\n"
        b"type=file;size=10; ../../../../escape.nc\r\n"
        b"type=file;size=10; ..\r\n"
        b"type=file;size=10; .\r\n"
        b"type=cdir;size=0; /feed\r\n")
    await add_provider(dsn, "hostile", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "feed/*")
    await drain(settings)
    got = {r["name"]: r for r in await rows(dsn)}
    assert got["ok.nc"]["status"] == "done"
    assert got["escape.nc"]["status"] == "failed"  # no such file in feed/
    assert got["escape.nc"]["url"] == ftp.base + "feed/escape.nc"
    assert set(got) == {"ok.nc", "escape.nc"}
    assert settings.dest is not None
    assert _files_under(settings.dest) == {"hostile/ok.nc": good}


async def test_a_huge_folder_is_listed_and_queued_quickly(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    """5000 entries in one folder (a year of hourly files): one listing, 4000 rows queued
    with their sizes, in a few seconds."""
    lines = [f"type=file;size={1000 + i};modify=20240101000000; "
             f"sst_{i:05d}.{'nc' if i < 4000 else 'md5'}\r\n" for i in range(5000)]
    ftp.listings["MLSD", "big"] = "".join(lines).encode()
    await add_provider(dsn, "big", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "big/*.nc")
    began = time.monotonic()
    await _resolve_with_transfers_parked(settings, dsn, ftp, transfers=4)
    assert time.monotonic() - began < 10
    [count] = await sql(dsn, "SELECT count(*) AS n, count(DISTINCT url) AS urls,"
                         " sum(size) AS total FROM download")
    assert count["n"] == count["urls"] == 4000
    assert count["total"] == sum(1000 + i for i in range(4000))
    assert ftp.sent_commands("MLSD") == ["big"]


# -- patterns and templates --------------------------------------------------------------------


async def test_question_mark_wildcard_in_a_get_url(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    for day in (1, 2):
        ftp.add(f"feed/sst_2024030{day}.nc", b"CDF\x01" + os.urandom(2000))
    await queue(dsn, ftp.base + "feed/sst_2024030?.nc")
    await drain(settings)
    assert sorted((r["name"], r["status"]) for r in await rows(dsn)) == \
        [("sst_20240301.nc", "done"), ("sst_20240302.nc", "done")]


async def test_question_mark_in_a_search_template(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("sst/2024/03/sst_20240301_v2.nc", b"CDF\x01" + os.urandom(2000))
    await add_provider(dsn, "cmems", ftp.base, FAST, protocol="ftp")
    result = cli("search", "cmems", "--collection", "sst/{date:%Y/%m}/sst_{date:%Y%m%d}_v?.nc",
                 "--start", "2024-03-01", "--end", "2024-03-01", dsn=dsn, home=settings.home,
                 env={"ASYNCSAT_DEST": str(settings.dest)})
    assert result.returncode == 0, result.stderr
    await drain(settings)
    assert [(r["name"], r["status"]) for r in await rows(dsn)] == \
        [("sst_20240301_v2.nc", "done")]


async def test_same_file_name_in_several_daily_folders(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    files = {}
    for day in ("20240301", "20240302"):
        files[day] = b"GRIB" + os.urandom(5000)
        ftp.add(f"gfs.{day}/gfs.t00z.f000", files[day])
    await add_provider(dsn, "noaa", ftp.base, FAST, protocol="ftp")
    result = cli("search", "noaa", "--collection", "gfs.{date:%Y%m%d}/gfs.t00z.f*",
                 "--start", "2024-03-01", "--end", "2024-03-02", dsn=dsn, home=settings.home,
                 env={"ASYNCSAT_DEST": str(settings.dest)})
    assert result.returncode == 0, result.stderr
    await drain(settings)
    [req] = await _requests(dsn)
    assert req["status"] == "resolved", req["error"]
    got = await rows(dsn)
    assert sorted(Path(r["path"]).read_bytes() for r in got) == sorted(files.values())


async def test_names_that_sanitise_to_the_same_file_do_not_share_it(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    colon, underscore = b"CDF\x01" + os.urandom(9000), b"CDF\x01" + os.urandom(7000)
    ftp.add("feed/a:b.nc", colon)
    ftp.add("feed/a_b.nc", underscore)
    await add_provider(dsn, "clash", ftp.base, FAST, protocol="ftp",
                       credentials=[(USER, PASSWORD, 1)])
    await queue(dsn, ftp.base + "feed/a*.nc")
    await drain(settings)
    got = await rows(dsn)
    assert [r["status"] for r in got] == ["done", "done"], [r["error"] for r in got]
    assert len({r["path"] for r in got}) == 2
    assert sorted(Path(r["path"]).read_bytes() for r in got) == sorted([colon, underscore])


async def test_concurrent_searches_of_daily_folders_that_reuse_names(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    """Two searches queued together (one per day) of a layout whose daily folders reuse
    the file names: resolved side by side, both queue every product."""
    names = [f"gfs.t00z.f{i:03d}" for i in range(300)]
    for day in ("20240301", "20240302"):
        ftp.listings["MLSD", f"gfs.{day}"] = "".join(
            f"type=file;size={100 + i}; {n}\r\n" for i, n in enumerate(names)).encode()
    ftp.delay["MLSD"] = 0.5  # both listings end together
    await add_provider(dsn, "noaa", ftp.base, FAST, protocol="ftp")
    for day in ("2024-03-01", "2024-03-02"):
        result = cli("search", "noaa", "--collection", "gfs.{date:%Y%m%d}/gfs.t00z.f*",
                     "--start", day, "--end", day, dsn=dsn, home=settings.home)
        assert result.returncode == 0, result.stderr
    await _resolve_with_transfers_parked(settings, dsn, ftp, transfers=4)
    assert [(r["status"], r["error"]) for r in await _requests(dsn)] == \
        [("resolved", None), ("resolved", None)]
    [count] = await sql(dsn, "SELECT count(*) AS n, count(DISTINCT name) AS names"
                         " FROM download")
    assert count["n"] == 600


async def test_names_made_only_of_dots_do_not_fail_the_request(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    """A hostile listing with `...` and `....`: nothing usable is left of either name once
    sanitised; each is fetched under a fallback name, and the other products still are."""
    ok = b"CDF\x01" + os.urandom(500)
    ftp.add("odd/ok.nc", ok)
    ftp.add("odd/...", b"CDF\x01three")
    ftp.add("odd/....", b"CDF\x01four")
    await add_provider(dsn, "odd", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "odd/*")
    await drain(settings)
    [req] = await _requests(dsn)
    assert req["status"] == "resolved", req["error"]
    got = await rows(dsn)
    assert [r["status"] for r in got] == ["done"] * 3
    assert sorted(Path(r["path"]).read_bytes() for r in got) == \
        sorted([ok, b"CDF\x01three", b"CDF\x01four"])


async def test_a_product_named_like_another_products_part_file(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    whole, partial = b"CDF\x01" + os.urandom(8000), b"CDF\x01" + os.urandom(3000)
    ftp.add("up/x.nc", whole)
    ftp.add("up/x.nc.part", partial)
    await add_provider(dsn, "up", ftp.base, FAST, protocol="ftp",
                       credentials=[(USER, PASSWORD, 1)])
    await queue(dsn, ftp.base + "up/x.nc.part")  # fetched first
    await drain(settings)
    await queue(dsn, ftp.base + "up/*")
    await drain(settings)
    got = {r["url"].rsplit("/", 1)[-1]: r for r in await rows(dsn)}
    assert {n: r["status"] for n, r in got.items()} == {"x.nc.part": "done", "x.nc": "done"}
    assert Path(got["x.nc"]["path"]).read_bytes() == whole
    assert Path(got["x.nc.part"]["path"]).read_bytes() == partial
    assert not Path(got["x.nc.part"]["path"]).name.endswith(".part")


async def test_a_glob_mixing_hosts_fails_the_request_and_queues_nothing(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("feed/a.nc", b"CDF\x01a")
    other = ftp.base.replace("127.0.0.1", "localhost")
    request_id = await queue(dsn, ftp.base + "feed/*.nc", other + "feed/a.nc")
    await drain(settings)
    [req] = await _requests(dsn)
    assert req["id"] == request_id and req["status"] == "failed"
    assert "must all belong to one provider" in req["error"]
    assert await rows(dsn) == []
    assert ftp.sent_commands("MLSD") == []


async def test_a_glob_with_a_checksum_is_refused(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("feed/a.nc", b"CDF\x01a")
    result = cli("get", ftp.base + "feed/*.nc", "--checksum", "md5:" + "0" * 32, dsn=dsn,
                 home=settings.home)
    assert result.returncode == 2 and result.stdout == ""
    assert "checksum" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert await _requests(dsn) == []
    await queue(dsn, ftp.base + "feed/*.nc", checksum="md5:" + "0" * 32)  # the psql way
    await drain(settings)
    [req] = await _requests(dsn)
    assert req["status"] == "failed" and "checksum cannot apply" in req["error"]
    assert await rows(dsn) == []


async def test_wildcards_in_folders_fail_a_psql_request_with_its_reason(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("2024/03/a.nc", b"CDF\x01a")
    result = cli("get", ftp.base + "2024/*/a.nc", dsn=dsn, home=settings.home)
    assert result.returncode == 2 and "file name only" in result.stderr
    await queue(dsn, ftp.base + "2024/*/a.nc")
    await drain(settings)
    [req] = await _requests(dsn)
    assert req["status"] == "failed" and "file name only" in req["error"]


async def test_a_glob_at_the_login_folder_and_names_that_need_quoting(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    names = ["a#1.nc", "b%20c.nc", "q?.nc", "sp ace.nc", "plus+.nc"]
    data = {n: b"CDF\x01" + os.urandom(1000 + i) for i, n in enumerate(names)}
    for name, body in data.items():
        ftp.add(name, body)
    await add_provider(dsn, "root", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "*.nc")
    await drain(settings)
    got = await rows(dsn)
    assert [r["status"] for r in got] == ["done"] * len(names)
    assert sorted(Path(r["path"]).read_bytes() for r in got) == sorted(data.values())
    assert ftp.sent_commands("MLSD") == [""]
    assert sorted(ftp.sent_commands("RETR")) == sorted(names)


async def test_a_long_search_lists_each_folder_once(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    for day in range(1, 29):
        ftp.add(f"sst/2024/02/sst_202402{day:02d}.nc", b"CDF\x01" + bytes([day]) * 100)
    for day in range(1, 13):
        ftp.add(f"sst/2024/03/sst_202403{day:02d}.nc", b"CDF\x01" + bytes([day]) * 100)
    await add_provider(dsn, "cmems", ftp.base, FAST, protocol="ftp")
    result = cli("search", "cmems", "--collection", "sst/{date:%Y/%m}/sst_{date:%Y%m%d}.nc",
                 "--start", "2024-02-01", "--end", "2024-03-11", dsn=dsn, home=settings.home)
    assert result.returncode == 0, result.stderr
    await _resolve_with_transfers_parked(settings, dsn, ftp, transfers=4)
    assert len(await rows(dsn)) == 28 + 11
    assert sorted(ftp.sent_commands("MLSD")) == ["sst/2024/02", "sst/2024/03"]


async def test_a_search_that_cannot_log_in_over_tls_fails_instead_of_finding_nothing(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("sst/2024/03/sst_20240301.nc", b"CDF\x01x")
    tls_base = ftp.base.replace("ftp://", "ftps://")  # this server does not know AUTH TLS
    await add_provider(dsn, "secure", tls_base, FAST, protocol="ftp")
    result = cli("search", "secure", "--collection", "sst/{date:%Y/%m}/*_{date:%Y%m%d}.nc",
                 "--start", "2024-03-01", "--end", "2024-03-03", dsn=dsn, home=settings.home)
    assert result.returncode == 0, result.stderr
    await drain(settings)
    [req] = await _requests(dsn)
    assert ftp.sent_commands("USER") == [] and not ftp.logins
    assert req["status"] == "failed" and "TLS" in (req["error"] or "")


async def test_a_glob_that_cannot_log_in_over_tls_fails_with_the_reason(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("feed/a.nc", b"CDF\x01x")
    await queue(dsn, ftp.base.replace("ftp://", "ftps://") + "feed/*.nc")
    await drain(settings)
    [req] = await _requests(dsn)
    assert req["status"] == "failed" and "refused TLS" in req["error"], req["error"]
    assert ftp.sent_commands("USER") == [] and ftp.sent_commands("PASS") == []


async def test_proftpd_style_symlinks_in_mlsd_are_resolved(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = b"CDF\x01" + os.urandom(3000)
    ftp.add("nrt/sst_20240301.nc", data)
    ftp.add("2024/03/01/x.nc", b"CDF\x01x")
    os.symlink("sst_20240301.nc", ftp.root / "nrt" / "latest.nc")
    os.symlink("../2024/03/01", ftp.root / "nrt" / "today")
    ftp.listings["MLSD", "nrt"] = (
        b"modify=20240301120000;perm=adfr;size=3004;type=file;unique=801U1; "
        b"sst_20240301.nc\r\n"
        b"modify=20240301120000;perm=adfr;size=15;type=OS.unix=slink:sst_20240301.nc;"
        b"unique=801U2; latest.nc\r\n"
        b"modify=20240301120000;perm=adfr;size=13;type=OS.unix=slink:../2024/03/01;"
        b"unique=801U3; today\r\n")
    await add_provider(dsn, "proftpd", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "nrt/*")
    await drain(settings)
    got = {r["url"].rsplit("/", 1)[-1]: (r["status"], r["error"]) for r in await rows(dsn)}
    assert got == {"sst_20240301.nc": ("done", None), "latest.nc": ("done", None)}


async def test_a_search_limit_on_a_one_connection_account_leaves_no_session_behind(
        dsn: str, settings: Settings) -> None:
    """`search --limit 1` stops reading the catalog in the middle of its listing session:
    that session must be gone before the download logs in (the server allows one)."""
    with FtpServer(users={"bob": "pw-bob-9931"}, max_per_user=1) as capped:
        for day in ("20240301", "20240302"):
            capped.add(f"sst/{day}/sst_{day}_a.nc", b"CDF\x01" + os.urandom(2000))
            capped.add(f"sst/{day}/sst_{day}_b.nc", b"CDF\x01" + os.urandom(2000))
        await add_provider(dsn, "capped", capped.base, FAST, protocol="ftp",
                           credentials=[("bob", "pw-bob-9931", 1)])
        result = cli("search", "capped", "--collection", "sst/{date:%Y%m%d}/*.nc",
                     "--start", "2024-03-01", "--end", "2024-03-02", "--limit", "1",
                     dsn=dsn, home=settings.home)
        assert result.returncode == 0, result.stderr
        await drain(settings)
        assert [(r["name"], r["status"]) for r in await rows(dsn)] == \
            [("sst_20240301_a.nc", "done")]
        assert capped.over_limit == 0 and capped.peak["bob"] == 1
        await _wait_until(lambda: capped.active["bob"] == 0, "every session to end")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("hunt-tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_an_ftps_glob_lists_and_fetches_over_tls_only(
        tls_files: tuple[Path, Path], dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))  # the system trust store, here
    server = await TlsFtpServer(*tls_files, mlsd=True).start()
    try:
        data = {n: b"CDF\x01" + os.urandom(5000) for n in ("a.nc", "b.nc")}
        for name, body in data.items():
            server.files[f"secure/{name}"] = body
        server.files["secure/sub/c.nc"] = b"CDF\x01c"
        server.files["secure/notes.txt"] = b"not a product"
        secret = "tls-pw:@/9"
        await queue(dsn, f"ftps://erin:{quote(secret, safe='')}@127.0.0.1:{server.port}"
                    "/secure/*.nc")
        await drain(settings)
        got = await rows(dsn)
        assert [r["status"] for r in got] == ["done", "done"], [r["error"] for r in got]
        assert {r["name"]: Path(r["path"]).read_bytes() for r in got} == data
        assert server.data_tls == [True, True, True]  # the listing and both files
        assert all(encrypted for command, _arg, encrypted in server.commands
                   if command != "AUTH")
        assert secret not in repr(server.commands)
    finally:
        await server.stop()


# -- the daemon stopped, killed or overruled while it lists ------------------------------------


async def test_sigkill_while_listing_resolves_the_request_later_once(
        ftp: FtpServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data = {f"sst_{i}.nc": b"CDF\x01" + os.urandom(4000 + i) for i in range(3)}
    for name, body in data.items():
        ftp.add(f"feed/{name}", body)
    await add_provider(dsn, "slow", ftp.base, FAST, protocol="ftp",
                       credentials=[(USER, PASSWORD, 2)])
    dest = tmp_path / "dest"
    await queue(dsn, ftp.base + "feed/*.nc", dest=dest)
    ftp.delay["MLSD"] = 30.0  # the first listing hangs until the daemon dies

    first = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(first)
    await _wait_until(lambda: ftp.sent_commands("MLSD") == ["feed"], "the listing to start")
    first.signal(signal.SIGKILL)
    first.wait()
    [req] = await _requests(dsn)
    assert req["status"] == "queued" and await rows(dsn) == []
    await _wait_until(lambda: ftp.active[USER] == 0, "the server to drop the session")

    del ftp.delay["MLSD"]
    second = DaemonProcess(dsn, tmp_path / "home", "--exit-when-idle")
    daemons.append(second)
    assert await asyncio.to_thread(second.wait, 20) == 0
    # the same pattern asked again: nothing is queued or fetched twice
    await queue(dsn, ftp.base + "feed/*.nc", dest=dest)
    third = DaemonProcess(dsn, tmp_path / "home", "--exit-when-idle")
    daemons.append(third)
    assert await asyncio.to_thread(third.wait, 20) == 0

    assert [r["status"] for r in await _requests(dsn)] == ["resolved", "resolved"]
    got = await rows(dsn)
    assert sorted(r["name"] for r in got) == sorted(data)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in got)
    assert _files_under(dest / "slow") == data
    assert sorted(ftp.sent_commands("RETR")) == sorted(f"feed/{n}" for n in data)
    links = await sql(dsn, "SELECT request_id, download_id FROM request_download")
    assert len(links) == 2 * len(data)
    assert PASSWORD not in "".join(first.raw + second.raw + third.raw)


async def test_sigterm_while_listing_exits_at_once_and_keeps_the_request(
        ftp: FtpServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    ftp.add("feed/a.nc", b"CDF\x01a")
    await add_provider(dsn, "slow", ftp.base, FAST, protocol="ftp",
                       credentials=[(USER, PASSWORD, 2)])
    await queue(dsn, ftp.base + "feed/*.nc", dest=tmp_path / "dest")
    ftp.delay["MLSD"] = 30.0
    proc = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(proc)
    await _wait_until(lambda: ftp.sent_commands("MLSD") == ["feed"], "the listing to start")
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0
    assert time.monotonic() - began < 4
    [req] = await _requests(dsn)
    assert req["status"] == "queued" and req["error"] is None
    assert await rows(dsn) == []
    await _wait_until(lambda: ftp.active[USER] == 0, "the server to drop the session")


async def test_a_request_cancelled_with_sql_while_listing_queues_nothing(
        ftp: FtpServer, dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    ftp.add("feed/a.nc", b"CDF\x01a")
    ftp.add("feed/b.nc", b"CDF\x01b")
    await add_provider(dsn, "slow", ftp.base, FAST, protocol="ftp",
                       credentials=[(USER, PASSWORD, 2)])
    request_id = await queue(dsn, ftp.base + "feed/*.nc")
    ftp.delay["MLSD"] = 1.0
    locked: list[object] = []  # what the resolver found when it came to queue the products
    request_lock = queries.request_lock

    async def spy(db: Any, rid: int) -> Any:
        found = await request_lock(db, rid)
        locked.append(found)
        return found

    monkeypatch.setattr(queries, "request_lock", spy)

    async def cancel_while_listing() -> None:
        await _wait_until(lambda: ftp.sent_commands("MLSD") != [], "the listing to start")
        await sql(dsn, "UPDATE request SET status = 'cancelled' WHERE id = $1", request_id)

    canceller = asyncio.create_task(cancel_while_listing())
    with capture_logs() as logs:

        async def resolver_done() -> bool:
            return bool(locked) or any(e["event"] == "request search stopped" for e in logs)

        await _serve_until(settings, resolver_done)
    await canceller
    # the listing is stopped by the cancellation's notification, or, if it ended first,
    # finds the request no longer to resolve
    assert locked in ([], [None])
    [req] = await _requests(dsn)
    assert req["status"] == "cancelled"
    assert await rows(dsn) == []
    assert not [e for e in logs if e["event"] in ("request resolved", "request failed")]


# -- connection slots --------------------------------------------------------------------------


async def test_listings_and_transfers_together_respect_the_account_cap(
        dsn: str, settings: Settings) -> None:
    with FtpServer(users={"bob": "pw-bob-9931"}, max_per_user=2) as capped:
        for i in range(4):
            capped.add(f"plain/S3A_{i}.nc", b"CDF\x01" + os.urandom(200_000), rate=1_000_000)
        for day in ("20240301", "20240302"):
            for j in range(2):
                capped.add(f"sst/2024/03/sst_{day}_{j}.nc", b"CDF\x01" + os.urandom(100_000),
                           rate=1_000_000)
            capped.add(f"glob{day}/x_{day}.nc", b"CDF\x01" + os.urandom(50_000))
        capped.delay["MLSD"] = 0.2
        await add_provider(dsn, "capped", capped.base, FAST, protocol="ftp",
                           credentials=[("bob", "pw-bob-9931", 2)])
        await queue(dsn, *(capped.base + f"plain/S3A_{i}.nc" for i in range(4)))
        await queue(dsn, capped.base + "glob20240301/*.nc", capped.base + "glob20240302/*.nc")
        result = cli("search", "capped", "--collection", "sst/{date:%Y/%m}/sst_{date:%Y%m%d}_*",
                     "--start", "2024-03-01", "--end", "2024-03-02", dsn=dsn,
                     home=settings.home)
        assert result.returncode == 0, result.stderr
        await drain(settings)
        got = await rows(dsn)
        assert len(got) == 4 + 2 + 4 and {r["status"] for r in got} == {"done"}
        assert capped.over_limit == 0 and capped.peak["bob"] == 2
        assert capped.active["bob"] == 0


async def test_a_listing_refused_for_too_many_sessions_is_waited_out(
        dsn: str, settings: Settings) -> None:
    """The account's only session is held by another client (an operator's FileZilla, a
    second machine): the listing is refused with 421 until it ends, then goes through."""
    with FtpServer(users={"bob": "pw-bob-9931"}, max_per_user=1) as capped:
        capped.add("feed/a.nc", b"CDF\x01" + os.urandom(1000))
        await add_provider(dsn, "capped", capped.base, FAST, protocol="ftp",
                           credentials=[("bob", "pw-bob-9931", 1)])
        other = aioftp.Client()
        await other.connect("127.0.0.1", capped.port)
        await other.login("bob", "pw-bob-9931")
        try:
            await queue(dsn, capped.base + "feed/*.nc")
            waiting = asyncio.create_task(drain(settings, timeout=15))
            await _wait_until(lambda: capped.over_limit >= 3, "refused sessions")
            await asyncio.sleep(1.0)
        finally:
            other.close()
        await _wait_until(lambda: capped.active["bob"] == 0, "the other session to end")
        await waiting
        [req] = await _requests(dsn)
        assert req["status"] == "resolved", req["error"]
        assert [r["status"] for r in await rows(dsn)] == ["done"]


async def test_a_refused_login_while_listing_is_tried_twice_like_a_download(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("feed/a.nc", b"CDF\x01a")
    await add_provider(dsn, "auth", ftp.base, FAST, protocol="ftp")
    wrong = "wr0ng-pw-secret"
    await queue(dsn, ftp.url("feed/*.nc", user=USER, password=wrong))
    with capture_logs() as logs:
        await drain(settings)
    [req] = await _requests(dsn)
    assert req["status"] == "failed" and "refused the login as 'ocean'" in req["error"]
    assert wrong not in repr(logs) and wrong not in repr(list(req))
    assert len(ftp.sent_commands("PASS")) <= 2


async def test_a_cancelled_request_stops_its_throttled_listing_retries(
        dsn: str, settings: Settings) -> None:
    with FtpServer(users={"bob": "pw-bob-9931"}, max_per_user=1) as capped:
        capped.add("feed/a.nc", b"CDF\x01" + os.urandom(1000))
        await add_provider(dsn, "capped", capped.base, FAST, protocol="ftp",
                           credentials=[("bob", "pw-bob-9931", 1)])
        other = aioftp.Client()
        await other.connect("127.0.0.1", capped.port)
        await other.login("bob", "pw-bob-9931")
        stop = False

        async def stopped() -> bool:
            return stop

        try:
            request_id = await queue(dsn, capped.base + "feed/*.nc")
            serving = asyncio.create_task(_serve_until(settings, stopped))
            await _wait_until(lambda: capped.over_limit >= 2, "refused sessions")
            await sql(dsn, "UPDATE request SET status = 'cancelled' WHERE id = $1",
                       request_id)
            await asyncio.sleep(0.5)
            after_cancel = capped.over_limit
            await asyncio.sleep(1.5)
            later = capped.over_limit
            stop = True
            await sql(dsn, "NOTIFY asyncsat")  # a turn of the loop, to see `stop`
            await serving
        finally:
            other.close()
        assert later == after_cancel, f"{later - after_cancel} more logins after the cancel"
        assert await rows(dsn) == []


async def test_absolute_and_spaced_folders_in_patterns(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    """`%2F` makes a pattern's folder absolute (RFC 1738); spaces and `#` in folders are
    percent-encoded in the URL and decoded for MLSD and RETR."""
    a, b = b"CDF\x01" + os.urandom(700), b"CDF\x01" + os.urandom(800)
    ftp.add("pub/a.nc", a)
    ftp.add("dir with space/#2/b.nc", b)
    await add_provider(dsn, "paths", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "%2Fpub/*.nc", ftp.base + "dir%20with%20space/%232/*.nc")
    await drain(settings)
    got = {r["name"]: r for r in await rows(dsn)}
    assert {n: r["status"] for n, r in got.items()} == {"a.nc": "done", "b.nc": "done"}
    assert Path(got["a.nc"]["path"]).read_bytes() == a
    assert Path(got["b.nc"]["path"]).read_bytes() == b
    assert sorted(ftp.sent_commands("MLSD")) == ["/pub", "dir with space/#2"]
    assert sorted(ftp.sent_commands("RETR")) == ["/pub/a.nc", "dir with space/#2/b.nc"]


# -- protocol faults ---------------------------------------------------------------------------


async def test_epsv_refused_falls_back_to_pasv_and_both_refused_fails_clearly(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = b"CDF\x01" + os.urandom(50_000)
    ftp.add("feed/a.nc", data)
    ftp.add("feed/b.nc", data)
    await add_provider(dsn, "pasv", ftp.base, FAST, protocol="ftp",
                       credentials=[(USER, PASSWORD, 1)])
    ftp.script["EPSV"] = ['500 Command "EPSV" not understood.'] * 2  # listing + a.nc
    await queue(dsn, ftp.base + "feed/a*.nc")
    await drain(settings)
    [a] = await rows(dsn)
    assert a["status"] == "done" and Path(a["path"]).read_bytes() == data
    assert len(ftp.sent_commands("PASV")) == 2

    ftp.script["EPSV"] = ["502 No."] * 10
    ftp.script["PASV"] = ["502 No passive mode here."] * 10
    await queue(dsn, ftp.base + "feed/b.nc")
    await drain(settings)
    b = next(r for r in await rows(dsn) if r["url"].endswith("/b.nc"))
    assert b["status"] == "failed" and b["attempts"] == 1
    assert "502 No passive mode here" in b["error"]


async def test_550_on_size_for_a_file_that_exists(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = b"CDF\x01" + os.urandom(300_000)
    f = ftp.add("feed/nosize.nc", data, drop_after=[100_000])
    ftp.script["SIZE"] = ["550 SIZE not allowed."] * 10
    await add_provider(dsn, "nosize", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "feed/nosize.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done" and Path(row["path"]).read_bytes() == data
    # resumed with REST although the size was unknown, 4 kB early to check the overlap
    assert f.starts == [0, 100_000 - OVERLAP]


async def test_rest_acknowledged_but_ignored_is_caught_by_the_size(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = b"CDF\x01" + os.urandom(400_000)
    f = ftp.add("feed/liar.nc", data, drop_after=[150_000])
    ftp.fake_rest = True
    await add_provider(dsn, "liar", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "feed/liar.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done" and Path(row["path"]).read_bytes() == data
    assert ftp.sent_commands("REST") == ["150000"]
    assert f.starts == [0, 0, 0]  # the lie (part + whole file) was thrown away


async def test_rest_acknowledged_but_ignored_without_size_is_not_done_corrupt(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = b"CDF\x01" + os.urandom(400_000)
    ftp.add("feed/liar.nc", data, drop_after=[150_000])
    ftp.fake_rest = True
    ftp.script["SIZE"] = ["550 SIZE not allowed."] * 10
    await add_provider(dsn, "liar", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "feed/liar.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done" and Path(row["path"]).read_bytes() == data
    # the resume asked 4 kB early, saw other bytes than the kept ones, started again
    assert "the bytes it sent again differ" in repr(
        await sql(dsn, "SELECT error FROM download_event"))


async def test_a_file_growing_while_fetched_by_get_is_fetched_again_whole(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    head, tail = b"CDF\x01" + os.urandom(100_000), os.urandom(50_000)
    ftp.add("feed/growing.nc", head, grow=tail)
    await add_provider(dsn, "nrt", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "feed/growing.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done" and Path(row["path"]).read_bytes() == head + tail
    assert row["size"] == len(head + tail)


async def test_a_file_listed_while_still_uploading_is_fetched_whole(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    head, tail = b"CDF\x01" + os.urandom(60_000), os.urandom(40_000)
    ftp.add("nrt/sst_20240301.nc", head)
    await add_provider(dsn, "nrt", ftp.base, FAST, protocol="ftp")
    await queue(dsn, ftp.base + "nrt/*.nc")
    await _resolve_with_transfers_parked(settings, dsn, ftp, transfers=1)  # listed mid-upload
    ftp.change("nrt/sst_20240301.nc", head + tail, mtime=ftp.files[
        "nrt/sst_20240301.nc"].mtime)  # the upload completes
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row["error"]
    assert Path(row["path"]).read_bytes() == head + tail


async def test_a_stale_part_file_is_resumed_or_restarted(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    """`.part` files left by an earlier run (its rows lost): one that is a prefix of the
    product is resumed with REST, one longer than the product starts again from zero."""
    a, b = b"CDF\x01" + os.urandom(200_000), b"CDF\x01" + os.urandom(50_000)
    fa, fb = ftp.add("feed/a.nc", a), ftp.add("feed/b.nc", b)
    await add_provider(dsn, "stale", ftp.base, FAST, protocol="ftp")
    folder = _dest(settings, "stale")
    folder.mkdir(parents=True)
    (folder / "a.nc.part").write_bytes(a[:120_000])
    (folder / "b.nc.part").write_bytes(os.urandom(80_000))
    (folder / "c.nc.part").write_bytes(b"left by someone else")
    await queue(dsn, ftp.base + "feed/*.nc")
    await drain(settings)
    assert [r["status"] for r in await rows(dsn)] == ["done", "done"]
    assert (folder / "a.nc").read_bytes() == a and (folder / "b.nc").read_bytes() == b
    assert fa.starts == [120_000] and fb.starts == [0]
    assert (folder / "c.nc.part").read_bytes() == b"left by someone else"


async def test_a_transfer_cancelled_during_quit_closes_its_control_connection(
        ftp: FtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    clients: list[aioftp.Client] = []

    class Recorded(aioftp.Client):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            clients.append(self)

    monkeypatch.setattr(aioftp, "Client", Recorded)
    data = os.urandom(20_000)
    ftp.add("q.nc", data)
    ftp.delay["QUIT"] = 5.0  # a slow goodbye
    driver = FtpDriver(read_timeout=5, quit_timeout=10)

    async def fetch() -> bytes:
        async with driver.open(Source(ftp.url("q.nc")), 0, Validator()) as stream:
            return b"".join([chunk async for chunk in stream.chunks(1 << 20)])

    task = asyncio.create_task(fetch())
    await _wait_until(lambda: ftp.sent_commands("QUIT") != [], "the QUIT")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    [client] = clients
    writer = client.stream.writer
    try:
        assert writer.is_closing()
    finally:
        writer.close()


async def test_a_transfer_cancelled_as_its_connection_opens_stops(
        ftp: FtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    ftp.add("c.nc", os.urandom(50_000))
    real_open = aioftp.client.open_connection
    victims: list[asyncio.Task[bytes]] = []

    async def opened_as_the_stop_comes(*args: Any, **kwargs: Any) -> Any:
        connection = await real_open(*args, **kwargs)
        if victims:  # the stop arrives in the very iteration the connection opens
            victims.pop().cancel()
        return connection

    monkeypatch.setattr(aioftp.client, "open_connection", opened_as_the_stop_comes)
    driver = FtpDriver(read_timeout=5)

    async def fetch() -> bytes:
        async with driver.open(Source(ftp.url("c.nc")), 0, Validator()) as stream:
            return b"".join([chunk async for chunk in stream.chunks(1 << 20)])

    task = asyncio.create_task(fetch())
    victims.append(task)
    try:
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ftp.sent_commands("RETR") == []
    finally:
        await _wait_until(lambda: ftp.active["anonymous"] == 0, "the session to end")


# -- logins and secrets ------------------------------------------------------------------------


async def test_a_password_with_special_characters_in_an_ftp_url(
        dsn: str, settings: Settings) -> None:
    """`@ : / % ? #` percent-encoded in the URL: the login works for the listing and the
    transfers, the URL's user wins over the provider's credential, nothing leaks."""
    secret = "p@ss:w/rd%?#-9981"
    with FtpServer(users={"dave": secret, USER: PASSWORD}) as ftp:
        data = {n: b"CDF\x01" + os.urandom(3000) for n in ("a.nc", "b.nc")}
        for name, body in data.items():
            ftp.add(f"feed/{name}", body)
        await add_provider(dsn, "special", ftp.base, FAST, protocol="ftp",
                           credentials=[(USER, PASSWORD, 2)])
        await queue(dsn, ftp.url("feed/*.nc", user="dave", password=secret))
        with capture_logs() as logs:
            await drain(settings)
        got = await rows(dsn)
        assert [r["status"] for r in got] == ["done", "done"]
        assert set(ftp.logins) == {"dave"}
        stored = await sql(dsn, "SELECT r.urls, r.error, d.url, d.error FROM request r"
                            " JOIN download d ON d.request_id = r.id")
        for text in (repr([tuple(r) for r in stored]), repr(logs)):
            for form in (secret, "p%40ss", "w/rd%"):
                assert form not in text


async def test_an_unencoded_at_sign_in_a_password_does_not_leak_on_failure(
        dsn: str, settings: Settings) -> None:
    secret = "hunter@2024-secret"
    with FtpServer(users={"dave": secret}) as ftp:
        url = f"ftp://dave:{secret}@127.0.0.1:{ftp.port}/missing/*.nc"
        await queue(dsn, url)
        await drain(settings)
        assert ftp.logins["dave"] == 1  # the login itself worked
    [req] = await _requests(dsn)
    assert req["status"] == "failed" and "folder not found" in req["error"]
    assert "2024-secret" not in repr(list(req))


async def test_an_unencoded_hash_in_a_password_does_not_leak_in_errors(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    url = f"ftp://dave:Sup3rSecret#24@127.0.0.1:{ftp.port}/feed/x.nc"
    result = cli("get", url, dsn=dsn, home=settings.home)
    assert result.returncode == 2
    await queue(dsn, url)
    await drain(settings)
    [req] = await _requests(dsn)
    assert req["status"] == "failed"
    assert "Sup3rSecret" not in result.stderr + result.stdout
    assert "Sup3rSecret" not in repr(list(req))


async def test_a_server_echoing_the_password_in_its_replies_is_masked(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    ftp.add("feed/a.nc", b"CDF\x01a")
    await add_provider(dsn, "echo", ftp.base, FAST, protocol="ftp")
    ftp.script["PASS"] = [f"530 Login incorrect: user {USER} password {PASSWORD}"] * 10
    await queue(dsn, ftp.url("feed/*.nc", user=USER, password=PASSWORD))
    await queue(dsn, ftp.url("feed/a.nc", user=USER, password=PASSWORD))
    with capture_logs() as logs:
        await drain(settings)
    pattern_request, _plain = await _requests(dsn)
    assert pattern_request["status"] == "failed" and "530" in pattern_request["error"]
    [row] = await rows(dsn)
    assert row["status"] == "failed" and "530" in row["error"]
    everything = repr(logs) + repr([list(r) for r in await _requests(dsn)]) + repr(row)
    assert PASSWORD not in everything


async def test_anonymous_login_and_url_user_without_password(
        dsn: str, settings: Settings) -> None:
    """No credential: the listing and the transfers log in as `anonymous` with an e-mail
    like password; a URL user without password logs in with an empty one."""
    with FtpServer(users={"guest": ""}, anonymous=True) as ftp:
        ftp.add("pub/a.nc", b"CDF\x01" + os.urandom(1000))
        ftp.add("pub/b.dat", b"CDF\x01" + os.urandom(1000))
        await queue(dsn, ftp.base + "pub/*.nc")
        await queue(dsn, f"ftp://guest@127.0.0.1:{ftp.port}/pub/b.dat")
        await drain(settings)
        assert [r["status"] for r in await rows(dsn)] == ["done", "done"]
        assert ftp.logins == {"anonymous": 2, "guest": 1}
