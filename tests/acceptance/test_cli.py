"""The command line as users and scripts meet it: exit codes, one-line errors, JSON, secrets."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.conftest import cli
from tests.servers import FileServer

COUNT_ALL = ("SELECT (SELECT count(*) FROM provider) + (SELECT count(*) FROM credential)"
             " + (SELECT count(*) FROM request) + (SELECT count(*) FROM download)")


async def _count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(COUNT_ALL))
    finally:
        await conn.close()


@pytest.mark.parametrize("args", [
    ["get", "notaurl"],
    ["get", "https://ok.example/a.zip", "ftp//broken"],
    ["get", "https://ok.example/a.zip", "--checksum", "md5:nothex"],
    ["get", "https://a/x.zip", "https://a/y.zip", "--checksum", "md5:" + "0" * 32],
    ["get", "https://ok.example/a.zip", "--provider", "nosuch"],
    ["credential", "add", "nosuch", "--user", "u", "--password-env", "HOME"],
    ["credential", "add", "hub", "--user", "u", "--password-env", "HOME",
     "--max-connections", "-1"],
    ["credential", "add", "hub", "--user", "u", "--password-file", "/nonexistent/pw"],
    ["credential", "add", "hub", "--user", "u", "--password-env", "ASYNCSAT_TEST_UNSET"],
    ["credential", "add", "hub", "--user", "u", "--password-ref", "vault:x"],
    ["credential", "add", "hub", "--user", "u", "--password-ref", "file:relative/pw"],
    ["provider", "add", "bad/name", "--protocol", "http"],
    ["provider", "add", "x", "--protocol", "gopher"],
    ["provider", "add", "x", "--protocol", "http", "--url", "nota url"],
    ["provider", "add", "x", "--protocol", "ftp", "--url", "http://files.example/b/"],
    ["provider", "add", "x", "--protocol", "stac", "--url", "ftp://files.example/b/"],
    ["provider", "add", "x", "--protocol", "http", "--set", "max_connections=-3"],
    ["provider", "add", "x", "--protocol", "http", "--set", "bogus_key=1"],
    ["provider", "add", "x", "--protocol", "odata", "--url", "https://HUB.example/odata/v1"],
    ["status", "--request", "999"],
    # a login in one URL of a pattern request would go to the other server too
    ["get", "ftp://u:pw@a.example/x/*.nc", "ftp://b.example/y/*.nc", "--provider", "hub"],
    # a file where the folder would be (itself, or one of its parents)
    ["get", "https://ok.example/a.zip", "--dest", "/etc/passwd"],
    ["get", "https://ok.example/a.zip", "--dest", "/etc/passwd/sub/dir"],
    ["search", "hub", "--collection", "SENTINEL-2", "--dest", "/etc/passwd"],
    ["provider", "pause", "nosuch"],
    ["provider", "resume", "nosuch"],
    ["retry", "12345"],
    ["retry"],
    ["cancel", "abc"],
    ["frobnicate"],
    # numbers past what the database holds are bad input, not a DataError (exit 1)
    ["status", "--request", "9" * 20],
    ["status", "--limit", "9" * 20],
    ["retry", "9" * 20],
    ["cancel", "9" * 20],
    ["cancel", "--request", "9" * 20],
    ["credential", "add", "hub", "--user", "u", "--password-env", "HOME",
     "--max-connections", "9" * 14],
    # delays no clock can add (the daemon's retry then failed in SQL, the row stuck running)
    ["provider", "add", "x", "--protocol", "http", "--set", "backoff_initial=1e300",
     "--set", "backoff_max=1e300"],
    ["provider", "add", "x", "--protocol", "odata", "--set", "follow_overlap=1e300"],
    # a user name that is empty, or would break the USER command or the Basic header
    ["credential", "add", "hub", "--user", "", "--password-env", "HOME"],
    ["credential", "add", "hub", "--user", "me\r\nDELE x", "--password-env", "HOME"],
])
async def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        args: list[str], dsn: str, tmp_path: Path) -> None:
    setup = await asyncio.to_thread(cli, "provider", "add", "hub", "--protocol", "odata",
                                    "--url", "https://hub.example/odata/v1/", dsn=dsn,
                                    home=tmp_path)
    assert setup.returncode == 0, setup.stderr
    before = await _count(dsn)
    result = await asyncio.to_thread(cli, *args, dsn=dsn, home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncsat: error: "), result.stderr
    assert await _count(dsn) == before


async def test_provider_add_names_the_bad_key(dsn: str, tmp_path: Path) -> None:
    for args, named in [
        (["--set", "max_connections=-3"], "max_connections=-3"),
        (["--set", "bogus_key=1"], "'bogus_key'"),
        (["--url", "https://a.example/data/", "--set", "max_attempts=0"], "max_attempts=0"),
    ]:
        r = await asyncio.to_thread(cli, "provider", "add", "p", "--protocol", "http", *args,
                                    dsn=dsn, home=tmp_path)
        assert r.returncode == 2 and named in r.stderr, r.stderr
    first = await asyncio.to_thread(cli, "provider", "add", "a", "--protocol", "http", "--url",
                                    "https://a.example/data/", dsn=dsn, home=tmp_path)
    assert first.returncode == 0, first.stderr
    second = await asyncio.to_thread(cli, "provider", "add", "b", "--protocol", "http",
                                     "--url", "https://a.example/data", dsn=dsn, home=tmp_path)
    assert second.returncode == 2
    assert second.stderr.strip() == ("asyncsat: error: provider a already has the URL "
                                     "https://a.example/data/: one URL, one provider")
    assert await _count(dsn) == 1


async def test_provider_and_credential_lists_never_show_a_secret(dsn: str,
                                                                 tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("s3cret-from-file\nsecond line ignored\n")
    steps = [
        ["provider", "add", "cdse", "--protocol", "odata",
         "--url", "https://download.dataspace.copernicus.eu/odata/v1/", "--set", "max_attempts=7",
         "--set", "token_url=https://identity.example/token"],
        ["credential", "add", "cdse", "--user", "alice", "--password-file", str(pw_file),
         "--max-connections", "4"],
        ["credential", "add", "cdse", "--user", "bob", "--password-env", "BOB_PW"],
    ]
    for step in steps:
        r = await asyncio.to_thread(cli, *step, dsn=dsn, home=tmp_path,
                                    env={"BOB_PW": "env-secret-bob"})
        assert r.returncode == 0, r.stderr
    stdin = await asyncio.to_thread(cli, "credential", "add", "cdse", "--user", "carol",
                                    "--password-stdin", dsn=dsn, home=tmp_path,
                                    input="stdin-secret\r\n")
    assert stdin.returncode == 0

    providers = json.loads((await asyncio.to_thread(
        cli, "provider", "list", "--json", dsn=dsn, home=tmp_path)).stdout)
    assert providers == [{"name": "cdse", "protocol": "odata",
                          "url": "https://download.dataspace.copernicus.eu/odata/v1/",
                          "settings": {"max_attempts": 7,
                                       "token_url": "https://identity.example/token"},
                          "implicit": False, "paused": False}]
    listed = await asyncio.to_thread(cli, "credential", "list", "--json", dsn=dsn, home=tmp_path)
    creds = json.loads(listed.stdout)
    assert creds == [
        {"provider": "cdse", "user": "alice", "max_connections": 4, "enabled": True,
         "secret_ref": None},
        {"provider": "cdse", "user": "bob", "max_connections": 2, "enabled": True,
         "secret_ref": None},
        {"provider": "cdse", "user": "carol", "max_connections": 2, "enabled": True,
         "secret_ref": None},
    ]
    plain = await asyncio.to_thread(cli, "credential", "list", dsn=dsn, home=tmp_path)
    for secret in ("s3cret-from-file", "env-secret-bob", "stdin-secret"):
        assert secret not in listed.stdout + plain.stdout
    conn = await asyncpg.connect(dsn)
    try:
        stored = {r["username"]: r["secret"] for r in await conn.fetch(
            "SELECT username, secret FROM credential")}
    finally:
        await conn.close()
    assert stored == {"alice": "s3cret-from-file", "bob": "env-secret-bob",
                      "carol": "stdin-secret"}


async def test_url_login_is_used_but_never_stored_in_the_url_or_printed(
        dsn: str, tmp_path: Path) -> None:
    server = await FileServer(users={"me": "url-pass-42"}).start()
    try:
        data = os.urandom(5000)
        server.add("private.bin", data)
        url = server.url("private.bin", user="me", password="url-pass-42")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path), "get", url,
            "--dest", str(tmp_path / "d"), "--wait",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    finally:
        await server.stop()
    assert proc.returncode == 0, err.decode()
    assert server.requests[-1]["user"] == "me"
    status = await asyncio.to_thread(cli, "status", "--json", dsn=dsn, home=tmp_path)
    [row] = json.loads(status.stdout)
    assert row["url"] == server.url("private.bin")
    for text in (out.decode(), err.decode(), status.stdout):
        assert "url-pass-42" not in text


async def test_status_json_fields_retry_and_cancel(server: FileServer, dsn: str,
                                                   tmp_path: Path) -> None:
    server.add("ok.bin", os.urandom(1000))
    dest = tmp_path / "d"
    r = await asyncio.to_thread(cli, "get", server.url("ok.bin"), server.url("gone.bin"),
                                "--dest", str(dest), dsn=dsn, home=tmp_path)
    assert r.returncode == 0, r.stderr
    queued = json.loads((await asyncio.to_thread(cli, "status", "--json", dsn=dsn,
                                                 home=tmp_path)).stdout)
    assert [q["status"] for q in queued] == ["queued", "queued"]
    assert queued[0]["id"] > queued[1]["id"]  # newest first
    cancelled = await asyncio.to_thread(cli, "cancel", str(queued[0]["id"]), dsn=dsn,
                                        home=tmp_path)
    assert cancelled.returncode == 0
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path), "run",
        "--exit-when-idle", stdout=asyncio.subprocess.DEVNULL)
    assert await run.wait() == 0
    rows = json.loads((await asyncio.to_thread(cli, "status", "--json", dsn=dsn,
                                               home=tmp_path)).stdout)
    keys = {"id", "request_id", "provider", "name", "url", "status", "bytes_done", "size",
            "attempts", "error", "path"}
    assert all(keys <= set(row) for row in rows)
    gone, ok = rows
    provider = f"127.0.0.1_{server.port}"
    assert ok["status"] == "done" and ok["provider"] == provider and ok["name"] == "ok.bin"
    assert ok["path"] == str(dest / provider / "ok.bin") and ok["size"] == 1000
    assert gone["status"] == "cancelled"

    again = await asyncio.to_thread(cli, "retry", str(gone["id"]), dsn=dsn, home=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("1 download")
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path), "run",
        "--exit-when-idle", stdout=asyncio.subprocess.DEVNULL)
    assert await run.wait() == 0
    rows = json.loads((await asyncio.to_thread(cli, "status", "--json", "--request",
                                               str(gone["request_id"]), dsn=dsn,
                                               home=tmp_path)).stdout)
    assert rows[0]["status"] == "failed" and "404" in rows[0]["error"]
    table = await asyncio.to_thread(cli, "status", dsn=dsn, home=tmp_path)
    assert "done" in table.stdout and "failed" in table.stdout


async def test_init_is_idempotent_and_upgrades(dsn: str, tmp_path: Path) -> None:
    for _ in range(2):
        r = await asyncio.to_thread(cli, "init", dsn=dsn, home=tmp_path)
        assert r.returncode == 0, r.stderr


async def test_get_wait_exit_code_reflects_failures(server: FileServer, dsn: str,
                                                    tmp_path: Path) -> None:
    server.add("fine.bin", os.urandom(100))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path), "get",
        server.url("fine.bin"), server.url("missing.bin"), "--dest", str(tmp_path / "d"),
        "--wait", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _err = await proc.communicate()
    assert proc.returncode == 1
    assert "done" in out.decode() and "failed" in out.decode()


async def test_credential_remove(dsn: str, tmp_path: Path) -> None:
    for step in (["provider", "add", "hub", "--protocol", "http", "--url", "https://h.example/"],
                 ["credential", "add", "hub", "--user", "alice", "--password-env", "PW"],
                 ["credential", "add", "hub", "--user", "bob", "--password-env", "PW"]):
        r = await asyncio.to_thread(cli, *step, dsn=dsn, home=tmp_path, env={"PW": "pw-123"})
        assert r.returncode == 0, r.stderr
    removed = await asyncio.to_thread(cli, "credential", "remove", "hub", "--user", "alice",
                                      dsn=dsn, home=tmp_path)
    assert (removed.returncode, removed.stdout) == (0, "credential alice of hub removed\n")
    again = await asyncio.to_thread(cli, "credential", "remove", "hub", "--user", "alice",
                                    dsn=dsn, home=tmp_path)
    assert again.returncode == 2
    assert again.stderr == ("asyncsat: error: provider hub has no credential for user "
                            "'alice'\n")
    listed = await asyncio.to_thread(cli, "credential", "list", "--json", dsn=dsn, home=tmp_path)
    assert [c["user"] for c in json.loads(listed.stdout)] == ["bob"]


async def test_no_ops_say_why_and_status_filters(server: FileServer, dsn: str,
                                                 tmp_path: Path) -> None:
    empty = await asyncio.to_thread(cli, "credential", "list", dsn=dsn, home=tmp_path)
    assert (empty.returncode, empty.stdout) == (0, "no credentials\n")
    nobody = await asyncio.to_thread(cli, "provider", "list", dsn=dsn, home=tmp_path)
    assert (nobody.returncode, nobody.stdout) == (0, "no providers\n")
    for name in ("a.bin", "b.bin", "c.bin"):
        server.add(name, os.urandom(500))
    r = await asyncio.to_thread(cli, "get", server.url("a.bin"), server.url("b.bin"),
                                server.url("missing.bin"), "--dest", str(tmp_path / "d"),
                                "--wait", dsn=dsn, home=tmp_path)
    assert r.returncode == 1
    r = await asyncio.to_thread(cli, "get", server.url("c.bin"), "--dest", str(tmp_path / "d"),
                                dsn=dsn, home=tmp_path)
    assert r.returncode == 0, r.stderr
    a, b, missing, c = 1, 2, 3, 4  # ids in the order queued

    cancelled = await asyncio.to_thread(cli, "cancel", str(a), str(missing), str(c), str(c),
                                        dsn=dsn, home=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.splitlines() == [
        "1 download(s) cancelled: 4",
        "download 1 is done: nothing to cancel",
        "download 3 has failed: nothing to cancel",
    ]
    retried = await asyncio.to_thread(cli, "retry", str(b), str(missing), str(c), dsn=dsn,
                                      home=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.splitlines() == [
        "2 download(s) queued again: 3, 4",
        "download 2 is done and its file is in place: nothing to retry",
    ]
    again = await asyncio.to_thread(cli, "retry", str(c), dsn=dsn, home=tmp_path)
    assert again.stdout.splitlines() == [
        "0 download(s) queued again", "download 4 is queued already: nothing to retry"]
    none_failed = await asyncio.to_thread(cli, "retry", "--failed", dsn=dsn, home=tmp_path)
    assert none_failed.stdout == "no failed download: nothing to retry\n"

    def ids(*args: str) -> list[int]:
        out = cli("status", "--json", *args, dsn=dsn, home=tmp_path)
        assert out.returncode == 0, out.stderr
        return [row["id"] for row in json.loads(out.stdout)]

    assert await asyncio.to_thread(ids) == [4, 3, 2, 1]
    assert await asyncio.to_thread(ids, "--status", "done") == [2, 1]
    assert await asyncio.to_thread(ids, "--status", "queued", "--status", "done") == \
        [4, 3, 2, 1]
    assert await asyncio.to_thread(ids, "--limit", "3") == [4, 3, 2]
    assert await asyncio.to_thread(ids, "--status", "done", "--limit", "1") == [2]
    table = await asyncio.to_thread(cli, "status", "--limit", "1", dsn=dsn, home=tmp_path)
    lines = table.stdout.splitlines()
    assert "c.bin" in lines[-2] and lines[-1] == (
        "... 3 older download(s) not shown (--limit); next page: asyncsat status --limit 1 "
        "--before 4")
    bad = await asyncio.to_thread(cli, "status", "--status", "finished", dsn=dsn, home=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


async def test_provider_pause_and_resume(server: FileServer, dsn: str, tmp_path: Path) -> None:
    server.add("p.bin", os.urandom(500))
    added = await asyncio.to_thread(cli, "provider", "add", "local", "--protocol", "http",
                                    "--url", server.base, dsn=dsn, home=tmp_path)
    assert added.returncode == 0, added.stderr
    paused = await asyncio.to_thread(cli, "provider", "pause", "local", dsn=dsn, home=tmp_path)
    assert (paused.returncode, paused.stdout) == (0, (
        "provider local paused: no new transfer starts; 0 running transfer(s) finish, "
        "0 waiting download(s) wait for asyncsat provider resume local\n"))
    again = await asyncio.to_thread(cli, "provider", "pause", "local", dsn=dsn, home=tmp_path)
    assert again.stdout.startswith("provider local is paused already: ")
    listed = await asyncio.to_thread(cli, "provider", "list", "--json", dsn=dsn, home=tmp_path)
    assert [(p["name"], p["paused"]) for p in json.loads(listed.stdout)] == [("local", True)]
    table = await asyncio.to_thread(cli, "provider", "list", dsn=dsn, home=tmp_path)
    assert table.stdout.rstrip().endswith("(paused)")

    queued = await asyncio.to_thread(cli, "get", server.url("p.bin"), "--dest",
                                     str(tmp_path / "d"), dsn=dsn, home=tmp_path)
    assert queued.returncode == 0, queued.stderr
    # the queue is "drained" with the paused provider's download left waiting
    run = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=tmp_path)
    assert run.returncode == 0, run.stderr
    status = await asyncio.to_thread(cli, "status", dsn=dsn, home=tmp_path)
    assert "paused: provider local (1 waiting download(s)): asyncsat provider resume local" \
        in status.stdout.splitlines()
    assert server.requests == []

    resumed = await asyncio.to_thread(cli, "provider", "resume", "local", dsn=dsn,
                                      home=tmp_path)
    assert resumed.stdout == ("provider local resumed: 1 waiting download(s) start as its "
                              "connections allow\n")
    run = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "d" / "local" / "p.bin").exists()
    assert "paused" not in (await asyncio.to_thread(cli, "status", dsn=dsn,
                                                    home=tmp_path)).stdout


@pytest.mark.parametrize("line", [
    "listener_ping = 0",  # the daemon reconnected to PostgreSQL in a loop, for ever
    "listener_ping = -5",
    "shutdown_timeout = -1",
    "progress_interval = nan",
    "status_interval = nan",
    "chunk_size = inf",  # OverflowError, exit 1
    "chunk_size = nan",
])
async def test_bad_config_value_is_one_line_exit_2(line: str, dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "asyncsat.toml"
    config.write_text(line + "\n")
    result = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=tmp_path,
                                     env={"ASYNCSAT_CONFIG": str(config)}, timeout=20)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and line.split()[0] in lines[0], result.stderr


async def test_a_keyword_dsn_as_psql_takes_it_reaches_the_database(dsn: str,
                                                                    tmp_path: Path) -> None:
    parts = urlsplit(dsn)
    keywords = (f"host={parts.hostname} port={parts.port} dbname={parts.path.lstrip('/')}"
                f" user={parts.username}")
    added = await asyncio.to_thread(cli, "provider", "add", "kw", "--protocol", "http",
                                    "--url", "http://127.0.0.1:9/", dsn=keywords, home=tmp_path)
    assert added.returncode == 0, added.stderr
    listed = await asyncio.to_thread(cli, "provider", "list", dsn=dsn, home=tmp_path)
    assert "kw" in listed.stdout


@pytest.mark.parametrize("bad", ["host=db.example junk password=topsecret",
                                 "mysql://ops:topsecret@db.example/x",
                                 "postgresql://ops:topsecret@db.example:port/x"])
async def test_a_malformed_dsn_is_one_line_exit_2_without_its_password(
        bad: str, tmp_path: Path) -> None:
    result = await asyncio.to_thread(cli, "status", dsn=bad, home=tmp_path, timeout=20)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "topsecret" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncsat: error: invalid dsn: "), lines
