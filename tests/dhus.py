"""A DHuS hub emulator on 127.0.0.1 (the Data Hub Software of scihub/apihub, coda, s5phub, cophub,
the national collaborative hubs): OpenSearch `search`, OData v1 `Products('<uuid>')`, `$value`
downloads with the long-term archive (LTA) codes, HTTP basic auth on everything.
Sources: apihub answers recorded in sentinelsat 64ef13c tests/fixtures/vcr_cassettes
(test_small_query, test_count, test_s2_cloudcover, test_order_by, test_large_query,
test_uuid_search, test_invalid_query, test_unicode_support, test_get_product_odata_short*,
test_get_product_info_bad_key, test_is_online, test_get_stream, test_download_all_lta,
test_SentinelAPI_wrong_credentials); sentinelsat download.py `trigger_offline_retrieval`,
tests/test_download.py, test_odata.py; sentinelsat issues #358, #388, #493, #508, #563; DHuS
2017 sources (SentinelDataHub/DataHubSystem 226d598: SearchController, opensearch_atom.xsl, solr
schema.xml, sentinel-2.owl, ExpectedException, ServiceLogger, ChannelQueue).
"guess" marks what none of them shows."""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import fnmatch
import hashlib
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from uuid import uuid4

from aiohttp import web

from tests.cdse import FilterError, _utc, parse_wkt, rings_intersect

Point = tuple[float, float]  # lon, lat
Ring = list[Point]  # closed; one point for a POINT
Doc = dict[str, Any]  # a product as the search index sees it
Predicate = Callable[[Doc], bool]
ENTRY = web.RequestKey[dict[str, Any]]("dhus_entry")
HUB = "Sentinels Scientific Data Hub"  # apihub's long name; each hub has its own
EXTENSIONS = {"Sentinel-1": ".SAFE", "Sentinel-2": ".SAFE", "Sentinel-3": ".SEN3",
              "Sentinel-5 Precursor": ".nc"}
INSTRUMENTS = {"Sentinel-1": "SAR-C SAR", "Sentinel-2": "MSI", "Sentinel-3": "OLCI",
               "Sentinel-5 Precursor": "TROPOMI"}  # in `summary`; S3, S5P: guess
# Solr field types (sentinel-*.owl, schema.xml): text = words, lower-cased (text_general);
# string = the exact value. A product's `attributes` add fields of their Python type.
FIELDS = {"platformname": "text", "producttype": "text", "uuid": "string",
          "identifier": "string", "filename": "string", "format": "string", "size": "string",
          "beginposition": "date", "endposition": "date", "ingestiondate": "date",
          "cloudcoverpercentage": "double", "footprint": "geo", "orbitnumber": "int",
          "relativeorbitnumber": "int", "orbitdirection": "text", "polarisationmode": "text",
          "sensoroperationalmode": "text", "instrumentshortname": "text", "tileid": "text",
          "processinglevel": "text", "platformserialidentifier": "text", "timeliness": "text"}
CLIENT_ERROR = ("The server cannot or will not process the request due to something that is "
                "perceived to be a client error.")


class SolrError(ValueError):
    """A query Solr refuses: DHuS answers 200 with `{"feed": {..., "error": {...}}}`."""


def iso(dt: datetime) -> str:
    """2024-03-01T10:20:21.024Z, as the feed writes dates (milliseconds)."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def odata_date(dt: datetime) -> str:
    return f"/Date({(dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)})/"


def human_size(n: int) -> str:
    """DHuS' `size`: "10.65 KB", "110.44 MB", "1.09 GB" (binary units; "bytes": guess)."""
    k = next(k for k in range(5) if n < 1024 ** (k + 1) or k == 4)
    return f"{n} bytes" if k == 0 else f"{n / 1024 ** k:.2f} {' KMGT'[k]}B"


