"""A CDSE emulator on 127.0.0.1: OData catalogue (`catalogue_url` .../odata/v1/), downloads
(`download_url` .../download/odata/v1/: real ones are on another host), Keycloak (`token_url`).
Sources: eu-cdse/documentation OData.qmd, Token.qmd, Quotas.qmd (2025-03), CDSETool's recorded
odata_page_1.json, eodag #2019 (429 DAT-ZIP-100); "guess" marks what no source shows."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import itertools
import operator
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import blake3
from aiohttp import web

Point = tuple[float, float]
Ring = list[Point]
Predicate = Callable[["EmuProduct"], bool]
AttrValue = str | float | int | datetime
ENTRY = web.RequestKey[dict[str, Any]]("cdse_entry")  # a request's record in `requests`
DATES = ("ContentDate/Start", "ContentDate/End", "PublicationDate", "ModificationDate",
         "OriginDate")


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso(dt: datetime) -> str:
    return _utc(dt).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def attr_type(value: AttrValue) -> str:
    """The OData.CSC type of a value: an int is Integer, a float Double (cloudCover: a float)."""
    kinds = {str: "String", int: "Integer", float: "Double", datetime: "DateTimeOffset"}
    if type(value) not in kinds:  # a bool too
        raise TypeError(f"attribute value {value!r}: use str, int, float or datetime")
    return kinds[type(value)]


@dataclass
class EmuProduct:
    """A catalogue entry and its bytes. `checksums`: (Algorithm, Value) pairs, None for MD5
    and BLAKE3 of `data`; an empty `footprint` gives Footprint and GeoFootprint null."""

    name: str
    data: bytes
    _: KW_ONLY
    collection: str = "SENTINEL-2"
    start: datetime
    end: datetime | None = None
    published: datetime | None = None
    footprint: list[tuple[float, float]] = field(default_factory=lambda: [  # lon, lat
        (11.0, 45.0), (12.4, 45.0), (12.4, 46.0), (11.0, 46.0), (11.0, 45.0)])
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    online: bool = True
    checksums: list[tuple[str, str]] | None = None
    content_length: int | None = None  # the catalogue's ContentLength; None: len(data)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    rate: float | None = None  # bytes/s per connection
    drop_after: list[int] = field(default_factory=list)  # per response: bytes, then abort
    dates: dict[str, datetime] = field(init=False, repr=False)  # DATES -> value

    def __post_init__(self) -> None:
        self.start, self.end = _utc(self.start), _utc(self.end or self.start)
        self.published = _utc(self.published or self.start + timedelta(hours=3))
        self.dates = dict(zip(DATES, (self.start, self.end, self.published, self.published,
                                      self.published - timedelta(minutes=30)), strict=True))
        self.content_length = len(self.data) if self.content_length is None else self.content_length
        self.footprint = [(float(x), float(y)) for x, y in self.footprint]
        self.footprint += self.footprint[:1] if self.footprint[:1] != self.footprint[-1:] else []
        list(map(attr_type, self.attributes.values()))  # TypeError on a wrong type
        if self.checksums is None:
            self.checksums = [("MD5", hashlib.md5(self.data).hexdigest()),
                              ("BLAKE3", blake3.blake3(self.data).hexdigest())]

    def to_json(self, expand: Container[str] = ()) -> dict[str, Any]:
        wkt, modified = ", ".join(f"{x} {y}" for x, y in self.footprint), iso(self.dates[DATES[3]])
        out: dict[str, Any] = {
            "@odata.mediaContentType": "application/octet-stream", "Id": self.id,
            "Name": self.name, "ContentType": "application/octet-stream",
            "ContentLength": self.content_length, "OriginDate": iso(self.dates["OriginDate"]),
            "PublicationDate": iso(self.dates["PublicationDate"]), "ModificationDate": modified,
            "Online": self.online, "EvictionDate": "9999-12-31T23:59:59.999999Z",
            "S3Path": f"/eodata/{self.collection.title()}/{self.start:%Y/%m/%d}/{self.name}",
            "Checksum": [{"Value": v, "Algorithm": a, "ChecksumDate": modified}
                         for a, v in self.checksums or []],
            "ContentDate": {"Start": iso(self.start), "End": iso(self.dates["ContentDate/End"])},
            "Footprint": f"geography'SRID=4326;POLYGON (({wkt}))'" if self.footprint else None,
            "GeoFootprint": {"type": "Polygon", "coordinates": [[list(p) for p in self.footprint]]}
            if self.footprint else None}
        if "Attributes" in expand:
            out["Attributes"] = [
                {"@odata.type": f"#OData.CSC.{attr_type(v)}Attribute", "Name": k,
                 "Value": iso(v) if isinstance(v, datetime) else v, "ValueType": attr_type(v)}
                for k, v in self.attributes.items()]
        out.update({k: [] for k in ("Assets", "Locations") if k in expand})  # none emulated
        return out


class FilterError(ValueError):
    """A $filter or $orderby the service refuses (HTTP 400)."""


def _orient(a: Point, b: Point, c: Point) -> float:
    """Geometry is planar in lon/lat; a polygon is its closed exterior ring, a point 1 point."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def segments_intersect(a: Point, b: Point, c: Point, d: Point) -> bool:
    """Whether segments ab and cd share a point (crossing, touching or overlapping)."""
    def on(s: Point, e: Point, p: Point) -> bool:  # p on the segment se
        return _orient(s, e, p) == 0 and min(s[0], e[0]) <= p[0] <= max(s[0], e[0]) \
            and min(s[1], e[1]) <= p[1] <= max(s[1], e[1])
    d1, d2, d3, d4 = _orient(c, d, a), _orient(c, d, b), _orient(a, b, c), _orient(a, b, d)
    return (((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4))) or \
        on(c, d, a) or on(c, d, b) or on(a, b, c) or on(a, b, d)


