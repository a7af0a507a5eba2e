"""The CDSE emulator (tests/cdse.py) with N generated products, in a process of its own.

Started by bench/catalog.py, so that the emulator's CPU is not counted in the clients'
rusage and it shares no event loop with them. One user (`--user`, `--password`), at most
`--max-downloads` downloads of that user at once (429 beyond), `--products` products of
collection SENTINEL-2, all Online, each a real zip (the daemon reads zip central
directories) of exactly `--size` bytes, with their MD5 and BLAKE3 in the catalogue;
`--rate` caps each download connection (bytes/s).

Writes the manifest (`--manifest PATH`: JSON, {file name: [size, md5]}, the file name
being the product's Name + ".zip", as the clients save it), then prints one JSON line
(port, pid, catalogue_url, token_url, download_url) on stdout once it listens. Then it
reads commands on stdin, one a line: `stats` answers one JSON line (grants by type with
their times, downloads admitted at once, 429s, requests by kind and status, bytes sent,
the emulator's own CPU seconds), `reset` zeroes the counters (answer `{"ok": true}`). It
stops at the end of stdin, or on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import resource
import signal
import sys
import time
import zipfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cdse import CdseEmulator, EmuProduct  # noqa: E402

T0 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", type=int, default=1000)
    p.add_argument("--size", type=int, default=64 * 1024, help="bytes of each product (a zip)")
    p.add_argument("--rate", type=float, default=None,
                   help="bandwidth cap per download connection, bytes/s (default: none)")
    p.add_argument("--max-downloads", type=int, default=4,
                   help="downloads of the user at once (429 beyond)")
    p.add_argument("--user", default="bench@example.eu")
    p.add_argument("--password", default="bench-Pa55word")
    p.add_argument("--token-lifetime", type=float, default=600, help="access tokens, seconds")
    p.add_argument("--refresh-lifetime", type=float, default=3600,
                   help="refresh tokens (and sessions), seconds")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    return p.parse_args(argv)


def product_name(n: int) -> str:
    """A Sentinel-2 L1C name, unique by its sensing time (n minutes after T0)."""
    when = T0 + timedelta(minutes=n)
    return (f"S2B_MSIL1C_{when:%Y%m%dT%H%M%S}_N0510_R{n % 143:03d}_T32TQM_"
            f"{when:%Y%m%dT%H%M%S}.SAFE")


def zipped(name: str, size: int) -> bytes:
    """A stored zip of exactly `size` bytes: a manifest and one band of random bytes."""
    def build(band: bytes) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{name}/manifest.safe", "<xfdu:XFDU/>")
            zf.writestr(f"{name}/GRANULE/IMG_DATA/B04.jp2", band)
        return buf.getvalue()

    overhead = len(build(b""))
    if size <= overhead:
        raise SystemExit(f"serve_cdse: --size must be more than {overhead} bytes (zip overhead)")
    data = build(os.urandom(size - overhead))
    assert len(data) == size
    return data


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Counters:
    """What the emulator saw since the last reset (it keeps every request in `requests`)."""

    def __init__(self, emu: CdseEmulator) -> None:
        self.emu = emu
        self.since = time.monotonic()

    def reset(self) -> None:
        emu = self.emu
        emu.requests.clear()
        emu.grants.clear()
        emu.peak.clear()
        emu.rejected.clear()
        emu.bytes_sent = 0
        self.since = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        emu = self.emu
        kinds: Counter[str] = Counter()
        grant_times: list[tuple[float, str]] = []
        tokens: set[str] = set()
        auth_on_catalogue = 0
        for r in emu.requests:
            path, status = r["path"], r.get("status")
            kind = ("token" if path == emu.TOKEN_PATH else "download"
                    if path.endswith("/$value") else "catalogue")
            kinds[f"{kind} {status}"] += 1
            if kind == "token" and status == 200:
                grant = r.get("form", {}).get("grant_type", "?")
                grant_times.append((round(r["t"] - self.since, 3), grant))
            elif kind == "download" and r.get("token"):
                tokens.add(r["token"])
                kinds["download ranged"] += r.get("range") is not None
            elif kind == "catalogue":
                auth_on_catalogue += r.get("auth") is not None
        return {
            "grants": {f"{user} {grant}": n for (user, grant), n in emu.grants.items()},
            "grant_times": grant_times, "peak": dict(emu.peak), "active": dict(emu.active),
            "rejected": dict(emu.rejected), "requests": dict(kinds),
            "download_tokens": len(tokens), "catalogue_with_auth": auth_on_catalogue,
            "bytes_sent": emu.bytes_sent, "cpu_seconds": _cpu_seconds(),
            "seconds": time.monotonic() - self.since,
        }


async def _commands(counters: Counters, stop: asyncio.Event) -> None:
    """Answer `stats` and `reset` on stdin; stop at its end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "stats":
                answer: dict[str, Any] = counters.snapshot()
            elif command == "reset":
                counters.reset()
                answer = {"ok": True}
            else:
                answer = {"error": f"unknown command {command!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        stop.set()


async def serve(args: argparse.Namespace) -> None:
    emu = CdseEmulator(users={args.user: args.password}, token_lifetime=args.token_lifetime,
                       refresh_lifetime=args.refresh_lifetime,
                       max_downloads_per_user=args.max_downloads)
    emu.port = args.port
    manifest: dict[str, tuple[int, str]] = {}
    for n in range(args.products):
        name = product_name(n)
        data = zipped(name, args.size)
        emu.add(EmuProduct(name, data, start=T0 + timedelta(minutes=n), rate=args.rate,
                           attributes={"productType": "S2MSI1C", "cloudCover": 10.0}))
        manifest[name + ".zip"] = (len(data), hashlib.md5(data).hexdigest())
    args.manifest.write_text(json.dumps(manifest))
    await emu.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counters = Counters(emu)
    print(json.dumps({"port": emu.port, "pid": os.getpid(), "products": len(emu.products),
                      "catalogue_url": emu.catalogue_url, "token_url": emu.token_url,
                      "download_url": emu.download_url}), flush=True)
    commands = asyncio.create_task(_commands(counters, stop))
    try:
        await stop.wait()
    finally:
        commands.cancel()
        await emu.stop()


def main(argv: list[str] | None = None) -> int:
    uvloop.run(serve(_parse(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
