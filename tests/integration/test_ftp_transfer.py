"""The FTP driver and the daemon against a real loopback FTP server that injects faults."""

from __future__ import annotations

import os
import random
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from asyncsat.auth.base import Login
from asyncsat.config import Settings
from asyncsat.errors import PermanentError, RetryableError
from asyncsat.transfer.base import RemoteEntry, Source, Validator
from asyncsat.transfer.ftp import FtpDriver
from tests.ftpserver import FtpServer, TlsFtpServer
from tests.helpers import add_provider, drain, queue, rows
from tests.servers import FileServer

PROVIDER = "ftplocal"
USER, PASSWORD = "alice", "s3cret-alice-pw"
FAST = {"backoff_initial": 0.05, "backoff_max": 0.3}


@pytest.fixture
def ftp() -> Iterator[FtpServer]:
    with FtpServer(users={USER: PASSWORD}, anonymous=True) as server:
        yield server


@pytest.fixture(autouse=True)
async def ftp_provider(ftp: FtpServer, dsn: str) -> None:
    """The loopback server as an FTP provider with short backoffs (anonymous, 4 connections)."""
    await add_provider(dsn, PROVIDER, ftp.base, FAST, protocol="ftp")


def _final(settings: Settings, name: str) -> Path:
    assert settings.dest is not None
    return settings.dest / PROVIDER / name


def _parts(settings: Settings) -> list[Path]:
    assert settings.dest is not None
    return list(settings.dest.rglob("*.part"))


async def _download_row(dsn: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow("SELECT * FROM download")
    finally:
        await conn.close()


# -- the driver alone --------------------------------------------------------------------------


async def _fetch(driver: FtpDriver, source: Source, offset: int = 0,
                 validator: Validator | None = None) -> tuple[int, bytes]:
    async with driver.open(source, offset, validator or Validator()) as stream:
        body = b"".join([chunk async for chunk in stream.chunks(1 << 20)])
        return stream.opened.offset, body


async def test_driver_percent_decodes_the_path_and_reports_size_and_mdtm(
        ftp: FtpServer) -> None:
    data = os.urandom(70_000)
    f = ftp.add("dir with space/S3A_SL_2_WST 1.nc", data)
    driver = FtpDriver(read_timeout=5)
    async with driver.open(Source(ftp.url(f.name)), 0, Validator()) as stream:
        opened = stream.opened
        body = b"".join([chunk async for chunk in stream.chunks(1 << 20)])
    assert body == data
    assert opened.offset == 0 and opened.total == len(data)
    assert opened.validator == Validator(etag=f"size:{len(data)}", last_modified=f.mdtm)
    assert ftp.sent_commands("RETR") == ["dir with space/S3A_SL_2_WST 1.nc"]
    assert ftp.sent_commands("TYPE")[0] == "I"
    assert ftp.logins["anonymous"] == 1 and ftp.active["anonymous"] == 0  # QUIT was said


async def test_driver_control_connection_timeout_is_retryable(ftp: FtpServer) -> None:
    data = os.urandom(10_000)
    ftp.add("slow.nc", data)
    ftp.script["SIZE"] = [None]  # the server never answers the first SIZE
    driver = FtpDriver(read_timeout=0.3, quit_timeout=0.3)
    with pytest.raises(RetryableError, match="timed out waiting for the FTP server"):
        await _fetch(driver, Source(ftp.url("slow.nc")))
    assert await _fetch(driver, Source(ftp.url("slow.nc"))) == (0, data)


async def test_driver_resumes_with_rest_and_detects_a_short_transfer(ftp: FtpServer) -> None:
    data = os.urandom(500_000)
    f = ftp.add("lie.nc", data, drop_after=[123_456], drop_mode="lie")  # 226 after a cut
    driver = FtpDriver(read_timeout=5)
    source = Source(ftp.url("lie.nc"), Login(USER, PASSWORD))
    received = bytearray()
    with pytest.raises(RetryableError, match="connection broken mid-file: got 123456 of"):
        async with driver.open(source, 0, Validator()) as stream:
            validator = stream.opened.validator
            async for chunk in stream.chunks(1 << 20):
                received += chunk
    assert len(received) == 123_456
    offset, rest = await _fetch(driver, source, len(received), validator)
    assert offset == 123_456 and bytes(received) + rest == data
    assert f.starts == [0, 123_456]
    assert ftp.peak[USER] == 1 and ftp.active[USER] == 0


@pytest.mark.parametrize("mlsd", [True, False])
async def test_driver_lists_a_folder(ftp: FtpServer, mlsd: bool) -> None:
    ftp.add("feed/2024/03/sst_20240301.nc", os.urandom(1234))
    ftp.add("feed/2024/03/sst 20240302.nc", os.urandom(99))
    ftp.add("feed/2024/03/old/x.nc", b"x")
    if not mlsd:
        ftp.script["MLSD"] = ['500 Command "MLSD" not understood.']  # LIST is used instead
    driver = FtpDriver(read_timeout=5)
    entries = await driver.list_dir(Source(ftp.base + "feed/2024/03/", Login(USER, PASSWORD)))
    assert sorted(entries, key=lambda e: e.name) == [
        RemoteEntry("old", None, is_dir=True),
        RemoteEntry("sst 20240302.nc", 99), RemoteEntry("sst_20240301.nc", 1234)]
    assert ftp.sent_commands("LIST" if not mlsd else "MLSD") == ["feed/2024/03"]
    with pytest.raises(PermanentError, match=r"folder not found .*: feed/2025"):
        await driver.list_dir(Source(ftp.base + "feed/2025/", Login(USER, PASSWORD)))
    assert ftp.active[USER] == 0


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key), made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
async def ftps(tls_cert: tuple[Path, Path]) -> AsyncIterator[TlsFtpServer]:
    server = await TlsFtpServer(*tls_cert).start()
    yield server
    await server.stop()


