"""A credential whose password is kept out of the database (`--password-ref`): the row
holds the reference only, the daemon reads the secret where it runs, and a secret it
cannot read fails the download saying why, never sending it without its login."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from tests.conftest import cli
from tests.helpers import FAST, add_provider, rows, sql
from tests.servers import FileServer


async def test_a_password_by_reference_is_read_by_the_daemon_never_stored(
        dsn: str, tmp_path: Path) -> None:
    server = await FileServer(users={"alice": "from-a-file", "bob": "from-the-env"}).start()
    try:
        server.add("a.bin", os.urandom(2000))
        server.add("b.bin", os.urandom(2000))
        server.add("c.bin", os.urandom(2000))
        await add_provider(dsn, "files", server.base, {**FAST, "max_attempts": 2})
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / "alice-pw").write_text("from-a-file\n")
        home = tmp_path / "h"
        added = await asyncio.to_thread(
            cli, "credential", "add", "files", "--user", "alice", "--password-ref",
            f"file:{secrets}/alice-pw", dsn=dsn, home=home)
        assert added.returncode == 0, added.stderr
        assert added.stdout == (f"credential alice for files saved (its password is read "
                                f"from file:{secrets}/alice-pw where a daemon runs)\n")
        assert await sql(dsn, "SELECT secret, secret_ref FROM credential") == [
            ("", f"file:{secrets}/alice-pw")]
        listed = json.loads((await asyncio.to_thread(
            cli, "credential", "list", "--json", dsn=dsn, home=home)).stdout)
        assert listed[0]["secret_ref"] == f"file:{secrets}/alice-pw"

        got = await asyncio.to_thread(cli, "get", server.url("a.bin"), "--dest",
                                      str(tmp_path / "d"), "--wait", dsn=dsn, home=home)
        assert got.returncode == 0, got.stderr
        assert [r["user"] for r in server.requests] == ["alice"]
        assert "from-a-file" not in got.stdout + got.stderr

        # the file gone: the download fails saying why, and nothing goes out without it
        (secrets / "alice-pw").unlink()
        lost = await asyncio.to_thread(cli, "get", server.url("b.bin"), "--dest",
                                       str(tmp_path / "d"), "--wait", dsn=dsn, home=home)
        assert lost.returncode == 1
        [row] = [r for r in await rows(dsn) if r["url"].endswith("b.bin")]
        assert row["status"] == "failed"
        assert row["error"] == (f"the secret of credential alice of files "
                                f"(file:{secrets}/alice-pw) cannot be read here: cannot read "
                                f"{secrets}/alice-pw: No such file or directory")
        assert len(server.requests) == 1
        assert any(json.loads(line).get("event") == "credential secret unreadable"
                   for line in lost.stdout.splitlines() if line.startswith("{"))

        # by the environment of the daemon (another account, the first one disabled)
        await sql(dsn, "UPDATE credential SET enabled = false")
        env = await asyncio.to_thread(
            cli, "credential", "add", "files", "--user", "bob", "--password-ref",
            "env:ASYNCSAT_TEST_BOB_PW", dsn=dsn, home=home)
        assert env.returncode == 0, env.stderr
        got = await asyncio.to_thread(
            cli, "get", server.url("c.bin"), "--dest", str(tmp_path / "d"), "--wait",
            dsn=dsn, home=home, env={"ASYNCSAT_TEST_BOB_PW": "from-the-env"})
        assert got.returncode == 0, got.stderr
        assert server.requests[-1]["user"] == "bob"
    finally:
        await server.stop()
