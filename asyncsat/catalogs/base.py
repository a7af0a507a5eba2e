"""The catalog seam: what every adapter (FTP tree, OData, STAC, M2M) provides."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from asyncsat import checksums
from asyncsat.auth.base import Auth
from asyncsat.errors import CatalogError, UsageError
from asyncsat.models import Checksum, Download, Provider
from asyncsat.transfer.base import Source


@dataclass(frozen=True)
class ProductRef:
    """One product a catalog found: where it is and what it knows of it."""

    url: str
    name: str | None = None
    size: int | None = None
    checksum: Checksum | None = None
    size_binding: bool = True
    """False when the size may still change (a file listed while it is uploaded)."""
    id: str | None = None
    """The catalog's own id: the product's identity (None: the URL is)."""
    online: bool = True
    """False when the catalog reports it archived: it waits, `offline`, until it is not."""
    seen_at: datetime | None = None
    """When the catalog published (or, failing that, sensed) it: a standing request's
    watermark moves to the newest one."""


class PageRepeats:
    """The pages of a search paged by an offset, told apart. The same page (the same ids in
    the same order) three times running is a server that ignores the offset: it would be
    paged for ever. Once or twice may be a page that products published meanwhile pushed
    back (its repeats are dropped as the search goes on)."""

    def __init__(self) -> None:
        self._before: list[str] = []
        self._runs = 0

    def same_again(self, ids: list[str]) -> bool:
        """Whether the page of `ids` is the third of the same in a row."""
        self._runs = self._runs + 1 if ids and ids == self._before else 0
        self._before = ids
        return self._runs >= 2


MAX_SIZE = (1 << 63) - 1
"""The largest size a download row holds (bigint): a larger one is no file's."""


def checked(ref: ProductRef) -> tuple[ProductRef | None, list[str]]:
    """The product as it can be queued, and what a catalog got wrong in it: a size no file
    has and a checksum no digest of its algorithm is are left out (the size is then the
    server's); a name's lone surrogates become `?`; an id or URL that PostgreSQL cannot
    store (a NUL, a lone surrogate) skips the product (None). One such product no longer
    fails the whole search."""
    if not all(_storable(text) for text in (ref.url, ref.id or "")):
        return None, ["its id or URL holds a NUL or is not UTF-8"]
    wrong: list[str] = []
    if ref.name is not None and not _storable(ref.name):  # (sanitised later: NUL is `_`)
        ref = replace(ref, name=ref.name.encode("utf-8", "replace").decode())
    if ref.size is not None and not 0 <= ref.size <= MAX_SIZE:
        wrong.append(f"size {ref.size}")
        ref = replace(ref, size=None)
    if ref.checksum is not None and not checksums.well_formed(ref.checksum):
        wrong.append(f"checksum {str(ref.checksum)[:80]}")
        ref = replace(ref, checksum=None)
    return ref, wrong


def _storable(text: str) -> bool:
    if "\0" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


OPERATORS = ("<=", ">=", "<", ">", "=")
"""`--filter` operators, in the order they are looked for."""


@dataclass(frozen=True)
class Filter:
    """`KEY=VALUE` (equality) or `KEY<=VALUE`, `KEY>=VALUE`, `KEY<VALUE`, `KEY>VALUE`
    (numbers); keys are the catalog's own attribute names."""

    key: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"

    @property
    def number(self) -> float | None:
        """The value as a number, if it is a finite one."""
        try:
            value = float(self.value)
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    @classmethod
    def parse(cls, text: str) -> Filter:
        """`cloudCover<=20` -> Filter("cloudCover", "<=", "20"); UsageError otherwise."""
        for i, char in enumerate(text):
            if char in "<>=":
                op = text[i:i + 2] if text[i:i + 2] in ("<=", ">=") else char
                key, value = text[:i].strip(), text[i + len(op):].strip()
                break
        else:
            raise UsageError(f"invalid filter {text!r}: use KEY=VALUE, KEY<=VALUE, "
                             "KEY>=VALUE, KEY<VALUE or KEY>VALUE")
        if not key or not value:
            raise UsageError(f"invalid filter {text!r}: a key and a value are needed")
        if op != "=" and cls(key, op, value).number is None:
            raise UsageError(f"invalid filter {text!r}: {op} compares numbers")
        return cls(key, op, value)


