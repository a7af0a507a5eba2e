"""What the migration tests compare: a database's tables, indexes, constraints, triggers."""

from __future__ import annotations

import itertools
from typing import Any

from asyncsat.db.pool import connect
from tests.servers import PgCluster

SHAPE = """
SELECT 'column' AS kind, table_name || '.' || column_name || ' ' || data_type
       || ' ' || is_nullable || ' ' || coalesce(column_default, '') AS what
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger', tgrelid::regclass || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
ORDER BY 1, 2
"""

_n = itertools.count()


async def shape(conn: Any) -> list[tuple[str, str]]:
    """The shape of a database, comparable with another's."""
    return [tuple(r) for r in await conn.fetch(SHAPE)]


async def new_database(pg: PgCluster) -> tuple[str, Any]:
    """An empty database of the test cluster: its DSN and a connection to it."""
    name = f"m_{next(_n)}"
    pg.psql(f"CREATE DATABASE {name} OWNER asyncsat")
    dsn = pg.dsn(name)
    return dsn, await connect(dsn)
