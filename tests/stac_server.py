"""A real STAC API for tests: stac-fastapi-pgstac on a throwaway PostgreSQL with PostGIS.

`StacServer` starts its own PostgreSQL cluster (`tests.servers.PgCluster`, a second instance:
tests that restart the main cluster must not take the API down), creates the pgstac schema
with `pypgstac migrate` as the superuser, and runs `uvicorn` on a free loopback port. The
server and pypgstac live in their own virtual environment (`STAC_VENV`, default
`~/.cache/asyncsat/stac-venv`), built by `scripts/stac-server-setup` with pinned versions,
along with Debian's PostGIS: `start()` runs that script first (milliseconds when all is in
place), so `pytest` alone works, and it raises with the script's output when it cannot.

The transactions extension is on: collections and items are loaded over HTTP
(`POST /collections`, `POST /collections/{id}/items` with a FeatureCollection).

Isolation: the `stac_server` fixture is session-scoped (started once: about 2 s), and nothing
is emptied between tests. Each test loads its items into a collection of its own,
`await stac_server.new_collection()` (a unique id), and scopes its searches to it with
`collections`; a search without `collections` sees every test's items.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.servers import PgCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "stac-server-setup"
DATABASE = "stac"
FILE_EXTENSION = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
EO_EXTENSION = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"


def default_venv() -> Path:
    """Where scripts/stac-server-setup puts the server's virtual environment."""
    return Path(os.environ.get("STAC_VENV") or Path.home() / ".cache/asyncsat/stac-venv")


def ensure_installed(venv: Path) -> None:
    """Run scripts/stac-server-setup: PostGIS and the venv, installed when missing."""
    result = subprocess.run([str(SETUP)], env={**os.environ, "STAC_VENV": str(venv)},
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{SETUP} failed (exit {result.returncode}), so no STAC server "
                           f"can run:\n{result.stdout}{result.stderr[-6000:]}")


def multihash_sha256(data: bytes) -> str:
    """`file:checksum` of data: a multihash (sha2-256 = 0x12, 32 bytes = 0x20) in hex."""
    return "1220" + hashlib.sha256(data).hexdigest()


def data_asset(href: str, data: bytes | None = None, *, size: int | None = None,
               checksum: str | None = None, media_type: str = "application/zip") -> \
        dict[str, Any]:
    """An asset with the `data` role; `file:size` and `file:checksum` from data if given."""
    asset: dict[str, Any] = {"href": href, "type": media_type, "roles": ["data"]}
    if data is not None:
        size = len(data) if size is None else size
        checksum = multihash_sha256(data) if checksum is None else checksum
    if size is not None:
        asset["file:size"] = size
    if checksum is not None:
        asset["file:checksum"] = checksum
    return asset


def stac_item(item_id: str, *, datetime: str = "2024-01-01T00:00:00Z",
              bbox: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
              properties: dict[str, Any] | None = None,
              assets: dict[str, dict[str, Any]] | None = None,
              stac_extensions: list[str] | None = None) -> dict[str, Any]:
    """A STAC Item with a rectangular footprint (bbox) and the given assets."""
    w, s, e, n = bbox
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [FILE_EXTENSION, EO_EXTENSION] if stac_extensions is None
        else stac_extensions,
        "id": item_id,
        "geometry": {"type": "Polygon",
                     "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        "bbox": list(bbox),
        "properties": {"datetime": datetime, **(properties or {})},
        "links": [],
        "assets": assets or {},
    }


def stac_collection(collection_id: str, **fields: Any) -> dict[str, Any]:
    """A minimal valid STAC Collection; fields override or add keys."""
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": collection_id,
        "description": f"test collection {collection_id}",
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
                   "temporal": {"interval": [["2000-01-01T00:00:00Z", None]]}},
        "links": [],
        **fields,
    }


class StacServer:
    """stac-fastapi-pgstac on 127.0.0.1 with its own PostgreSQL; `start()`, then `stop()`."""

    def __init__(self, venv: Path | None = None) -> None:
        self.venv = venv or default_venv()
        self.pg: PgCluster | None = None
        self.port = 0
        self.conformance: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        """The API root (landing page), ending in `/`."""
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60) -> StacServer:
        ensure_installed(self.venv)
        try:
            self._start_database()
            self._start_api(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_database(self) -> None:
        self.pg = pg = PgCluster().init()
        pg.psql(f"CREATE DATABASE {DATABASE}")
        if pg.psql("SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'") == "0":
            major = int(pg.psql("SHOW server_version_num")) // 10000
            raise RuntimeError(f"PostGIS is missing for PostgreSQL {major}: run {SETUP} "
                               f"(apt-get install postgresql-{major}-postgis-3)")
        # pgstac creates extensions (postgis, btree_gist, unaccent) and roles: superuser
        result = subprocess.run(
            [str(self.venv / "bin" / "pypgstac"), "migrate", "--dsn",
             pg.dsn(DATABASE, user="postgres")],
            capture_output=True, text=True, env=self._env(), cwd=pg.root, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"pypgstac migrate failed: {result.stdout}{result.stderr}")

    def _env(self) -> dict[str, str]:
        """A clean environment: the app reads many settings from any variable it finds."""
        assert self.pg is not None
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.pg.port),
            "PGUSER": "postgres",
            "PGPASSWORD": "unused",  # required by the app's settings; the cluster trusts
            "PGDATABASE": DATABASE,
            "ENABLE_TRANSACTIONS_EXTENSIONS": "true",
            "STAC_FASTAPI_TITLE": "asyncsat test catalog",
            "STAC_FASTAPI_DESCRIPTION": "stac-fastapi-pgstac started by asyncsat's tests",
            "STAC_FASTAPI_LANDING_ID": "asyncsat-tests",
            "STAC_FASTAPI_VERSION": "1.0.0",
        }

    def _start_api(self, timeout: float) -> None:
        assert self.pg is not None
        self.port = free_port()
        self._log = self.pg.root / "stac-api.log"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(self.venv / "bin" / "uvicorn"), "--factory",
                 "stac_fastapi.pgstac.app:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._env(), cwd=self.pg.root)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(self.url + "conformance", timeout=5) as resp:
                self.conformance = list(json.load(resp)["conformsTo"])
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                state = "exited" if self._proc.poll() is not None else "did not answer"
                raise RuntimeError(f"the STAC API {state}; its log:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        """What uvicorn and the app printed (warnings and errors only)."""
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self.pg is not None:
            self.pg.destroy()
            self.pg = None

    async def _post(self, path: str, body: Any) -> None:
        async with aiohttp.ClientSession() as session, \
                session.post(self.url + path, json=body) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"POST {path}: {resp.status} {await resp.text()}")

    async def add_collection(self, collection: dict[str, Any]) -> None:
        await self._post("collections", collection)

    async def add_items(self, collection_id: str, items: list[dict[str, Any]]) -> None:
        """Insert items (ids new to the collection) in one request; sets their `collection`."""
        if items:
            features = [{**item, "collection": collection_id} for item in items]
            await self._post(f"collections/{collection_id}/items",
                             {"type": "FeatureCollection", "features": features})

    async def new_collection(self, prefix: str = "test", **fields: Any) -> str:
        """Create a collection with an id no other test uses, and return the id."""
        collection_id = f"{prefix}-{next(self._ids)}"
        await self.add_collection(stac_collection(collection_id, **fields))
        return collection_id


@pytest.fixture(scope="session")
def stac_server() -> Iterator[StacServer]:
    server = StacServer().start()
    yield server
    server.stop()