def point_in_ring(p: Point, ring: Ring) -> bool:
    """Inside or on the boundary of a closed ring (ray casting)."""
    inside = False
    for a, b in itertools.pairwise(ring):
        if segments_intersect(a, b, p, p):
            return True
        if (a[1] > p[1]) != (b[1] > p[1]) and \
                p[0] < a[0] + (p[1] - a[1]) * (b[0] - a[0]) / (b[1] - a[1]):
            inside = not inside
    return inside


def rings_intersect(a: Ring, b: Ring) -> bool:
    """Two polygons (or a point) share a point: edges meet, or one holds a vertex of the other."""
    if len(a) == 1 or len(b) == 1:
        point, ring = (a[0], b) if len(a) == 1 else (b[0], a)
        return point == ring[0] if len(ring) == 1 else point_in_ring(point, ring)
    return any(segments_intersect(p, q, r, s) for p, q in itertools.pairwise(a)
               for r, s in itertools.pairwise(b)) or point_in_ring(a[0], b) \
        or point_in_ring(b[0], a)


def _lonlat(c: Any) -> bool:
    return isinstance(c, tuple) and -180 <= c[0] <= 180 and -90 <= c[1] <= 90


def _ring(coords: Any) -> Ring:
    if not isinstance(coords, list) or len(coords) < 4 or not all(map(_lonlat, coords)):
        raise FilterError("a ring is 4 EPSG 4326 coordinates (lon lat) at least")
    if coords[0] != coords[-1]:
        raise FilterError("polygon must start and end with the same point")
    n = len(coords) - 1  # geometries are validated (the service uses Shapely)
    if any((i, j) != (0, n - 1) and segments_intersect(*coords[i:i + 2], *coords[j:j + 2])
           for i in range(n) for j in range(i + 2, n)):
        raise FilterError("invalid geometry: self-intersecting ring")
    return coords


def parse_wkt(body: str) -> list[Ring]:
    """`SRID=4326;POLYGON((lon lat, ...))`, MULTIPOLYGON or POINT: the list of its parts."""
    m = re.fullmatch(r"SRID=(\d+);\s*(POLYGON|MULTIPOLYGON|POINT)\s*(\([-+\d.eE\s,()]*\))\s*", body)
    if not m or m[1] != "4326":
        raise FilterError(f"{body!r} is not SRID=4326;POINT|POLYGON|MULTIPOLYGON(...)")
    number = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    nested = re.sub(number + r"\s+" + number, r"(\1,\2)", m[3].replace("(", "[").replace(")", "]"))
    try:
        tree = ast.literal_eval(nested)
    except (ValueError, SyntaxError):
        raise FilterError(f"malformed {m[2]} {m[3]!r}") from None
    if m[2] == "POINT":
        if not (isinstance(tree, list) and len(tree) == 1 and _lonlat(tree[0])):
            raise FilterError("POINT takes one EPSG 4326 coordinate (lon lat)")
        return [tree]
    polygons = [tree] if m[2] == "POLYGON" else tree
    if not isinstance(polygons, list) or not polygons or \
            not all(isinstance(poly, list) and len(poly) == 1 for poly in polygons):
        raise FilterError(f"malformed {m[2]} (or holes, which the emulator does not support)")
    return [_ring(poly[0]) for poly in polygons]