async def test_ftps_encrypts_the_login_and_the_data(ftps: TlsFtpServer,
                                                    tls_cert: tuple[Path, Path]) -> None:
    data = os.urandom(300_000)
    ftps.files["secure/S6A_P4_2.nc"] = data
    driver = FtpDriver(read_timeout=5, ssl_context=ssl.create_default_context(
        cafile=str(tls_cert[0])))
    source = Source(ftps.url("secure/S6A_P4_2.nc"), Login("dave", "pw-dave-55"))
    assert await _fetch(driver, source) == (0, data)
    sent = {command: encrypted for command, _arg, encrypted in ftps.commands}
    assert [c for c, _a, _t in ftps.commands][:4] == ["AUTH", "PBSZ", "PROT", "USER"]
    assert sent["AUTH"] is False and sent["USER"] is sent["PASS"] is sent["RETR"] is True
    assert ("PROT", "P", True) in ftps.commands
    assert ftps.data_tls == [True]


async def test_ftps_with_an_untrusted_certificate_fails_permanently(
        ftps: TlsFtpServer) -> None:
    ftps.files["x.nc"] = b"x" * 100
    with pytest.raises(PermanentError, match="TLS certificate is rejected"):
        await _fetch(FtpDriver(read_timeout=5), Source(ftps.url("x.nc"), Login("dave", "pw")))
    assert [c for c, _a, _t in ftps.commands] == ["AUTH"]  # no login in clear text


async def test_ftps_refused_by_the_server_fails_permanently(
        tls_cert: tuple[Path, Path]) -> None:
    server = await TlsFtpServer(*tls_cert, offer_tls=False).start()
    try:
        server.files["x.nc"] = b"x" * 100
        with pytest.raises(PermanentError, match="the FTP server refused TLS"):
            await _fetch(FtpDriver(read_timeout=5), Source(server.url("x.nc"), Login("dave", "pw")))
        assert "USER" not in [c for c, _a, _t in server.commands]
    finally:
        await server.stop()


