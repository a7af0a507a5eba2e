"""A USGS M2M emulator on 127.0.0.1: the JSON API (`url`, .../api/api/json/stable/) and the file
host its URLs point at (real ones: dds.cr.usgs.gov/download-staging/<b64> and /download/<b64>).

Sources, cited in comments as [doc] the M2M JSON API reference (m2m.cr.usgs.gov/api/docs/reference,
a 2025-05 copy) and its exception-codes page (code descriptions, as copied by client libraries),
[fix] responses recorded in kapadia/usgs tests/data (2021), [seen] error texts quoted in issues
(kapadia/usgs #59 #68, landsatxplore #78 #93 #130, eodag #243, MrChebur/usgs-m2m #1). "guess" marks
what no source shows."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, date, datetime, timedelta
from operator import attrgetter
from typing import Any

from aiohttp import web

BASE = "/api/api/json/stable/"
SECRETS = ("token", "password")  # never kept in `requests`
MESSAGES = {
    "INPUT_FORMAT": "JSON payload could not be parsed as valid JSON",  # [doc]
    "INPUT_PARAMETER_INVALID": "Invalid parameters used",  # [doc]; details appended (guess)
    "NOT_FOUND": "Invalid Endpoint",  # [seen] landsatxplore #130 (`login` after Feb 2025)
    "AUTH_INVALID": "User credential verification failed",  # [doc] description; text a guess
    "AUTH_UNAUTHROIZED": "Your account does not have access to this endpoint",  # [seen], sic
    "AUTH_KEY_INVALID": "Invalid API Key",  # [doc]
    "AUTH_EXPIRED": "API key has expired due to inactivity",  # [seen] kapadia/usgs #59
    "UNAUTHORIZED_USER": "Unable to validate user API permissions.",  # [seen] landsatxplore #78
    "RATE_LIMIT": "User attempted to run multiple requests at a time",  # [doc]
    "RATE_LIMIT_USER_DL": "User has reached download-related rate limits",  # [doc]
    "DATASET_INVALID": "Invalid dataset used",  # [doc]
}
Log = list[dict[str, Any]]
KEY_CHARS = string.ascii_letters + string.digits + "@"  # [seen] a real key: "4oCpGCCrIET5H@Cd"


class ApiError(Exception):
    def __init__(self, code: str, detail: str = "", status: int = 200) -> None:
        super().__init__(code)
        self.code, self.status = code, status  # HTTP 200 with the error in the envelope
        self.message = MESSAGES.get(code, code) + (f": {detail}" if detail else "")


@dataclass(frozen=True)
class Spec:
    """A dataset's bundle (product id, code, name) and "folder" option of band files."""

    dataset_id: str
    collection: str
    bundle: tuple[str, str, str]
    band_option: tuple[str, str, str] | None = None
    band_dataset_id: str = ""
    bands: tuple[str, ...] = ()
    band_entity: str = ""  # format string: kind (SR/ST), display, band


SPECS = {  # ids: [doc] landsat_ot_c2_l1 dataset/band option; [seen] landsatxplore #93 (L2 bundle
    # 5e83d14fec7cae84, dataset 5e83d14f2fc39685) and user scripts (L1 bundle 5e81f14f92acf9ef);
    # product names [seen] (many clients match on them); product codes of bundles: guesses
    "landsat_ot_c2_l2": Spec(
        "5e83d14f2fc39685", "Landsat 8-9 OLI/TIRS C2 L2",
        ("5e83d14fec7cae84", "D697", "Landsat Collection 2 Level-2 Product Bundle"),
        ("632210d4770592cf", "D698", "Landsat Collection 2 Level-2 Band File"),  # guess id
        "5e83d1507a9b04ad", ("SR_B4", "SR_B5", "ST_B10"), "L2{kind}_{display}_{band}_TIF"),
    "landsat_ot_c2_l1": Spec(
        "5e81f14f59432a27", "Landsat 8-9 OLI/TIRS C2 L1",
        ("5e81f14f92acf9ef", "D684", "Landsat Collection 2 Level-1 Product Bundle"),
        ("73ceb05468b7e8c2", "D687", "Landsat Collection 2 Level-1 Band File"),
        "5e81ff5f86d11d08", ("B4", "B5", "B10"), "L1_{display}_{band}_TIF"),
}