_TOKEN = re.compile(r"""(?P<ws>\s+)|(?P<geo>geography'[^']*')|(?P<string>'(?:[^']|'')*')
 |(?P<guid>[\da-fA-F]{8}(?:-[\da-fA-F]{4}){3}-[\da-fA-F]{12}\b)|(?P<int>-?\d+(?![-.\deE]))
 |(?P<datetime>\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d{1,9})?)?(?:Z|[+-]\d\d:\d\d))
 |(?P<float>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<id>[A-Za-z_][\w.]*)|(?P<op>[()/,:=])|(?P<bad>.)""",
                    re.X | re.S)
_CMP: dict[str, Callable[[Any, Any], bool]] = {
    op: getattr(operator, op) for op in ("eq", "ne", "lt", "le", "gt", "ge")}
_ALL, _EQ, _RANGE = frozenset(_CMP), frozenset({"eq", "ne"}), frozenset(_CMP) - {"ne"}


def _date(prop: str) -> Callable[[EmuProduct], datetime]:
    return lambda p: p.dates[prop]


_LITERALS: dict[str, Callable[[str], Any]] = {
    "string": lambda t: t[1:-1].replace("''", "'"), "guid": str.lower, "int": int,
    "float": float, "datetime": datetime.fromisoformat, "bool": lambda t: t == "true"}
# property -> (literal kinds, getter, operators)
_PROPS: dict[str, tuple[tuple[str, ...], Callable[[EmuProduct], Any], frozenset[str]]] = {
    "Name": (("string",), lambda p: p.name, _EQ),
    "Collection/Name": (("string",), lambda p: p.collection, _EQ),
    "Id": (("guid", "string"), lambda p: p.id.lower(), _EQ),
    "ContentLength": (("int",), lambda p: p.content_length, _ALL),
    "Online": (("bool",), lambda p: p.online, _EQ),
    **{d: (("datetime",), _date(d), _ALL) for d in DATES}}
_ATTR_KINDS = {"String": ("string",), "Double": ("int", "float"), "Integer": ("int",),
               "DateTimeOffset": ("datetime",)}
_STRING_FUNCS: dict[str, Callable[[str, str], bool]] = {
    "contains": lambda v, s: s in v, "startswith": str.startswith, "endswith": str.endswith}


