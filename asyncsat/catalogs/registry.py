"""Pick the catalog adapter of a provider by its protocol."""

from __future__ import annotations

from urllib.parse import urlsplit

from asyncsat.catalogs.base import Catalog
from asyncsat.catalogs.client import JsonClient
from asyncsat.catalogs.ftp_tree import FtpTree, Lister
from asyncsat.errors import CatalogError
from asyncsat.models import Provider


class Catalogs:
    """One adapter per provider, sharing the transfer drivers' connections and one JSON
    client for the catalog APIs."""

    def __init__(self, lister: Lister) -> None:
        self._lister = lister
        self._json = JsonClient()

    def for_provider(self, provider: Provider) -> Catalog:
        scheme = urlsplit(provider.url or "").scheme.lower()
        if provider.protocol == "ftp" or (provider.protocol == "http"
                                           and scheme in ("ftp", "ftps")):
            return FtpTree(self._lister, provider)
        if provider.protocol == "odata":
            from asyncsat.catalogs.odata import ODataCatalog

            return ODataCatalog(self._json, provider)
        if provider.protocol == "dhus":
            from asyncsat.catalogs.dhus import DhusCatalog

            return DhusCatalog(self._json, provider)
        if provider.protocol == "m2m":
            from asyncsat.catalogs.m2m import M2MCatalog

            return M2MCatalog(self._json, provider)
        if provider.protocol == "stac":
            from asyncsat.catalogs.stac import StacCatalog

            return StacCatalog(self._json, provider)
        raise CatalogError(f"catalog searches of {provider.protocol} providers are not "
                           f"supported yet (provider {provider.name})")

    def prepares(self, provider: Provider) -> bool:
        """True when the provider's products go through its catalog before a transfer."""
        return provider.protocol in ("odata", "dhus", "stac", "m2m")

    async def aclose(self) -> None:
        await self._json.aclose()