# -- the daemon --------------------------------------------------------------------------------


async def test_download_is_byte_identical(ftp: FtpServer, dsn: str, settings: Settings) -> None:
    data = os.urandom(1_500_000)
    f = ftp.add("S3B_OL_2_WFR.nc", data)
    await queue(dsn, ftp.url("S3B_OL_2_WFR.nc"))
    await drain(settings)

    assert _final(settings, "S3B_OL_2_WFR.nc").read_bytes() == data
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 1 and row["size"] == len(data)
    assert row["provider"] == PROVIDER
    assert f.sent == len(data) and f.starts == [0]
    stored = await _download_row(dsn)
    assert stored["etag"] == f"size:{len(data)}" and stored["last_modified"] == f.mdtm
    assert not _parts(settings)
    assert ftp.active["anonymous"] == 0


@pytest.mark.parametrize("mode", ["close", "reset", "lie"])
async def test_resume_after_the_data_connection_drops_at_a_random_offset(
        ftp: FtpServer, dsn: str, settings: Settings, mode: str) -> None:
    size = 2_000_000
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    first = rng.randrange(1, size - 2)
    second = rng.randrange(1, size - first - 1)
    data = os.urandom(size)
    f = ftp.add("S1A_EW_GRDM.nc", data, drop_after=[first, second], drop_mode=mode)
    await queue(dsn, ftp.url("S1A_EW_GRDM.nc"))
    await drain(settings)

    why = f"seed={seed} first={first} second={second} starts={f.starts}"
    assert _final(settings, "S1A_EW_GRDM.nc").read_bytes() == data, why
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 3, why
    assert len(f.starts) == 3 and f.starts[0] == 0, why
    assert ftp.sent_commands("REST") == [str(s) for s in f.starts[1:]], why
    if mode == "reset":  # a reset may lose what the client had not read yet
        assert f.starts[1] <= first and f.starts[2] <= f.starts[1] + second, why
    else:  # every byte sent was kept: the resume points are the drop points
        assert f.starts[1:] == [first, first + second], why
    # bytes sent twice: at most what was in flight when the connection broke
    assert f.sent - size <= settings.chunk_size, why
    assert not _parts(settings)


async def test_rest_refused_restarts_from_zero(ftp: FtpServer, dsn: str,
                                               settings: Settings) -> None:
    data = os.urandom(800_000)
    f = ftp.add("refused.nc", data, drop_after=[300_000])
    ftp.refuse_rest = True
    await queue(dsn, ftp.url("refused.nc"))
    with capture_logs() as logs:
        await drain(settings)

    assert _final(settings, "refused.nc").read_bytes() == data
    assert ftp.sent_commands("REST") == ["300000"]  # asked, refused: the whole file came
    assert f.starts == [0, 0] and f.sent == 300_000 + len(data)
    [refused] = [e for e in logs if e["event"] == "ftp rest refused"]
    assert refused["offset"] == 300_000 and refused["reply"].startswith("502")
    [row] = await rows(dsn)
    assert row["status"] == "done"


async def test_changed_remote_file_restarts_from_zero(ftp: FtpServer, dsn: str,
                                                     settings: Settings) -> None:
    old, new = os.urandom(900_000), os.urandom(900_000)  # same size: only MDTM tells
    f = ftp.add("changed.nc", old, drop_after=[400_000], change_after_drop=new)
    old_mdtm = f.mdtm
    await queue(dsn, ftp.url("changed.nc"))
    await drain(settings)

    assert _final(settings, "changed.nc").read_bytes() == new
    assert f.starts == [0, 0]
    assert ftp.sent_commands("REST") == []  # the change was seen before any REST
    stored = await _download_row(dsn)
    assert stored["last_modified"] == f.mdtm != old_mdtm
    [row] = await rows(dsn)
    assert row["status"] == "done"