@dataclass
class DhusProduct:
    """A hub product and its bytes. `name` is the identifier, with or without its extension;
    `attributes` (beyond the brief) adds index fields such as orbitdirection or
    relativeorbitnumber (str: text, int: int, float: double)."""

    name: str
    data: bytes
    _: KW_ONLY
    platform: str = "Sentinel-2"
    producttype: str = "S2MSI1C"
    begin: datetime
    ingested: datetime | None = None
    footprint: list[Point] = field(default_factory=lambda: [  # lon, lat
        (11.0, 45.0), (12.4, 45.0), (12.4, 46.0), (11.0, 46.0), (11.0, 45.0)])
    cloud: float | None = None
    online: bool = True
    md5: str | None = None  # the catalogue's checksum; None: the MD5 of data (lower-case hex)
    uuid: str = field(default_factory=lambda: str(uuid4()))
    rate: float | None = None  # bytes/s per connection
    drop_after: list[int] = field(default_factory=list)  # per response: bytes, then abort
    xml_error_body: bool = False  # `$value` answers 200 with an OData XML error document
    attributes: dict[str, str | int | float] = field(default_factory=dict)
    modified: datetime = field(init=False)  # OData ModificationDate (a restore updates it)

    def __post_init__(self) -> None:
        self.begin = _utc(self.begin)
        self.ingested = self.modified = _utc(self.ingested or self.begin + timedelta(hours=3))
        ring = [(float(x), float(y)) for x, y in self.footprint]
        self.footprint = ring + ring[:1] if ring and ring[0] != ring[-1] else ring
        self.md5 = hashlib.md5(self.data).hexdigest() if self.md5 is None else self.md5

    @property
    def title(self) -> str:
        return re.sub(r"\.(SAFE|SEN3|nc|zip)$", "", self.name)

    @property
    def filename(self) -> str:
        return self.name if self.name != self.title else \
            self.title + EXTENSIONS.get(self.platform, ".SAFE")

    def document(self) -> Doc:
        doc: Doc = {
            "platformname": self.platform, "producttype": self.producttype, "uuid": self.uuid,
            "identifier": self.title, "filename": self.filename, "size": human_size(len(self.data)),
            "format": "NetCDF" if self.filename.endswith(".nc") else "SAFE",  # guess: .nc
            "beginposition": self.begin, "endposition": self.begin, "ingestiondate": self.ingested,
            "footprint": self.footprint, **self.attributes}
        if self.cloud is not None:
            doc["cloudcoverpercentage"] = float(self.cloud)
        return doc

    def gml(self) -> str:  # gmlfootprint and ContentGeometry: "lat,lon" pairs
        coords = " ".join(f"{y},{x}" for x, y in self.footprint)
        return ('<gml:Polygon srsName="http://www.opengis.net/gml/srs/epsg.xml#4326" '
                'xmlns:gml="http://www.opengis.net/gml">\n   <gml:outerBoundaryIs>\n      '
                f"<gml:LinearRing>\n         <gml:coordinates>{coords}</gml:coordinates>\n      "
                "</gml:LinearRing>\n   </gml:outerBoundaryIs>\n</gml:Polygon>")


def field_kind(name: str, products: list[DhusProduct]) -> str | None:
    values = [p.attributes[name] for p in products if name in p.attributes]
    if name in FIELDS or not values:
        return FIELDS.get(name)
    return "text" if isinstance(values[0], str) else "int" if type(values[0]) is int else "double"


# ---------------------------------------------------------------- dates and shapes

_DATE = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")
_UNITS = ("YEAR", "MONTH", "DAY", "HOUR", "MINUTE", "SECOND")
_MATH = re.compile(rf"([+-])(\d+)({'|'.join(_UNITS)})S?|/({'|'.join(_UNITS)})S?")


def solr_date(text: str, now: datetime) -> datetime:
    """ISO 8601 in UTC or NOW, then Solr date math: NOW-1DAY, 2024-03-01T00:00:00Z+1MONTH,
    NOW/DAY. The messages are Solr's DateMathParser's, from memory (guess)."""
    if text.startswith("NOW"):
        value, pos = now, 3
    elif m := _DATE.match(text):
        try:
            value, pos = datetime.fromisoformat(
                f"{m[1]}-{m[2]}-{m[3]}T{m[4]}:{m[5]}:{m[6]}.{(m[7] or '')[:6]:0<6}+00:00"), m.end()
        except ValueError:
            raise SolrError(f"Invalid Date String:'{text}'") from None
    else:
        raise SolrError(f"Invalid Date String:'{text}'")
    while pos < len(text):
        if not (op := _MATH.match(text, pos)):
            raise SolrError(f"Invalid Date Math String:'{text}'")
        pos, unit = op.end(), op[3] or op[4]
        if op[4]:  # /UNIT rounds down
            fmt = ("%Y-01-01", "%Y-%m-01", "%Y-%m-%d", "%Y-%m-%dT%H", "%Y-%m-%dT%H:%M",
                   "%Y-%m-%dT%H:%M:%S")[_UNITS.index(unit)]
            value = datetime.strptime(value.strftime(fmt), fmt).replace(tzinfo=UTC)
        elif unit in ("YEAR", "MONTH"):  # the same day of the month, or its last one
            year, month = divmod(value.year * 12 + value.month - 1 + int(op[1] + op[2]) * (
                12 if unit == "YEAR" else 1), 12)
            value = value.replace(year=year, month=month + 1, day=min(
                value.day, calendar.monthrange(year, month + 1)[1]))
        else:
            value += int(op[1] + op[2]) * timedelta(**{unit.lower() + "s": 1})
    return value


