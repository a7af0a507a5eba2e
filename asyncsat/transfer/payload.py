"""Judge a payload by its content: an error page or a broken archive is never a product."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from asyncsat.errors import PayloadError

# extensions of binary products: a text document in their place is an error page
_BINARY = frozenset({
    ".zip", ".nc", ".nc4", ".h5", ".hdf", ".he5", ".tif", ".tiff", ".jp2", ".gz", ".tgz",
    ".tar", ".grib", ".grib2", ".grb", ".grb2", ".safe", ".sen3", ".7z", ".bz2", ".xz",
    ".img", ".dat", ".bin",
})
_TEXTUAL_ERROR_STARTS = (b"<", b"{", b"[")
# an XML document whose root element is `error`, in any namespace (OData v2/v4, S3, DHuS)
_XML_ERROR_ROOT = re.compile(rb"^(?:<\?xml[^>]*\?>\s*)?(?:<!--.*?-->\s*)*<(?:[\w.-]+:)?error[\s>/]",
                             re.S | re.I)
_XML_MESSAGE = re.compile(rb"<(?:[\w.-]+:)?message[^>]*>([^<]+)<", re.I)


_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
"""A zip's first record (a file, an empty archive's end, a split archive's marker): "PK"
alone begins one file in 65,536 of any binary format."""
HEAD = 512
"""Bytes of a file's start that the checks look at."""


def check(path: Path, name: str, head: bytes | None = None) -> None:
    """Raise PayloadError unless the file at `path` can be the product `name`. Blocking.

    The content decides: an HTML page is never a product, a zip must have a readable
    central directory, and a text document in place of a binary product is an error
    document. The name only says whether a binary product is expected. `head`: the file's
    first `HEAD` bytes (or all of a shorter one) when the caller has them, else read.
    """
    if head is None:
        with path.open("rb") as f:
            head = f.read(HEAD)
    suffix = Path(name).suffix.lower()
    if not head and suffix in _BINARY:
        raise PayloadError(f"the server sent an empty file instead of a {suffix} product")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lowered = text[:200].lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered[:100]:
        raise PayloadError("the server sent an HTML page instead of the product")
    if _XML_ERROR_ROOT.match(text):
        message = _XML_MESSAGE.search(text)
        detail = _snippet(message.group(1)) if message else _snippet(text)
        raise PayloadError(f"the server sent an error document: {detail}")
    if head.startswith(_ZIP_SIGNATURES):
        _check_zip(path)
        return
    if suffix in _BINARY and text.startswith(_TEXTUAL_ERROR_STARTS) and _is_text(head):
        raise PayloadError(
            f"the server sent a text document instead of a {suffix} product: {_snippet(text)}"
        )


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise PayloadError(f"the zip archive is broken: {exc}") from None


def _is_text(head: bytes) -> bool:
    """Printable UTF-8 without NUL bytes (the last bytes may be a cut character)."""
    if b"\x00" in head:
        return False
    try:
        head[:-4].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _snippet(text: bytes) -> str:
    return " ".join(text[:160].decode("utf-8", "replace").split())
