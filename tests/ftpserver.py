"""Real FTP servers on loopback for tests: pyftpdlib in a thread, with faults to inject.

`FtpServer` serves files from a temporary folder (so SIZE and MDTM are the real ones) and
can, per file: drop the data connection after a number of bytes (closing it, resetting it,
or closing it while claiming success), cap the bandwidth, and publish a new version of the
file (content and mtime) when a drop happens. For the whole server: refuse REST, answer no
MDTM, cap the logged-in control connections per user (421 beyond the cap, the peak is
recorded), and scripted replies to any command (None: never answer it). It counts the bytes
it sends and records every command. More knobs for fault hunts: answer a command only after a
delay, serve a raw listing (any bytes) for a folder, acknowledge REST but send from byte 0,
and let a file grow while it is being sent.

`TlsFtpServer` is a small explicit-FTPS server on asyncio (AUTH TLS, PBSZ, PROT P, EPSV,
RETR): pyftpdlib's FTPS needs pyOpenSSL, this one only the ssl module and a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

with warnings.catch_warnings():  # pyftpdlib still imports asynchat and asyncore
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import DTPHandler, FTPHandler
    from pyftpdlib.ioloop import IOLoop
    from pyftpdlib.servers import FTPServer

# pyftpdlib warns about every refused connection (the tests check those themselves), and
# configures logging for the whole process unless its logger has a handler
_log = logging.getLogger("pyftpdlib")
_log.setLevel(logging.ERROR)
_log.addHandler(logging.NullHandler())

DEFAULT_MTIME = 1_700_000_000.0


@dataclass
class FtpFile:
    """One file on the server, and the faults to inject when it is sent."""

    name: str
    path: Path
    data: bytes
    mtime: float = DEFAULT_MTIME
    drop_after: list[int] = field(default_factory=list)
    """Per RETR, in order: send this many bytes, then drop the data connection."""
    drop_mode: str = "close"
    """"close": close it, reply 426; "reset": TCP reset, 426; "lie": close it, reply 226;
    "stall": keep it open and send nothing more."""
    rate: float | None = None
    """Bytes per second per data connection."""
    change_after_drop: bytes | None = None
    """After the next drop, the provider publishes this as a new version (new mtime too)."""
    grow: bytes | None = None
    """Appended to the file when its next transfer starts (after SIZE answered): the file is
    still being written by the provider while it is fetched."""
    sent: int = 0
    """Bytes of this file sent over data connections, all transfers together."""
    starts: list[int] = field(default_factory=list)
    """Where each transfer of this file started (0, or the REST offset)."""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def mdtm(self) -> str:
        return time.strftime("%Y%m%d%H%M%S", time.gmtime(self.mtime))

    def digest(self, algo: str = "md5") -> str:
        return hashlib.new(algo, self.data).hexdigest()


class FtpServer:
    """An FTP provider on 127.0.0.1; `start()` and `stop()` it (or use it as a context)."""

    def __init__(self, *, users: dict[str, str] | None = None, anonymous: bool | None = None,
                 max_per_user: int | None = None, refuse_rest: bool = False,
                 no_mdtm: bool = False) -> None:
        self.users = users or {}
        self.anonymous = not self.users if anonymous is None else anonymous
        self.max_per_user = max_per_user
        self.refuse_rest = refuse_rest
        self.no_mdtm = no_mdtm
        self.script: dict[str, list[str | None]] = {}
        self.delay: dict[str, float] = {}
        """Seconds the server waits before handling a command (`{"MLSD": 2.0}`)."""
        self.listings: dict[tuple[str, str], bytes] = {}
        """Raw data sent for (`LIST` or `MLSD`, folder relative to the root, "" for it)."""
        self.fake_rest = False
        """Reply 350 to REST but send every file from byte 0 (a server that lies)."""
        self.root = Path(tempfile.mkdtemp(prefix="asyncsat-ftp-"))
        self.files: dict[str, FtpFile] = {}
        self.commands: list[tuple[str, str, str]] = []  # (user, command, argument)
        self.active: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.logins: Counter[str] = Counter()
        self.over_limit = 0
        self.bytes_sent = 0
        self.port = 0
        self._by_path: dict[str, FtpFile] = {}
        self._server: FTPServer | None = None
        self._ioloop: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- files ----------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"ftp://127.0.0.1:{self.port}/"

    def url(self, name: str, *, user: str | None = None, password: str | None = None) -> str:
        login = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
        return f"ftp://{login}127.0.0.1:{self.port}/{quote(name)}"

    def add(self, name: str, data: bytes, *, mtime: float = DEFAULT_MTIME,
            **knobs: Any) -> FtpFile:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = FtpFile(name=name, path=path, data=data, mtime=mtime, **knobs)
        self._write(spec, data, mtime)
        self.files[name] = spec
        self._by_path[os.path.realpath(path)] = spec
        return spec

    def change(self, name: str, data: bytes, mtime: float | None = None) -> FtpFile:
        """Publish a new version of a file (new content, and a new mtime by default)."""
        spec = self.files[name]
        self._write(spec, data, mtime if mtime is not None else spec.mtime + 3600)
        return spec

    @staticmethod
    def _write(spec: FtpFile, data: bytes, mtime: float) -> None:
        tmp = spec.path.with_name(spec.path.name + ".new")
        tmp.write_bytes(data)
        os.utime(tmp, (mtime, mtime))
        tmp.replace(spec.path)
        spec.data, spec.mtime = data, mtime

    def file_for(self, fs_path: str) -> FtpFile | None:
        return self._by_path.get(os.path.realpath(fs_path))

    def sent_commands(self, command: str) -> list[str]:
        """The arguments of every `command` received, in order."""
        return [arg for _user, cmd, arg in self.commands if cmd == command]

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> FtpServer:
        authorizer = DummyAuthorizer()
        for user, password in self.users.items():
            authorizer.add_user(user, password, str(self.root), perm="elr")
        if self.anonymous:
            authorizer.add_anonymous(str(self.root))
        handler = _handler_class(self, authorizer)
        self._ioloop = IOLoop()
        self._server = FTPServer(("127.0.0.1", 0), handler, ioloop=self._ioloop)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="ftpserver", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._server is not None
        try:
            while not self._stopping.is_set():
                self._ioloop.loop(0.01, blocking=False)
        finally:
            self._server.close_all()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FtpServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class _Dtp(DTPHandler):  # type: ignore[misc]
    """The data connection: counts bytes, caps the rate, drops at the file's offsets."""

    ftp: FtpServer  # set on the subclass made for each server
    spec: FtpFile | None = None

    def use_sendfile(self) -> bool:
        return False  # every byte goes through send(), where the faults are

    def push_with_producer(self, producer: Any) -> None:
        self.spec = self.ftp.file_for(self.file_obj.name) if self.file_obj else None
        if self.spec is not None:
            if self.spec.grow is not None:
                grown, self.spec.grow = self.spec.data + self.spec.grow, None
                with open(self.spec.path, "ab") as f:
                    f.write(grown[self.spec.size:])
                self.spec.data = grown
            self.spec.starts.append(producer.file.tell())
            self._drop = self.spec.drop_after.pop(0) if self.spec.drop_after else None
            self._began = time.monotonic()
            self._here = 0
        super().push_with_producer(producer)

    def send(self, data: bytes) -> int:
        spec = self.spec
        if spec is None:
            return int(super().send(data))
        if self._drop is not None:
            data = data[: max(0, self._drop - self._here)]
        sent = int(super().send(data)) if data else 0
        self._here += sent
        spec.sent += sent
        self.ftp.bytes_sent += sent
        if self._drop is not None and self._here >= self._drop:
            # let the client read what was sent, then cut the connection (or go silent,
            # still watching for the client to close it, so nothing is left open)
            if spec.drop_mode == "stall":
                self.modify_ioloop_events(self.ioloop.READ)
            else:
                self.del_channel()
                self.call_later(0.05, self._cut)
        elif spec.rate:
            ahead = self._here / spec.rate - (time.monotonic() - self._began)
            if ahead > 0:
                self.del_channel()
                self.call_later(ahead, self._wake)
        return sent

    def _wake(self) -> None:
        if not self._closed:
            self.add_channel(events=self.ioloop.WRITE)

    def _cut(self) -> None:
        spec = self.spec
        if self._closed or spec is None:
            return
        if spec.drop_mode == "reset":
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if spec.drop_mode == "lie":
            self.transfer_finished = True
            self._resp = ("226 Transfer complete.", _log.debug)
            self.close()
        else:
            self.handle_close()  # data left to send: pyftpdlib replies 426
        if spec.change_after_drop is not None:
            new, spec.change_after_drop = spec.change_after_drop, None
            self.ftp.change(spec.name, new)


