"""FTP folders as catalogs: URL patterns and date-templated layouts, against a real server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncsat.config import Settings
from tests.conftest import cli
from tests.ftpserver import FtpServer
from tests.helpers import FAST, add_provider, drain, rows, sql

USER, PASSWORD = "ocean", "0cean-pw-77"


@pytest.fixture
def ftp() -> Iterator[FtpServer]:
    with FtpServer(users={USER: PASSWORD}, anonymous=True) as server:
        yield server



def _feed(ftp: FtpServer) -> dict[str, bytes]:
    """A CMEMS-like daily layout: sst/YYYY/MM/sst_YYYYMMDD_v2.nc, plus noise."""
    files = {}
    for day in ("20240228", "20240229", "20240301", "20240302"):
        name = f"sst/{day[:4]}/{day[4:6]}/sst_{day}_v2.nc"
        files[name] = b"CDF\x01" + os.urandom(20_000 + int(day[-2:]))
        ftp.add(name, files[name])
    ftp.add("sst/2024/03/README.txt", b"not a product")
    ftp.add("sst/2024/03/sst_20240301_v2.nc.md5", b"0" * 32)
    return files


async def test_get_with_a_glob_lists_the_folder_and_queues_each_match(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    files = _feed(ftp)
    await add_provider(dsn, "cmems", ftp.base, FAST, protocol="ftp",
                       credentials=[(USER, PASSWORD, 2)])
    result = cli("get", ftp.base + "sst/2024/03/*.nc", dsn=dsn, home=settings.home,
                 env={"ASYNCSAT_DEST": str(settings.dest)})
    assert result.returncode == 0, result.stderr
    await drain(settings)
    done = {r["name"]: r for r in await rows(dsn)}
    assert set(done) == {"sst_20240301_v2.nc", "sst_20240302_v2.nc"}
    for name, row in done.items():
        assert row["status"] == "done" and row["provider"] == "cmems"
        assert Path(row["path"]).read_bytes() == files[f"sst/2024/03/{name}"]
        assert row["size"] == len(files[f"sst/2024/03/{name}"])
    assert set(ftp.logins) == {USER}  # the listing logged in with the account too
    [req] = await sql(dsn, "SELECT status, error FROM request")
    assert req["status"] == "resolved"


async def test_a_glob_request_inserted_with_psql_and_a_login_in_the_url(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    files = _feed(ftp)
    pattern = ftp.url("sst/2024/02/sst_2024022[89]_*.nc", user=USER, password=PASSWORD)
    await sql(dsn, "INSERT INTO request (urls) VALUES ($1)", [pattern])
    await drain(settings)
    result = await rows(dsn)
    assert sorted(r["name"] for r in result) == ["sst_20240228_v2.nc", "sst_20240229_v2.nc"]
    assert {r["status"] for r in result} == {"done"}
    assert all(Path(r["path"]).read_bytes() == files[f"sst/2024/02/{r['name']}"]
               for r in result)
    stored = await sql(dsn, "SELECT r.urls, d.url FROM request r JOIN download d"
                        " ON d.request_id = r.id")
    assert PASSWORD not in repr([tuple(r) for r in stored])  # the login left the URLs
    assert set(ftp.logins) == {USER}


async def test_a_login_in_a_pattern_request_never_goes_to_another_server(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    """A psql request of one provider's, a login in one of its pattern URLs and another URL
    on another server: the login would go with both; the request fails saying so, and
    nothing is listed."""
    _feed(ftp)
    await add_provider(dsn, "feeds", ftp.base, protocol="ftp")
    with FtpServer(users={USER: PASSWORD}, anonymous=True) as other:
        await sql(dsn, "INSERT INTO request (provider_id, urls) SELECT id, $1 FROM provider",
                  [ftp.url("sst/2024/02/*.nc", user=USER, password=PASSWORD),
                   other.base + "sst/*.nc"])
        await drain(settings)
        [req] = await sql(dsn, "SELECT status, error FROM request")
        assert req["status"] == "failed" and req["error"].startswith(
            "a login in the URLs of a request with a pattern goes with each of them")
        assert not other.logins and not ftp.logins


async def test_a_pattern_in_a_missing_folder_fails_the_request_with_its_reason(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    _feed(ftp)
    await sql(dsn, "INSERT INTO request (urls) VALUES ($1)", [ftp.base + "sst/1999/*.nc"])
    await drain(settings)
    [req] = await sql(dsn, "SELECT status, error FROM request")
    assert req["status"] == "failed" and "folder not found" in req["error"], req["error"]
    assert await rows(dsn) == []


async def test_search_resolves_a_date_range_against_a_templated_layout(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    files = _feed(ftp)
    layout = "sst/{date:%Y}/{date:%m}/sst_{date:%Y%m%d}_*.nc"
    await add_provider(dsn, "cmems", ftp.base, {**FAST, "collections": {"sst-l4": layout}},
                       protocol="ftp")
    env = {"ASYNCSAT_DEST": str(settings.dest)}
    result = cli("search", "cmems", "--collection", "sst-l4", "--start", "2024-02-29",
                 "--end", "2024-03-01T12:00:00Z", dsn=dsn, home=settings.home, env=env)
    assert result.returncode == 0, result.stderr
    # the layout itself as the collection, over a range with a day that has no folder
    result = cli("search", "cmems", "--collection", layout, "--start", "2024-03-02",
                 "--end", "2024-04-01", "--limit", "5", dsn=dsn, home=settings.home, env=env)
    assert result.returncode == 0, result.stderr
    await drain(settings)
    got = {r["name"]: r for r in await rows(dsn)}
    assert set(got) == {"sst_20240229_v2.nc", "sst_20240301_v2.nc", "sst_20240302_v2.nc"}
    for name, row in got.items():
        day = name.split("_")[1]
        assert Path(row["path"]).read_bytes() == files[f"sst/2024/{day[4:6]}/{name}"]
    statuses = [r["status"] for r in await sql(dsn, "SELECT status FROM request ORDER BY id")]
    assert statuses == ["resolved", "resolved"]


async def test_search_limit_caps_the_products_queued(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    _feed(ftp)
    await add_provider(dsn, "cmems", ftp.base, FAST, protocol="ftp")
    result = cli("search", "cmems", "--collection", "sst/{date:%Y/%m}/*.nc",
                 "--start", "2024-02-01", "--end", "2024-03-31", "--limit", "3",
                 dsn=dsn, home=settings.home, env={"ASYNCSAT_DEST": str(settings.dest)})
    assert result.returncode == 0, result.stderr
    await drain(settings)
    assert len(await rows(dsn)) == 3


async def test_bad_searches_exit_2_and_write_nothing(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    await add_provider(dsn, "cmems", ftp.base, FAST, protocol="ftp")
    await add_provider(dsn, "web", "http://127.0.0.1:9/", FAST)
    for args, message in [
        (["nope", "--collection", "x"], "unknown provider"),
        (["cmems", "--collection", "sst/{date:%Y}/*.nc"], "give --start"),
        (["cmems", "--collection", "{day}/*.nc", "--start", "2024-01-01"], "template"),
        (["cmems", "--collection", "x/*/y.nc"], "file name only"),
        (["cmems", "--collection", "x", "--start", "soon"], "ISO 8601"),
        (["cmems", "--collection", "x", "--bbox", "1,2,3,4"], "only search by"),
        (["web", "--collection", "x"], "not supported yet"),
    ]:
        result = cli("search", *args, dsn=dsn, home=settings.home)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert await sql(dsn, "SELECT * FROM request") == []


async def test_get_wait_with_a_glob_downloads_in_the_foreground(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    files = _feed(ftp)
    result = cli("get", ftp.base + "sst/2024/02/*_v2.nc", "--wait", dsn=dsn,
                 home=settings.home, env={"ASYNCSAT_DEST": str(settings.dest)})
    assert result.returncode == 0, result.stderr
    done = [line.split(None, 1)[1] for line in result.stdout.splitlines()
            if line.startswith("done")]
    assert sorted(Path(p).name for p in done) == ["sst_20240228_v2.nc", "sst_20240229_v2.nc"]
    assert all(Path(p).read_bytes() == files[f"sst/2024/02/{Path(p).name}"] for p in done)
    # nothing matches: the request is resolved with no download, and --wait says so
    result = cli("get", ftp.base + "sst/2024/02/*.grib", "--wait", dsn=dsn,
                 home=settings.home, env={"ASYNCSAT_DEST": str(settings.dest)})
    assert result.returncode == 1 and "nothing" in result.stderr, result.stderr


async def test_get_with_a_pattern_keeps_the_login_out_of_the_request_urls(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    files = _feed(ftp)
    pattern = ftp.url("sst/2024/03/*_v2.nc", user=USER, password=PASSWORD)
    result = cli("get", pattern, dsn=dsn, home=settings.home,
                 env={"ASYNCSAT_DEST": str(settings.dest)})
    assert result.returncode == 0, result.stderr
    [queued] = await sql(dsn, "SELECT urls, login_user, login_secret FROM request")
    assert PASSWORD not in repr(queued["urls"]) and queued["login_user"] == USER
    await drain(settings)
    assert {r["status"] for r in await rows(dsn)} == {"done"}
    assert len(await rows(dsn)) == 2 and set(ftp.logins) == {USER}
    [resolved] = await sql(dsn, "SELECT status, login_secret FROM request")
    assert resolved["status"] == "resolved" and resolved["login_secret"] is None
    assert files  # the feed was served


async def test_status_shows_requests_being_listed_and_failed_ones(
        ftp: FtpServer, dsn: str, settings: Settings) -> None:
    _feed(ftp)
    missing = ftp.url("sst/1999/*.nc", user=USER, password=PASSWORD)
    await sql(dsn, "INSERT INTO request (urls) VALUES ($1)", [missing])
    shown = cli("status", dsn=dsn, home=settings.home)
    assert "listing" in shown.stdout and PASSWORD not in shown.stdout
    await drain(settings)
    shown = cli("status", dsn=dsn, home=settings.home)
    assert shown.returncode == 0
    [line] = [x for x in shown.stdout.splitlines() if x.startswith("request")]
    assert "failed" in line and "folder not found" in line and PASSWORD not in line
    assert cli("status", "--json", dsn=dsn, home=settings.home).stdout.strip() == "[]"