def shape(wkt: str) -> list[Ring]:
    """WKT in lon lat order (POINT, POLYGON, MULTIPOLYGON: the CDSE emulator's reader; and a
    GEOMETRYCOLLECTION of those) as rings. Solr's wrapper "Couldn't parse shape '...' because:";
    the reasons are the reader's (Spatial4j's own wording: not emulated)."""
    m = re.fullmatch(r"\s*GEOMETRYCOLLECTION\s*\((.*)\)\s*", wkt, re.S)
    try:
        return [ring for part in (re.split(r",\s*(?=[A-Z])", m[1]) if m else [wkt])
                for ring in parse_wkt("SRID=4326;" + part.strip())]
    except FilterError as e:
        raise SolrError(f"Couldn't parse shape '{wkt}' because: {e}") from None


def spatial(text: str) -> Predicate:
    """`Intersects(<WKT>)`; `Intersects(lat, lon)` is a point in Spatial4j's legacy "lat, lon"
    order, `Intersects(x y)` one in lon lat order; DHuS' `distErrPct=0` suffix is accepted.
    IsWithin and Contains (sentinelsat's area_relation): not emulated."""
    m = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*(?:distErrPct=[\d.]+\s*)?", text, re.S)
    if not m or m[1].lower() != "intersects":
        raise SolrError(f"emulator: only Intersects(...) is emulated, not {text!r}")
    xy = re.fullmatch(r"\s*([-+]?[\d.]+)\s*(,?)\s*([-+]?[\d.]+)\s*", m[2])  # a point
    parts = shape(m[2].strip() if not xy else f"POINT ({xy[3]} {xy[1]})" if xy[2] else
                  f"POINT ({xy[1]} {xy[3]})")
    return lambda doc: bool(doc["footprint"]) and any(
        rings_intersect(doc["footprint"], part) for part in parts)


# ---------------------------------------------------------------- the query language

_QUOTED, _BOUND = r'"(?:[^"\\]|\\.)*"', r'"(?:[^"\\]|\\.)*"|[^\s\]}"]+'
_TOKEN = re.compile(
    r"(?P<ws>\s+)|(?P<range>[\[{]\s*(?P<lo>" + _BOUND + r")\s+TO\s+(?P<hi>" + _BOUND +
    r")\s*[\]}])|(?P<quoted>" + _QUOTED + r')|(?P<op>[():])|(?P<word>(?:[^\s()\[\]{}:"\\]|\\.)+)'
    r"|(?P<bad>.)", re.S)


class Tok(NamedTuple):
    kind: str  # range, quoted, op, word, bad, end
    text: str
    pos: int
    bounds: tuple[str, str] = ("", "")  # a range's ends, unquoted


def _unescape(text: str) -> str:
    text = text[1:-1] if len(text) > 1 and text[0] == text[-1] == '"' else text
    return re.sub(r"\\(.)", r"\1", text)


def _words(text: str) -> list[str]:  # roughly Solr's StandardTokenizer + LowerCaseFilter
    return re.findall(r"\w+", text.lower())


def tokenize(q: str) -> list[Tok]:
    return [*(Tok(m.lastgroup or "", m[0], m.start(), (_unescape(m["lo"]), _unescape(m["hi"]))
                  if m.lastgroup == "range" else ("", ""))
              for m in _TOKEN.finditer(q) if m.lastgroup != "ws"), Tok("end", "", len(q))]


def _sortable(kind: str, value: Any) -> Any:
    return None if value is None or kind == "geo" else float(value) if kind in (
        "int", "double") else value.lower() if kind == "text" else value


