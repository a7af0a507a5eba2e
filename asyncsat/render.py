"""What people see: the status table and the progress bar of `get --wait`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from asyncsat.naming import without_login
from asyncsat.progress import duration, eta

if TYPE_CHECKING:
    from asyncsat.intake import Asked, Link


def human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


STATUS_PAGE = 100
"""Downloads `status` shows without --limit (and without --json): the newest, then the
command for the next page. A million lines is no answer to a person."""


def status_table(rows: Sequence[dict[str, Any]], *, stalled: bool = False) -> str:
    """A plain-text table of downloads, one per line. With `stalled` (no daemon serves the
    database), rows marked running show as `stalled`: nothing moves them."""
    if not rows:
        return "no downloads"
    lines = [f"{'ID':>6}  {'STATUS':<9}  {'PROVIDER':<16}  {'PROGRESS':<22}  {'RATE':>10}  "
             f"{'ETA':>8}  {'TRIES':>5}  NAME"]
    for r in rows:
        size = r["size"]
        pct = f"{100 * r['bytes_done'] / size:5.1f}%" if size else "     "
        progress = f"{pct} {human(r['bytes_done'])}/{human(size)}"
        name = r["name"] or r["url"]
        shown = "stalled" if stalled and r["status"] == "running" else r["status"]
        rate = r.get("rate")
        speed, left = "", ""
        if r["status"] == "running" and not stalled:
            speed = f"{human(int(rate))}/s" if rate is not None else "-"
            left = duration(eta(size - r["bytes_done"] if size else None, rate))
        line = (f"{r['id']:>6}  {shown:<9}  {r['provider'][:16]:<16}  {progress:<22}  "
                f"{speed:>10}  {left:>8}  {r['attempts']:>5}  {name}")
        if r["error"] and r["status"] != "done":
            line += f"  ({r['error']})"
        if r["status"] == "offline" and r.get("not_before") is not None:
            line += f"  [looked at again at {r['not_before']:%Y-%m-%d %H:%M:%S %Z}]"
        lines.append(line)
    return "\n".join(lines)


def totals_line(t: dict[str, Any]) -> str | None:
    """`progress: ...` over the downloads still to fetch (None when there are none): how
    many run and at what rate, how many wait, the bytes left and the time left."""
    if not t["running"] and not t["queued"]:
        return None
    line = f"progress: {t['running']} running at {human(int(t['rate']))}/s, {t['queued']} queued"
    if t["offline"]:
        line += f", {t['offline']} offline"
    line += f"; {human(t['left'])} left"
    if t["left_unsized"]:
        line += f" (and {t['left_unsized']} of unknown size)"
    return line + f"; ETA {duration(eta(t['left'], t['rate']))}"


def request_line(request_id: int, t: dict[str, Any]) -> str:
    """One request as `get --wait` follows it: downloads by status, bytes, rate, time left."""
    total = sum(t[k] for k in ("queued", "running", "offline", "done", "failed", "cancelled"))
    line = f"request {request_id}: {t['done']} of {total} done"
    for key in ("running", "queued", "offline", "failed", "cancelled"):
        if t[key]:
            line += f", {t[key]} {key}"
    size = human(t["size"]) if not t["unsized"] else "?"
    line += f"; {human(t['bytes_done'])}/{size}; {human(int(t['rate']))}/s"
    return line + f"; ETA {duration(eta(t['left'], t['rate']))}"


class DbProgress:
    """`get --wait` while a daemon does the work: the request's progress as the database
    holds it. On a terminal, one line per running transfer and one for the request, redrawn
    in place; elsewhere the request's line every `every` seconds (0: never). A note (no
    daemon, a paused provider) is printed once each time it changes."""

    def __init__(self, stream: TextIO | None = None, *, every: float = 30.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._drawn = 0
        self._printed = time.monotonic()
        self._note: str | None = None

    def show(self, request_id: int, totals: dict[str, Any], running: Sequence[dict[str, Any]],
             note: str | None = None) -> None:
        if note != self._note:
            self._note = note
            if note is not None:
                self._write([note], redraw=False)
        summary = request_line(request_id, totals)
        if self.tty:
            self._write([_transfer_line(r) for r in running] + [summary], redraw=True)
        elif self.every and time.monotonic() - self._printed >= self.every:
            self._printed = time.monotonic()
            self._write([summary], redraw=False)

    def clear(self) -> None:
        """Erase what is drawn on a terminal (another display follows)."""
        self._write([], redraw=False)

    def _write(self, lines: list[str], *, redraw: bool) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # back over the last drawing
        self._drawn = 0
        # (lines drawn again are cut to the terminal's likely width; a note is said whole)
        text = "".join((line[:ProgressBar.WIDTH] if redraw else line) + "\n" for line in lines)
        self.stream.write(text)
        if redraw:
            self._drawn = len(lines)
        self.stream.flush()


def _transfer_line(r: dict[str, Any]) -> str:
    size, done, rate = r["size"], r["bytes_done"], r.get("rate")
    pct = f"{100 * done / size:5.1f}%" if size else "  ?  "
    left = duration(eta(size - done if size else None, rate))
    speed = f"{human(int(rate))}/s" if rate is not None else "-"
    return (f"  {(r['name'] or r['url'])[:40]:<40} {pct} {human(done)}/{human(size)} "
            f"{speed} ETA {left}")


PLACED = ("linked", "copied", "there")
"""How a done product was put into a folder (else: why it was not)."""


def asked_line(request_id: int, asked: Asked, placed: Sequence[tuple[Link, str]],
               dest: Path) -> str:
    """What `get` did, in one line: queued, done already, fetched again, put in place."""
    def ids(items: Sequence[int]) -> str:
        return ", ".join(str(i) for i in items)

    parts = []
    if asked.queued:
        parts.append(f"{len(asked.queued)} download(s) queued: {ids(asked.queued)}")
    there = [i for i, _path in asked.done] + [link.download_id for link, how in placed
                                               if how == "there"]
    if there:
        parts.append(f"{len(there)} done already, the file in {dest}: {ids(there)}")
    for how in ("linked", "copied"):
        done = [link.download_id for link, h in placed if h == how]
        if done:
            parts.append(f"{len(done)} done already, {how} into {dest}: {ids(done)}")
    for link, how in placed:
        if how not in PLACED:
            parts.append(f"download {link.download_id} is done but was {how}")
    if asked.refetched:
        parts.append(f"{len(asked.refetched)} done before but the file is gone, queued again: "
                     + ", ".join(f"{i} ({path})" for i, path in asked.refetched))
    if asked.owed:
        parts.append(f"{len(asked.owed)} fetched into another folder by an earlier request, "
                     f"put into {dest} once done: {ids(asked.owed)}")
    return f"request {request_id}: " + "; ".join(parts)


def _what(r: dict[str, Any]) -> str:
    """What a request asks for, in a few words: its search's collection, else its URLs
    (a row inserted with psql may hold a search of any JSON shape)."""
    search = r["search"]
    if isinstance(search, dict):
        return str(search.get("collection", ""))
    if search is not None:
        return json.dumps(search)
    urls = r["urls"] or []
    if len(urls) <= 1:
        return urls[0] if urls else ""
    return f"{urls[0]} (+{len(urls) - 1} more)"


def _tail(text: str, width: int) -> str:
    """`text` in `width` characters, its end kept (a URL's file name is at its end)."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def requests_lines(rows: Sequence[dict[str, Any]]) -> str:
    """The requests still in progress, and the failed ones, one line each (under the
    downloads of `status`): still being listed or searched, standing, or with products
    not finished; with products found, done, failed and bytes."""
    lines = []
    for r in rows:
        if r["status"] in ("done", "cancelled"):
            continue
        what = _what(r)
        state = "listing" if r["status"] == "queued" else r["status"]
        line = f"request {r['id']:>4}  {state:<9}  {what}"
        if r["status"] != "queued":
            line += (f"  found {r['products']}, done {r['done']}, failed {r['failed']}, "
                     f"{human(r['bytes_done'])}/{human(r['size'])}")
        if r["offline"]:
            line += f", {r['offline']} offline"
        if r["error"]:
            line += f"  ({r['error']})"
        lines.append(line)
    return "\n".join(lines)


class ProgressBar:
    """One line on a terminal for all running downloads, rewritten in place.

    The cursor is left at the start of the line, so a log line printed meanwhile simply
    overwrites the bar, which is drawn again below it. Silent when not on a terminal.
    """

    WIDTH = 100

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._files: dict[int, tuple[int, int | None]] = {}
        self._finished: set[int] = set()
        self._last: tuple[float, int] | None = None
        self._rate = 0.0

    def progress(self, download_id: int, name: str, done: int, total: int | None) -> None:
        self._files[download_id] = (done, total)
        if self.enabled:
            self._draw()

    def finished(self, download_id: int, status: str) -> None:
        if status == "done":
            _done, total = self._files.get(download_id, (0, None))
            self._files[download_id] = (total or _done, total)
        self._finished.add(download_id)
        if self.enabled:
            self._draw()

    def _draw(self) -> None:
        done = sum(d for d, _ in self._files.values())
        sizes = [t for _, t in self._files.values()]
        total = sum(t for t in sizes if t) if sizes and all(sizes) else None
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            instant = max(0.0, (done - self._last[1]) / (now - self._last[0]))
            self._rate = instant if not self._rate else 0.7 * self._rate + 0.3 * instant
        self._last = (now, done)
        fraction = done / total if total else 0.0
        bar = "#" * int(20 * fraction) + "-" * (20 - int(20 * fraction))
        pct = f"{100 * fraction:5.1f}%" if total else "  ?  "
        left = duration(eta(total - done if total else None, self._rate))
        line = (f"[{bar}] {pct} {human(done)}/{human(total)} {human(int(self._rate))}/s "
                f"ETA {left}  {len(self._files) - len(self._finished)} running, "
                f"{len(self._finished)} finished")
        self.stream.write("\r" + line[: self.WIDTH] + "\x1b[K\r")
        self.stream.flush()


def request_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A request as users follow it (`status --requests --json`): its status says where it
    stands, derived from its products once it is resolved."""
    status, error = row["status"], row["error"]
    if status == "resolved":
        if row["failed"]:
            status = "failed"
            error = f"{row['failed']} product(s) failed" + (
                f"; first: {row['product_error']}" if row["product_error"] else "")
        elif not row["pending"] and not row["offline"]:
            # every product finished: done, unless all that were found were cancelled
            status = "cancelled" if row["cancelled"] and not row["done"] else "done"
    search = row["search"] or {}
    return {
        "id": row["id"], "status": status, "provider": row["provider"],
        "products": row["products"], "done": row["done"], "failed": row["failed"],
        "cancelled": row["cancelled"], "offline": row["offline"], "pending": row["pending"],
        "bytes_done": row["bytes_done"], "size": row["size"], "error": error,
        "follow": row["follow"], "search": search or None,
        "urls": [without_login(u) for u in row["urls"] or [] if isinstance(u, str)] or None,
        "next_run": row["next_run"].isoformat() if row["next_run"] else None,
        "watermark": row["watermark"].isoformat() if row["watermark"] else None,
        "created_at": row["created_at"].isoformat(),
    }


def request_progress_table(rows: Sequence[dict[str, Any]],
                           redact: Callable[[str], str] = str) -> str:
    """One line per request: status, products found, done, failed, bytes. What it asks for
    is `redact`ed before it is cut to its end: a pre-signed URL's end is its signature,
    which the redactor no longer knows once the name before it is cut off."""
    if not rows:
        return "no requests"
    lines = [f"{'ID':>6}  {'STATUS':<9}  {'PROVIDER':<16}  {'FOUND':>6}  {'DONE':>6}  "
             f"{'FAILED':>6}  {'BYTES':<20}  WHAT"]
    for r in rows:
        what = _what(r)
        size = f"{human(r['bytes_done'])}/{human(r['size'])}"
        line = (f"{r['id']:>6}  {r['status']:<9}  {(r['provider'] or '-')[:16]:<16}  "
                f"{r['products']:>6}  {r['done']:>6}  {r['failed']:>6}  {size:<20}  "
                f"{_tail(redact(what), 60)}")
        if r["offline"]:
            line += f"  [{r['offline']} offline]"
        if r["next_run"]:
            line += f"  [next run {r['next_run'][:19]}]"
        if r["error"]:
            line += f"  ({r['error']})"
        lines.append(line)
    return "\n".join(lines)
