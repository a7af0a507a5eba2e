"""The HTTP client's import, started in a thread while a command does its first work.

`aiohttp` takes about 100 ms to import (a third of `get --wait`'s start on a small VM),
40 of them making its two TLS contexts at import, which reads and parses the system's CA
certificates in OpenSSL without the GIL. A command that will run transfers starts it here,
first thing: that part then runs beside the command's own imports and its first database
round trips, instead of after them. Only third-party packages are imported here (never one
of ours, which could import a module the main thread is importing: a lock-order deadlock);
a failure is left for the main thread's own import to report.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

HEAVY = ("aiohttp",)


def start() -> None:
    threading.Thread(target=_import, name="asyncsat-imports", daemon=True).start()


def _import() -> None:
    for name in HEAVY:
        with contextlib.suppress(Exception):  # (reported where it is imported for use)
            importlib.import_module(name)


__all__ = ["start"]
