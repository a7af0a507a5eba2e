"""Known services: `provider add NAME --preset PRESET` fills protocol, URL and settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from asyncsat.errors import UsageError

CDSE_TOKEN_URL = (
    "https://identity.dataspace.copernicus.eu/auth/realms/CDSE/protocol/openid-connect/token")


@dataclass(frozen=True)
class Preset:
    """A provider as a well-known service needs it."""

    protocol: str
    url: str
    settings: dict[str, object] = field(default_factory=dict)
    about: str = ""


PRESETS: dict[str, Preset] = {
    "cdse": Preset(
        "odata", "https://catalogue.dataspace.copernicus.eu/odata/v1/",
        {"token_url": CDSE_TOKEN_URL, "client_id": "cdse-public",
         "download_url": "https://download.dataspace.copernicus.eu/odata/v1/",
         "page_size": 100, "max_skip": 10000},
        "Copernicus Data Space Ecosystem, OData catalogue (a free account; 4 connections)"),
    "cdse-stac": Preset(
        "stac", "https://stac.dataspace.copernicus.eu/v1/",
        {"token_url": CDSE_TOKEN_URL, "client_id": "cdse-public",
         "auth_hosts": ["download.dataspace.copernicus.eu", "zipper.dataspace.copernicus.eu"],
         "page_size": 100},
        "Copernicus Data Space Ecosystem, STAC API (downloads need a CDSE account)"),
    "earth-search": Preset(
        "stac", "https://earth-search.aws.element84.com/v1/", {"page_size": 100},
        "Element 84 Earth Search: Sentinel-2, Landsat and more as public COGs"),
    "usgs": Preset(
        "m2m", "https://m2m.cr.usgs.gov/api/api/json/stable/", {},
        "USGS Machine-to-Machine API (Landsat); the password is an M2M application token"),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None
