"""The CLI's commands start without the daemon's HTTP client and engine (0.22 -> 0.14 s for
`asyncsat status`): only a command that runs the daemon imports them."""

from __future__ import annotations

import subprocess
import sys


def _loaded(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_the_commands_import_no_http_client_and_no_engine() -> None:
    loaded = _loaded("asyncsat.commands")
    assert "asyncsat.daemon" in loaded  # (what they use of it: connections, waits)
    assert not {"aiohttp", "asyncsat.engine", "asyncsat.transfer.http"} & loaded

