"""Checksum algorithms: parsing `ALGO:HEX` and making hashers."""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

from asyncsat.errors import TransferError, UsageError
from asyncsat.models import Checksum

_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128, "sha3_256": 64, "blake3": 64}
_ALIASES = {"sha-1": "sha1", "sha-256": "sha256", "sha-512": "sha512", "sha3-256": "sha3_256"}


class Hasher(Protocol):
    def update(self, data: bytes, /) -> object: ...
    def hexdigest(self) -> str: ...


def normalize_algo(algo: str) -> str:
    a = algo.strip().lower()
    return _ALIASES.get(a, a)


def parse(text: str) -> Checksum:
    """`md5:9e10...` -> Checksum; UsageError on anything else."""
    algo, sep, value = text.partition(":")
    algo, value = normalize_algo(algo), value.strip().lower()
    if not sep or algo not in _LENGTHS:
        raise UsageError(
            f"invalid checksum {text!r}: use ALGO:HEX with ALGO one of {', '.join(_LENGTHS)}"
        )
    if not re.fullmatch(rf"[0-9a-f]{{{_LENGTHS[algo]}}}", value):
        raise UsageError(f"invalid checksum {text!r}: {algo} needs {_LENGTHS[algo]} hex digits")
    new_hasher(algo)  # fails early when blake3 is not installed
    return Checksum(algo, value)


def well_formed(checksum: Checksum) -> bool:
    """False for a digest that no hasher of its algorithm can give (a catalog's MD5 of 40
    digits, or not hex): it could only fail the file, after the whole of it was fetched."""
    length = _LENGTHS.get(normalize_algo(checksum.algo))
    return length is None or re.fullmatch(rf"[0-9a-f]{{{length}}}", checksum.value) is not None


def new_hasher(algo: str) -> Hasher:
    """A hasher for `algo`: the ones `parse` takes, or any other of hashlib's that a row
    inserted with psql may name (`sha384`); TransferError (permanent) for one that no
    library here knows, or whose digest has no length of its own (`shake_128`)."""
    algo = normalize_algo(algo)
    if algo == "blake3":
        from blake3 import blake3

        hasher: Hasher = blake3(max_threads=1)
        return hasher
    if not algo.startswith("shake_"):
        try:
            return hashlib.new(algo)
        except ValueError:
            pass
    raise TransferError(f"unknown checksum algorithm {algo!r}: use one of "
                        f"{', '.join(_LENGTHS)} (or another of hashlib's)")
