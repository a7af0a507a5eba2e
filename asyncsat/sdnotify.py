"""systemd's notify protocol (sd_notify(3)): READY, STATUS, STOPPING, the watchdog, and
more time to start.

A datagram to the socket systemd names in NOTIFY_SOCKET; nothing when it is not set (not
run by systemd with Type=notify). No library: the protocol is one sendto().
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping


class Notifier:
    """Tells systemd how the daemon is doing."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None
        """Seconds within which systemd wants a WATCHDOG=1, or None."""

    @property
    def enabled(self) -> bool:
        """True when run by systemd with Type=notify (someone listens)."""
        return bool(self._address)

    def send(self, state: str) -> None:
        """One datagram: `KEY=VALUE` lines, e.g. `READY=1` or `STATUS=...`."""
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(state.encode(), self._address)
        except OSError:
            pass  # systemd gone: nothing to tell

    async def keep_alive(self) -> None:
        """WATCHDOG=1 at half the interval, for as long as the event loop turns."""
        if self.watchdog is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog / 2)

    def extend_timeout(self, seconds: float, status: str) -> None:
        """Ask for `seconds` more to start (or stop) than TimeoutStartSec, saying why."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}\nSTATUS={status}")

    async def report(self, status: Callable[[], Awaitable[str | None]], interval: float) -> None:
        """STATUS=<status()> every `interval` seconds (what `systemctl status` shows); a
        None status (the database is away) is skipped."""
        if not self._address:
            return
        while True:
            text = await status()
            if text:
                self.send(f"STATUS={text}")
            await asyncio.sleep(interval)


def from_env() -> Notifier:
    return Notifier(os.environ)
