"""Which size a file must have: catalog sizes bind, sizes the server announced may change."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncsat.errors import RetryableError, SizeError
from asyncsat.transfer.base import Opened, Source, Validator
from asyncsat.transfer.runner import Job, _expected_size


def _job(size: int | None, *, from_server: bool = False, etag: str | None = '"a"') -> Job:
    return Job(Source("http://h/f.nc"), Path("/tmp"), "f.nc", size, None,
               Validator(etag=etag), size_from_server=from_server)


def test_unknown_sizes_take_the_servers() -> None:
    assert _expected_size(_job(None), Opened(0, 10)) == 10
    assert _expected_size(_job(0), Opened(0, 10)) == 10  # catalogs say 0 for "unknown"
    assert _expected_size(_job(None), Opened(0, None)) is None
    assert _expected_size(_job(7), Opened(0, None)) == 7


def test_a_catalog_size_binds_even_when_the_server_restarts_the_file() -> None:
    with pytest.raises(SizeError, match="announces 300 bytes, 1000 were expected"):
        _expected_size(_job(1000), Opened(0, 300, validator=Validator(etag='"b"')))


def test_a_size_the_server_announced_yields_to_a_new_version() -> None:
    assert _expected_size(_job(1000, from_server=True), Opened(0, 300)) == 300
    with pytest.raises(RetryableError, match="changed size"):
        _expected_size(_job(1000, from_server=True), Opened(500, 300))
