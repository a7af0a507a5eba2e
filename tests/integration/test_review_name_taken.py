"""Review of 20509fc (a file the daemon did not write at a product's final name is never
replaced): flows where that promise, or the row's name and the file on disk, do not hold."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from asyncsat.config import Settings
from tests.helpers import drain, local_folder, named_row, rows, sql
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("size", [3000, 2_500_000], ids=["held", "streamed"])
async def test_a_users_file_at_a_named_rows_name_of_unknown_size_is_kept(
        local_server: FileServer, dsn: str, settings: Settings, size: int) -> None:
    """A row named by a catalog that could not size it (or queued by psql with a name)
    finds a user's file at its final name: `recover` takes any regular file there for the
    product's own, renamed before a crash, when no size is known; the resume's overlap
    check then finds other bytes and empties it. The user's file is gone."""
    data, mine = os.urandom(size), os.urandom(5000)
    local_server.add("a.nc", data)
    local_folder(settings).mkdir(parents=True)
    (local_folder(settings) / "a.nc").write_bytes(mine)
    await named_row(dsn, settings, local_server.url("a.nc"), "a.nc")
    await drain(settings)
    [row] = await rows(dsn)
    assert (local_folder(settings) / "a.nc").read_bytes() == mine
    assert row["status"] == "done", row
    assert Path(row["path"]).read_bytes() == data


@pytest.mark.parametrize("size", [40_000, 2_500_000], ids=["held", "streamed"])
async def test_a_stop_as_the_other_name_is_recorded_keeps_the_part_with_the_row(
        local_server: FileServer, dsn: str, settings: Settings, size: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon is stopped just as the other name is recorded (the statement committed,
    its answer not yet taken): the row says `a_<id>.nc` but the whole `.part` is still
    `a.nc.part`. The next attempt looks for `a_<id>.nc.part`, finds nothing and fetches the
    file again from zero; `a.nc.part` stays in the folder for good."""
    from asyncsat import engine

    data, mine = os.urandom(size), b"my notes\n"
    local_server.add("a.nc", data)
    local_folder(settings).mkdir(parents=True)
    (local_folder(settings) / "a.nc").write_bytes(mine)
    original = engine._RowEvents.elsewhere
    stopped: list[str] = []

    async def stop_after(self: engine._RowEvents, *args: object, **kw: object) -> str:
        other = await original(self, *args, **kw)  # type: ignore[arg-type]
        if not stopped:  # the transfer is stopped as the answer comes
            stopped.append(other)
            self._engine._tasks[self._download.id].cancel()
            await asyncio.sleep(0)
        return other

    monkeypatch.setattr(engine._RowEvents, "elsewhere", stop_after)
    from tests.helpers import queue
    await queue(dsn, local_server.url("a.nc"), provider="local")
    await drain(settings)
    [row] = await rows(dsn)
    assert stopped
    assert row["status"] == "done", row
    assert row["name"] == f"a_{row['id']}.nc"
    assert Path(row["path"]).read_bytes() == data
    assert sorted(p.name for p in local_folder(settings).iterdir()) == ["a.nc", row["name"]]
    assert (local_folder(settings) / "a.nc").read_bytes() == mine
    gets = [r for r in local_server.requests if r["path"] == "/files/a.nc"]
    assert len(gets) == 1 or gets[-1]["range"] == f"bytes={size}-", gets  # not fetched again


async def test_a_part_renamed_by_the_daemon_it_was_taken_from_is_found_at_the_final_name(
        local_server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon A's lease lapsed while it flushed the whole `.part` (no database to renew it);
    daemon B took the download over and measured A's `.part`, then A renamed it to the final
    name (it held the lock: it may). B's open of the `.part` to resume it created an empty
    one (`O_CREAT`), and said it changed. Its next attempt resumes that empty `.part`, not
    the product's own file at the final name, fetches it all again, and finds its final
    name taken by its own file: the product is then in the folder twice, under two names."""
    from asyncsat.transfer import files

    data = os.urandom(200_000)
    local_server.add("a.nc", data)
    local_folder(settings).mkdir(parents=True)
    (local_folder(settings) / "a.nc.part").write_bytes(data)  # A's, whole
    download_id = await named_row(dsn, settings, local_server.url("a.nc"), "a.nc", size=len(data))
    # (A's attempt, which got as far as sealing its file)
    await sql(dsn, "UPDATE download SET attempts = 1, sealed_attempt = 1 WHERE id = $1",
              download_id)
    original = files.PartFile.open
    renamed: list[Path] = []

    async def after_a_renamed(self: files.PartFile, offset: int, *args: object) -> None:
        if offset and not renamed:  # A's rename lands between B's measure and its open
            os.replace(self.path, self.final)
            renamed.append(self.final)
        await original(self, offset, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(files.PartFile, "open", after_a_renamed)
    await drain(settings)
    [row] = await rows(dsn)
    assert renamed
    assert row["status"] == "done", row
    assert (row["name"], Path(row["path"])) == ("a.nc", local_folder(settings) / "a.nc")
    assert Path(row["path"]).read_bytes() == data
    assert sorted(p.name for p in local_folder(settings).iterdir()) == ["a.nc"]


@pytest.mark.parametrize("blocker", ["folder", "smaller file"])
async def test_a_row_tried_before_takes_no_foreign_thing_at_its_name_for_its_own(
        local_server: FileServer, dsn: str, settings: Settings, blocker: str) -> None:
    """`recover`'s own checks, on a row an earlier attempt may have renamed the file of
    (a first attempt takes nothing there for its own: the tests of test_fault_hunt_disk no
    longer reach them): a folder, or a file shorter than the row's size, stays."""
    data = os.urandom(300_000)
    local_server.add("b.nc", data)
    local_folder(settings).mkdir(parents=True)
    there = local_folder(settings) / "b.nc"
    if blocker == "folder":
        there.mkdir()
        (there / "keep.txt").write_text("mine")
    else:
        there.write_bytes(b"mine" * 25_000)
    download_id = await named_row(dsn, settings, local_server.url("b.nc"), "b.nc", size=len(data))
    await sql(dsn, "UPDATE download SET attempts = 1, sealed_attempt = 1 WHERE id = $1",
              download_id)
    await drain(settings)
    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert row["name"] == f"b_{row['id']}.nc"
    assert Path(row["path"]).read_bytes() == data
    if blocker == "folder":
        assert (there / "keep.txt").read_text() == "mine"
    else:
        assert there.read_bytes() == b"mine" * 25_000
