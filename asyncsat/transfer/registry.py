"""Pick the transfer driver for a URL by its scheme.

Drivers are imported on first use: a command that transfers nothing (`status`, `provider
list`) does not pay for importing aiohttp (its TLS set-up) or aioftp.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from asyncsat.errors import PermanentError
from asyncsat.transfer.base import Driver, Folders, Source

if TYPE_CHECKING:
    from asyncsat.transfer.ftp import FtpDriver


class Drivers:
    """One driver per scheme, created on first use and closed together."""

    def __init__(self) -> None:
        self._drivers: dict[str, Driver] = {}

    def for_url(self, url: str) -> Driver:
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if "http" not in self._drivers:
                from asyncsat.transfer.http import HttpDriver

                self._drivers["http"] = HttpDriver.create()
            return self._drivers["http"]
        if scheme in ("ftp", "ftps"):
            return self._ftp()
        raise PermanentError(f"no transfer driver for {scheme}:// URLs yet")

    def _ftp(self) -> FtpDriver:
        from asyncsat.transfer.ftp import FtpDriver

        driver = self._drivers.get("ftp")
        if not isinstance(driver, FtpDriver):
            driver = self._drivers["ftp"] = FtpDriver.create()
        return driver

    def folders(self, source: Source) -> AbstractAsyncContextManager[Folders]:
        """A session listing folders of the server of `source.url` (FTP only: HTTP has no
        listing to rely on)."""
        scheme = urlsplit(source.url).scheme.lower()
        if scheme not in ("ftp", "ftps"):
            raise PermanentError(f"cannot list folders of {scheme}:// URLs")
        return self._ftp().folders(source)

    async def aclose(self) -> None:
        for driver in self._drivers.values():
            await driver.aclose()
        self._drivers.clear()
