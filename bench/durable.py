"""What the benchmark's peers share with asyncsat to keep a file: fsync, rename, fsync the
folder (a peer measured against asyncsat must not skip what makes its files durable)."""

from __future__ import annotations

import os
from pathlib import Path


def seal(part: Path, final: Path, fd: int, *, drop_pages: bool = False) -> None:
    """fsync the part file (and drop its pages from the page cache, as asyncsat does by
    default, with `drop_pages`), close it, rename it to its final name, fsync the folder.
    Blocking."""
    try:
        os.fsync(fd)
        if drop_pages:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.replace(part, final)
    folder = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
