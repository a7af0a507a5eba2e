"""The catalog seam: what every adapter (FTP tree, OData, STAC, M2M) provides."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from asyncsat.errors import UsageError
from asyncsat.models import Checksum
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


@dataclass(frozen=True)
class Query:
    """Search criteria, as stored in `request.search` (JSON)."""

    collection: str
    start: datetime | None = None
    end: datetime | None = None
    bbox: tuple[float, float, float, float] | None = None
    wkt: str | None = None
    filters: Mapping[str, str] = field(default_factory=dict)
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
            out["filters"] = dict(self.filters)
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
        filters = data.get("filters") or {}
        if not isinstance(filters, Mapping):
            raise UsageError("search filters must be a JSON object")
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
                   filters={str(k): str(v) for k, v in filters.items()}, limit=limit)


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
    """One adapter per provider protocol. Errors are asyncsat CatalogError/TransferError."""

    def search(self, query: Query, login: Source) -> AsyncGenerator[ProductRef, None]:
        """The products matching `query`, logging in as `login` (its URL: the provider's)."""
        ...

    def expand(self, pattern: str, login: Source) -> AsyncGenerator[ProductRef, None]:
        """The products a URL pattern (`ftp://host/dir/*.nc`) stands for."""
        ...
