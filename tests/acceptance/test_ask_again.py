"""Asking again for a product: its file gone, or wanted in another folder (`get`, `retry`)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from tests.conftest import DaemonProcess, cli
from tests.servers import FileServer


def _gets(server: FileServer, name: str) -> int:
    return sum(1 for r in server.requests if r["path"] == f"/files/{name}")


async def test_a_done_product_whose_file_is_gone_is_fetched_again(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    server.add("f.nc", data)
    dest = tmp_path / "d"
    final = dest / f"127.0.0.1_{server.port}" / "f.nc"

    def get() -> tuple[int, str, str]:
        r = cli("get", server.url("f.nc"), "--dest", str(dest), "--wait", dsn=dsn,
                home=tmp_path)
        return r.returncode, r.stdout.splitlines()[-1], r.stderr.splitlines()[-1]

    assert (await asyncio.to_thread(get))[:2] == (0, f"done    {final}")
    assert final.read_bytes() == data and _gets(server, "f.nc") == 1

    # asked again with its file in place: nothing to fetch, and `get` says so
    code, out, err = await asyncio.to_thread(get)
    assert (code, out) == (0, f"done    {final}")
    assert err == f"request 2: 1 done already, the file in {dest}: 1"
    assert _gets(server, "f.nc") == 1

    # deleted (or moved away downstream): asking again fetches it again
    final.unlink()
    code, out, err = await asyncio.to_thread(get)
    assert err == f"request 3: 1 done before but the file is gone, queued again: 1 ({final})"
    assert (code, out) == (0, f"done    {final}")
    assert final.read_bytes() == data and _gets(server, "f.nc") == 2

    # `retry` of a done download: only when its file is gone
    kept = await asyncio.to_thread(cli, "retry", "1", dsn=dsn, home=tmp_path)
    assert kept.stdout.splitlines() == [
        "0 download(s) queued again",
        "download 1 is done and its file is in place: nothing to retry"]
    final.unlink()
    again = await asyncio.to_thread(cli, "retry", "1", dsn=dsn, home=tmp_path)
    assert again.stdout == f"1 download(s) queued again: 1 (done, but its file {final} was " \
                           "gone)\n"
    run = await asyncio.to_thread(cli, "run", "--exit-when-idle", dsn=dsn, home=tmp_path)
    assert run.returncode == 0, run.stderr
    assert final.read_bytes() == data and _gets(server, "f.nc") == 3
    [row] = json.loads((await asyncio.to_thread(cli, "status", "--json", dsn=dsn,
                                                home=tmp_path)).stdout)
    assert (row["status"], row["path"], row["bytes_done"]) == ("done", str(final), len(data))


async def test_another_dest_gets_the_done_file_without_fetching_it_again(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    server.add("g.nc", data)
    provider = f"127.0.0.1_{server.port}"
    first, other = tmp_path / "first", tmp_path / "other"
    r = await asyncio.to_thread(cli, "get", server.url("g.nc"), "--dest", str(first), "--wait",
                                dsn=dsn, home=tmp_path)
    assert r.returncode == 0, r.stderr

    r = await asyncio.to_thread(cli, "get", server.url("g.nc"), "--dest", str(other), "--wait",
                                dsn=dsn, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1] == f"request 2: 1 done already, linked into {other}: 1"
    assert r.stdout.splitlines()[-1] == f"done    {other / provider / 'g.nc'}"
    assert os.path.samefile(first / provider / "g.nc", other / provider / "g.nc")
    assert _gets(server, "g.nc") == 1
    # the download keeps its one path; the request that asked for the other folder has it
    [row] = json.loads((await asyncio.to_thread(cli, "status", "--json", dsn=dsn,
                                                home=tmp_path)).stdout)
    assert row["path"] == str(first / provider / "g.nc")

    # gone from both folders: fetched again, into the folder asked for now
    (first / provider / "g.nc").unlink()
    (other / provider / "g.nc").unlink()
    third = tmp_path / "third"
    r = await asyncio.to_thread(cli, "get", server.url("g.nc"), "--dest", str(third), "--wait",
                                dsn=dsn, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (third / provider / "g.nc").read_bytes() == data and _gets(server, "g.nc") == 2
    assert not (first / provider / "g.nc").exists()


async def test_another_dest_with_a_users_file_at_the_name_gets_the_other_name(
        server: FileServer, dsn: str, tmp_path: Path) -> None:
    """A done product asked for into another folder where a user's file has its name: the
    user's file was taken for the product ("1 done already, the file in ..."), and `get
    --wait` printed it as the product. It stays; the product is linked beside it under the
    other name, and printed there."""
    data, mine = os.urandom(200_000), b"my notes\n"
    server.add("g.nc", data)
    provider = f"127.0.0.1_{server.port}"
    first, other = tmp_path / "first", tmp_path / "other"
    r = await asyncio.to_thread(cli, "get", server.url("g.nc"), "--dest", str(first), "--wait",
                                dsn=dsn, home=tmp_path)
    assert r.returncode == 0, r.stderr
    (other / provider).mkdir(parents=True)
    (other / provider / "g.nc").write_bytes(mine)

    r = await asyncio.to_thread(cli, "get", server.url("g.nc"), "--dest", str(other), "--wait",
                                dsn=dsn, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1] == f"request 2: 1 done already, linked into {other}: 1"
    assert r.stdout.splitlines()[-1] == f"done    {other / provider / 'g_1.nc'}"
    assert (other / provider / "g.nc").read_bytes() == mine
    assert os.path.samefile(first / provider / "g.nc", other / provider / "g_1.nc")
    assert _gets(server, "g.nc") == 1


async def test_another_dest_while_it_downloads_gets_it_once_done(
        server: FileServer, dsn: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    data = os.urandom(2_000_000)
    server.add("h.nc", data, rate=1_000_000)
    provider = f"127.0.0.1_{server.port}"
    home = tmp_path / "home"
    daemon = DaemonProcess(dsn, home)
    daemons.append(daemon)
    await daemon.wait_for(lambda line: line["event"] == "daemon started")
    first, other = tmp_path / "first", tmp_path / "other"
    r = await asyncio.to_thread(cli, "get", server.url("h.nc"), "--dest", str(first), dsn=dsn,
                                home=home)
    assert r.returncode == 0, r.stderr
    await daemon.wait_for(lambda line: line["event"] == "download running")

    r = await asyncio.to_thread(cli, "get", server.url("h.nc"), "--dest", str(other), "--wait",
                                dsn=dsn, home=home)
    assert r.returncode == 0, r.stderr
    assert f"request 2: 1 fetched into another folder by an earlier request, put into {other} " \
           "once done: 1" in r.stderr.splitlines()
    assert r.stdout.splitlines()[-1] == f"done    {other / provider / 'h.nc'}"
    assert (other / provider / "h.nc").read_bytes() == data
    assert (first / provider / "h.nc").read_bytes() == data
    assert _gets(server, "h.nc") == 1
    line = await daemon.wait_for(lambda line: line["event"] == "download put in place")
    assert (line["how"], line["path"], line["for_request"]) == \
        ("linked", str(other / provider / "h.nc"), 2)
