"""The `asyncsat` program's exit (`cli.run`): the interpreter's teardown is skipped, but not
the exit code, the output, or the atexit handlers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_PROGRAM = """
import atexit, sys
import asyncsat.cli as cli
atexit.register(lambda: print("atexit ran", file=sys.stderr))
cli.main = lambda: (print("done"), {code})[1]  # held in the buffer until the exit
cli.run()
"""


def _run(code: int, stdout: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (buffered)
    return subprocess.run([sys.executable, "-c", _PROGRAM.format(code=code)], env=env,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60)


def test_the_output_and_the_exit_code_are_kept(tmp_path: Path) -> None:
    with (tmp_path / "out").open("w") as out:
        ran = _run(3, out)
    assert ran.returncode == 3
    assert (tmp_path / "out").read_text() == "done\n"
    assert "atexit ran" in ran.stderr


def test_output_that_cannot_be_written_is_no_success() -> None:
    with open("/dev/full", "w") as full:
        ran = _run(0, full)
    assert ran.returncode == 120  # as CPython's own exit when stdout cannot be flushed
    with open("/dev/full", "w") as full:
        assert _run(2, full).returncode == 2  # a failure keeps its own code
