"""A file the download did not write at its final name is never replaced: the `.part`
stays whole and locked, and takes another name."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from pathlib import Path

import pytest

from asyncsat.transfer import files
from asyncsat.transfer.files import PART_SUFFIX, NameTaken, PartFile


async def test_a_file_at_the_final_name_is_kept_and_the_part_takes_another(
        tmp_path: Path) -> None:
    stranger = tmp_path / "a.nc"
    stranger.write_bytes(b"a user's own file")
    body = os.urandom(70_000)
    part = PartFile(tmp_path, "a.nc", None)
    await part.open(0)
    await part.write(body)
    with pytest.raises(NameTaken) as taken:
        await part.finish(len(body), "a.nc")
    assert taken.value.final == stranger
    assert stranger.read_bytes() == b"a user's own file"
    assert (tmp_path / ("a.nc" + PART_SUFFIX)).read_bytes() == body  # whole, kept
    # still locked: no other process can take the part between the two names
    with open(tmp_path / ("a.nc" + PART_SUFFIX), "rb") as other, \
            pytest.raises(BlockingIOError):
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    await part.move("a_7.nc")
    path = await part.finish(len(body), "a_7.nc")
    assert path == tmp_path / "a_7.nc"
    assert path.read_bytes() == body
    assert stranger.read_bytes() == b"a user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nc", "a_7.nc"]


async def test_a_held_file_keeps_a_folder_or_a_link_at_its_name(tmp_path: Path) -> None:
    (tmp_path / "b.nc").mkdir()
    (tmp_path / "c.nc").symlink_to(tmp_path / "nowhere")
    for name in ("b.nc", "c.nc"):
        part = PartFile(tmp_path, name, None)
        chunks = [b"x" * 1000]
        with pytest.raises(NameTaken):
            await part.write_whole(chunks, 1000, name, lambda: True)
        part.close()
    assert (tmp_path / "b.nc").is_dir()
    assert (tmp_path / "c.nc").is_symlink()


def _both(tmp_path: Path) -> tuple[Path, Path]:
    source, target = tmp_path / "x.nc.part", tmp_path / "x.nc"
    source.write_bytes(b"product")
    target.write_bytes(b"someone's")
    return source, target


@pytest.mark.parametrize("kernel", ["renameat2", "no renameat2", "a file system without it"])
def test_the_rename_never_replaces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """One call where the kernel has it (Linux's renameat2 with RENAME_NOREPLACE), else a
    hard link then an unlink."""
    def refused(*_args: object) -> int:
        ctypes.set_errno(errno.EINVAL)  # (what such a file system answers)
        return -1

    if kernel == "renameat2":
        assert files._c_renameat2() is not None
    else:
        monkeypatch.setattr(files, "_c_renameat2",
                            lambda: None if kernel == "no renameat2" else refused)
    source, target = _both(tmp_path)
    with pytest.raises(FileExistsError):
        files._rename_new(source, target)
    assert (source.read_bytes(), target.read_bytes()) == (b"product", b"someone's")
    target.unlink()
    files._rename_new(source, target)
    assert target.read_bytes() == b"product" and not source.exists()
