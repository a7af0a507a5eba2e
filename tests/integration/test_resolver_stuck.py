"""A request whose failure cannot be recorded is left alone for a while, not retried in a
loop (a broken trigger once made the daemon spin on one request)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncsat import daemon
from asyncsat.catalogs.base import Query
from asyncsat.config import Settings
from asyncsat.errors import CatalogError
from asyncsat.logs import Redactor
from asyncsat.resolver import Resolver
from tests.helpers import add_provider, search_request, sql


async def test_a_failure_that_cannot_be_recorded_does_not_spin(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    await add_provider(dsn, "cat", "https://stac.example/", protocol="stac")
    pid = (await sql(dsn, "SELECT id FROM provider"))[0]["id"]
    await search_request(dsn, pid, Query("c"))
    asked = [0]

    async def find(self: Resolver, request: Any, queued: Any) -> Any:
        asked[0] += 1
        raise CatalogError("the catalog is broken")

    async def fail(self: Resolver, conn: Any, request: Any, error: str) -> None:
        raise RuntimeError("the database refuses the failure")

    monkeypatch.setattr(Resolver, "_find", find)
    monkeypatch.setattr(Resolver, "_fail", fail)
    with pytest.raises(TimeoutError):  # the daemon serves on: stopped after 1.5 s
        await asyncio.wait_for(daemon.serve(settings, Redactor()), 1.5)
    assert asked[0] == 1  # tried once, then left alone (not thousands of times)
