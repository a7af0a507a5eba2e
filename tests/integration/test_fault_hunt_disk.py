"""Fault hunt, the local file system side: a full disk, folders removed or in the way,
file systems that refuse an fsync, files at the final name the daemon did not write.

Each test names a fault found by hunting for it; each pins the behaviour that handles it.
The faults are simulated in-process (no mount needed), on the code paths a real file
system takes (ENOSPC from write(2), EINVAL from fsync(2) of a folder).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from asyncsat import daemon
from asyncsat.config import Settings
from asyncsat.db import queries
from asyncsat.logs import Redactor
from asyncsat.transfer import files
from tests.helpers import drain, local_folder, named_row, queue, rows
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


async def test_a_directory_at_the_final_name_is_never_moved(
        local_server: FileServer, dsn: str, settings: Settings) -> None:
    """A folder (someone's, with files in it) has the name a row's product is to get, and
    no `.part` is there: it was renamed to `<name>.part` as if it were a final file renamed
    before a crash, then written into. It stays where it is, and the product takes another
    name (the row failed once, "Is a directory", when nothing else was at the name)."""
    data = os.urandom(3000)
    local_server.add("a.nc", data)
    blocker = local_folder(settings) / "a.nc"
    blocker.mkdir(parents=True)
    (blocker / "keep.txt").write_text("mine")
    await named_row(dsn, settings, local_server.url("a.nc"), "a.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert (blocker / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in blocker.iterdir()) == ["keep.txt"]
    assert not (local_folder(settings) / "a.nc.part").exists()
    assert row["status"] == "done", row
    assert row["name"] == f"a_{row['id']}.nc"
    assert Path(row["path"]) == local_folder(settings) / row["name"]
    assert Path(row["path"]).read_bytes() == data


async def test_a_smaller_foreign_file_at_the_final_name_is_not_resumed_from(
        local_server: FileServer, dsn: str, settings: Settings) -> None:
    """A row named by a catalog, with its size, finds a shorter file of other content at
    its final name (no `.part`): it was taken for its own file renamed before a crash and
    resumed from its end, and the product of foreign head and served tail, of the right
    size, was marked done. A file that cannot be the sealed product is not resumed from,
    nor replaced: the product takes another name."""
    data, foreign = os.urandom(300_000), os.urandom(100_000)
    local_server.add("b.nc", data)
    (local_folder(settings)).mkdir(parents=True)
    (local_folder(settings) / "b.nc").write_bytes(foreign)
    await named_row(dsn, settings, local_server.url("b.nc"), "b.nc", size=len(data))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert Path(row["path"]).read_bytes() == data
    assert row["name"] == f"b_{row['id']}.nc"
    assert (local_folder(settings) / "b.nc").read_bytes() == foreign


async def test_a_folder_removed_while_its_file_is_written_starts_again(
        local_server: FileServer, dsn: str, settings: Settings) -> None:
    """`rm -rf DEST/provider` (a clean-up) while a file is written into it: the rename at
    the end found no `.part` and the row failed for good ("cannot write ...: No such file
    or directory"). The file starts again, in the folder made again."""
    data = os.urandom(1_500_000)
    local_server.add("c.nc", data, rate=1_000_000)
    await queue(dsn, local_server.url("c.nc"))
    task = asyncio.create_task(drain(settings))
    part = local_folder(settings) / "c.nc.part"
    for _ in range(500):
        if part.exists() and part.stat().st_size > 100_000:
            break
        await asyncio.sleep(0.01)
    shutil.rmtree(local_folder(settings))
    await task
    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert Path(row["path"]).read_bytes() == data


async def test_a_file_system_that_refuses_to_fsync_folders(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems (FUSE, CIFS, ...) answer fsync(2) of a folder with EINVAL: the file
    was verified, flushed and renamed, then the row failed for good ("cannot write
    x.part: Invalid argument") with the product at its final name. Such a refusal is
    ignored, as PostgreSQL ignores it."""
    data = os.urandom(3000)
    local_server.add("d.nc", data)
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    await queue(dsn, local_server.url("d.nc"))
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert Path(row["path"]).read_bytes() == data


async def test_a_full_disk_is_waited_out_saying_so(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """write(2) answers ENOSPC half-way: the row goes back to the queue, its `.part` kept,
    saying the disk is full (the log line said the retry budget was spared because "the
    server limits requests or connections"); once there is room again it resumes from the
    bytes on disk and is done."""
    data = os.urandom(2_000_000)
    local_server.add("e.nc", data)
    real = os.write
    room = {"left": 700_000}

    def write(fd: int, buf: bytes | memoryview) -> int:
        if room["left"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, buf[:room["left"]])
        room["left"] -= n
        return n

    monkeypatch.setattr(files.os, "write", write)
    await queue(dsn, local_server.url("e.nc"))
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.serve(settings, Redactor(), exit_when_idle=True))
        for _ in range(500):
            if any(e.get("reason") == "retry" for e in logs):
                break
            await asyncio.sleep(0.01)
        [row] = await rows(dsn)
        assert row["status"] in ("queued", "running"), row
        assert "no space left" in row["error"], row
        assert (local_folder(settings) / "e.nc.part").stat().st_size == 700_000
        room["left"] = 1 << 40
        await asyncio.wait_for(task, 30)
    [retry] = [e for e in logs if e.get("reason") == "retry"][:1]
    assert "no space left" in retry["budget"] and "server" not in retry["budget"], retry
    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert Path(row["path"]).read_bytes() == data
    ranges = [r["range"] for r in local_server.requests]
    assert "bytes=700000-" in ranges, ranges


async def test_a_claim_refused_by_a_full_database_disk_is_tried_again_soon(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL's own disk full: the claim fails (`DiskFullError: could not extend file`)
    and the dispatcher waited for the requests' recheck, a minute, before it claimed again,
    with the space back long before. It claims again within seconds."""
    local_server.add("f.nc", os.urandom(3000))
    real = queries.claim
    refused: list[int] = []

    async def claim(db: Any, *args: Any, **kw: Any) -> Any:
        if not refused:
            refused.append(1)
            raise asyncpg.DiskFullError("could not extend file: No space left on device")
        return await real(db, *args, **kw)

    monkeypatch.setattr(queries, "claim", claim)
    await named_row(dsn, settings, local_server.url("f.nc"), "f.nc")  # (queued before the start)
    with capture_logs() as logs:
        await drain(settings, timeout=20)
    [row] = await rows(dsn)
    assert refused and row["status"] == "done", row
    # the server's reason, in one warning: no traceback every few seconds for as long as
    # the disk stays full
    [failed] = [e for e in logs if e["event"] == "claim failed"]
    assert failed["log_level"] == "warning" and "could not extend file" in failed["error"]
    assert "exc_info" not in failed, failed