async def test_changed_remote_file_without_mdtm_is_seen_by_its_size(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    old, new = os.urandom(700_000), os.urandom(650_000)
    ftp.no_mdtm = True
    f = ftp.add("nomdtm.nc", old, drop_after=[200_000], change_after_drop=new)
    await queue(dsn, ftp.url("nomdtm.nc"))
    await drain(settings)

    assert _final(settings, "nomdtm.nc").read_bytes() == new
    assert f.starts == [0, 0]
    stored = await _download_row(dsn)
    assert stored["etag"] == f"size:{len(new)}" and stored["last_modified"] is None


async def test_wrong_password_fails_with_a_clear_error(ftp: FtpServer, dsn: str,
                                                       settings: Settings) -> None:
    ftp.add("private.nc", os.urandom(5000))
    wrong = "wr0ng-and-secret"
    await queue(dsn, ftp.url("private.nc", user=USER, password=wrong))
    with capture_logs() as logs:
        await drain(settings)

    [row] = await rows(dsn)
    assert row["status"] == "failed"
    assert row["attempts"] == 2  # a refused login is retried once
    assert "refused the login as 'alice'" in row["error"] and "530" in row["error"]
    assert wrong not in row["error"] and wrong not in row["url"]
    assert wrong not in repr(logs)
    assert not _final(settings, "private.nc").exists()


async def test_missing_file_fails_at_once_with_a_clear_reason(ftp: FtpServer, dsn: str,
                                                              settings: Settings) -> None:
    await queue(dsn, ftp.url("gone/S2A_MSIL2A.zip"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "failed" and row["attempts"] == 1
    assert "file not found or not readable on the FTP server: gone/S2A_MSIL2A.zip" \
        in row["error"]
    assert "550" in row["error"]


async def test_transient_replies_are_retried(ftp: FtpServer, dsn: str,
                                             settings: Settings) -> None:
    data = os.urandom(60_000)
    ftp.add("busy.nc", data)
    ftp.script["PASS"] = ["421 Service not available, closing control connection."]
    ftp.script["RETR"] = ["450 Requested file action not taken: file busy.",
                          "425 Can't open data connection.",
                          "451 Requested action aborted: local error in processing."]
    await queue(dsn, ftp.url("busy.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done" and row["attempts"] == 5
    assert _final(settings, "busy.nc").read_bytes() == data


async def test_checksum_is_verified_across_a_resume(ftp: FtpServer, dsn: str,
                                                    settings: Settings) -> None:
    data = os.urandom(600_000)
    f = ftp.add("sum.nc", data, drop_after=[250_000])
    ftp.add("bad.nc", os.urandom(30_000))
    await queue(dsn, ftp.url("sum.nc"), checksum=f"md5:{f.digest('md5')}")
    await queue(dsn, ftp.url("bad.nc"), checksum="md5:" + "0" * 32)
    await drain(settings)

    good, bad = await rows(dsn)
    assert good["status"] == "done" and f.starts == [0, 250_000]
    assert _final(settings, "sum.nc").read_bytes() == data
    assert bad["status"] == "failed" and "md5 mismatch" in bad["error"]
    assert not _final(settings, "bad.nc").exists()


async def test_complete_part_file_is_verified_not_refetched(ftp: FtpServer, dsn: str,
                                                            settings: Settings) -> None:
    data = os.urandom(64_000)
    ftp.add("whole.nc", data)
    await queue(dsn, ftp.url("whole.nc"))
    await drain(settings)
    final = _final(settings, "whole.nc")
    final.rename(final.with_name("whole.nc.part"))  # renamed, but the row never said done
    conn = await asyncpg.connect(dsn)
    await conn.execute("UPDATE download SET status = 'queued'")
    await conn.close()
    await drain(settings)
    assert final.read_bytes() == data
    assert len(ftp.sent_commands("RETR")) == 1


@pytest.fixture
async def capped(dsn: str) -> AsyncIterator[FtpServer]:
    """A provider whose account `bob` allows 2 connections, on a server that counts them."""
    with FtpServer(users={"bob": "pw-bob-123"}, max_per_user=2) as server:
        await add_provider(dsn, "capped", server.base, FAST, protocol="ftp",
                           credentials=[("bob", "pw-bob-123", 2)])
        yield server


async def test_per_user_connection_cap_is_respected(capped: FtpServer, dsn: str,
                                                    settings: Settings) -> None:
    names = [f"S5P_L2_{i}.nc" for i in range(6)]
    for n in names:
        capped.add(n, os.urandom(300_000), rate=1_000_000)
    await queue(dsn, *(capped.url(n) for n in names))
    await drain(settings)

    assert [r["status"] for r in await rows(dsn)] == ["done"] * len(names)
    assert capped.peak["bob"] == 2  # every slot used, never more
    assert capped.over_limit == 0 and capped.logins["bob"] == len(names)
    assert capped.active["bob"] == 0


async def test_too_many_connections_is_waited_out_without_using_attempts(
        capped: FtpServer, dsn: str, settings: Settings) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute("UPDATE provider SET settings = settings || '{\"max_attempts\": 2}'")
    await conn.close()
    capped.max_per_user = 1  # the account really allows fewer than configured
    names = [f"S3A_{i}.nc" for i in range(4)]
    for n in names:
        capped.add(n, os.urandom(200_000), rate=1_000_000)
    await queue(dsn, *(capped.url(n) for n in names))
    await drain(settings)

    assert capped.over_limit > 0  # refused with 421 "Too many connections"
    assert capped.peak["bob"] == 1
    assert [r["status"] for r in await rows(dsn)] == ["done"] * len(names)


async def test_ftp_and_http_providers_run_side_by_side(
        ftp: FtpServer, server: FileServer, dsn: str, settings: Settings) -> None:
    ftp.add("a.nc", os.urandom(300_000), rate=1_000_000)
    server.add("b.nc", os.urandom(200_000))
    await queue(dsn, ftp.url("a.nc"), server.url("b.nc"))
    await drain(settings)
    assert {r["url"].rsplit("/", 1)[-1]: r["status"] for r in await rows(dsn)} == \
        {"a.nc": "done", "b.nc": "done"}


async def test_a_silent_data_connection_times_out_and_the_next_attempt_resumes(
        ftp: FtpServer) -> None:
    """The server stops sending mid-file and keeps the connection open: after read_timeout
    without a byte the attempt ends (a RetryableError), and REST resumes it."""
    import time

    data = os.urandom(300_000)
    ftp.add("stall.nc", data, drop_after=[120_000], drop_mode="stall")
    driver = FtpDriver(read_timeout=0.5, quit_timeout=0.3)
    received = bytearray()
    started = time.monotonic()
    with pytest.raises(RetryableError, match=r"no data from the FTP server for 0.5 s"):
        async with driver.open(Source(ftp.url("stall.nc")), 0, Validator()) as stream:
            async for chunk in stream.chunks(1 << 16):
                received += chunk
    assert time.monotonic() - started < 3
    assert len(received) == 120_000
    offset, rest = await _fetch(driver, Source(ftp.url("stall.nc")), len(received))
    assert offset == 120_000 and bytes(received) + rest == data


@pytest.mark.parametrize("size", [40_000, 2_500_000], ids=["held", "streamed"])
async def test_a_users_file_at_the_name_is_kept_over_ftp(
        ftp: FtpServer, dsn: str, settings: Settings, size: int) -> None:
    """As over HTTP: a file the daemon did not write at the product's name stays, and the
    product takes `<stem>_<id><suffix>`."""
    data, mine = os.urandom(size), b"my own notes\n"
    ftp.add("a.nc", data)
    _final(settings, "a.nc").parent.mkdir(parents=True)
    _final(settings, "a.nc").write_bytes(mine)
    await queue(dsn, ftp.url("a.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert row["name"] == f"a_{row['id']}.nc"
    assert _final(settings, row["name"]).read_bytes() == data
    assert _final(settings, "a.nc").read_bytes() == mine
    assert _parts(settings) == []
