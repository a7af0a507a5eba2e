"""Folder fsyncs shared by the renames made while one runs (group commit)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from asyncsat.transfer import files


def test_each_rename_is_covered_by_an_fsync_that_started_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[float] = []
    lock = threading.Lock()

    def slow_fsync(folder: Path) -> None:
        with lock:
            started.append(time.monotonic())
        time.sleep(0.01)  # a disk's journal commit

    monkeypatch.setattr(files, "_fsync_folder", slow_fsync)
    sync = files._FolderSync()
    covered: list[tuple[float, float]] = []

    def rename_and_sync() -> None:
        renamed = time.monotonic()
        sync.sync(tmp_path)
        with lock:  # the fsyncs that started after the rename, before the return
            after = [t for t in started if t >= renamed]
        assert after, "returned without an fsync started after the rename"
        covered.append((renamed, after[0]))

    threads = [threading.Thread(target=rename_and_sync) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(covered) == 24
    assert len(started) < 24  # shared: renames made while one ran waited for the next one


def test_folders_are_synced_apart_and_a_failed_fsync_is_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def fsync(folder: Path) -> None:
        seen.append(folder)
        if folder.name == "bad":
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "_fsync_folder", fsync)
    sync = files._FolderSync()
    sync.sync(tmp_path / "a")
    sync.sync(tmp_path / "b")
    with pytest.raises(OSError):
        sync.sync(tmp_path / "bad")
    sync.sync(tmp_path / "a")  # a second rename in `a` needs a new fsync
    assert seen == [tmp_path / "a", tmp_path / "b", tmp_path / "bad", tmp_path / "a"]