class QueryParser:
    """Recursive descent over tokens, AND being the default operator (schema.xml):
    or := and (OR and)*; and := unary ([AND] unary)*; unary := (NOT | - | +) unary | primary;
    primary := ( or ) | field:( or ) | field:value | value (the default field)."""

    def __init__(self, q: str, kind: Callable[[str], str | None], now: datetime) -> None:
        self.q, self.kind, self.now, self.toks, self.i = q, kind, now, tokenize(q), 0

    def syntax(self, tok: Tok) -> SolrError:  # Solr's shape; the detail is a guess
        return SolrError(f"org.apache.solr.search.SyntaxError: Cannot parse '{self.q}': "
                         f"Encountered \"{tok.text or '<EOF>'}\" at line 1, column {tok.pos}.")

    def peek(self) -> Tok:
        return self.toks[self.i]

    def next(self) -> Tok:
        self.i += 1
        return self.toks[self.i - 1]

    def accept(self, *words: str) -> bool:
        found = self.peek().kind in ("word", "op") and self.peek().text in words
        self.i += found
        return found

    def parse(self) -> Predicate:
        pred = self.or_(None)
        if self.peek().kind != "end":
            raise self.syntax(self.peek())
        return pred

    def or_(self, fld: str | None) -> Predicate:
        preds = [self.and_(fld)]
        while self.accept("OR", "||"):
            preds.append(self.and_(fld))
        return preds[0] if len(preds) == 1 else lambda d: any(p(d) for p in preds)

    def and_(self, fld: str | None) -> Predicate:
        preds = [self.unary(fld)]
        while not (self.peek().kind == "end" or self.peek().text in (")", "OR", "||")):
            self.accept("AND", "&&")
            preds.append(self.unary(fld))
        return preds[0] if len(preds) == 1 else lambda d: all(p(d) for p in preds)

    def unary(self, fld: str | None) -> Predicate:
        tok, negate = self.peek(), self.accept("NOT", "!", "-")
        if not negate and tok.kind == "word" and tok.text[0] in "+-" and len(tok.text) > 1:
            self.toks[self.i] = tok._replace(text=tok.text[1:], pos=tok.pos + 1)  # -field:x
            negate = tok.text[0] == "-"
        elif not negate:
            self.accept("+")
        inner = self.unary(fld) if negate else self.primary(fld)
        return (lambda d: not inner(d)) if negate else inner

    def primary(self, fld: str | None) -> Predicate:
        tok = self.next()
        if tok.kind == "op" and tok.text == "(":
            pred = self.or_(fld)
            if not self.accept(")"):
                raise self.syntax(self.peek())
            return pred
        if tok.kind == "word" and self.peek()[:2] == ("op", ":"):
            self.i += 1
            name = _unescape(tok.text).lower()  # DHuS lower-cases field names (SolrDao)
            if name != "*" and self.kind(name) is None:
                raise SolrError(f"undefined field {name}")  # test_invalid_query
            return self.primary(name) if self.peek()[:2] == ("op", "(") else \
                self.value(name, self.next())
        return self.value(fld, tok)

    def value(self, fld: str | None, tok: Tok) -> Predicate:
        if tok.kind not in ("word", "quoted", "range") or tok.text in ("AND", "OR", "NOT"):
            raise self.syntax(tok)
        text, quoted = _unescape(tok.text), tok.kind == "quoted"
        if fld in (None, "*"):  # the default field `contents`: guess, the identifier's words
            return (lambda d: True) if "*" in (fld, text) else \
                self.words("identifier", text, quoted)
        kind = self.kind(fld) or "text"
        if tok.kind == "range":
            lo, hi = (self.convert(fld, kind, b) for b in tok.bounds)
            inc_lo, inc_hi = tok.text[0] == "[", tok.text[-1] == "]"

            def in_range(d: Doc) -> bool:
                v = _sortable(kind, d.get(fld))
                return v is not None and (lo is None or v > lo or (inc_lo and v == lo)) and \
                    (hi is None or v < hi or (inc_hi and v == hi))
            return in_range
        if text == "*" and not quoted:
            return lambda d: d.get(fld) is not None
        if kind == "geo":
            return spatial(text)
        if kind == "text":
            return self.words(fld, text, quoted)
        if kind == "string":  # the whole value, case-sensitive; `*`, `?` unless quoted
            pattern = text.replace("[", "[[]")
            return (lambda d: d.get(fld) == text) if quoted or not set("*?") & set(text) else \
                (lambda d: fnmatch.fnmatchcase(str(d.get(fld, "")), pattern))
        want = self.convert(fld, kind, text)
        return lambda d: _sortable(kind, d.get(fld)) == want

    def convert(self, fld: str, kind: str, text: str) -> Any:
        if text == "*":
            return None
        if kind == "date":
            return solr_date(text, self.now)
        if kind == "geo":
            raise SolrError(f"emulator: no range queries on {fld}")
        try:
            return float(int(text)) if kind == "int" else float(text) if kind == "double" else \
                text.lower() if kind == "text" else text
        except ValueError:
            raise SolrError(f"Invalid Number: {text}") from None  # guess: Solr's wording

    @staticmethod
    def words(fld: str, text: str, quoted: bool) -> Predicate:
        """text fields: the query's words as a phrase among the value's words, lower-cased;
        unquoted `*`, `?` match one word."""
        if not quoted and set("*?") & set(text):
            pattern = text.lower().replace("[", "[[]")
            return lambda d: any(fnmatch.fnmatchcase(w, pattern)
                                 for w in _words(str(d.get(fld, ""))))
        want = _words(text)

        def phrase(d: Doc) -> bool:
            have = _words(str(d.get(fld, "")))
            return bool(want) and any(have[i:i + len(want)] == want for i in range(len(have)))
        return phrase


