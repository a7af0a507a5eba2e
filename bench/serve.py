"""Serve the files of one directory with tests.servers.FileServer, in a process of its own.

Started by bench/run.py, so that the server's CPU is not counted in the clients' rusage
and the server does not share an event loop with any client. Prints one JSON line
(`{"port": ..., "pid": ...}`) on stdout once it listens, then serves until SIGTERM,
SIGINT or the end of its standard input.

Besides /files/<name>, it answers /bench/stats (connection peaks, 429s, bytes and the
server's own CPU seconds, as JSON) and /bench/reset (zero the counters).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import FileServer  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, help="serve every regular file of this directory")
    p.add_argument("--rate", type=float, default=None,
                   help="bandwidth cap per connection, bytes/s (default: none)")
    p.add_argument("--max-per-user", type=int, default=None,
                   help="answer 429 beyond this many concurrent connections per user")
    p.add_argument("--chunk", type=int, default=64 * 1024, help="bytes per write")
    p.add_argument("--port", type=int, default=0)
    return p.parse_args(argv)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _add_control_routes(server: FileServer) -> None:
    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({
            "peak": dict(server.peak), "active": dict(server.active),
            "over_limit": server.over_limit, "requests": len(server.requests),
            "bytes_sent": server.bytes_sent, "cpu_seconds": _cpu_seconds(),
        })

    async def reset(_request: web.Request) -> web.Response:
        server.peak.clear()
        server.requests.clear()
        server.over_limit = 0
        server.bytes_sent = 0
        return web.json_response({"ok": True})

    server.app.router.add_get("/bench/stats", stats)
    server.app.router.add_get("/bench/reset", reset)


class _StdinWatch(asyncio.Protocol):
    """Sets `stop` when the parent closes our standard input (or dies)."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop.set()


async def serve(args: argparse.Namespace) -> None:
    server = FileServer(max_per_user=args.max_per_user, chunk=args.chunk)
    server.port = args.port
    for path in sorted(args.directory.iterdir()):
        if path.is_file():
            server.add(path.name, path=path, rate=args.rate)
    _add_control_routes(server)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # stdin that is not a pipe (a file, /dev/null): stop on signals only
    with contextlib.suppress(OSError, ValueError):
        await loop.connect_read_pipe(lambda: _StdinWatch(stop), sys.stdin)
    print(json.dumps({"port": server.port, "pid": os.getpid(), "files": len(server.products)}),
          flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    uvloop.run(serve(_parse(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
