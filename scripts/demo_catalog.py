"""A local stand-in for the Copernicus Data Space catalogue, for the README's demo.

Serves six Sentinel-2 products over OData on 127.0.0.1 (the CDSE emulator of the tests):
a token endpoint whose tokens live 20 s, four products over the demo's coast and two
elsewhere or too cloudy, one dropped connection. Prints `CATALOGUE TOKEN_URL DOWNLOAD_URL`
and runs until interrupted. No network needed.
"""

from __future__ import annotations

import asyncio
import io
import random
import sys
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cdse import CdseEmulator, EmuProduct

USER, PASSWORD = "demo@example.eu", "demo-password"
COAST = [(8.0, 43.0), (9.0, 43.0), (9.0, 44.0), (8.0, 44.0), (8.0, 43.0)]
FAR = [(20.0, 60.0), (21.0, 60.0), (21.0, 61.0), (20.0, 61.0), (20.0, 60.0)]


def product(name: str, megabytes: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/manifest.safe", "<xfdu:XFDU/>")
        # (the same bytes on every start: a product is the same product each time)
        zf.writestr(f"{name}/GRANULE/band.jp2",
                    random.Random(name).randbytes(megabytes * 1_000_000))
    return buf.getvalue()


async def main() -> None:
    emu = await CdseEmulator(users={USER: PASSWORD}, token_lifetime=20.0).start()
    start = datetime(2024, 3, 1, 10, 20, 21, tzinfo=UTC)
    for day in range(6):
        name = (f"S2{'AB'[day % 2]}_MSIL1C_202403{day + 1:02d}T102021_N0510_R065_T32TNP_"
                f"202403{day + 1:02d}T123456.SAFE")
        cloudy, far = day == 4, day == 5
        emu.add(EmuProduct(
            name, product(name, 8), start=start + timedelta(days=day),
            footprint=FAR if far else COAST, rate=4_000_000.0,
            attributes={"productType": "S2MSI1C", "cloudCover": 64.0 if cloudy else 3.5 * day},
            drop_after=[3_000_000] if day == 0 else [],
            # a catalogue's product ids are stable: the demo run again finds what it has
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"demo-cdse/{name}"))))
    print(emu.catalogue_url, emu.token_url, emu.download_url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
