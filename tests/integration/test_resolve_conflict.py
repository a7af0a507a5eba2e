"""A request whose resolving transaction PostgreSQL aborts for a deadlock is resolved again,
not failed: the deadlock is the database's way of letting another transaction through."""

from __future__ import annotations

import os
from typing import Any

import asyncpg
import pytest

from asyncsat import intake
from asyncsat.config import Settings
from tests.helpers import drain, queue, rows, sql
from tests.servers import FileServer


async def test_a_deadlock_while_resolving_resolves_the_request_again(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(30_000)
    server.add("S1A_asked_again.zip", data)
    original = intake.resolve
    calls: list[int] = []

    async def deadlocked_once(conn: Any, request: Any, *args: Any, **kw: Any) -> Any:
        calls.append(request.id)
        if len(calls) == 1:  # as PostgreSQL aborts the statement in a cycle of row locks
            await conn.execute("SELECT 1")
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return await original(conn, request, *args, **kw)

    monkeypatch.setattr(intake, "resolve", deadlocked_once)
    request_id = await queue(dsn, server.url("S1A_asked_again.zip"))
    await drain(settings)
    [request] = await sql(dsn, "SELECT status, error FROM request WHERE id = $1", request_id)
    assert (request["status"], request["error"]) == ("resolved", None)
    [row] = await rows(dsn)
    assert row["status"] == "done"
    assert calls == [request_id, request_id]
