"""Serve the files of one directory over FTP (pyftpdlib), in a process of its own.

The FTP counterpart of bench/serve.py, started by `bench/run.py --protocol ftp`: the
server's CPU is not counted in the clients' rusage and it shares no event loop with them.

- One login (`--user`, `--password`; anonymous when no user is given), read-only.
- `--rate`: bandwidth cap per data connection, in bytes/s. After every write the data
  connection is paused until the bytes it sent since the transfer started are due at that
  rate (the algorithm of tests/ftpserver.py and tests/servers.py). pyftpdlib's own
  ThrottledDTPHandler is not used: it sends a second's worth of data at full speed, then
  sleeps for twice the rest of the second, every other second, so that a file of an odd
  number of seconds' worth ends a second early (50 MiB at 10 MiB/s in 4.0 s).
- `--max-per-user N`: at most N logged-in control connections per user; the login of one
  more is refused with `421 Too many connections for this user` (and counted). A session
  counts from its successful login until QUIT or until its socket closes.
- Files go out with sendfile(2) (`--no-sendfile`: read() + send()), `--chunk` bytes per
  call, so the server needs little CPU even at several hundred MiB/s.

Prints one JSON line (`{"port": ..., "pid": ...}`) on stdout once it listens. Then it reads
commands on stdin, one a line: `stats` answers one JSON line (per-user peak and active
sessions, refused logins, logins, RETR commands, commands received by verb, bytes sent,
the server's own CPU seconds), `reset` zeroes the counters (answer `{"ok": true}`). It
stops at the end of stdin, or on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

with warnings.catch_warnings():  # pyftpdlib still imports asynchat and asyncore
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import DTPHandler, FTPHandler
    from pyftpdlib.handlers.ftp.producers import FileProducer
    from pyftpdlib.ioloop import IOLoop
    from pyftpdlib.servers import FTPServer

# no log line per command: pyftpdlib configures logging for the process unless its
# logger has a handler
_log = logging.getLogger("pyftpdlib")
_log.setLevel(logging.ERROR)
_log.addHandler(logging.NullHandler())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, help="serve every file of this directory")
    p.add_argument("--rate", type=float, default=None,
                   help="bandwidth cap per data connection, bytes/s (default: none)")
    p.add_argument("--max-per-user", type=int, default=None,
                   help="refuse (421) logins beyond this many sessions per user")
    p.add_argument("--chunk", type=int, default=64 * 1024, help="bytes per write")
    p.add_argument("--user", help="the login (default: anonymous only)")
    p.add_argument("--password", default="", help="its password")
    p.add_argument("--no-sendfile", action="store_true", help="read() + send(), no sendfile")
    p.add_argument("--port", type=int, default=0)
    return p.parse_args(argv)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Counters:
    """What the server saw; updated by the I/O loop, read and reset by the stdin thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.over_limit = 0
        self.requests = 0
        self.logins = 0
        self.bytes_sent = 0
        self.commands: Counter[str] = Counter()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"peak": dict(self.peak), "active": dict(self.active),
                    "over_limit": self.over_limit, "requests": self.requests,
                    "logins": self.logins, "bytes_sent": self.bytes_sent,
                    "commands": dict(self.commands), "cpu_seconds": _cpu_seconds()}

    def reset(self) -> None:
        with self.lock:
            self.peak = Counter(self.active)  # sessions still open count from here on
            self.over_limit = self.requests = self.logins = self.bytes_sent = 0
            self.commands = Counter()


