"""An account's login goes to its provider's own servers only: `get --provider` refuses a
URL elsewhere, a row that holds one anyway (psql) is fetched without it, and `auth_hosts`
lets the login go to another server on purpose. Two real servers on loopback: the
provider's, and another one (same host, another port)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from tests.conftest import cli
from tests.helpers import add_provider, rows, sql
from tests.servers import FileServer


async def test_get_provider_refuses_a_url_off_the_providers_servers(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    other = await FileServer(users={"alice": "s3cret-pw"}).start()
    try:
        other.add("h.bin", os.urandom(5000))
        await add_provider(dsn, "files", server.base, credentials=[("alice", "s3cret-pw", 2)])
        refused = await asyncio.to_thread(
            cli, "get", other.url("h.bin"), "--provider", "files", "--dest",
            str(tmp_path / "d"), "--wait", dsn=dsn, home=tmp_path)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and "s3cret-pw" not in refused.stderr
        assert f"is not on a server of provider files ({server.base})" in refused.stderr
        assert f"""--set 'auth_hosts=["127.0.0.1:{other.port}"]'""" in refused.stderr
        assert await sql(dsn, "SELECT id FROM request") == []
        assert other.requests == []

        # on purpose: the other server named in the provider's auth_hosts
        allowed = await asyncio.to_thread(
            cli, "provider", "set", "files", "--set",
            f'auth_hosts=["127.0.0.1:{other.port}"]', dsn=dsn, home=tmp_path)
        assert allowed.returncode == 0, allowed.stderr
        got = await asyncio.to_thread(
            cli, "get", other.url("h.bin"), "--provider", "files", "--dest",
            str(tmp_path / "d"), "--wait", dsn=dsn, home=tmp_path)
        assert got.returncode == 0, got.stderr
        assert [r["user"] for r in other.requests] == ["alice"]
    finally:
        await other.stop()


async def test_a_row_with_a_url_off_its_providers_servers_goes_without_the_login(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    """A download row inserted with psql for a provider with an account, its URL on
    another server: fetched anonymously, the daemon saying why; the account's own server
    gets the login as before."""
    other = await FileServer().start()
    try:
        data = os.urandom(5000)
        other.add("h.bin", data)
        server.add("own.bin", os.urandom(3000))
        await add_provider(dsn, "files", server.base, credentials=[("alice", "s3cret-pw", 2)])
        server.users = {"alice": "s3cret-pw"}
        dest = tmp_path / "d"
        for url in (other.url("h.bin"), server.url("own.bin")):
            await sql(dsn, "INSERT INTO download (provider_id, url, dest) SELECT id, $1, $2"
                      " FROM provider WHERE name = 'files'", url, str(dest))
        run = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=tmp_path)
        assert run.returncode == 0, run.stderr
        logs = run.stdout.splitlines()
        assert {r["status"] for r in await rows(dsn)} == {"done"}
        assert (dest / "files" / "h.bin").read_bytes() == data
        assert [r["user"] for r in other.requests] == [None]  # no Authorization at all
        assert [r["user"] for r in server.requests] == ["alice"]
        [warned] = [json.loads(line) for line in logs if "outside the provider" in line]
        assert warned["level"] == "warning" and warned["host"] == f"127.0.0.1:{other.port}"
    finally:
        await other.stop()


async def test_the_warning_of_a_row_off_its_providers_servers_shows_no_login_in_its_url(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    """A psql row whose URL holds a login of its own (`user:pw@host`), off the provider's
    servers: the warning names the host, not the login (its `host` field was the URL's
    whole netloc, userinfo and all, which no redaction pattern matches)."""
    other = await FileServer().start()
    try:
        other.add("h.bin", os.urandom(2000))
        await add_provider(dsn, "files", server.base, credentials=[("alice", "s3cret-pw", 2)])
        url = other.url("h.bin", user="bob", password="bobs-own-pw")
        await sql(dsn, "INSERT INTO download (provider_id, url, dest) SELECT id, $1, $2"
                  " FROM provider WHERE name = 'files'", url, str(tmp_path / "d"))
        run = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=tmp_path)
        assert run.returncode == 0, run.stderr
        [warned] = [json.loads(line) for line in run.stdout.splitlines()
                    if "outside the provider" in line]
        assert warned["host"] == f"127.0.0.1:{other.port}"
        assert "bobs-own-pw" not in run.stdout + run.stderr
    finally:
        await other.stop()