def select(products: list[DhusProduct], q: str, orderby: str | None = None,
           now: datetime | None = None) -> list[DhusProduct]:
    """The products a query finds, in DHuS' order: `ingestiondate desc` without `orderby`,
    index order with an empty one (SearchController); products without the field last."""
    def kind(name: str) -> str | None:
        return field_kind(name, products)
    pred = QueryParser(q, kind, now or datetime.now(UTC)).parse()
    found = [(p, doc) for p in products if pred(doc := p.document())]
    keys = []
    for part in ("ingestiondate desc" if orderby is None else orderby).split(","):
        if not part.strip() and orderby is not None and not orderby.strip():
            break
        bits = part.split()
        if len(bits) != 2 or bits[1].lower() not in ("asc", "desc"):  # guess: Solr's wording
            raise SolrError(f"Can't determine a Sort Order (asc or desc) in sort spec "
                            f"'{part.strip()}'")
        if kind(bits[0].lower()) in (None, "geo"):
            raise SolrError(f"sort param field can't be found: {bits[0]}")  # guess
        keys.append((bits[0].lower(), kind(bits[0].lower()) or "", bits[1].lower() == "desc"))
    for name, k, desc in reversed(keys):  # stable sorts, least significant key first
        have = sorted((x for x in found if x[1].get(name) is not None), reverse=desc,
                      key=lambda x: _sortable(k, x[1][name]))
        found = have + [x for x in found if x[1].get(name) is None]
    return [p for p, _ in found]


# ---------------------------------------------------------------- answers

def _quirk(items: list[Any]) -> Any:
    """DHuS makes its JSON from XML with org.json: one element is an object, not a list."""
    return items[0] if len(items) == 1 else items


def feed_entry(p: DhusProduct, base: str) -> dict[str, Any]:
    uri, doc = f"{base}odata/v1/Products('{p.uuid}')", p.document()
    typed: dict[str, list[dict[str, str]]] = {"date": [], "int": [], "double": [], "str": []}
    for name, value in doc.items():  # the footprint comes after, as WKT and GML
        kind = field_kind(name, [p]) or "geo"
        if (key := "str" if kind in ("text", "string") else kind) in typed:
            typed[key].append({"name": name, "content": iso(value) if kind == "date" else
                               str(int(value) if kind == "int" else value)})
    wkt = "MULTIPOLYGON (((" + ", ".join(f"{x} {y}" for x, y in p.footprint) + ")))"
    typed["str"] += [{"name": "footprint", "content": wkt},  # S2: MULTIPOLYGON, "lon lat"
                     {"name": "gmlfootprint", "content": p.gml()}]
    about = [("Instrument", p.attributes.get("instrumentshortname", INSTRUMENTS.get(p.platform))),
             ("Mode", p.attributes.get("polarisationmode")), ("Satellite", p.platform),
             ("Size", doc["size"])]
    out: dict[str, Any] = {
        "title": p.title, "link": [{"href": f"{uri}/$value"}, {"rel": "alternative",
                                                               "href": f"{uri}/"},
                                   {"rel": "icon", "href": f"{uri}/Products('Quicklook')/$value"}],
        "id": p.uuid, "summary": ", ".join([f"Date: {iso(p.begin)}"] + [
            f"{k}: {v}" for k, v in about if v]), "ondemand": "false"}
    return out | {k: _quirk(v) for k, v in typed.items() if v}


def feed(base: str, q: str, start: int, rows: int, total: int, page: list[dict[str, Any]],
         took: float) -> dict[str, Any]:
    """opensearch_atom.xsl's feed and its arithmetic (`last` is total - 1, `next` is NaN with
    rows=0), as org.json writes it; links carry no orderby (test_order_by)."""
    def link(rel: str, at: float) -> dict[str, str]:
        at_ = "NaN" if math.isnan(at) else str(int(at))
        return {"rel": rel, "type": "application/json",
                "href": f"{base}search?q={q}&start={at_}&rows={rows}&format=json"}
    current = math.ceil(start / rows) if rows else math.nan
    more = total > rows and total - start > rows
    links = [link("self", start), link("first", 0)]
    links += [link("previous", (current - 1) * rows)] if start > rows else []
    links += [link("next", (current + 1) * rows)] if more else []
    links += [link("last", total - 1), {"rel": "search", "href": "opensearch_description.xml",
                                        "type": "application/opensearchdescription+xml"}]
    shown = f"{start} to {start + rows - 1} of {total} total" if more else \
        f"{start} to {total - 1} of {total} total" if total > rows and start > 0 else f"{total}"
    body: dict[str, Any] = {
        "xmlns:opensearch": "http://a9.com/-/spec/opensearch/1.1/",
        "xmlns": "http://www.w3.org/2005/Atom", "title": f"{HUB} search results for: {q}",
        "subtitle": f"Displaying {shown} results. Request done in {took:.3f} seconds.",
        "updated": iso(datetime.now(UTC)), "author": {"name": HUB}, "id": f"{base}search?q={q}",
        "opensearch:totalResults": str(total), "opensearch:startIndex": str(start),
        "opensearch:itemsPerPage": str(rows),
        "opensearch:Query": {"role": "request", "searchTerms": q, "startPage": "1"},
        "link": links}
    return {"feed": body | ({"entry": _quirk(page)} if page else {})}


