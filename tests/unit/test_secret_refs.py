"""A credential's secret by reference: `env:NAME`, `file:PATH` (its first line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncsat import secret_refs
from asyncsat.errors import AsyncsatError, UsageError


def test_a_reference_is_read_where_it_is_used(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret-1\nignored\n")
    monkeypatch.setenv("ASYNCSAT_TEST_PW", "s3cret-2")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert secret_refs.read(f"file:{tmp_path}/pw") == "s3cret-1"
    assert secret_refs.read("file:$CREDENTIALS_DIRECTORY/pw") == "s3cret-1"
    assert secret_refs.read("env:ASYNCSAT_TEST_PW") == "s3cret-2"


@pytest.mark.parametrize(("ref", "says"), [
    ("env:ASYNCSAT_TEST_UNSET", "the environment variable ASYNCSAT_TEST_UNSET is not set or empty"),
    ("file:/nonexistent/pw", "cannot read /nonexistent/pw: No such file or directory"),
])
def test_an_unreadable_reference_says_why(ref: str, says: str) -> None:
    with pytest.raises(AsyncsatError) as caught:
        secret_refs.read(ref)
    assert caught.value.message == says


def test_an_empty_file_has_no_secret(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(AsyncsatError, match="no secret on its first line"):
        secret_refs.read(f"file:{tmp_path}/pw")


@pytest.mark.parametrize("ref", ["pw", "env:", "vault:x", "file:relative/pw", "file:"])
def test_a_bad_reference_is_refused_before_anything_is_written(ref: str) -> None:
    with pytest.raises(UsageError):
        secret_refs.check(ref)
    assert secret_refs.check("file:$CREDENTIALS_DIRECTORY/pw")
