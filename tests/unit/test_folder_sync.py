"""Folder fsyncs shared by the renames made while one runs (group commit), on the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from asyncsat.errors import PermanentError
from asyncsat.transfer import files


async def test_each_rename_is_covered_by_an_fsync_that_started_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[float] = []
    lock = threading.Lock()

    def slow_fsync(folder: Path) -> None:
        with lock:
            started.append(time.monotonic())
        time.sleep(0.01)  # a disk's journal commit

    monkeypatch.setattr(files, "_fsync_folder", slow_fsync)
    covered: list[tuple[float, float]] = []

    async def rename_and_sync(delay: float) -> None:
        await asyncio.sleep(delay)
        renamed = time.monotonic()
        await files.synced(tmp_path)
        with lock:  # the fsyncs that started after the rename, before the return
            after = [t for t in started if t >= renamed]
        assert after, "returned without an fsync started after the rename"
        covered.append((renamed, after[0]))

    await asyncio.gather(*(rename_and_sync(i * 0.002) for i in range(24)))
    assert len(covered) == 24
    assert len(started) < 24  # shared: renames made while one ran waited for the next one


async def test_folders_are_synced_apart_and_a_failed_fsync_is_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def fsync(folder: Path) -> None:
        seen.append(folder)
        if folder.name == "bad":
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "_fsync_folder", fsync)
    await files.synced(tmp_path / "a")
    await files.synced(tmp_path / "b")
    with pytest.raises(PermanentError, match=r"cannot flush the folder .*bad.*Input/output"):
        await files.synced(tmp_path / "bad")
    await files.synced(tmp_path / "a")  # a second rename in `a` needs a new fsync
    assert seen == [tmp_path / "a", tmp_path / "b", tmp_path / "bad", tmp_path / "a"]


async def test_a_cancel_waits_for_the_fsync_then_is_passed_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[float] = []

    def slow_fsync(folder: Path) -> None:
        time.sleep(0.2)
        ended.append(time.monotonic())

    monkeypatch.setattr(files, "_fsync_folder", slow_fsync)
    waiter = asyncio.create_task(files.synced(tmp_path))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ended, "the cancel came back before the fsync it waited for had ended"
