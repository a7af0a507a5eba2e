"""`provider set` and `credential set`: a provider or an account changed in place, its rows
and secret kept, and a running daemon applying the change at once."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import asyncpg

from tests.conftest import DaemonProcess, cli
from tests.helpers import add_provider, queue, rows
from tests.servers import FileServer


async def _provider_row(dsn: str, name: str) -> dict[str, object]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT url, settings::text AS settings, paused, implicit"
                                  " FROM provider WHERE name = $1", name)
        assert row is not None
        return dict(row)
    finally:
        await conn.close()


async def test_provider_set_changes_in_place_and_bad_input_changes_nothing(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    server.add("a.bin", os.urandom(1000))
    await add_provider(dsn, "hub", server.base, {"page_size": 50, "max_attempts": 3},
                       credentials=[("alice", "s3cret-pw", 2)], protocol="odata")
    await add_provider(dsn, "other", "https://other.example/data/")
    queued = await asyncio.to_thread(cli, "get", server.url("a.bin"), "--provider", "hub",
                                     "--dest", str(tmp_path / "d"), dsn=dsn, home=tmp_path)
    assert queued.returncode == 0, queued.stderr
    before_rows = await rows(dsn)
    assert len(before_rows) == 1

    def run(*args: str) -> tuple[int, str, str]:
        r = cli("provider", "set", *args, dsn=dsn, home=tmp_path)
        return r.returncode, r.stdout, r.stderr

    unchanged = await _provider_row(dsn, "hub")
    for args, says in [
        (["hub"], "nothing to change"),
        (["nosuch", "--set", "page_size=3"], "unknown provider 'nosuch'"),
        (["hub", "--set", "page_size=0"], "page_size=0"),
        (["hub", "--set", "bogus=1"], "'bogus'"),
        (["hub", "--unset", "bogus"], "'bogus'"),
        (["hub", "--set", "page_size=3", "--unset", "page_size"], "both set and unset"),
        (["hub", "--url", "nota url"], "invalid provider URL"),
        (["hub", "--url", "https://me:pw@hub.example/"], "credential"),
        # a port out of range, a bracket left open: refused as any bad URL (the first was
        # taken, and a URL that cannot be read gave the provider no server of its own: its
        # accounts' login went to any URL; the second ended 1, ValueError)
        (["hub", "--url", "https://hub.example:99999/odata/v1"], "invalid provider URL"),
        (["hub", "--url", "https://[::1/odata/v1"], "invalid provider URL"),
        (["hub", "--url", "https://OTHER.example/data"], "provider other already has"),
        # (the last key is bad: nothing of the first is written either)
        (["hub", "--set", "page_size=7", "--set", "backoff_max=-1"], "backoff_max=-1"),
    ]:
        code, out, err = await asyncio.to_thread(run, *args)
        assert (code, out) == (2, ""), (args, err)
        assert err.count("\n") == 1 and says in err, (args, err)
        assert "s3cret-pw" not in err
        assert await _provider_row(dsn, "hub") == unchanged, args

    code, out, err = await asyncio.to_thread(
        run, "hub", "--url", "https://hub2.example/odata/v1/", "--set", "page_size=20",
        "--set", "max_connections=6", "--unset", "max_attempts")
    assert code == 0, err
    assert out == ("provider hub: URL https://hub2.example/odata/v1/; max_connections=6; "
                   "page_size=20; max_attempts back to its default (downloads queued "
                   "already keep their URLs; those off its servers now go without its "
                   "accounts' login)\n")
    listed = json.loads((await asyncio.to_thread(
        cli, "provider", "list", "--json", dsn=dsn, home=tmp_path)).stdout)
    hub = next(p for p in listed if p["name"] == "hub")
    assert (hub["url"], hub["settings"], hub["protocol"]) == (
        "https://hub2.example/odata/v1/", {"page_size": 20, "max_connections": 6}, "odata")
    # its credential and its downloads are kept, the queued row with the URL it had
    creds = json.loads((await asyncio.to_thread(
        cli, "credential", "list", "--json", dsn=dsn, home=tmp_path)).stdout)
    assert [(c["provider"], c["user"]) for c in creds] == [("hub", "alice")]
    assert [(r["id"], r["url"], r["status"]) for r in await rows(dsn)] == \
        [(r["id"], r["url"], r["status"]) for r in before_rows]

    code, out, _ = await asyncio.to_thread(run, "hub", "--set", "page_size=20")
    assert (code, out) == (0, "provider hub: no change\n")


async def test_an_implicit_provider_takes_settings_but_keeps_its_hosts_url(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    server.add("a.bin", os.urandom(1000))
    queued = await asyncio.to_thread(cli, "get", server.url("a.bin"), "--dest",
                                     str(tmp_path / "d"), dsn=dsn, home=tmp_path)
    assert queued.returncode == 0, queued.stderr
    implicit = f"127.0.0.1_{server.port}"
    moved = await asyncio.to_thread(cli, "provider", "set", implicit, "--url",
                                    "https://elsewhere.example/", dsn=dsn, home=tmp_path)
    assert moved.returncode == 2 and "implicit provider of its host" in moved.stderr
    capped = await asyncio.to_thread(cli, "provider", "set", implicit, "--set",
                                     "max_connections=8", dsn=dsn, home=tmp_path)
    assert capped.stdout == f"provider {implicit}: max_connections=8\n", capped.stderr
    row = await _provider_row(dsn, implicit)
    assert row["implicit"] is True and json.loads(str(row["settings"])) == \
        {"max_connections": 8}


async def test_a_running_daemon_applies_a_raised_cap_at_once(
        server: FileServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """An anonymous provider's `max_connections` raised from 1 to 3 while its queue is
    long: the daemon uses the new slots without a restart (the provider's NOTIFY)."""
    names = [f"f{i}.bin" for i in range(6)]
    for name in names:
        server.add(name, os.urandom(600_000), rate=200_000)  # 3 s each
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    await queue(dsn, *[server.url(n) for n in names], dest=tmp_path / "dest")
    proc = DaemonProcess(dsn, tmp_path / "home")
    daemons.append(proc)
    deadline = time.monotonic() + 20
    while not server.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert server.peak["anonymous"] == 1 and len(server.requests) == 1

    raised = await asyncio.to_thread(cli, "provider", "set", "local", "--set",
                                     "max_connections=3", dsn=dsn, home=tmp_path)
    assert raised.returncode == 0, raised.stderr
    changed = time.monotonic()
    while server.peak["anonymous"] < 3 and time.monotonic() - changed < 10:
        await asyncio.sleep(0.05)
    assert server.peak["anonymous"] == 3
    # (the first file still runs: the new slots came from the NOTIFY, not its end)
    assert time.monotonic() - changed < 2


async def test_credential_set_changes_an_account_without_its_secret(
        dsn: str, tmp_path: Path) -> None:
    await add_provider(dsn, "hub", "https://hub.example/", credentials=[
        ("alice", "pw-a", 2), ("bob", "pw-b", 2)])

    def run(*args: str) -> tuple[int, str, str]:
        r = cli("credential", "set", "hub", *args, dsn=dsn, home=tmp_path)
        return r.returncode, r.stdout, r.stderr

    for args, says in [([], "--user"), (["--user", "alice"], "nothing to change"),
                       (["--user", "carol", "--disable"], "no credential for user 'carol'"),
                       (["--user", "alice", "--max-connections", "0"], "at least 1"),
                       (["--user", "alice", "--enable", "--disable"], "not allowed with")]:
        code, out, err = await asyncio.to_thread(run, *args)
        assert (code, out) == (2, "") and says in err and err.count("\n") == 1, (args, err)
    assert (await asyncio.to_thread(run, "--user", "alice", "--max-connections", "5"))[1] == \
        "credential alice of hub: 5 connection(s), enabled\n"
    assert (await asyncio.to_thread(run, "--user", "bob", "--disable"))[1] == \
        "credential bob of hub: 2 connection(s), disabled (running transfers finish)\n"
    code, out, _ = await asyncio.to_thread(run, "--user", "alice", "--disable")
    assert code == 0 and out.endswith(
        "provider hub has no enabled credential left: its downloads go out anonymously "
        "(asyncsat provider pause hub holds them)\n")
    listed = json.loads((await asyncio.to_thread(
        cli, "credential", "list", "--json", dsn=dsn, home=tmp_path)).stdout)
    assert [(c["user"], c["max_connections"], c["enabled"]) for c in listed] == [
        ("alice", 5, False), ("bob", 2, False)]
    conn = await asyncpg.connect(dsn)
    try:  # (the secrets are those given to `credential add`)
        assert await conn.fetch("SELECT username, secret FROM credential ORDER BY 1") == [
            ("alice", "pw-a"), ("bob", "pw-b")]
    finally:
        await conn.close()


async def test_a_running_daemon_stops_using_a_disabled_account(
        dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """Of two accounts, one is disabled while the queue is long: its running transfers
    finish, and no new request goes out with its login."""
    server = await FileServer(users={"alice": "pw-a", "bob": "pw-b"}).start()
    try:
        names = [f"f{i}.bin" for i in range(8)]
        for name in names:
            server.add(name, os.urandom(400_000), rate=400_000)  # 1 s each
        await add_provider(dsn, "local", server.base,
                           credentials=[("alice", "pw-a", 1), ("bob", "pw-b", 1)])
        await queue(dsn, *[server.url(n) for n in names], dest=tmp_path / "dest")
        proc = DaemonProcess(dsn, tmp_path / "home", "--exit-when-idle")
        daemons.append(proc)
        deadline = time.monotonic() + 20
        while server.peak["bob"] < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        disabled = await asyncio.to_thread(cli, "credential", "set", "local", "--user", "bob",
                                           "--disable", dsn=dsn, home=tmp_path)
        assert disabled.returncode == 0, disabled.stderr
        at = time.monotonic()
        assert await asyncio.to_thread(proc.wait, 60) == 0
        assert {r["status"] for r in await rows(dsn)} == {"done"}
        late = [r for r in server.requests if r["user"] == "bob" and float(r["t"]) > at + 0.5]
        assert late == [], late
        assert sum(r["user"] == "alice" for r in server.requests) >= 6
    finally:
        await server.stop()


async def test_provider_set_unsets_a_key_written_with_psql_that_it_does_not_know(
        dsn: str, tmp_path: Path) -> None:
    """A misspelt key written with psql (`UPDATE provider SET settings = settings ||
    '{"page_sise": 50}'`, which the README shows, unchecked) is taken out with `--unset`:
    it was refused as unknown, and every `--set` too (the settings as a whole failed to
    validate), which left psql as the only way back."""
    await add_provider(dsn, "hub", "https://hub.example/odata/v1", {"page_size": 50},
                       protocol="odata")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE provider SET settings = settings || '{\"page_sise\": 50}'"
                           " WHERE name = 'hub'")
    finally:
        await conn.close()
    unset = await asyncio.to_thread(cli, "provider", "set", "hub", "--unset", "page_sise",
                                    dsn=dsn, home=tmp_path)
    assert unset.returncode == 0, unset.stderr
    assert unset.stdout == "provider hub: page_sise back to its default\n"
    assert json.loads(str((await _provider_row(dsn, "hub"))["settings"])) == {"page_size": 50}
    # a key neither known nor set is still refused
    bogus = await asyncio.to_thread(cli, "provider", "set", "hub", "--unset", "bogus",
                                    dsn=dsn, home=tmp_path)
    assert bogus.returncode == 2 and "'bogus'" in bogus.stderr
