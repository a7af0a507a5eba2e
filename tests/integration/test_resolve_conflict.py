"""A request whose resolving transaction PostgreSQL aborts for a deadlock is resolved again,
not failed: the deadlock is the database's way of letting another transaction through."""

from __future__ import annotations

import os
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from asyncsat import intake
from asyncsat.config import Settings
from tests.helpers import drain, queue, rows, sql
from tests.servers import FileServer


@pytest.mark.parametrize("deadlocks", [1, 6], ids=["once", "past-the-retries"])
async def test_a_deadlock_while_resolving_resolves_the_request_again(
        server: FileServer, dsn: str, settings: Settings,
        monkeypatch: pytest.MonkeyPatch, deadlocks: int) -> None:
    """Once: the transaction runs again at once. Six times in a row (past the five tries of
    `Store.transaction`): the daemon goes on, and the next turn resolves the request."""
    data = os.urandom(30_000)
    server.add("S1A_asked_again.zip", data)
    original = intake.resolve
    calls: list[int] = []

    async def deadlocked(conn: Any, request: Any, *args: Any, **kw: Any) -> Any:
        calls.append(request.id)
        if len(calls) <= deadlocks:  # as PostgreSQL aborts a statement in a lock cycle
            await conn.execute("SELECT 1")
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return await original(conn, request, *args, **kw)

    monkeypatch.setattr(intake, "resolve", deadlocked)
    request_id = await queue(dsn, server.url("S1A_asked_again.zip"))
    with capture_logs() as logs:
        await drain(settings)
    [request] = await sql(dsn, "SELECT status, error FROM request WHERE id = $1", request_id)
    assert (request["status"], request["error"]) == ("resolved", None)
    [row] = await rows(dsn)
    assert row["status"] == "done"
    assert calls == [request_id] * (deadlocks + 1)
    # what a transaction that was rolled back did is not logged: one line, once it held
    told = [e["event"] for e in logs if e.get("request_id") == request_id
            and e["event"].startswith("request")]
    assert told == ["request resolved"], told
    turns = [e for e in logs if e["event"].startswith("requests not resolved this turn")]
    assert len(turns) == (1 if deadlocks >= 5 else 0), turns
