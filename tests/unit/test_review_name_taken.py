"""Review of 20509fc: the `.part` that takes another name keeps its one writer."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from asyncsat.errors import RetryableError
from asyncsat.transfer.files import NameTaken, PartFile


async def test_the_move_never_replaces_a_part_another_process_writes(tmp_path: Path) -> None:
    """The `.part` is locked so that no two processes write one product's file; the lock
    is on the file, not its name. Moved to the other name, it replaced whatever was there:
    the `.part` the daemon that took the download over (this one's lease lapsed after the
    other name was recorded) is writing, locked, which then writes into a file no name
    reaches."""
    (tmp_path / "a.nc").write_bytes(b"a user's file")
    body = os.urandom(70_000)
    part = PartFile(tmp_path, "a.nc", None)
    await part.open(0)
    await part.write(body)
    with pytest.raises(NameTaken):
        await part.finish(len(body), "a.nc")
    theirs = tmp_path / "a_7.nc.part"
    fd = os.open(theirs, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"the other daemon's bytes")
        with pytest.raises(RetryableError):
            await part.move("a_7.nc")
        assert theirs.read_bytes() == b"the other daemon's bytes"
        assert (tmp_path / "a.nc").read_bytes() == b"a user's file"
    finally:
        os.close(fd)
        part.close()
