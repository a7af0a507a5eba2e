"""What people see: the status table and the progress bar of `get --wait`."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


def human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def status_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of downloads, one per line."""
    if not rows:
        return "no downloads"
    lines = [f"{'ID':>6}  {'STATUS':<9}  {'PROVIDER':<16}  {'PROGRESS':<22}  {'TRIES':>5}  NAME"]
    for r in rows:
        size = r["size"]
        pct = f"{100 * r['bytes_done'] / size:5.1f}%" if size else "     "
        progress = f"{pct} {human(r['bytes_done'])}/{human(size)}"
        name = r["name"] or r["url"]
        line = (f"{r['id']:>6}  {r['status']:<9}  {r['provider'][:16]:<16}  {progress:<22}  "
                f"{r['attempts']:>5}  {name}")
        if r["error"] and r["status"] != "done":
            line += f"  ({r['error']})"
        lines.append(line)
    return "\n".join(lines)


class ProgressBar:
    """One line on a terminal, rewritten in place; silent when the stream is not a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._seen: dict[int, tuple[float, int]] = {}

    def progress(self, download_id: int, name: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        then, before = self._seen.get(download_id, (now, done))
        self._seen[download_id] = (now, done)
        rate = (done - before) / (now - then) if now > then else 0.0
        pct = f"{100 * done / total:5.1f}%" if total else "  ?  "
        width = 30
        filled = int(width * done / total) if total else 0
        bar = "#" * filled + "-" * (width - filled)
        line = f"\r[{bar}] {pct} {human(done)}/{human(total)} {human(int(rate))}/s {name[:40]}"
        self.stream.write(line.ljust(110)[:110])
        self.stream.flush()

    def finished(self, download_id: int, status: str) -> None:
        self._seen.pop(download_id, None)
        if self.enabled:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()