def _hexid(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()[:16]


def spec(dataset: str) -> Spec:
    """Another dataset gets one generic bundle (guess)."""
    return SPECS.get(dataset) or Spec(_hexid(dataset), dataset,
                                      (_hexid(dataset + "/bundle"), "D000", "Standard Download"))


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


@dataclass
class M2MScene:
    """A scene and the bytes of its bundle. `prepare_time`: seconds a download request stays
    "preparing"; `rate` (bytes/s) and `drop_after` (per response) apply to the bundle;
    `available=False` makes its bundle an orderable, not downloadable, option."""

    entity_id: str
    display_id: str
    data: bytes
    _: KW_ONLY
    dataset: str = "landsat_ot_c2_l2"
    acquired: datetime
    bounds: tuple[float, float, float, float] = (8.0, 43.0, 9.0, 44.0)  # w, s, e, n
    cloud: float | None = 10.0
    published: datetime | None = None
    prepare_time: float = 0.0
    filename: str | None = None  # Content-Disposition; None: display_id + ".tar"
    rate: float | None = None
    drop_after: list[int] = field(default_factory=list)
    available: bool = True

    def __post_init__(self) -> None:
        self.dataset, self.acquired = self.dataset.lower(), _utc(self.acquired)
        self.published = _utc(self.published or self.acquired + timedelta(days=8, hours=3))
        self.filename = self.display_id + ".tar" if self.filename is None else self.filename


@dataclass
class _Item:  # what download-request accepts: a scene's bundle or one of its band files
    scene: M2MScene
    entity_id: str
    display_id: str
    product: tuple[str, str, str]  # id, code, name
    filename: str
    data: bytes
    bundle: bool


@dataclass
class _Download:  # a record of the download queue
    id: int
    user: str
    item: _Item
    label: str
    requested: float
    ready: float
    attempted: bool = False
    completed: bool = False


@dataclass
class _Session:
    id: int
    user: str
    key: str
    expires: float
    open: bool = True


def _int(body: dict[str, Any], name: str, default: int) -> int:
    try:  # "1" too: [doc] samples send strings
        n = default if body.get(name) is None else int(body[name])
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ApiError("INPUT_PARAMETER_INVALID", f"{name} must be a positive integer")
    return n


def _dates(flt: Any, what: str, get: Callable[[M2MScene], datetime]) -> Callable[[M2MScene], bool]:
    """[doc] "only search at the date level, discarding any time information"."""
    try:
        lo, hi = (date.fromisoformat(str(flt[k])[:10]) if flt.get(k) else default
                  for k, default in (("start", date.min), ("end", date.max)))
    except (ValueError, AttributeError):
        raise ApiError("INPUT_PARAMETER_INVALID", f"{what}: start, end") from None
    return lambda sc: lo <= get(sc).date() <= hi


def _bbox(flt: Any) -> tuple[float, float, float, float]:
    """mbr [doc]; geojson by the bounding box of its coordinates (an approximation)."""
    try:
        if flt.get("filterType") == "mbr":
            ll, ur = flt["lowerLeft"], flt["upperRight"]  # [doc] both must exist
            return (float(ll["longitude"]), float(ll["latitude"]),
                    float(ur["longitude"]), float(ur["latitude"]))
        if flt.get("filterType") == "geojson":
            text = json.dumps(flt["geoJson"]["coordinates"])
            xy = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text)]
            return min(xy[::2]), min(xy[1::2]), max(xy[::2]), max(xy[1::2])
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    raise ApiError("INPUT_PARAMETER_INVALID", "spatialFilter: mbr needs lowerLeft and "
                   "upperRight, geojson needs geoJson")  # guess: text


