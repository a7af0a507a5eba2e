"""A file the daemon did not write at a product's final name (a user's, another program's,
one of a download whose row was deleted) is never replaced: the product takes another
name, recorded in its row, and the daemon says so in its log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from asyncsat.commands import _done_path
from asyncsat.config import Settings
from tests.helpers import add_provider, drain, local_folder, named_row, queue, rows, sql
from tests.servers import FileServer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("size", [40_000, 2_500_000], ids=["held", "streamed"])
async def test_a_file_of_a_user_at_the_name_is_kept(
        server: FileServer, dsn: str, settings: Settings, size: int) -> None:
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    data, mine = os.urandom(size), b"my notes, not a product\n"
    server.add("a.nc", data)
    local_folder(settings).mkdir(parents=True)
    (local_folder(settings) / "a.nc").write_bytes(mine)
    await queue(dsn, server.url("a.nc"))
    with capture_logs() as logs:
        await drain(settings)

    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert row["name"] == f"a_{row['id']}.nc"
    assert Path(row["path"]) == local_folder(settings) / row["name"]
    assert Path(row["path"]).read_bytes() == data
    assert (local_folder(settings) / "a.nc").read_bytes() == mine
    assert sorted(p.name for p in local_folder(settings).iterdir()) == ["a.nc", row["name"]]
    [taken] = [e for e in logs if e["event"].startswith("a file this download did not")]
    assert taken["log_level"] == "warning"
    assert (taken["download_id"], taken["name"], taken["now"]) == \
        (row["id"], "a.nc", row["name"])


async def test_files_at_both_names_fail_the_download_and_stay(
        server: FileServer, dsn: str, settings: Settings) -> None:
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    server.add("b.nc", os.urandom(30_000))
    row_id = await named_row(dsn, settings, server.url("b.nc"), None)  # (as psql inserts it)
    local_folder(settings).mkdir(parents=True)
    first, second = local_folder(settings) / "b.nc", local_folder(settings) / f"b_{row_id}.nc"
    first.write_text("one")
    second.write_text("two")
    await drain(settings)

    [row] = await rows(dsn)
    assert row["status"] == "failed", row
    assert "neither is replaced" in row["error"], row["error"]
    assert (first.read_text(), second.read_text()) == ("one", "two")


async def test_a_users_file_in_another_requests_folder_is_kept(
        server: FileServer, dsn: str, settings: Settings, tmp_path: Path) -> None:
    """Two requests want one product, into two folders; the second folder has a user's file
    at the product's name. The product is fetched once, and put into the second folder
    under the other name (it was taken for the product there, and the second request's
    `get --wait` showed the user's file as its product)."""
    await add_provider(dsn, "local", server.base, {"max_connections": 2})
    data, mine = os.urandom(40_000), b"my notes\n"
    server.add("a.nc", data)
    other = tmp_path / "other"
    (other / "local").mkdir(parents=True)
    (other / "local" / "a.nc").write_bytes(mine)
    await queue(dsn, server.url("a.nc"), dest=settings.dest)
    await queue(dsn, server.url("a.nc"), dest=other)
    await drain(settings)

    [row] = await rows(dsn)
    assert row["status"] == "done", row
    assert (other / "local" / "a.nc").read_bytes() == mine
    copy = other / "local" / f"a_{row['id']}.nc"
    assert copy.read_bytes() == data
    assert _done_path(row, str(other)) == (str(copy), True)
    assert _done_path(row, str(settings.dest)) == (row["path"], True)


async def test_a_product_named_like_an_other_name_does_not_take_another_products_name(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """Product `x.nc` (download P) is done at `x.nc`. Product `x_<q>.nc` (download Q: its
    own name happens to end with its id, e.g. `band_1.tif` of download 1) finds a user's
    file at its name: it takes another name, never P's `x.nc` (a change that took the
    other name of `x_<q>.nc` for `x.nc`, reverted, failed it: found by a review)."""
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    p_data = os.urandom(20_000)
    server.add("x.nc", p_data)
    [p] = await sql(dsn, "INSERT INTO download (provider_id, url, dest, not_before)"
                         " SELECT id, $1, $2, now() - interval '10 seconds' FROM provider"
                         " WHERE name = 'local' RETURNING id",
                    server.url("x.nc"), str(settings.dest))
    await drain(settings)
    [q] = await sql(dsn, "INSERT INTO download (provider_id, url, dest)"
                         " SELECT id, 'http://placeholder/', $1 FROM provider"
                         " WHERE name = 'local' RETURNING id", str(settings.dest))
    q_name = f"x_{q['id']}.nc"
    q_data = os.urandom(30_000)
    server.add(q_name, q_data)
    await sql(dsn, "UPDATE download SET url = $2 WHERE id = $1", q["id"], server.url(q_name))
    mine = b"a user's file, not a product\n"
    (local_folder(settings) / q_name).write_bytes(mine)
    await drain(settings)

    by_id = {r["id"]: r for r in await rows(dsn)}
    assert by_id[p["id"]]["status"] == "done"
    assert (local_folder(settings) / "x.nc").read_bytes() == p_data
    assert (local_folder(settings) / q_name).read_bytes() == mine
    row = by_id[q["id"]]
    assert row["status"] == "done", (row["status"], row["error"], row["name"])
    assert row["name"] not in ("x.nc", q_name), row["name"]
    assert Path(row["path"]).read_bytes() == q_data


async def test_a_product_whose_other_name_holds_a_users_file_does_not_fail(
        server: FileServer, dsn: str, settings: Settings) -> None:
    """Two products named `x.nc` in one folder (two URLs): P has `x.nc`; Q records its other
    name `x_<q>.nc` (the database has `x.nc` for P). A user's file sits at `x_<q>.nc`: at
    the rename Q takes another name (`_RowEvents.elsewhere`), never P's `x.nc` (found by
    a review of a change, reverted, that took `x.nc` for the other name of `x_<q>.nc`)."""
    await add_provider(dsn, "local", server.base, {"max_connections": 1})
    p_data = os.urandom(20_000)
    server.add("x.nc", p_data)
    await sql(dsn, "INSERT INTO download (provider_id, url, dest)"
                   " SELECT id, $1, $2 FROM provider WHERE name = 'local'",
              server.url("x.nc"), str(settings.dest))
    await drain(settings)
    [q] = await sql(dsn, "INSERT INTO download (provider_id, url, dest)"
                         " SELECT id, $1, $2 FROM provider WHERE name = 'local' RETURNING id",
                    server.url("x.nc") + "?copy=2", str(settings.dest))
    mine = b"a user's file, not a product\n"
    (local_folder(settings) / f"x_{q['id']}.nc").write_bytes(mine)
    await drain(settings)

    by_id = {r["id"]: r for r in await rows(dsn)}
    assert (local_folder(settings) / "x.nc").read_bytes() == p_data
    assert (local_folder(settings) / f"x_{q['id']}.nc").read_bytes() == mine
    row = by_id[q["id"]]
    assert row["status"] == "done", (row["status"], row["error"], row["name"])
    assert Path(row["path"]).read_bytes() == p_data
