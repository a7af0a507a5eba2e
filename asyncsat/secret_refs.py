"""A credential's secret by reference (`env:NAME`, `file:PATH`): kept out of the database,
read by each daemon where it runs (a systemd credential, a container secret)."""

from __future__ import annotations

import os
from pathlib import Path

from asyncsat.errors import AsyncsatError, UsageError

KINDS = ("env", "file")


def check(ref: str) -> str:
    """`ref` when it is `env:NAME` or `file:PATH`, else UsageError (nothing is read: the
    daemon reads it where it runs, perhaps as another user, on another host)."""
    kind, sep, rest = ref.partition(":")
    if not sep or kind not in KINDS or not rest.strip():
        raise UsageError(f"invalid --password-ref {ref!r}: use env:NAME or file:PATH")
    if kind == "file" and not Path(os.path.expandvars(rest)).is_absolute() \
            and not rest.startswith("$"):
        raise UsageError(f"invalid --password-ref {ref!r}: the file's path must be absolute")
    return ref


def read(ref: str) -> str:
    """The secret `ref` names, read now (`file:` paths may hold environment variables, such
    as systemd's `$CREDENTIALS_DIRECTORY`): its first line; AsyncsatError saying why not."""
    kind, _, rest = ref.partition(":")
    if kind == "env":
        value = os.environ.get(rest)
        if not value:
            raise AsyncsatError(f"the environment variable {rest} is not set or empty")
        return value
    if kind == "file":
        path = Path(os.path.expandvars(rest))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise AsyncsatError(f"cannot read {path}: {why}") from None
        line = text.splitlines()[0] if text else ""
        if not line:
            raise AsyncsatError(f"{path} has no secret on its first line")
        return line
    raise AsyncsatError(f"unknown secret reference {kind}:")