def intersects(scene: tuple[float, float, float, float], box: tuple[float, ...]) -> bool:
    """Boxes sharing a point; a box whose west is east of its east crosses the antimeridian."""
    (w, s, e, n), (bw, bs, be, bn) = scene, box
    if not (s <= bn and bs <= n):
        return False
    return (w <= be and bw <= e) if bw <= be else (e >= bw or w <= be)


def _compile(flt: Any) -> list[Callable[[M2MScene], bool]]:
    """sceneFilter -> predicates; metadataFilter is accepted and ignored (not emulated)."""
    if not isinstance(flt, dict):
        raise ApiError("INPUT_PARAMETER_INVALID", "sceneFilter must be an object")
    preds: list[Callable[[M2MScene], bool]] = []
    if flt.get("spatialFilter"):
        box = _bbox(flt["spatialFilter"])
        preds.append(lambda sc: intersects(sc.bounds, box))
    for name, get in (("acquisitionFilter", attrgetter("acquired")),
                      ("ingestFilter", attrgetter("published"))):
        if flt.get(name):
            preds.append(_dates(flt[name], name, get))
    if cc := flt.get("cloudCoverFilter"):
        lo, hi = float(cc.get("min", 0) or 0), float(100 if cc.get("max") is None else cc["max"])
        unknown = bool(cc.get("includeUnknown", False))  # guess: the default
        preds.append(lambda sc: unknown if sc.cloud is None else lo <= sc.cloud <= hi)
    return preds


