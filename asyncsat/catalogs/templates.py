"""Folder layouts of operational feeds: `{date:%Y/%m}/*_{date:%Y%m%d}.nc` and globs. Pure."""

from __future__ import annotations

import fnmatch
import re
import string
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

from asyncsat.errors import UsageError

_GLOB = re.compile(r"[*?\[]")


def has_glob(text: str) -> bool:
    """True when `text` holds a shell wildcard (`*`, `?`, `[...]`)."""
    return bool(_GLOB.search(text))


def check_template(template: str) -> None:
    """A template may only use `{date:FORMAT}` fields (strftime codes)."""
    try:
        fields = [f for _t, f, _s, _c in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UsageError(f"invalid template {template!r}: {exc}") from None
    for name in fields:
        if name != "date":
            raise UsageError(f"invalid template {template!r}: only {{date:FORMAT}} fields "
                             f"are known, not {{{name}}}")


def days(start: datetime, end: datetime) -> Iterator[date]:
    """Every UTC day from `start` to `end`, both included."""
    first, last = start.astimezone(UTC).date(), end.astimezone(UTC).date()
    for n in range((last - first).days + 1):
        yield first + timedelta(days=n)


def expand(template: str, start: datetime, end: datetime) -> list[str]:
    """The distinct patterns a template gives for the days of a range, in date order."""
    check_template(template)
    if "{" not in template:
        return [template]
    seen: dict[str, None] = {}
    for day in days(start, end):
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        seen.setdefault(template.format(date=moment))
    return list(seen)


def split_pattern(path: str) -> tuple[str, str]:
    """(folder, name pattern) of a path whose last segment may hold wildcards.

    Wildcards in folders are refused: listing a tree is the provider's template's job.
    """
    folder, _, name = path.rpartition("/")
    if has_glob(folder):
        raise UsageError(f"wildcards are allowed in the file name only, not in {folder!r}")
    return folder + "/", name


def matches(name: str, pattern: str) -> bool:
    """Shell-style match, case-sensitive like the servers' file systems."""
    return fnmatch.fnmatchcase(name, pattern)
