"""Putting a done product into another folder: a hard link, else a copy; never overwriting."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from asyncsat.transfer.files import place


def test_a_hard_link_on_the_same_file_system(tmp_path: Path) -> None:
    source = tmp_path / "a" / "p.nc"
    source.parent.mkdir()
    source.write_bytes(b"CDF" * 1000)
    target = tmp_path / "b" / "prov" / "p.nc"
    assert place(source, target) == "linked"
    assert os.path.samefile(source, target)


def test_a_copy_across_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "p.nc"
    source.write_bytes(os.urandom(3_000_000))
    target = tmp_path / "other" / "p.nc"
    real_link = os.link

    def cross_device(src: object, dst: object) -> None:
        if Path(str(src)) == source:  # what the kernel answers across file systems
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", cross_device)
    assert place(source, target) == "copied"
    assert target.read_bytes() == source.read_bytes()
    assert not os.path.samefile(source, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["p.nc"]  # no temporary left


def test_a_file_already_there_is_left_alone(tmp_path: Path) -> None:
    source = tmp_path / "p.nc"
    source.write_bytes(b"new")
    target = tmp_path / "t" / "p.nc"
    target.parent.mkdir()
    target.write_bytes(b"the user's own")
    assert place(source, target) == "there"
    assert target.read_bytes() == b"the user's own"
