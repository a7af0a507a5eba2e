"""Names and URLs: product names from URLs and headers, sanitised; login split from URLs."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from email.message import Message
from pathlib import PurePath
from urllib.parse import unquote, urlsplit, urlunsplit

from asyncsat.errors import UsageError

SCHEMES = ("http", "https", "ftp", "ftps")
_SPACE = re.compile(r"\s")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")
MAX_NAME = 200


def sanitize(name: str) -> str:
    """A file name that cannot escape its folder, or "" if nothing usable is left."""
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip(" .")
    if name in ("", ".", ".."):
        return ""
    if name.lower().endswith(".part"):  # never the in-flight file of another product
        name += "_"
    if len(name.encode()) > MAX_NAME:
        _stem, dot, ext = name.rpartition(".")
        keep = ext if dot and len(ext) <= 16 else ""
        name = name.encode()[: MAX_NAME - len(keep) - 1].decode(errors="ignore") + (
            "." + keep if keep else "")
    return name


def unique_name(name: str, download_id: int) -> str:
    """`TCI.tif` -> `TCI_17.tif`: for a product whose name another download owns, or a
    file the daemon did not write has."""
    path = PurePath(name)
    return f"{path.stem}_{download_id}{path.suffix}"


def name_from_url(url: str) -> str:
    """The percent-decoded last segment of the URL path, sanitised."""
    path = urlsplit(url).path
    return sanitize(unquote(path.rstrip("/").rsplit("/", 1)[-1]))


def name_from_content_disposition(header: str | None) -> str:
    """The file name a Content-Disposition header gives (RFC 6266, filename* first)."""
    if not header:
        return ""
    msg = Message()
    msg["content-disposition"] = header
    filename = msg.get_filename()
    return sanitize(filename) if filename else ""


@dataclass(frozen=True)
class SplitUrl:
    """A URL without its userinfo, and the login it carried."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)


def split_login(raw: str | None) -> SplitUrl:
    """Validate a download URL and take the user and password out of it."""
    if not isinstance(raw, str) or not raw.strip():
        raise UsageError("empty URL")
    try:
        parts = urlsplit(raw.strip())
        port = parts.port  # raises on a bad port
    except ValueError:
        # not the library's text: it quotes the bad port, which may be part of a password
        # holding an unencoded `#` or `/`
        raise UsageError(f"malformed URL {without_login(raw)!r}: bad host or port "
                         "(percent-encode '@', '#', '/' and ':' in a login)") from None
    if parts.scheme.lower() not in SCHEMES:
        schemes = ", ".join(SCHEMES)
        raise UsageError(
            f"unsupported URL {without_login(raw)!r}: the scheme must be one of {schemes}"
        )
    if not parts.hostname:
        raise UsageError(f"malformed URL {without_login(raw)!r}: no host")
    if _SPACE.search(raw.strip()):
        raise UsageError(f"malformed URL {without_login(raw)!r}: it contains spaces")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    clean = urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return SplitUrl(clean, user, password)


def ftp_path(url: str) -> str:
    """The percent-decoded path of an FTP URL; a `?` belongs to it (FTP has no query)."""
    parts = urlsplit(url)
    return unquote(parts.path + (f"?{parts.query}" if parts.query else ""))


def implicit_provider_name(url: str) -> str:
    """The name of the provider made for a URL's host: `host` or `host_port`."""
    parts = urlsplit(url)
    name = (parts.hostname or "unknown").strip("[]").replace(":", "_")
    if parts.port is not None:
        name += f"_{parts.port}"
    # a provider name starts with a letter or digit: `[::1]:8080` -> `1_8080`
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "host"
    return name[:100]


def without_login(raw: str) -> str:
    """The URL with any userinfo removed (for messages and the rows that keep it).

    Up to the last `@` before the path: a password may hold an unencoded `@` or `#`.
    """
    return re.sub(r"//[^/\s]*@", "//", raw)