def product_json(p: DhusProduct, base: str, online: bool = True) -> dict[str, Any]:
    """The OData v1 entity (test_get_product_odata_short*); old DHuS has no `Online`."""
    uri = f"{base}odata/v1/Products('{p.uuid}')"
    media = f"{uri}/$value"
    ingested = odata_date(p.ingested or p.begin)
    d: dict[str, Any] = {
        "__metadata": {"id": uri, "uri": uri, "type": "DHuS.Product", "media_src": media,
                       "content_type": "application/octet-stream", "edit_media": media},
        "Id": p.uuid, "Name": p.title, "ContentType": "application/octet-stream",
        "ContentLength": str(len(p.data)), "ChildrenNumber": "1", "Value": None,
        "CreationDate": ingested, "IngestionDate": ingested,
        "ModificationDate": odata_date(p.modified), "EvictionDate": None, "Online": p.online,
        "OnDemand": False, "ContentDate": {"__metadata": {"type": "DHuS.TimeRange"}, "Start":
                                           odata_date(p.begin), "End": odata_date(p.begin)},
        "Checksum": {"__metadata": {"type": "DHuS.Checksum"}, "Algorithm": "MD5", "Value": p.md5},
        "ContentGeometry": p.gml(),
        **{k: {"__deferred": {"uri": f"{uri}/{k}"}} for k in ("Products", "Nodes", "Attributes",
                                                             "Class")}}
    return {"d": d if online else {k: v for k, v in d.items() if k != "Online"}}


def xml_error(message: str) -> str:
    return ("<?xml version='1.0' encoding='UTF-8'?><error xmlns=\"http://schemas.microsoft.com/"
            f'ado/2007/08/dataservices/metadata"><code/><message xml:lang="en">{message}'
            "</message></error>")


def odata_error(status: int, cause: str, message: str, as_json: bool = False) -> web.Response:
    """The message in a document (JSON with $format=json, else XML) and in `cause-message`."""
    headers = {"cause-message": f"{cause} : {message}", "DataServiceVersion": "1.0"}
    if as_json:
        return web.json_response({"error": {"code": None, "message": {
            "lang": "en", "value": message}}}, status=status, headers=headers)
    return web.Response(status=status, text=xml_error(message), content_type="application/xml",
                        headers=headers)


def tomcat(status: int, reason: str, message: str, description: str,
           headers: dict[str, str] | None = None) -> web.Response:
    """Tomcat's HTML error report (the recorded 401, its styles left out)."""
    return web.Response(status=status, content_type="text/html", headers=headers, text=(
        f'<!doctype html><html lang="en"><head><title>HTTP Status {status} \u2013 {reason}'
        f"</title></head><body><h1>HTTP Status {status} \u2013 {reason}</h1><hr class=\"line\""
        f" /><p><b>Type</b> Status Report</p><p><b>Message</b> {message}</p><p><b>Description"
        f"</b> {description}</p><hr class=\"line\" /><h3>Apache Tomcat/8.5.42</h3></body></html>"))