class _Parser:
    """Recursive descent over (kind, text, position) tokens: or := and ('or' and)*; and := unary
    ('and' unary)*; unary := 'not' unary | primary; primary := (or) | function | any | path op x"""

    def __init__(self, text: str) -> None:
        self.toks = [(m.lastgroup or "", m.group(), m.start()) for m in _TOKEN.finditer(text)
                     if m.lastgroup != "ws"] + [("end", "", len(text))]
        self.i = 0
        if bad := [t for t in self.toks if t[0] == "bad"]:
            raise FilterError(f"unexpected character {bad[0][1]!r} at {bad[0][2]}")

    def peek(self, k: int = 0) -> tuple[str, str, int]:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self, kind: str | None = None, *texts: str) -> tuple[str, str, int]:
        for text in texts or (None,):
            tok = self.peek()
            if (kind and tok[0] != kind) or (text is not None and tok[1] != text):
                raise FilterError(f"expected {text or kind!r} at {tok[2]}, found "
                                  f"{tok[1] or 'end'!r}")
            self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        found = self.peek()[1] == text and self.peek()[0] in ("id", "op")
        self.i += found
        return found

    def chain(self, word: str, operand: Callable[[], Predicate], join: Any) -> Predicate:
        preds = [operand()]
        while self.accept(word):
            preds.append(operand())
        return preds[0] if len(preds) == 1 else lambda p: join(f(p) for f in preds)

    def or_(self) -> Predicate:
        return self.chain("or", lambda: self.chain("and", self.unary, all), any)

    def unary(self) -> Predicate:
        if not self.accept("not"):
            return self.primary()
        if not (self.peek()[1] in ("(", "not", "Attributes") or self.peek(1)[1] == "("):
            raise FilterError(f"'not' needs a parenthesised expression at {self.peek()[2]}")
        inner = self.unary()
        return lambda p: not inner(p)

    def literal(self, kinds: tuple[str, ...], what: str) -> Any:
        kind, text, pos = self.take()
        kind = "bool" if kind == "id" and text in ("true", "false") else kind
        try:
            assert kind in kinds
            return _LITERALS[kind](text)
        except (AssertionError, ValueError):  # ValueError: a datetime such as 2024-02-30
            raise FilterError(f"{what} takes a {' or '.join(kinds)} literal, not {text or 'end'!r}"
                              f" (at {pos})") from None

    def primary(self) -> Predicate:
        kind, text, pos = self.peek()
        if self.accept("("):
            pred = self.or_()
            self.take("op", ")")
            return pred
        if kind != "id" or text in ("and", "or", "not"):
            raise FilterError(f"unexpected {text or 'end'!r} at {pos}")
        if self.peek(1)[1] == "(":
            return self.function()
        segments = [self.take("id")[1]]
        while self.accept("/"):
            segments.append(self.take("id")[1])
            if segments[-1] == "any" and self.peek()[1] == "(":
                return self.any_(segments[:-1], pos)
        if (path := "/".join(segments)) not in _PROPS:
            raise FilterError(f"unknown property {path!r} at {pos}")
        kinds, getter, ops = _PROPS[path]
        if (op := self.take("id")[1]) not in ops:
            raise FilterError(f"operator {op!r} is not supported for {path}")
        value, compare = self.literal(kinds, path), _CMP[op]
        value = value.lower() if path == "Id" else value
        return lambda p: compare(getter(p), value)

    def function(self) -> Predicate:
        _, name, pos = self.take("id")
        self.take("op", "(")
        if name in _STRING_FUNCS:
            self.take(None, "Name", ",")
            needle, func = self.literal(("string",), name), _STRING_FUNCS[name]
            self.take("op", ")")
            return lambda p: func(p.name, needle)
        if name == "OData.CSC.Intersects":
            self.take(None, "area", "=")
            area = parse_wkt(self.take("geo")[1][len("geography'"):-1])
            self.take("op", ")")
            return lambda p: bool(p.footprint) and any(rings_intersect(a, p.footprint)
                                                       for a in area)
        raise FilterError(f"unknown function {name!r} at {pos}")

    def any_(self, prefix: list[str], pos: int) -> Predicate:
        m = re.fullmatch(r"OData\.CSC\.(\w+)Attribute", prefix[-1])
        if prefix[0] != "Attributes" or len(prefix) != 2 or not m or m[1] not in _ATTR_KINDS:
            raise FilterError(f"unknown collection {'/'.join(prefix)!r} at {pos}")
        vtype = m[1]
        self.take("op", "(")
        var = self.take("id")[1]
        self.take(None, ":", var, "/", "Name", "eq")
        name = self.literal(("string",), "Name")
        self.take(None, "and", var, "/", prefix[1], "/", "Value")
        if (op := self.take("id")[1]) not in (_RANGE if vtype != "String" else {"eq"}):
            raise FilterError(f"operator {op!r} is not supported for {vtype} attributes")
        value, compare = self.literal(_ATTR_KINDS[vtype], f"{vtype}Attribute"), _CMP[op]
        self.take("op", ")")

        def match(p: EmuProduct) -> bool:
            have = p.attributes.get(name)
            return have is not None and attr_type(have) == vtype and compare(
                _utc(have) if isinstance(have, datetime) else have, value)
        return match


def parse_filter(text: str) -> Predicate:
    """Compile a CDSE $filter into a predicate on products; FilterError when refused."""
    try:
        parser = _Parser(text)
        pred: Predicate = parser.or_() if text.strip() else (lambda p: True)
        parser.take("end")
        return pred
    except FilterError as e:
        raise FilterError(f"Invalid filter: {e}") from None