class Dtp(DTPHandler):  # type: ignore[misc]
    """A data connection capped at `rate` bytes/s from the start of its transfer."""

    rate: float | None = None
    counters: Counters
    sendfile = True
    _began: float | None = None
    _sent = 0

    def use_sendfile(self) -> bool:
        return self.sendfile and bool(super().use_sendfile())

    def push_with_producer(self, producer: Any) -> None:
        self._began = time.monotonic()  # before the first write, which happens in there
        self._sent = 0
        super().push_with_producer(producer)

    def initiate_sendfile(self) -> None:
        before = self.tot_bytes_sent
        super().initiate_sendfile()
        self._account(self.tot_bytes_sent - before)

    def send(self, data: bytes) -> int:  # the path without sendfile (and listings)
        sent = int(super().send(data))
        self._account(sent)
        return sent

    def _account(self, sent: int) -> None:
        if not sent:
            return
        with self.counters.lock:
            self.counters.bytes_sent += sent
        if not self.rate or self._began is None or self._closed:
            return
        self._sent += sent
        ahead = self._sent / self.rate - (time.monotonic() - self._began)
        if ahead > 0:  # sent faster than the rate: sleep until these bytes are due
            self.del_channel()
            self.ioloop.call_later(ahead, self._wake)

    def _wake(self) -> None:
        if not self._closed:
            self.add_channel(events=self.ioloop.WRITE)


class Handler(FTPHandler):  # type: ignore[misc]
    """The control connection: at most `max_per_user` logged-in sessions per user."""

    counters: Counters
    max_per_user: int | None = None
    counted: str | None = None
    auth_failed_timeout = 0
    banner = "asyncsat bench FTP server ready."

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        with self.counters.lock:
            self.counters.commands[cmd] += 1
        super().pre_process_command(line, cmd, arg)

    def ftp_PASS(self, line: str) -> None:
        user, cap, c = self.username, self.max_per_user, self.counters
        if not self.authenticated and user and cap is not None:
            with c.lock:
                full = c.active[user] >= cap
                c.over_limit += full
            if full:
                self.respond("421 Too many connections for this user, try again later.")
                self.close_when_done()
                return
        super().ftp_PASS(line)

    def handle_auth_success(self, home: str, password: str, msg_login: str) -> None:
        super().handle_auth_success(home, password, msg_login)
        user = self.counted = self.username
        c = self.counters
        with c.lock:
            c.logins += 1
            c.active[user] += 1
            c.peak[user] = max(c.peak[user], c.active[user])

    def ftp_RETR(self, file: str) -> Any:
        with self.counters.lock:
            self.counters.requests += 1
        return super().ftp_RETR(file)

    def _uncount(self) -> None:
        if self.counted is not None:
            with self.counters.lock:
                self.counters.active[self.counted] -= 1
            self.counted = None

    def ftp_QUIT(self, line: str) -> None:
        self._uncount()  # the session ends here, whatever the socket does next
        super().ftp_QUIT(line)

    def close(self) -> None:
        self._uncount()
        super().close()


def _commands(counters: Counters, stop: threading.Event) -> None:
    """Answer `stats` and `reset` on stdin; stop at its end."""
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                answer: dict[str, Any] = counters.snapshot()
            elif command == "reset":
                counters.reset()
                answer = {"ok": True}
            else:
                answer = {"error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        stop.set()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    root = str(args.directory.resolve())
    authorizer = DummyAuthorizer()
    if args.user:
        authorizer.add_user(args.user, args.password, root, perm="elr")
    else:
        authorizer.add_anonymous(root)
    counters = Counters()
    dtp = type("BenchDtp", (Dtp,), {"rate": args.rate, "counters": counters,
                                    "sendfile": not args.no_sendfile,
                                    "ac_out_buffer_size": args.chunk})
    handler = type("BenchHandler", (Handler,), {
        "authorizer": authorizer, "dtp_handler": dtp, "counters": counters,
        "max_per_user": args.max_per_user})
    ioloop = IOLoop()
    server = FTPServer(("127.0.0.1", args.port), handler, ioloop=ioloop)
    server.max_cons = 256
    FileProducer.buffer_size = args.chunk  # the send() path reads `chunk` bytes at a time

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = server.socket.getsockname()[1]
    print(json.dumps({"port": port, "pid": os.getpid(),
                      "files": sum(1 for p in args.directory.iterdir() if p.is_file())}),
          flush=True)
    threading.Thread(target=_commands, args=(counters, stop), name="commands",
                     daemon=True).start()
    try:
        wait: float | None = 0.5
        while not stop.is_set():
            # poll until the next timer (a throttled connection waking up), at most 0.5 s
            wait = ioloop.loop(min(0.5, wait) if wait is not None else 0.5, blocking=False)
    finally:
        server.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