class _Handler(FTPHandler):  # type: ignore[misc]
    """The control connection: scripted replies, REST/MDTM knobs, per-user session counts."""

    ftp: FtpServer  # set on the subclass made for each server
    counted: str | None = None
    auth_failed_timeout = 0
    banner = "asyncsat test FTP server ready."
    timeout = 60

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        ftp = self.ftp
        ftp.commands.append((self.username or "-", cmd, "***" if cmd == "PASS" else arg))
        wait = ftp.delay.get(cmd)
        if wait:
            self.ioloop.call_later(wait, self._delayed, line, cmd, arg)
            return
        self._handle(line, cmd, arg)

    def _delayed(self, line: str, cmd: str, arg: str) -> None:
        if not self._closed:
            self._handle(line, cmd, arg)

    def _handle(self, line: str, cmd: str, arg: str) -> None:
        ftp = self.ftp
        replies = ftp.script.get(cmd)
        if replies:
            reply = replies.pop(0)
            if reply is not None:  # None: never answer
                self.respond(reply)
        elif cmd == "REST" and ftp.refuse_rest:
            self.respond("502 Command REST not implemented.")
        elif cmd == "MDTM" and ftp.no_mdtm:
            self.respond('500 Command "MDTM" not understood.')
        elif cmd == "REST" and ftp.fake_rest and self.authenticated:
            self.respond(f"350 Restarting at position {arg}.")
        elif cmd in ("LIST", "MLSD") and self.authenticated and \
                (cmd, arg.strip("/")) in ftp.listings:
            self.push_dtp_data(ftp.listings[cmd, arg.strip("/")], cmd=cmd)
        else:
            super().pre_process_command(line, cmd, arg)

    def ftp_PASS(self, line: str) -> None:
        user, cap = self.username, self.ftp.max_per_user
        if not self.authenticated and user and cap is not None and self.ftp.active[user] >= cap:
            self.ftp.over_limit += 1
            self.respond("421 Too many connections for this user, try again later.")
            self.close_when_done()
            return
        super().ftp_PASS(line)

    def handle_auth_success(self, home: str, password: str, msg_login: str) -> None:
        super().handle_auth_success(home, password, msg_login)
        user = self.counted = self.username
        self.ftp.logins[user] += 1
        self.ftp.active[user] += 1
        self.ftp.peak[user] = max(self.ftp.peak[user], self.ftp.active[user])

    def _uncount(self) -> None:
        if self.counted is not None:
            self.ftp.active[self.counted] -= 1
            self.counted = None

    def ftp_QUIT(self, line: str) -> None:
        self._uncount()  # the session ends here, whatever the socket does next
        super().ftp_QUIT(line)

    def close(self) -> None:
        self._uncount()
        super().close()


