"""A daemon row's process is judged alive only while it really runs (same-host takeover)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from asyncsat.daemon import machine, process_alive


def test_a_killed_process_nobody_reaped_is_dead() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert process_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        time.sleep(0.2)  # a zombie now: killed, not yet reaped by its parent (us)
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert not process_alive(child.pid)  # reaped: gone


def test_this_process_is_an_earlier_life_and_machine_names_boot_and_namespace() -> None:
    assert not process_alive(os.getpid())  # a row with our own pid is a previous life
    boot, _, space = machine().partition("/")
    assert len(boot) == 36 and space.isdigit()
