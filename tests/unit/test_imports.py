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



def _started_warmup(*argv: str) -> bool:
    """Whether `asyncsat ARGV` starts importing the HTTP client in a thread (the command is
    stopped at its dispatch: nothing else runs)."""
    code = (
        "import sys, threading\n"
        "from asyncsat import cli\n"
        "async def stop(*_a):\n"
        "    return 0\n"
        "cli._dispatch = stop\n"
        f"cli.main({list(argv)!r})\n"
        "print(any(t.name == 'asyncsat-imports' for t in threading.enumerate())\n"
        "      or 'aiohttp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[-1] == "True"


def test_a_command_that_runs_transfers_imports_the_http_client_from_its_start() -> None:
    """`get --wait` and `run` import aiohttp (about 100 ms, 40 of them in OpenSSL without
    the GIL) in a thread beside their own imports and first database round trips."""
    assert _started_warmup("get", "http://127.0.0.1:9/a", "--wait")
    assert _started_warmup("run")
    assert not _started_warmup("get", "http://127.0.0.1:9/a")
    assert not _started_warmup("status")


def test_the_main_threads_import_waits_for_the_threads_and_gets_the_whole_module() -> None:
    code = (
        "from asyncsat import warmup\n"
        "warmup.start()\n"
        "from aiohttp import ClientSession, TCPConnector\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["ok"]
