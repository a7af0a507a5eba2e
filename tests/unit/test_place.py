"""Putting a done product into another folder: a hard link, else a copy; never overwriting."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from asyncsat.intake import Link, deliver
from asyncsat.transfer.files import NOT_THE_PRODUCT, place, placed


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
    assert place(source, target) == NOT_THE_PRODUCT  # (not taken for the product)
    assert target.read_bytes() == b"the user's own"


def test_the_product_put_there_before_is_there(tmp_path: Path) -> None:
    source = tmp_path / "p.nc"
    source.write_bytes(os.urandom(5000))
    linked, copied = tmp_path / "l" / "p.nc", tmp_path / "c" / "p.nc"
    assert place(source, linked) == "linked"
    copied.parent.mkdir()
    copied.write_bytes(source.read_bytes())  # (a copy made across file systems)
    assert (place(source, linked), place(source, copied)) == ("there", "there")
    assert placed(source, linked) and placed(source, copied)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "p.nc").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "p.nc").symlink_to(tmp_path / "nowhere")
    for other in (tmp_path / "x" / "p.nc", tmp_path / "y" / "p.nc"):
        assert not placed(source, other)
        assert place(source, other) == NOT_THE_PRODUCT


def test_a_user_file_in_the_folder_asked_for_makes_the_product_take_the_other_name(
        tmp_path: Path) -> None:
    source = tmp_path / "a" / "p.nc"
    source.parent.mkdir()
    source.write_bytes(os.urandom(4000))
    target = tmp_path / "b" / "prov" / "p.nc"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"mine")
    [(link, how)] = deliver([Link(17, source, target)])
    assert (how, link.target) == ("linked", target.with_name("p_17.nc"))
    assert target.read_bytes() == b"mine"
    assert os.path.samefile(source, link.target)
    [(again, how)] = deliver([Link(17, source, target)])  # (asked once more: there)
    assert (how, again.target) == ("there", target.with_name("p_17.nc"))