class DhusEmulator:
    """A DHuS hub on 127.0.0.1: `await DhusEmulator(users={...}).start()`, then `url`.
    `orders`: (user, uuid, monotonic time) of each LTA order; `active`/`peak`: `$value`
    streams at once per user; `flows_refused`/`quota_refused`: their 403s per user."""

    def __init__(self, *, users: dict[str, str] | None = None, root: str = "/dhus/",
                 max_rows: int = 100, max_flows_per_user: int | None = 4, quota: int = 20,
                 quota_window: float = 43200, restore_delay: float = 1.0,
                 accept_orders: bool = True, old_offline: bool = False,
                 old_dhus: bool = False) -> None:
        self.users = {"user": "password"} if users is None else users
        self.root = "/" + root.strip("/") + "/"
        self.max_rows, self.max_flows_per_user = max_rows, max_flows_per_user
        self.quota, self.quota_window, self.restore_delay = quota, quota_window, restore_delay
        self.accept_orders, self.old_offline, self.old_dhus = accept_orders, old_offline, old_dhus
        self.products: dict[str, DhusProduct] = {}
        self.orders: list[tuple[str, str, float]] = []
        self.active, self.peak = Counter[str](), Counter[str]()
        self.flows_refused, self.quota_refused = Counter[str](), Counter[str]()
        self.requests: list[dict[str, Any]] = []
        self.bytes_sent, self.chunk, self.port = 0, 64 * 1024, 0
        self._restores: dict[str, float] = {}  # uuid -> when it comes online
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._record])
        self.app.add_routes([web.get(self.root + "search", self._search, allow_head=False),
                             web.get(self.root + "odata/v1/{path:.*}", self._odata,
                                     allow_head=False)])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.root}"

    def add(self, product: DhusProduct) -> DhusProduct:
        self.products[product.uuid] = product
        return product

    async def start(self) -> DhusEmulator:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def settle(self) -> None:
        """Ordered products whose restore delay has passed are online now."""
        for key, due in list(self._restores.items()):
            if due <= time.monotonic():
                product = self.products[key]
                product.online, product.modified = True, datetime.now(UTC)
                del self._restores[key]

    def _user(self, request: web.Request) -> str | None:
        kind, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        ok = kind.lower() == "basic" and user in self.users and self.users[user] == password
        return user if ok else None

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every request in `requests` with its status; basic auth before anything else."""
        request[ENTRY] = entry = {
            "method": request.method, "path": request.path, "query": dict(request.query),
            "user": self._user(request), "range": request.headers.get("Range"),
            "t": time.monotonic()}
        self.requests.append(entry)
        if entry["user"] is None:  # the realms of the recorded 401s
            realm = "OData service" if "/odata/" in request.path else f"{HUB} Search"
            response: web.StreamResponse = tomcat(
                401, "Unauthorized", "Unauthorized", "The request has not been applied because "
                "it lacks valid authentication credentials for the target resource.",
                {"WWW-Authenticate": f'Basic realm="{realm}"'})
        else:
            try:
                response = await handler(request)
            except web.HTTPException as e:
                entry["status"] = e.status
                raise
        entry["status"] = response.status
        return response

    async def _search(self, request: web.Request) -> web.Response:
        began, query = time.monotonic(), request.query
        if (q := query.get("q")) is None:  # Spring's message (sentinelsat #388)
            return tomcat(400, "Bad Request", "Required String parameter 'q' is not present",
                          CLIENT_ERROR)
        rows, start = (int(query[k]) if re.fullmatch(r"[+-]?\d+", query.get(k, "")) else default
                       for k, default in (("rows", 10), ("start", 0)))  # else ignored; 10: Solr's
        if rows > self.max_rows:  # SearchController.java
            return tomcat(400, "Bad Request", f"Parameter `rows` exceeds the maximum value "
                          f"({self.max_rows}) in search request", CLIENT_ERROR)
        if query.get("format", "").lower() != "json":  # Atom XML
            return web.Response(status=400, text="emulator: only format=json is emulated")
        try:
            if min(rows, start) < 0:  # guess: Solr's wording
                raise SolrError(f"'{'rows' if rows < 0 else 'start'}' parameter cannot be "
                                "negative")
            found = select(list(self.products.values()), q, query.get("orderby"))
        except SolrError as e:  # test_invalid_query, test_unicode_support: status 200
            return web.json_response({"feed": {
                "xmlns:opensearch": "http://a9.com/-/spec/opensearch/1.1/",
                "xmlns": "http://www.w3.org/2005/Atom", "error": {"code": "400",
                                                                  "message": str(e)}}})
        page = [feed_entry(p, self.url) for p in found[start:start + rows]]
        return web.json_response(feed(self.url, q, start, rows, len(found), page,
                                      time.monotonic() - began))

    async def _odata(self, request: web.Request) -> web.StreamResponse:
        path, as_json = request.match_info["path"], request.query.get("$format") == "json"
        if not (m := re.fullmatch(r"Products\('([^']*)'\)(/.*)?", path)):  # Olingo's message
            return odata_error(404, "UriNotMatchingException", "Could not find an entity set or "
                               f"function import for '{re.split(r'[(/]', path)[0]}'.", as_json)
        self.settle()
        product, rest = self.products.get(m[1]), (m[2] or "").rstrip("/")
        if product is None:
            return odata_error(404, "InvalidKeyException", f"Invalid key ({m[1]}) to access "
                               "Products", as_json and not rest)
        if not rest:
            return web.json_response(product_json(product, self.url, not self.old_dhus),
                                     headers={"DataServiceVersion": "2.0"}) if as_json else \
                web.Response(status=400, text="emulator: only $format=json is emulated")
        if rest == "/Online/$value" and not self.old_dhus:
            return web.Response(text=str(product.online).lower(),
                                headers={"DataServiceVersion": "2.0"})
        if rest == "/$value":
            return await self._value(request, product, request[ENTRY]["user"])
        return odata_error(500, "UriNotMatchingException", "Could not find property with name: "
                           f"'{rest.split('/')[1]}'.")  # test_odata.py: old DHuS' Online

    async def _value(self, request: web.Request, p: DhusProduct, user: str) -> web.StreamResponse:
        if not p.online:
            return self._offline(p, user)
        cap = self.max_flows_per_user
        if cap is not None and self.active[user] >= cap:  # ChannelQueue, #563; no body
            self.flows_refused[user] += 1
            return web.Response(status=403, headers={"cause-message": (
                "MediaRegulationException : An exception occured while creating a stream: "
                f'Maximum number of {cap} concurrent flows achieved by the user "{user}"')})
        if p.xml_error_body:  # sentinelsat #51/#62: an error saved as the product; guess: text
            return web.Response(content_type="application/xml", text=xml_error(
                "An exception occured while creating a stream: Maximum number of 2 concurrent "
                f'flows achieved by the user "{user}"'))
        self.active[user] += 1
        self.peak[user] = max(self.peak[user], self.active[user])
        try:
            return await self._send(request, p)
        finally:
            self.active[user] -= 1

    def _offline(self, p: DhusProduct, user: str) -> web.Response:
        """202 places an order (or repeats one under way, counting nothing); 403 past the
        user's quota within quota_window; 503 when orders are not accepted; older DHuS: 500
        with an empty body (#358) instead of 202 (guess: the order is placed all the same)."""
        now = time.monotonic()
        if p.uuid not in self._restores:
            if not self.accept_orders:  # guess: the cause-message
                return web.Response(status=503, headers={"cause-message": (
                    "ServiceUnavailableException : The retrieval of offline products is not "
                    "available at the moment")})
            if sum(u == user and now - t < self.quota_window for u, _, t in self.orders) >= \
                    self.quota:  # the text of sentinelsat #508 (two spaces before "trying")
                self.quota_refused[user] += 1
                return web.Response(status=403, headers={"cause-message": (
                    f"ExpectedException : User '{user}' offline products retrieval quota "
                    f"exceeded ({self.quota} fetches max)  trying to fetch product {p.title} "
                    f"({len(p.data)} bytes compressed)")})
            self.orders.append((user, p.uuid, now))
            self._restores[p.uuid] = now + self.restore_delay
        return web.Response(status=500) if self.old_offline else \
            web.Response(status=202, text="", headers={"DataServiceVersion": "2.0"})

    async def _send(self, request: web.Request, p: DhusProduct) -> web.StreamResponse:
        size, start, end, partial, etag = len(p.data), 0, len(p.data), False, p.md5 or ""
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", "").strip())
        if m and request.headers.get("If-Range", etag).strip('"') == etag and \
                (not m[2] or int(m[2]) >= int(m[1])):  # else the range is ignored
            if int(m[1]) >= size:  # guess: Tomcat-like
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start, end, partial = int(m[1]), min(size, int(m[2] or size) + 1), True
        response = web.StreamResponse(status=206 if partial else 200, headers={
            "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
            "ETag": etag, "DataServiceVersion": "2.0",  # recorded: the MD5, unquoted
            "Content-Disposition": f'inline;filename="{p.title}.zip"',
            "Content-Range": f"bytes {start}-{end - 1}/{size}"})  # recorded on a 200 too
        response.content_length = end - start
        await response.prepare(request)
        request[ENTRY]["status"] = response.status  # also when the transfer is cut
        stop = min(end, start + p.drop_after.pop(0)) if p.drop_after else end
        pos, began = start, time.monotonic()
        chunk = min(self.chunk, max(1024, int(p.rate / 20))) if p.rate else self.chunk
        while pos < stop:
            n = min(chunk, stop - pos)
            await response.write(p.data[pos:pos + n])
            pos, self.bytes_sent = pos + n, self.bytes_sent + n
            if p.rate and (pos - start) / p.rate > time.monotonic() - began:
                await asyncio.sleep((pos - start) / p.rate - (time.monotonic() - began))
        if stop < end:  # drop_after: let the client read what was sent, then cut
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        await response.write_eof()
        return response
