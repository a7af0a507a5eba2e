"""eodag doing bench/catalog.py's job: search the CDSE emulator, download every product.

    /path/to/eodag-venv/bin/python bench/catalog_eodag.py --catalogue URL --token-url URL \\
        --download-url URL --user USER --dest DIR --connections 4 < password

eodag's own `cop_dataspace` provider (its OData search plugin, its HTTPDownload), pointed
at the emulator: the search endpoint is the emulator's, extraction is off, and the product's
download link (eodag builds it from the Id with the real catalogue host) is mapped to the
emulator's download URL. Its Keycloak plugin is replaced by its generic TokenAuth (the
password grant at the emulator's token URL, the token as a bearer header): eodag's Keycloak
plugin reads the realm's .well-known document and validates the access token as a JWT signed
by the realm's keys, and the emulator issues opaque tokens. Downloads run on a
ThreadPoolExecutor of `--connections` workers. Needs a Python with eodag installed (not a
dependency of asyncsat; see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalogue", required=True, help="OData base URL, ending in /odata/v1/")
    p.add_argument("--token-url", required=True)
    p.add_argument("--download-url", required=True, help="download base, .../odata/v1/")
    p.add_argument("--user", required=True)
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument("--cfg-dir", type=Path, help="eodag's configuration folder (EODAG_CFG_DIR)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    password = sys.stdin.readline().rstrip("\n")
    if args.cfg_dir:
        os.environ["EODAG_CFG_DIR"] = str(args.cfg_dir)
    from eodag import EODataAccessGateway, setup_logging

    setup_logging(verbose=int(os.environ.get("EODAG_BENCH_VERBOSE", "0")))
    dag = EODataAccessGateway()
    host = "/".join(args.catalogue.split("/")[:3])
    dag.update_providers_config(dict_conf={"cop_dataspace": {
        "search": {"api_endpoint": args.catalogue + "Products", "ssl_verify": False,
                   "metadata_mapping": {"eodag:download_link":
                                        args.download_url + "Products({uid})/$value"}},
        "download": {"extract": False, "ssl_verify": False, "output_dir": str(args.dest)},
        "auth": {"type": "TokenAuth", "matching_url": host, "auth_uri": args.token_url,
                 "req_data": {"grant_type": "password", "client_id": "cdse-public"},
                 "token_type": "json", "token_key": "access_token",
                 "refresh_token_key": "refresh_token", "token_expiration_key": "expires_in",
                 "ssl_verify": False,
                 "credentials": {"username": args.user, "password": password}},
    }})
    dag.set_preferred_provider("cop_dataspace")
    products: Any = dag.search_all(collection="S2_MSI_L1C", provider="cop_dataspace",
                                   limit=args.page_size)
    wrong = [p for p in products if not p.remote_location.startswith(args.download_url)]
    if wrong:
        raise SystemExit(f"eodag: download link {wrong[0].remote_location} not the emulator's")
    args.dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.connections) as pool:
        paths = dag.download_all(products, executor=pool, output_dir=str(args.dest),
                                 extract=False)
    print(f"{len(products)} products, {len(paths)} paths")
    return 0 if len(paths) == len(products) else 1


if __name__ == "__main__":
    sys.exit(main())