@dataclass(frozen=True)
class Query:
    """Search criteria, as stored in `request.search` (JSON)."""

    collection: str
    start: datetime | None = None
    end: datetime | None = None
    bbox: tuple[float, float, float, float] | None = None
    wkt: str | None = None
    filters: tuple[Filter, ...] = ()
    limit: int | None = None

    def to_json(self) -> dict[str, object]:
        """The JSON object stored in `request.search`."""
        out: dict[str, object] = {"collection": self.collection}
        if self.start is not None:
            out["start"] = self.start.isoformat()
        if self.end is not None:
            out["end"] = self.end.isoformat()
        if self.bbox is not None:
            out["bbox"] = list(self.bbox)
        if self.wkt is not None:
            out["wkt"] = self.wkt
        if self.filters:
            out["filters"] = [str(f) for f in self.filters]
        if self.limit is not None:
            out["limit"] = self.limit
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Query:
        """Parse and validate a `request.search` object (written by the CLI or by psql)."""
        if not isinstance(data, Mapping):
            raise UsageError("a search must be a JSON object, such as {\"collection\": \"...\"}")
        collection = data.get("collection")
        if not isinstance(collection, str) or not collection.strip():
            raise UsageError("a search needs a collection")
        bbox = data.get("bbox")
        if bbox is not None:
            bbox = parse_bbox(bbox if isinstance(bbox, str) else
                              ",".join(str(v) for v in bbox) if isinstance(bbox, list) else "")
        filters = _filters(data.get("filters"))
        limit = data.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise UsageError("a search limit must be a positive integer")
        wkt = data.get("wkt")
        start, end = parse_time(data.get("start"), "start"), parse_time(data.get("end"), "end")
        if start is not None and end is not None and end < start:
            raise UsageError("the search ends before it starts")
        return cls(collection=collection.strip(), start=start, end=end, bbox=bbox,
                   wkt=wkt if isinstance(wkt, str) else None,
                   filters=filters, limit=limit)


def _filters(raw: object) -> tuple[Filter, ...]:
    """A list of expressions (`["cloudCover<=20"]`), or an object of equalities."""
    if raw is None:
        return ()
    if isinstance(raw, Mapping):
        return tuple(Filter.parse(f"{k}={v}") for k, v in raw.items())
    if isinstance(raw, list) and all(isinstance(f, str) for f in raw):
        return tuple(Filter.parse(f) for f in raw)
    raise UsageError('search filters must be a list such as ["cloudCover<=20"] or an object '
                     'such as {"productType": "S2MSI1C"}')


def offline(flag: object) -> bool:
    """An OData `Online` flag that says the product is in the long-term archive: `false`,
    as JSON's boolean or as the string some hubs send ("false", any case). Missing or
    anything else: online (older hubs know no flag)."""
    return flag is False or (isinstance(flag, str) and flag.strip().lower() == "false")


def root_url(provider: Provider) -> str:
    """The provider's URL with its trailing slash (CatalogError when it has none)."""
    if not provider.url:
        raise CatalogError(f"provider {provider.name} has no URL to search")
    return provider.url if provider.url.endswith("/") else provider.url + "/"


def page_size(provider: Provider, default: int, most: int | None = None) -> int:
    """The `page_size` setting (a positive integer), else `default`; at most `most`."""
    value = provider.settings.get("page_size")
    size = value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else default
    return min(size, most) if most is not None else size


def parse_time(value: object, what: str) -> datetime | None:
    """An ISO 8601 date or date-time (UTC when no offset is given)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UsageError(f"invalid {what} time {value!r}: use ISO 8601")
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid {what} time {value!r}: use ISO 8601") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """`W,S,E,N` in degrees."""
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"invalid bbox {text!r}: use W,S,E,N in degrees") from None
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
        raise UsageError(f"invalid bbox {text!r}: use W,S,E,N in degrees")
    return west, south, east, north


class Catalog(Protocol):
    """One adapter per provider protocol. Errors are asyncsat CatalogError/TransferError.

    Every call is made while the caller holds a slot of the account `auth` belongs to.
    """

    def search(self, query: Query, auth: Auth, since: datetime | None = None) -> \
            AsyncGenerator[ProductRef, None]:
        """The products matching `query`; `since`: only those published since then (the
        watermark of a standing request, less an overlap)."""
        ...

    def expand(self, pattern: str, auth: Auth) -> AsyncGenerator[ProductRef, None]:
        """The products a URL pattern (`ftp://host/dir/*.nc`) stands for."""
        ...

    async def prepare(self, download: Download, auth: Auth) -> Source:
        """Where to fetch the product from now, and how to log in there (`auth`, or none
        for a host that is not the provider's); OfflineError while it is not available
        (archived, being prepared), with the delay to look again when the API tells it."""
        ...

    async def order(self, download: Download, auth: Auth) -> float | None:
        """Order an archived product (called only when `prepare` said it is `orderable`,
        within the account's archive quota); seconds until it should be online, if known.
        OfflineError(quota=True) when the provider refuses the order for its quota."""
        ...
