"""`get --dest` refuses a file in the folder's way, and leaves to the daemon what this user
cannot see: the daemon may run as another user, who may write there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncsat import commands


def test_a_dest_this_user_cannot_look_into_is_left_to_the_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder under one this user may not enter (`/srv/asyncsat/data`, 0700, the
    daemon's user's): `exists()` raises PermissionError there. It ended `get` with exit 1
    ('PermissionError: ...'); the daemon, which may write there, decides."""
    locked = tmp_path / "daemons-own"
    real_exists = Path.exists

    def exists(self: Path, *args: Any, **kwargs: Any) -> bool:
        if self != locked and locked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)

    locked.mkdir()
    monkeypatch.setattr(Path, "exists", exists)
    dest = locked / "s2" / "l1c"
    assert commands._dest(str(dest), None) == dest  # type: ignore[arg-type]
