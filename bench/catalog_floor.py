"""The floor of bench/catalog.py: a plain aiohttp script doing a CDSE search-and-download job.

    python bench/catalog_floor.py --catalogue URL --token-url URL --download-url URL \\
        --user USER --dest DIR --connections 4 < password

One password grant (client_id cdse-public), the catalogue paged by `@odata.nextLink`
(`$filter=Collection/Name eq 'SENTINEL-2'`, `$orderby=ContentDate/Start asc`, `$top`
products a page), then every product downloaded with the bearer token, at most
`--connections` at a time (an asyncio.Semaphore), to DEST/<Name>.zip.

Nothing else: no database, no resume, no retry, no token refresh, no checksum or zip
check, no fsync, no part file. It is the least a client must do for the job, the floor
asyncsat is compared with. Prints `<n> products, <bytes> bytes` and exits 0, or fails on
the first error.

`--durable` adds what asyncsat does to land a file safely, the way it does it: write to
NAME.part, then in a worker thread fsync it, rename it to NAME and fsync the folder. The
difference between the two runs is the cost of that durability alone, without a database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from durable import seal

CHUNK = 64 * 1024


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalogue", required=True, help="OData base URL, ending in /odata/v1/")
    p.add_argument("--token-url", required=True)
    p.add_argument("--download-url", required=True, help="download base, .../odata/v1/")
    p.add_argument("--user", required=True)
    p.add_argument("--collection", default="SENTINEL-2")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument("--durable", action="store_true",
                   help="part file, fsync, rename, fsync of the folder (as asyncsat does)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop (asyncsat runs on uvloop)")
    return p.parse_args(argv)


async def token(session: aiohttp.ClientSession, url: str, user: str, password: str) -> str:
    form = {"grant_type": "password", "client_id": "cdse-public", "username": user,
            "password": password}
    async with session.post(url, data=form) as response:
        response.raise_for_status()
        answer: dict[str, Any] = await response.json()
    return str(answer["access_token"])


async def products(session: aiohttp.ClientSession, args: argparse.Namespace) -> list[Any]:
    query = {"$filter": f"Collection/Name eq '{args.collection}'",
             "$orderby": "ContentDate/Start asc", "$top": str(args.page_size)}
    url: str | None = f"{args.catalogue}Products?{urlencode(query)}"
    found: list[Any] = []
    while url:
        async with session.get(url) as response:
            response.raise_for_status()
            page: dict[str, Any] = await response.json()
        found += page["value"]
        url = page.get("@odata.nextLink")
    return found


async def download(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                   path: Path, slots: asyncio.Semaphore, durable: bool) -> int:
    size = 0
    target = path.with_name(path.name + ".part") if durable else path
    async with slots, session.get(url, headers=headers) as response:
        response.raise_for_status()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                size += len(chunk)
        except BaseException:
            os.close(fd)
            raise
        if durable:
            await asyncio.to_thread(seal, target, path, fd)
        else:
            os.close(fd)
    return size


async def job(args: argparse.Namespace, password: str) -> int:
    args.dest.mkdir(parents=True, exist_ok=True)
    async with aiohttp.ClientSession() as session:
        bearer = {"Authorization": "Bearer " + await token(session, args.token_url, args.user,
                                                           password)}
        found = await products(session, args)
        slots = asyncio.Semaphore(args.connections)
        sizes = await asyncio.gather(*(
            download(session, f"{args.download_url}Products({p['Id']})/$value", bearer,
                     args.dest / (p["Name"] + ".zip"), slots, args.durable) for p in found))
    print(f"{len(found)} products, {sum(sizes)} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    password = sys.stdin.readline().rstrip("\n")
    work: Coroutine[Any, Any, int] = job(args, password)
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(work)
    return asyncio.run(work)


if __name__ == "__main__":
    sys.exit(main())
