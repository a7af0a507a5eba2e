"""Pick the catalog adapter of a provider by its protocol."""

from __future__ import annotations

from urllib.parse import urlsplit

from asyncsat.catalogs.base import Catalog
from asyncsat.catalogs.ftp_tree import FtpTree, Lister
from asyncsat.errors import CatalogError
from asyncsat.models import Provider


class Catalogs:
    """One adapter per provider, sharing the transfer drivers' connections."""

    def __init__(self, lister: Lister) -> None:
        self._lister = lister

    def for_provider(self, provider: Provider) -> Catalog:
        scheme = urlsplit(provider.url or "").scheme.lower()
        if provider.protocol == "ftp" or scheme in ("ftp", "ftps"):
            return FtpTree(self._lister, provider)
        raise CatalogError(f"catalog searches of {provider.protocol} providers are not "
                           f"supported yet (provider {provider.name})")
