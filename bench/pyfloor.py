"""The Python floor: the least a downloader on asyncsat's stack does, as a benchmark peer.

    python bench/pyfloor.py -j 4 -d OUT URL...

uvloop and one aiohttp session of N connections; N workers take the URLs in turn. Each
file is streamed into `<name>.part`, then fsynced, its pages dropped, renamed and its
folder fsynced (in a worker thread), as asyncsat keeps its files durable (and the page
cache for others, `keep_page_cache` off). Nothing else: no database, no log, no
resume, no retry but a 429's Retry-After. Its wall time against asyncsat's tells what
asyncsat's bookkeeping costs; against aria2c's, what the language and the libraries cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
import uvloop
from durable import seal

CHUNK = 1 << 20
TRIES = 5


async def _fetch(session: aiohttp.ClientSession, url: str, out: Path) -> None:
    final = out / unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    part = final.with_name(final.name + ".part")
    for _ in range(TRIES):
        async with session.get(url) as response:
            if response.status == 429:
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            response.raise_for_status()
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                async for chunk in response.content.iter_chunked(CHUNK):
                    os.write(fd, chunk)
            except BaseException:
                os.close(fd)
                raise
        await asyncio.to_thread(seal, part, final, fd, drop_pages=True)
        return
    raise RuntimeError(f"{url}: refused {TRIES} times (429)")


async def _main(urls: Sequence[str], out: Path, connections: int) -> None:
    queue = list(reversed(urls))
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def worker() -> None:
            while queue:
                await _fetch(session, queue.pop(), out)

        await asyncio.gather(*(worker() for _ in range(connections)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-j", type=int, default=4, help="connections")
    p.add_argument("-d", type=Path, required=True, help="folder of the files")
    p.add_argument("urls", nargs="+")
    args = p.parse_args(argv)
    args.d.mkdir(parents=True, exist_ok=True)
    try:
        uvloop.run(_main(args.urls, args.d, args.j))
    except Exception as exc:  # (one line, as the other tools report a failure)
        print(f"pyfloor: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
