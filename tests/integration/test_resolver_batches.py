"""A long search queues its products in batches as it finds them: a retry, a failed run
and a limit count each product once (the catalog is scripted: a try is a list of products,
cut by a transient fault where the script says so)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from asyncsat import daemon
from asyncsat.catalogs.base import ProductRef, Query
from asyncsat.config import Settings
from asyncsat.errors import RetryableError
from asyncsat.logs import Redactor
from asyncsat.resolver import FLUSH_EVERY, Resolver
from tests.helpers import add_provider, search_request, sql

FAULT = ProductRef(url="fault")


def _refs(prefix: str, n: int) -> list[ProductRef]:
    return [ProductRef(url=f"https://cat.example/{prefix}{i}.bin", id=f"{prefix}{i}")
            for i in range(n)]


def _script(monkeypatch: pytest.MonkeyPatch, tries: Sequence[Sequence[ProductRef]]) -> list[int]:
    """The catalog answers try k with `tries[k]` (the last one again after it)."""
    calls = [0]

    def products(self: Resolver, *_args: Any) -> AsyncIterator[ProductRef]:
        script = tries[min(calls[0], len(tries) - 1)]
        calls[0] += 1

        async def run() -> AsyncIterator[ProductRef]:
            for ref in script:
                if ref is FAULT:
                    raise RetryableError("the catalog dropped the connection")
                yield ref

        return run()

    monkeypatch.setattr(Resolver, "_products", products)
    return calls


async def _provider(dsn: str) -> int:
    # paused: its searches run, its downloads wait (the test looks at what was queued)
    await add_provider(dsn, "cat", "https://cat.example/", protocol="stac",
                       settings={"max_attempts": 2, "backoff_initial": 0.01,
                                 "backoff_max": 0.02})
    await sql(dsn, "UPDATE provider SET paused = true")
    return int((await sql(dsn, "SELECT id FROM provider"))[0]["id"])


async def _one_run(dsn: str, settings: Settings, request_id: int, done: str) -> None:
    """Serve until `done` (a condition on the request row) holds."""
    task = asyncio.create_task(daemon.serve(settings, Redactor()))
    try:
        for _ in range(400):
            if (await sql(dsn, f"SELECT {done} AS ok FROM request WHERE id = $1",
                          request_id))[0]["ok"]:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the request never got to {done}")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _products(dsn: str, request_id: int) -> list[str]:
    rows = await sql(dsn, "SELECT d.product_id FROM request_download rd JOIN download d"
                          " ON d.id = rd.download_id WHERE rd.request_id = $1", request_id)
    return sorted(r["product_id"] for r in rows)


async def test_a_retry_after_a_batch_keeps_to_the_limit(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # try 1 queues a batch, then fails; try 2 finds 60 products sensed earlier first
    p, q = _refs("p", 300), _refs("q", 60)
    assert FLUSH_EVERY == 100
    calls = _script(monkeypatch, [[*p[:120], FAULT], q + p])
    rid = await search_request(dsn, await _provider(dsn), Query("c", limit=150))
    await _one_run(dsn, settings, rid, "status = 'resolved'")
    linked = await _products(dsn, rid)
    assert calls[0] == 2
    assert len(linked) == 150  # the 100 of the batch, and 50 of the second try
    assert set(linked) >= {r.id for r in p[:100]}


async def test_a_failed_run_of_a_standing_request_leaves_room_for_new_products(
        dsn: str, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    p, q = _refs("p", 400), _refs("q", 10)
    calls = _script(monkeypatch, [q, [*p[:120], FAULT], [*p[:120], FAULT], p])
    rid = await search_request(dsn, await _provider(dsn), Query("c", limit=150), follow=True)
    await _one_run(dsn, settings, rid, "status = 'following'")  # run 1: 10 products
    # run 2: both tries fail after a batch of 100; the run fails, what it queued stays
    await sql(dsn, "UPDATE request SET next_run = now() WHERE id = $1", rid)
    await _one_run(dsn, settings, rid, "error IS NOT NULL")
    assert len(await _products(dsn, rid)) == 110
    # run 3 finds those 100 again first: they leave room for 40 new ones, up to the limit
    await sql(dsn, "UPDATE request SET next_run = now() WHERE id = $1", rid)
    await _one_run(dsn, settings, rid, "status = 'resolved'")
    assert calls[0] == 4
    assert await _products(dsn, rid) == sorted(r.id or "" for r in [*q, *p[:140]])
