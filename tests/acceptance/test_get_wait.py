from __future__ import annotations

import asyncio
import os
import sys

from tests.servers import FileServer


async def test_get_wait_downloads_a_file(server: FileServer, dsn: str, tmp_path) -> None:
    data = os.urandom(3_000_000)
    server.add("S2A_MSIL1C_20240101.zip", data)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncsat", "--dsn", dsn, "--home", str(tmp_path / "h"),
        "get", server.url("S2A_MSIL1C_20240101.zip"), "--dest", str(tmp_path / "d"), "--wait",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    print(out.decode(), err.decode())
    assert proc.returncode == 0