def order(products: list[EmuProduct], orderby: str | None) -> list[EmuProduct]:
    """One field, asc by default, ties by Id (documented); by Id alone without $orderby.
    The documented fields, and Name (asked for by our brief, not in the docs)."""
    fields = {**{d: _date(d) for d in DATES[:4]}, "Name": lambda p: p.name}
    ranked = sorted(products, key=lambda p: p.id)
    m = re.fullmatch(r"\s*([\w/]+)(?:\s+(asc|desc))?\s*", orderby or "")
    if orderby is not None and (not m or m[1] not in fields):
        raise FilterError(f"Invalid orderby: {orderby!r}")
    return sorted(ranked, key=fields[m[1]], reverse=m[2] == "desc") if m else ranked


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


class CdseEmulator:
    """CDSE on 127.0.0.1: `await CdseEmulator(users={...}).start()`. `grants` counts successful
    grants, `active`/`peak` downloads admitted at once, `rejected` their 429s (per user)."""

    TOKEN_PATH = "/auth/realms/CDSE/protocol/openid-connect/token"

    def __init__(self, *, users: dict[str, str] | None = None, token_lifetime: float = 600,
                 refresh_lifetime: float = 3600, max_top: int = 1000, max_skip: int = 10000,
                 max_downloads_per_user: int | None = 4, max_sessions: int = 100,
                 next_links: bool = True, next_link_on_last_page: bool = False,
                 retry_after: str | None = None, hold_pages_from: int | None = None) -> None:
        self.users = {"user@example.com": "password"} if users is None else users
        self.token_lifetime, self.refresh_lifetime = token_lifetime, refresh_lifetime
        self.max_top, self.max_skip, self.max_sessions = max_top, max_skip, max_sessions
        self.max_downloads_per_user, self.retry_after = max_downloads_per_user, retry_after
        self.next_links, self.next_link_on_last_page = next_links, next_link_on_last_page
        self.hold_pages_from = hold_pages_from
        """A page from this `$skip` on is answered once a download has begun (or after 10 s):
        a client that queues products only at the end of its search waits the 10 s."""
        self.downloading = asyncio.Event()
        self.products: dict[str, EmuProduct] = {}
        self.grants: Counter[tuple[str, str]] = Counter()
        self.active, self.peak, self.rejected = Counter[str](), Counter[str](), Counter[str]()
        self.requests: list[dict[str, Any]] = []
        self.bytes_sent, self.chunk, self.port = 0, 64 * 1024, 0
        self.catalogue_url = self.download_url = self.token_url = ""  # set by start()
        self._access: dict[str, tuple[str, float]] = {}  # token -> (user, expiry)
        self._refresh: dict[str, tuple[str, float, str]] = {}  # token -> (user, expiry, session)
        self._sessions: dict[str, tuple[str, float]] = {}  # session -> (user, expiry)
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._record])
        product = "/odata/v1/Products({id:[^/()]+})"
        self.app.add_routes([
            web.get("/odata/v1/Products", self._search), web.get(product, self._product),
            web.post(self.TOKEN_PATH, self._token),
            web.get("/download" + product + "/$value", self._download, allow_head=False)])

    def add(self, product: EmuProduct) -> EmuProduct:
        self.products[product.id] = product
        return product

    async def start(self) -> CdseEmulator:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{self.port}"
        self.catalogue_url, self.download_url = f"{base}/odata/v1/", f"{base}/download/odata/v1/"
        self.token_url = base + self.TOKEN_PATH
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def expire_tokens(self) -> None:
        """Every access token issued so far is expired now (refresh tokens still work)."""
        self._access = {t: (user, 0.0) for t, (user, _) in self._access.items()}

    def sessions(self, user: str) -> int:
        """Active sessions: a password grant opens one; it lasts while it can be refreshed."""
        return sum(u == user and t > time.monotonic() for u, t in self._sessions.values())

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every request in `requests`, with the status of its answer (or of the 404)."""
        header, token = request.headers.get("Authorization", ""), request.query.get("token")
        auth = "bearer" if header.startswith("Bearer ") else "query" if token else None
        request[ENTRY] = entry = {
            "method": request.method, "path": request.path, "query": dict(request.query),
            "auth": auth, "token": header[7:] if auth == "bearer" else token,
            "range": request.headers.get("Range"), "if_range": request.headers.get("If-Range"),
            "t": time.monotonic()}
        self.requests.append(entry)
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as e:
            entry["status"] = e.status
            raise
        entry["status"] = response.status
        entry["answered"] = time.monotonic()
        return response

    def _params(self, q: Any) -> tuple[int, int, bool, set[str], list[dict[str, Any]]]:
        """$top, $skip, $count and $expand, validated as FastAPI does (its 422 `detail`)."""
        errors: list[dict[str, Any]] = []

        def invalid(kind: str, name: str, raw: str, msg: str, **ctx: Any) -> None:
            errors.append({"type": kind, "loc": ["query", name], "msg": "Input should be " + msg,
                           "input": raw, **({"ctx": ctx} if ctx else {})})

        def integer(name: str, default: int, cap: int) -> int:
            raw = q.get(name, str(default))
            if not re.fullmatch(r"[+-]?\d+", raw.strip()):
                invalid("int_parsing", name, raw, "a valid integer, unable to parse string as an "
                        "integer")
            elif int(raw) < 0:
                invalid("greater_than_equal", name, raw, "greater than or equal to 0", ge=0)
            elif int(raw) > cap:
                invalid("less_than_equal", name, raw, f"less than or equal to {cap}", le=cap)
            return default if errors else int(raw)

        top, skip = integer("$top", 20, self.max_top), integer("$skip", 0, self.max_skip)
        count, expand = q.get("$count", "false"), set(q.getall("$expand", []))
        if count not in ("True", "true", "1", "False", "false", "0"):
            invalid("bool_parsing", "$count", count, "a valid boolean, unable to interpret input")
        for bad in sorted(expand - {"Attributes", "Assets", "Locations"}):
            invalid("enum", "$expand", bad, "'Attributes', 'Assets' or 'Locations'")
        return top, skip, count in ("True", "true", "1"), expand, errors

    async def _search(self, request: web.Request) -> web.Response:
        q = request.query
        top, skip, count, expand, errors = self._params(q)
        if errors:
            return _json(422, {"detail": errors})
        if self.hold_pages_from is not None and skip >= self.hold_pages_from:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.downloading.wait(), 10)
        try:
            pred = parse_filter(q.get("$filter", ""))
            matched = order([p for p in self.products.values() if pred(p)], q.get("$orderby"))
        except FilterError as e:  # guess: the body (400 is what any bad request gets)
            return _json(400, {"detail": {"message": str(e), "filter": q.get("$filter"),
                                          "orderby": q.get("$orderby")}})
        shown = [e + "()" for e in ("Attributes", "Assets", "Locations") if e in expand]
        body: dict[str, Any] = {"@odata.context": "$metadata#Products" + (
            f"({','.join(shown)})" if shown else "")}
        if count:
            body["@odata.count"] = len(matched)
        body["value"] = [p.to_json(expand) for p in matched[skip:skip + top]]
        more = skip + top < len(matched) or (self.next_link_on_last_page and bool(body["value"]))
        if self.next_links and top > 0 and more:  # the same options, %24skip last
            params = [(k, v) for k, v in q.items() if k == "$filter"] + [("$top", str(top))]
            params += [(k, v) for k, v in q.items() if k not in ("$filter", "$top", "$skip")]
            body["@odata.nextLink"] = f"{self.catalogue_url}Products?" + urlencode(
                [*params, ("$skip", str(skip + top))])
        return _json(200, body)

    async def _product(self, request: web.Request) -> web.Response:
        *_, expand, errors = self._params(request.query)
        product = self.products.get(request.match_info["id"])
        if errors or product is None:
            return _json(422, {"detail": errors}) if errors else _json(404, {"detail": "Not Found"})
        return _json(200, product.to_json(expand))

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self.downloading.set()
        token = (entry := request[ENTRY])["token"]
        user, expiry = self._access.get(token, ("", 0.0)) if token else ("", 0.0)
        if not user or expiry <= time.monotonic():  # guess: bodies, but "Expired signature!"
            return _json(401, {"detail": "Expired signature!" if user else "Not authenticated"
                               if token is None else "Invalid token"})
        entry["user"] = user
        product = self.products.get(request.match_info["id"])
        if product is None:
            return _json(404, {"detail": "Not Found"})
        if not product.online:  # guess: undocumented (offline data is ordered in Data Workspace)
            return _json(409, {"detail": "Product is offline"})
        cap = self.max_downloads_per_user
        if cap is not None and self.active[user] >= cap:
            self.rejected[user] += 1
            return _json(429, {"trace-id": uuid.uuid4().hex, "code": "DAT-ZIP-100",
                               "message": "Max session number exceeded"},
                         {"Retry-After": self.retry_after} if self.retry_after else None)
        self.active[user] += 1
        self.peak[user] = max(self.peak[user], self.active[user])
        try:
            return await self._send(request, product)
        finally:
            self.active[user] -= 1

    async def _send(self, request: web.Request, product: EmuProduct) -> web.StreamResponse:
        size, start, end, partial = len(product.data), 0, len(product.data), False
        modified = product.dates[DATES[3]].strftime("%a, %d %b %Y %H:%M:%S GMT")
        etag = '"' + hashlib.md5(product.data).hexdigest() + '"'
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", "").strip())
        if m and request.headers.get("If-Range") in (None, etag, modified) and \
                (not m[2] or int(m[2]) >= int(m[1])):  # else the range is ignored
            if int(m[1]) >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start, end, partial = int(m[1]), min(size, int(m[2] or size) + 1), True
        stem = re.sub(r'[\x00-\x1f\x7f"\\]', "_", product.name.removesuffix(".SAFE"))
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "ETag": etag, "Last-Modified": modified,
                   "Content-Disposition": f'attachment; filename="{stem}.zip"'}
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        request[ENTRY]["status"] = response.status  # also when the transfer is cut
        stop = min(end, start + product.drop_after.pop(0)) if product.drop_after else end
        pos, began = start, time.monotonic()
        chunk = min(self.chunk, max(1024, int(product.rate / 20))) if product.rate else self.chunk
        while pos < stop:
            n = min(chunk, stop - pos)
            await response.write(product.data[pos:pos + n])
            pos, self.bytes_sent = pos + n, self.bytes_sent + n
            if product.rate and (pos - start) / product.rate > time.monotonic() - began:
                await asyncio.sleep((pos - start) / product.rate - (time.monotonic() - began))
        if stop < end:  # drop_after: let the client read what was sent, then cut
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        await response.write_eof()
        return response

    def _issue(self, user: str, session: str, grant: str) -> web.Response:
        now, access, refresh = time.monotonic(), secrets.token_urlsafe(32), secrets.token_hex(32)
        self._access[access] = (user, now + self.token_lifetime)
        self._refresh[refresh] = (user, now + self.refresh_lifetime, session)
        self._sessions[session] = (user, now + self.refresh_lifetime)
        self.grants[(user, grant)] += 1
        return _json(200, {"access_token": access, "expires_in": self.token_lifetime,
                           "refresh_expires_in": self.refresh_lifetime, "refresh_token": refresh,
                           "token_type": "Bearer", "not-before-policy": 0,
                           "session_state": session, "scope": "email profile"})

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        request[ENTRY]["form"] = {k: v for k, v in form.items() if k != "password"}
        grant, user = form.get("grant_type"), form.get("username", "")

        def error(status: int, code: str, description: str) -> web.Response:
            return _json(status, {"error": code, "error_description": description})
        if form.get("client_id") != "cdse-public":
            return error(401, "invalid_client", "Invalid client or Invalid client credentials")
        if grant == "password" and (not user or self.users.get(user) != form.get("password")):
            return error(401, "invalid_grant", "Invalid user credentials")
        if grant == "password" and self.sessions(user) >= self.max_sessions:  # guess: body
            return error(429, "too_many_sessions", f"More than {self.max_sessions} sessions")
        if grant == "password":
            return self._issue(user, str(uuid.uuid4()), grant)
        if grant != "refresh_token":
            return error(400, "unsupported_grant_type", "Unsupported grant_type") if grant else \
                error(400, "invalid_request", "Missing form parameter: grant_type")
        if not (token := form.get("refresh_token")):
            return error(400, "invalid_request", "Missing form parameter: refresh_token")
        user, expiry, session = self._refresh.get(token, ("", 0.0, ""))
        if expiry <= time.monotonic():
            return error(400, "invalid_grant", "Token is not active" if user
                         else "Invalid refresh token")
        return self._issue(user, session, grant)