def _handler_class(server: FtpServer, authorizer: DummyAuthorizer) -> type[FTPHandler]:
    """The handler classes bound to one server's files, counters and faults."""
    dtp = type("Dtp", (_Dtp,), {"ftp": server})
    return type("Handler", (_Handler,), {"ftp": server, "authorizer": authorizer,
                                         "dtp_handler": dtp})


class TlsFtpServer:
    """Explicit FTPS on 127.0.0.1 (asyncio, in the test's loop): `await start()`, `await stop()`.

    `offer_tls=False` makes it refuse AUTH TLS; `mlsd=True` makes it list folders (MLSD from
    the names in `files`, sent like RETR). `commands` records (command, argument, whether the
    control connection was encrypted); `data_tls` whether each data connection was.
    """

    def __init__(self, cert: Path, key: Path, *, offer_tls: bool = True,
                 mlsd: bool = False) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.offer_tls = offer_tls
        self.mlsd = mlsd
        self.files: dict[str, bytes] = {}
        self.commands: list[tuple[str, str, bool]] = []
        self.data_tls: list[bool] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    def url(self, name: str) -> str:
        return f"ftps://127.0.0.1:{self.port}/{quote(name)}"

    async def start(self) -> TlsFtpServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await _TlsSession(self, reader, writer).run()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()
            self._sessions.discard(task)


