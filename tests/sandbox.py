"""Run a command under the seccomp filters a systemd unit file asks for, as systemd would.

    python tests/sandbox.py UNIT_FILE -- COMMAND [ARG ...]

Reads SystemCallFilter= (its @groups expanded by `systemd-analyze syscall-filter`, @default
always allowed), SystemCallErrorNumber=, RestrictAddressFamilies=, MemoryDenyWriteExecute=,
RestrictNamespaces=yes and RestrictSUIDSGID= from the unit, loads the filters with
libseccomp (no new privileges), then execs the command. No root needed, nothing started by
systemd: the tests use it to run the daemon and its embedded PostgreSQL under the unit's
system call rules. The mount and /proc options of the unit are not reproduced here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

ALLOW = 0x7FFF0000
EQ, MASKED_EQ = 4, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
S_ISUID, S_ISGID = 0o4000, 0o2000
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                   0x40000000, 0x00000080)  # CLONE_NEWNS, NEWCGROUP, UTS, IPC, USER, PID, NET, TIME


class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def _errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _service_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _groups() -> dict[str, list[str]]:
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                             text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = ""
    for raw in listing.splitlines():
        line = raw.strip()
        if raw.startswith("@"):
            current = line
            groups[current] = []
        elif line and not line.startswith("#") and current:
            groups[current].append(line)
    return groups


def _expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= _expand(groups[name], groups) if name.startswith("@") else {name}
    return found


def _yes(settings: dict[str, list[str]], key: str) -> bool:
    return settings.get(key, ["no"])[-1] in ("yes", "true", "1", "on")


class _Filter:
    def __init__(self, lib: ctypes.CDLL, default: int) -> None:
        self.lib = lib
        self.ctx = lib.seccomp_init(default)

    def rule(self, action: int, name: str, *cmps: _Cmp) -> None:
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a system call of this architecture
            return
        array = (_Cmp * max(1, len(cmps)))(*cmps)
        code = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(cmps), array)
        if code < 0:
            raise OSError(-code, f"seccomp rule for {name}")

    def load(self) -> None:
        code = self.lib.seccomp_load(self.ctx)
        if code < 0:
            raise OSError(-code, "seccomp_load")


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def _system_call_filter(lib: ctypes.CDLL, settings: dict[str, list[str]]) -> _Filter | None:
    """SystemCallFilter= (an allow-list, then ~removals) and SystemCallErrorNumber=."""
    groups = _groups()
    allowed: set[str] | None = None
    for value in settings.get("SystemCallFilter", []):
        names = _expand(value.removeprefix("~").split(), groups)
        if allowed is None:
            assert not value.startswith("~"), "only allow-lists are reproduced"
            allowed = names | _expand(["@default"], groups)
        elif value.startswith("~"):
            allowed -= names
        else:
            allowed |= names
    if allowed is None:
        return None
    code = getattr(errno, settings.get("SystemCallErrorNumber", ["EPERM"])[-1])
    calls = _Filter(lib, _errno(code))
    for name in sorted(allowed):
        calls.rule(ALLOW, name)
    return calls


def _restrictions(lib: ctypes.CDLL, settings: dict[str, list[str]]) -> _Filter:
    """RestrictAddressFamilies=, MemoryDenyWriteExecute=, RestrictNamespaces=yes and
    RestrictSUIDSGID=, as systemd's own filters word them."""
    rules = _Filter(lib, ALLOW)
    families = settings.get("RestrictAddressFamilies", [""])[-1].split()
    if families:
        kept = {int(getattr(socket, family)) for family in families}
        for family in set(range(64)) - kept:
            rules.rule(_errno(errno.EAFNOSUPPORT), "socket", _Cmp(0, EQ, family, 0))
    if _yes(settings, "MemoryDenyWriteExecute"):
        both = PROT_WRITE | PROT_EXEC
        rules.rule(_errno(errno.EPERM), "mmap", _Cmp(2, MASKED_EQ, both, both))
        for name in ("mprotect", "pkey_mprotect"):
            rules.rule(_errno(errno.EPERM), name, _Cmp(2, MASKED_EQ, PROT_EXEC, PROT_EXEC))
        rules.rule(_errno(errno.EPERM), "shmat", _Cmp(2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
    if _yes(settings, "RestrictNamespaces"):
        rules.rule(_errno(errno.ENOSYS), "clone3")  # flags out of reach: glibc falls back
        rules.rule(_errno(errno.EPERM), "setns")
        for flag in NAMESPACE_FLAGS:
            for name in ("clone", "unshare"):
                rules.rule(_errno(errno.EPERM), name, _Cmp(0, MASKED_EQ, flag, flag))
    if _yes(settings, "RestrictSUIDSGID"):
        for bit in (S_ISUID, S_ISGID):
            for name, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2)):
                rules.rule(_errno(errno.EPERM), name, _Cmp(arg, MASKED_EQ, bit, bit))
    return rules


def main(argv: list[str]) -> None:
    unit, separator, *command = argv
    assert separator == "--" and command, __doc__
    settings = _service_settings(Path(unit))
    lib = _library()
    calls = _system_call_filter(lib, settings)
    for loaded in (_restrictions(lib, settings), *([calls] if calls else [])):
        loaded.load()  # libseccomp sets no_new_privs first
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