class M2MEmulator:
    """M2M on 127.0.0.1: `await M2MEmulator(users={name: app_token}).start()`. Counters:
    `requests` (every API call: endpoint, api_key, body without secrets, status, error),
    `logins`/`logouts` (usernames), `download_requests`, `file_gets`, `peak_file_gets`."""

    def __init__(self, *, users: dict[str, str] | None = None, no_role: set[str] | None = None,
                 api_key_lifetime: float = 7200, url_lifetime: float = 3600,
                 max_results_cap: int | None = None,
                 rate_limits: tuple[int, int, int] = (15000, 20000, 20000),
                 max_concurrent_requests: int | None = None, api_delay: float = 0.0) -> None:
        self.users = {"user": "token"} if users is None else users
        self.no_role = set(no_role or ())
        self.api_key_lifetime, self.url_lifetime = api_key_lifetime, url_lifetime
        self.max_results_cap = max_results_cap
        # [doc] rate-limit-summary: downloads requested in 15 min, pending, available but
        # not attempted; above them download-request answers RATE_LIMIT_USER_DL (guess: when)
        self.rate_limits = rate_limits
        self.max_concurrent_requests, self.api_delay = max_concurrent_requests, api_delay
        self.scenes: dict[str, M2MScene] = {}
        self.requests, self.download_requests, self.file_gets = Log(), Log(), Log()
        self.logins, self.logouts = list[str](), list[str]()
        self.active_file_gets = self.peak_file_gets = self.bytes_sent = self.port = 0
        self.chunk = 64 * 1024
        self._items: dict[tuple[str, str], _Item] = {}
        self._keys: dict[str, _Session] = {}
        self._downloads: list[_Download] = []
        self._urls: dict[str, tuple[_Download, float, bool]] = {}  # token -> dl, expiry, staging
        self._inflight: Counter[str] = Counter()
        self._request_ids, self._session_ids = itertools.count(225951215), itertools.count(4821)
        self._download_ids, self._url_ids = itertools.count(26107136), itertools.count(20263459)
        self._request_id = 0
        self._runner: web.AppRunner | None = None
        self._handlers: dict[str, Callable[[_Session, dict[str, Any]], Any]] = {
            "logout": self._logout, "scene-search": self._scene_search,
            "download-options": self._download_options,
            "download-request": self._download_request,
            "download-retrieve": self._download_retrieve}
        self.app = web.Application()
        self.app.add_routes([
            web.post(BASE + "{endpoint}", self._api),
            web.get(BASE + "{endpoint}", self._api, allow_head=False),  # [seen] clients GET
            web.get("/download/{token:.+}", self._file, allow_head=False),
            web.get("/download-staging/{token:.+}", self._file, allow_head=False)])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE}"

    def add(self, scene: M2MScene) -> M2MScene:
        sp = spec(scene.dataset)
        self.scenes[scene.entity_id] = scene
        self._items[(scene.entity_id, sp.bundle[0])] = _Item(
            scene, scene.entity_id, scene.display_id, sp.bundle, scene.filename or "",
            scene.data, True)
        for band in sp.bands if sp.band_option else ():
            entity = sp.band_entity.format(kind=band[:2], display=scene.display_id, band=band)
            product = (_hexid(entity), *(sp.band_option or ("", "", ""))[1:])
            display = f"{scene.display_id}_{band}.TIF"
            self._items[(entity, product[0])] = _Item(
                scene, entity, display, product, display, display.encode() * 50, False)
        return scene

    async def start(self) -> M2MEmulator:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def expire_api_keys(self) -> None:
        """Every API key issued so far answers AUTH_EXPIRED from now on."""
        for session in self._keys.values():
            session.expires = 0.0

    def expire_urls(self) -> None:
        """Every download URL handed out so far is expired now."""
        self._urls = {t: (dl, 0.0, staging) for t, (dl, _, staging) in self._urls.items()}

    # ------------------------------------------------------------------ the JSON API

    def _reply(self, entry: dict[str, Any], data: Any, session: _Session | None,
               err: ApiError | None = None) -> web.Response:
        entry.update(status=err.status if err else 200, error=err.code if err else None)
        if err and err.code == "AUTH_EXPIRED":  # [seen] kapadia/usgs #59: no ids, version null
            return web.json_response({"errorCode": err.code, "errorMessage": err.message,
                                      "data": None, "requestId": 0, "sessionId": None,
                                      "version": None}, status=err.status)
        self._request_id = next(self._request_ids)
        return web.json_response({  # [fix] key order
            "requestId": self._request_id, "version": "stable",
            "sessionId": session.id if session else None, "data": data,
            "errorCode": err.code if err else None, "errorMessage": err.message if err else None},
            status=err.status if err else 200)

    async def _api(self, request: web.Request) -> web.Response:
        endpoint, key = request.match_info["endpoint"], request.headers.get("X-Auth-Token")
        entry: dict[str, Any] = {"endpoint": endpoint, "method": request.method, "api_key": key,
                                 "body": None, "t": time.monotonic()}
        self.requests.append(entry)
        session: _Session | None = None
        try:
            raw = await request.read()
            try:  # `null` too: landsatxplore's logout sends json.dumps(None)
                body = json.loads(raw) if raw.strip() else None
            except ValueError:
                raise ApiError("INPUT_FORMAT") from None
            if not isinstance(body, dict | None):
                raise ApiError("INPUT_FORMAT")
            body = body or {}
            entry["body"] = {k: v for k, v in body.items() if k not in SECRETS}
            if endpoint == "login-token":
                if key:  # [seen] kapadia/usgs #68: a stale key sent along makes login fail
                    self._session(key)
                session = self._login(request.method, body)
                return self._reply(entry, session.key, session)
            if endpoint not in self._handlers:  # `login` too, since Feb 2025 [seen]
                raise ApiError("NOT_FOUND", status=404)  # guess: the HTTP status
            session = self._session(key)
            return self._reply(entry, await self._run(session, endpoint, body), session)
        except ApiError as err:
            return self._reply(entry, None, session, err)

    def _session(self, key: str | None) -> _Session:
        """[doc] a key lives two hours, "restarted after each subsequent request"."""
        if not key:
            raise ApiError("AUTH_UNAUTHROIZED")  # guess: which code a missing key gets
        session = self._keys.get(key)
        if session is None or not session.open:
            raise ApiError("AUTH_KEY_INVALID")
        if session.expires <= time.monotonic():
            raise ApiError("AUTH_EXPIRED")
        session.expires = time.monotonic() + self.api_key_lifetime
        return session

    def _login(self, method: str, body: dict[str, Any]) -> _Session:
        if method != "POST":  # [doc] "requires an HTTP POST request"; the answer: guess
            raise ApiError("INPUT_PARAMETER_INVALID", "login-token requires an HTTP POST")
        user, token = body.get("username"), body.get("token")
        if not isinstance(user, str) or not isinstance(token, str):
            raise ApiError("INPUT_PARAMETER_INVALID", "username and token are required")
        if self.users.get(user) != token:
            raise ApiError("AUTH_INVALID")
        if user in self.no_role:  # [seen] no approved M2M role; at login: guess
            raise ApiError("UNAUTHORIZED_USER")
        key = "".join(secrets.choice(KEY_CHARS) for _ in range(16))
        self._keys[key] = session = _Session(next(self._session_ids), user, key,
                                             time.monotonic() + self.api_key_lifetime)
        self.logins.append(user)
        return session

    async def _run(self, session: _Session, endpoint: str, body: dict[str, Any]) -> Any:
        cap = self.max_concurrent_requests
        if cap is not None and self._inflight[session.user] >= cap:
            raise ApiError("RATE_LIMIT")
        self._inflight[session.user] += 1
        try:
            if self.api_delay:
                await asyncio.sleep(self.api_delay)
            return self._handlers[endpoint](session, body)
        finally:
            self._inflight[session.user] -= 1

    def _logout(self, session: _Session, body: dict[str, Any]) -> None:
        session.open = False  # [doc] no data value
        self.logouts.append(session.user)

    def _dataset(self, body: dict[str, Any]) -> str:
        name = body.get("datasetName")  # case-insensitive [seen] usgsxplore
        known = set(SPECS) | {sc.dataset for sc in self.scenes.values()}
        if not isinstance(name, str) or name.lower() not in known:
            raise ApiError("DATASET_INVALID")
        return name.lower()

    def _scene_search(self, session: _Session, body: dict[str, Any]) -> dict[str, Any]:
        dataset = self._dataset(body)
        size = min(_int(body, "maxResults", 100), self.max_results_cap or 50000)  # [doc] 50,000
        start = _int(body, "startingNumber", 1)
        preds = _compile(body.get("sceneFilter") or {})
        hits = [sc for sc in self.scenes.values()
                if sc.dataset == dataset and all(p(sc) for p in preds)]
        descending = str(body.get("sortDirection") or "DESC").upper() != "ASC"  # guess: default
        hits.sort(key=lambda sc: (sc.acquired, sc.entity_id), reverse=descending)
        page = hits[start - 1:start - 1 + size]
        return {"results": [self._result(sc, body.get("metadataType")) for sc in page],
                "recordsReturned": len(page), "totalHits": len(hits),
                "totalHitsAccuracy": "exact" if body.get("sceneFilter") else "approximate",
                "isCustomized": False, "numExcluded": 0, "startingNumber": start,
                # [doc] 1 + 100 -> 101; [fix] the last page (1 of 1) says 1: the next record,
                # capped at totalHits (so a page ending one short of the end looks final too)
                "nextRecord": min(start + len(page), len(hits))}

    def _result(self, sc: M2MScene, metadata_type: Any) -> dict[str, Any]:
        w, s, e, n = sc.bounds
        day, ring = sc.acquired.strftime("%Y-%m-%d 00:00:00"), [[w, s], [w, n], [e, n], [e, s]]
        browse = f"https://landsatlook.usgs.gov/gen-browse?size={{}}&product_id={sc.display_id}"
        meta = [{"id": "5e83d1507bc900d5", "fieldName": "Landsat Product Identifier L2",
                 "dictionaryLink": None, "value": sc.display_id}]  # [doc] (one field only)
        return {  # [fix] fields and formats: cloudCover a string, dates without a zone
            "browse": [{"id": _hexid(sc.entity_id + "/browse"), "browseRotationEnabled": False,
                        "browseName": "Reflective Browse", "browsePath": browse.format("rrb"),
                        "overlayPath": None, "overlayType": "ls_chs",
                        "thumbnailPath": browse.format("thumb")}],
            "cloudCover": None if sc.cloud is None else f"{sc.cloud:.2f}", "entityId": sc.entity_id,
            "displayId": sc.display_id, "orderingId": None, "hasCustomizedMetadata": False,
            "metadata": meta if metadata_type in ("summary", "full") else [],
            "options": {"bulk": True, "download": True, "order": True, "secondary": False},
            "selected": {"bulk": False, "compare": False, "order": False},
            "spatialBounds": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
            "spatialCoverage": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
            "temporalCoverage": {"endDate": day, "startDate": day},
            "publishDate": (sc.published or sc.acquired).strftime("%Y-%m-%d %H:%M:%S")}

    def _option(self, item: _Item, dataset_id: str, available: bool, system: str,
                size: int | None = None) -> dict[str, Any]:
        pid, code, name = item.product
        return {"id": pid, "displayId": item.display_id, "entityId": item.entity_id,
                "datasetId": dataset_id, "available": available,
                "filesize": len(item.data) if size is None else size, "productName": name,
                "productCode": code, "bulkAvailable": available, "downloadSystem": system,
                "secondaryDownloads": []}  # [fix] and [doc]

    def _download_options(self, session: _Session, body: dict[str, Any]) -> Any:
        dataset, ids = self._dataset(body), body.get("entityIds") or []
        if isinstance(ids, str):  # [doc] a comma-separated string works too
            ids = [i for i in ids.split(",") if i]
        if not isinstance(ids, list):
            raise ApiError("INPUT_PARAMETER_INVALID", "entityIds")
        out = []
        for sc in (self.scenes.get(str(i)) for i in ids):  # unknown ids: left out (guess)
            if sc is None or sc.dataset != dataset:
                continue
            sp = spec(sc.dataset)
            out.append(self._option(self._items[(sc.entity_id, sp.bundle[0])], sp.dataset_id,
                                    sc.available, "dds"))
            if sp.band_option:
                folder = _Item(sc, sc.entity_id, sc.display_id, sp.band_option, "", b"", False)
                opt = self._option(folder, sp.dataset_id, sc.available, "folder", 0)  # [doc]
                for i, band in enumerate(sp.bands):
                    entity = sp.band_entity.format(kind=band[:2], display=sc.display_id,
                                                   band=band)
                    item = self._items[(entity, _hexid(entity))]
                    opt["secondaryDownloads"].append({
                        **self._option(item, sp.band_dataset_id, True, "dds"),
                        "fileGroups": [f"{dataset}_band"], "displayOrder": i + 1})
                out.append(opt)
        return out or None  # guess from usgsxplore: null when nothing is found

    def _counts(self, user: str) -> tuple[int, int, int]:
        now, mine = time.monotonic(), [d for d in self._downloads if d.user == user]
        return (sum(d.requested > now - 900 for d in mine),
                sum(d.ready > now and not d.completed for d in mine),
                sum(d.ready <= now and not (d.attempted or d.completed) for d in mine))

    def _remaining(self, user: str) -> list[dict[str, Any]]:
        names = ("recentDownloadCount", "pendingDownloadCount", "unattemptedDownloadCount")
        left = {k: lim - c for k, lim, c in zip(names, self.rate_limits, self._counts(user),
                                                  strict=True)}
        return [{"username": user, "limitType": "user", **left},  # [doc]
                {"ipAddress": "127.0.0.1", "limitType": "ip", **left}]

    def _pending(self, user: str, item: _Item) -> _Download | None:
        return next((d for d in self._downloads if d.user == user and d.item is item
                     and not d.completed), None)

    def _hand_out(self, dl: _Download, staging: bool) -> str:
        """A fresh URL; [doc]/[fix] shape, base64 of {"id","contactId"}; expiry: guess."""
        payload = {"id": next(self._url_ids), "contactId": 676404 + len(dl.user)}
        token = base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()
        self._urls[token] = (dl, time.monotonic() + self.url_lifetime, staging)
        return f"http://127.0.0.1:{self.port}/download{'-staging' if staging else ''}/{token}"

    def _download_request(self, session: _Session, body: dict[str, Any]) -> dict[str, Any]:
        downloads, label = body.get("downloads") or [], body.get("label")
        if not isinstance(downloads, list) or not all(isinstance(d, dict) for d in downloads):
            raise ApiError("INPUT_PARAMETER_INVALID", "downloads")
        if label is not None and (not isinstance(label, str) or len(label) > 50):
            raise ApiError("INPUT_PARAMETER_INVALID", "label is limited to 50 characters")
        self.download_requests.append({"user": session.user, "label": label,
                                       "downloads": downloads, "t": time.monotonic()})
        items = [self._items.get((str(d.get("entityId")), str(d.get("productId"))))
                 for d in downloads]
        fresh = sum(i is not None and self._pending(session.user, i) is None for i in items)
        (recent, pending, unattempted), limit = self._counts(session.user), self.rate_limits
        if recent + fresh > limit[0] or pending >= limit[1] or unattempted >= limit[2]:
            raise ApiError("RATE_LIMIT_USER_DL")
        default = f"m2m_{self._request_id + 1}_{datetime.now(UTC):%Y%m%d%H%M%S}"  # [fix]
        new, dup, now = dict[str, str](), dict[str, str](), time.monotonic()
        ready, preparing, failed = Log(), Log(), Log()
        for d, item in zip(downloads, items, strict=True):
            if item is None or (item.bundle and not item.scene.available):
                failed.append({"entityId": d.get("entityId"), "productId": d.get("productId"),
                               "errorMessage": "Invalid scene or product"})  # guess: shape
                continue
            dl = self._pending(session.user, item)
            if dl is not None:  # [doc] not queued again; keyed by downloadId like newRecords
                dup[str(dl.id)] = dl.label
            else:
                dl = _Download(next(self._download_ids), session.user, item,
                               label or d.get("label") or default, now,
                               now + (item.scene.prepare_time if item.bundle else 0.0))
                self._downloads.append(dl)
                new[str(dl.id)] = dl.label  # [fix] downloadId -> label
            staging = dl.ready > now
            (preparing if staging else ready).append({
                "downloadId": dl.id, "eulaCode": None, "url": self._hand_out(dl, staging),
                "entityId": item.entity_id})
        return {"availableDownloads": ready, "duplicateProducts": dup or [],
                "preparingDownloads": preparing, "failed": failed,
                "newRecords": new or [],  # an empty PHP array is [] in JSON (guess for these)
                "numInvalidScenes": len(failed), "remainingLimits": self._remaining(session.user)}

    def _download_retrieve(self, session: _Session, body: dict[str, Any]) -> dict[str, Any]:
        """[doc] "all available and previously requests but not completed downloads"."""
        label, now = body.get("label"), time.monotonic()
        mine = [d for d in self._downloads if d.user == session.user and not d.completed
                and (label is None or d.label == label)]

        def record(dl: _Download, ok: bool) -> dict[str, Any]:  # [doc]; "R": guess
            (_, code, name), sp = dl.item.product, spec(dl.item.scene.dataset)
            return {"url": self._hand_out(dl, not ok), "label": dl.label,
                    "entityId": dl.item.entity_id, "eulaCode": None, "filesize": len(dl.item.data),
                    "datasetId": sp.dataset_id, "displayId": dl.item.display_id,
                    "downloadId": dl.id, "statusCode": "A" if ok else "R",
                    "statusText": "Available" if ok else "Requested", "productCode": code,
                    "productName": name, "collectionName": sp.collection}
        available = [record(d, True) for d in mine if d.ready <= now]
        requested = [record(d, False) for d in mine if d.ready > now]
        # queueSize: those not yet available (as clients read it; the [doc] sample is unclear)
        return {"available": available, "eulas": [], "queueSize": len(requested),
                "requested": requested}

    # ------------------------------------------------------------------ the file host

    async def _file(self, request: web.Request) -> web.StreamResponse:
        staging = request.path.startswith("/download-staging/")
        entry: dict[str, Any] = {"path": request.path, "range": request.headers.get("Range"),
                                 "if_range": request.headers.get("If-Range"), "status": None,
                                 "entity_id": None, "download_id": None, "t": time.monotonic()}
        self.file_gets.append(entry)
        found = self._urls.get(request.match_info["token"])
        if found is None or found[2] != staging:
            return self._plain(entry, 404, "Not Found")  # guess
        dl, expiry, _ = found
        entry.update(entity_id=dl.item.entity_id, download_id=dl.id)
        if expiry <= time.monotonic():
            return self._plain(entry, 403, "Forbidden: download link has expired")  # guess
        if dl.ready > time.monotonic():  # a staging URL before it is ready: guess
            return self._plain(entry, 503, "Download is being prepared", {"Retry-After": "30"})
        dl.attempted = True
        self.active_file_gets += 1
        self.peak_file_gets = max(self.peak_file_gets, self.active_file_gets)
        try:
            return await self._send(request, entry, dl)
        finally:
            self.active_file_gets -= 1

    @staticmethod
    def _plain(entry: dict[str, Any], status: int, text: str,
               headers: dict[str, str] | None = None) -> web.Response:
        entry["status"] = status
        return web.Response(status=status, text=text, headers=headers)

    async def _send(self, request: web.Request, entry: dict[str, Any],
                    dl: _Download) -> web.StreamResponse:
        item = dl.item
        data, size, start, partial = item.data, len(item.data), 0, False
        etag = '"' + hashlib.md5(data).hexdigest() + '"'  # guess: what dds sends
        modified = (item.scene.published or item.scene.acquired).strftime(
            "%a, %d %b %Y %H:%M:%S GMT")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", "").strip())
        end = size
        if m and request.headers.get("If-Range") in (None, etag, modified) and \
                (not m[2] or int(m[2]) >= int(m[1])):
            if int(m[1]) >= size:
                return self._plain(entry, 416, "", {"Content-Range": f"bytes */{size}"})
            start, end, partial = int(m[1]), min(size, int(m[2] or size) + 1), True
        name = re.sub(r'[\x00-\x1f\x7f"\\]', "_", item.filename)  # a legal header, no more
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "ETag": etag, "Last-Modified": modified,
                   "Content-Disposition": f'attachment; filename="{name}"'}
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        entry["status"] = response.status
        faults = item.bundle and item.scene
        stop = min(end, start + faults.drop_after.pop(0)) if faults and faults.drop_after else end
        rate = faults.rate if faults else None
        pos, began = start, time.monotonic()
        chunk = min(self.chunk, max(1024, int(rate / 20))) if rate else self.chunk
        while pos < stop:
            n = min(chunk, stop - pos)
            await response.write(data[pos:pos + n])
            pos, self.bytes_sent = pos + n, self.bytes_sent + n
            dl.completed = dl.completed or pos == size  # served to the end: statusCode C
            if rate and (pos - start) / rate > time.monotonic() - began:
                await asyncio.sleep((pos - start) / rate - (time.monotonic() - began))
        if stop < end:  # drop_after: let the client read what was sent, then cut
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        await response.write_eof()
        return response
