"""Pick the transfer driver for a URL by its scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from asyncsat.errors import PermanentError
from asyncsat.transfer.base import Driver, RemoteEntry, Source
from asyncsat.transfer.ftp import FtpDriver
from asyncsat.transfer.http import HttpDriver


class Drivers:
    """One driver per scheme, created on first use and closed together."""

    def __init__(self) -> None:
        self._drivers: dict[str, Driver] = {}

    def for_url(self, url: str) -> Driver:
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if "http" not in self._drivers:
                self._drivers["http"] = HttpDriver.create()
            return self._drivers["http"]
        if scheme in ("ftp", "ftps"):
            if "ftp" not in self._drivers:
                self._drivers["ftp"] = FtpDriver.create()
            return self._drivers["ftp"]
        raise PermanentError(f"no transfer driver for {scheme}:// URLs yet")

    async def list_dir(self, source: Source) -> list[RemoteEntry]:
        """List a remote folder (FTP only: HTTP has no listing to rely on)."""
        driver = self.for_url(source.url)
        if not isinstance(driver, FtpDriver):
            raise PermanentError(f"cannot list folders of {urlsplit(source.url).scheme}:// URLs")
        return await driver.list_dir(source)

    async def aclose(self) -> None:
        for driver in self._drivers.values():
            await driver.aclose()
        self._drivers.clear()
