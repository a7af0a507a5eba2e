"""Downloaded files leave the page cache once on disk (unless `keep_page_cache`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asyncsat.config import Settings
from asyncsat.errors import ConfigError
from asyncsat.transfer import files
from asyncsat.transfer.files import PartFile
from tests.helpers import resident

MIB = 1 << 20


async def _download(folder: Path, data: bytes, *, keep_cache: bool) -> Path:
    part = PartFile(folder, "a.bin", None, keep_cache=keep_cache)
    await part.open(0)
    for at in range(0, len(data), MIB):
        await part.write(data[at:at + MIB])
    return await part.finish(len(data), "a.bin")


async def test_a_finished_file_leaves_the_page_cache(disk_dir: Path) -> None:
    data = os.urandom(8 * MIB)
    path = await _download(disk_dir, data, keep_cache=False)
    assert resident(path) == 0
    assert path.read_bytes() == data  # (read from the disk)


async def test_keep_page_cache_leaves_it_there(disk_dir: Path) -> None:
    path = await _download(disk_dir, os.urandom(8 * MIB), keep_cache=True)
    assert resident(path) >= 7 * MIB  # (all of it, unless the machine needed memory)


async def test_a_long_file_leaves_the_page_cache_while_it_is_written(
        disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "DROP_LAG", 1 * MIB)
    monkeypatch.setattr(files, "DROP_EVERY", 2 * MIB)
    data = [os.urandom(MIB) for _ in range(6)]
    part = PartFile(disk_dir, "long.bin", None)
    await part.open(0)
    for chunk in data[:2]:
        await part.write(chunk)
    assert part._fd is not None
    os.fsync(part._fd)  # written back: clean pages, which the next drop takes
    await part.write(data[2])  # 3 MiB = DROP_LAG + DROP_EVERY: the first drop
    assert resident(part.path, 0, 2 * MIB) == 0
    assert resident(part.path, 2 * MIB, 3 * MIB) == MIB  # the last DROP_LAG bytes stay
    for chunk in data[3:]:  # (at 5 MiB, a drop of pages still dirty: written back, kept)
        await part.write(chunk)
    await part.finish(6 * MIB, "long.bin")
    assert resident(disk_dir / "long.bin") == 0
    assert (disk_dir / "long.bin").read_bytes() == b"".join(data)


def test_keep_page_cache_is_a_setting(tmp_path: Path) -> None:
    config = tmp_path / "asyncsat.toml"
    config.write_text("keep_page_cache = true\n")
    env = {"ASYNCSAT_CONFIG": str(config), "HOME": str(tmp_path)}
    assert Settings.from_env(env).keep_page_cache is True
    assert Settings.from_env({"HOME": str(tmp_path)}).keep_page_cache is False
    config.write_text('keep_page_cache = "yes"\n')
    with pytest.raises(ConfigError, match="keep_page_cache must be true or false"):
        Settings.from_env(env)