class _TlsSession:
    def __init__(self, server: TlsFtpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.tls = self.protected = False
        self.data: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.Queue()
        self.listener: asyncio.Server | None = None

    async def reply(self, text: str) -> None:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()

    async def run(self) -> None:
        await self.reply("220 asyncsat test FTPS server ready.")
        while line := await self.reader.readline():
            command, _, arg = line.decode().rstrip("\r\n").partition(" ")
            command = command.upper()
            self.server.commands.append((command, "***" if command == "PASS" else arg, self.tls))
            if command == "QUIT":
                await self.reply("221 Goodbye.")
                return
            await self.handle(command, arg)

    async def handle(self, command: str, arg: str) -> None:
        files = self.server.files
        simple = {"PBSZ": "200 PBSZ=0", "USER": "331 Password required.",
                  "PASS": "230 Logged in.", "TYPE": "200 Type set."}
        if command == "AUTH" and self.server.offer_tls and arg.upper() == "TLS":
            await self.reply("234 AUTH TLS successful.")
            await self.writer.start_tls(self.server.context)
            self.tls = True
        elif command == "PROT":
            self.protected = arg.upper() == "P"
            await self.reply("200 Protection set.")
        elif command in simple:
            await self.reply(simple[command])
        elif command == "SIZE" and arg in files:
            await self.reply(f"213 {len(files[arg])}")
        elif command == "MDTM" and arg in files:
            await self.reply("213 20240301120000")
        elif command == "EPSV":
            self.listener = await asyncio.start_server(
                lambda r, w: self.data.put_nowait((r, w)), "127.0.0.1", 0,
                ssl=self.server.context if self.protected else None)
            port = self.listener.sockets[0].getsockname()[1]
            await self.reply(f"229 Entering extended passive mode (|||{port}|).")
        elif command == "RETR" and arg in files and self.listener is not None:
            await self.reply("150 Opening data connection.")
            async with asyncio.timeout(10):
                _reader, data = await self.data.get()
            self.listener.close()
            self.server.data_tls.append(data.get_extra_info("ssl_object") is not None)
            data.write(files[arg])
            await data.drain()
            data.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await data.wait_closed()
            await self.reply("226 Transfer complete.")
        elif command == "MLSD" and self.server.mlsd and self.listener is not None:
            folder = arg.strip("/")
            lines = "".join(
                f"type=file;size={len(body)}; {name[len(folder) + 1:]}\r\n"
                for name, body in sorted(files.items())
                if name.startswith(folder + "/") and "/" not in name[len(folder) + 1:])
            await self.reply("150 Opening data connection.")
            async with asyncio.timeout(10):
                _reader, data = await self.data.get()
            self.listener.close()
            self.server.data_tls.append(data.get_extra_info("ssl_object") is not None)
            data.write(lines.encode())
            await data.drain()
            data.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await data.wait_closed()
            await self.reply("226 Transfer complete.")
        elif command in ("SIZE", "MDTM", "RETR"):
            await self.reply("550 No such file.")
        else:
            await self.reply(f"502 Command {command} not implemented.")
