"""A local stand-in for a product provider, for the README's demo (no network needed).

Serves two Sentinel-like zip products on 127.0.0.1 with Range support, a bandwidth cap
and one dropped connection, prints their URLs, and runs until interrupted.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import FileServer


def product(name: str, megabytes: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}.SAFE/manifest.safe", "<xfdu:XFDU/>")
        zf.writestr(f"{name}.SAFE/measurement/band.tiff", os.urandom(megabytes * 1_000_000))
    return buf.getvalue()


async def main() -> None:
    server = await FileServer().start()
    names = ["S2A_MSIL1C_20240101T103431_N0510_R108_T32TQM", "S1A_IW_GRDH_1SDV_20240101T053012"]
    for i, name in enumerate(names):
        # 20 MB at 10 MB/s per connection; the first product's connection drops once
        server.add(f"{name}.zip", product(name, 20), rate=10_000_000,
                   drop_after=[7_000_000] if i == 0 else [])
    print(" ".join(server.url(f"{n}.zip") for n in names), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
