"""The FTP(S) driver (aioftp): SIZE, MDTM and REST resume; FTP replies mapped to asyncsat errors.

One control connection per transfer, logged in inside `open()` and closed (QUIT) when it
exits, so that a transfer holds exactly one connection of its account while it runs.

URLs: `ftp://host[:port]/path` is plain FTP; `ftps://host/path` is explicit FTPS (AUTH TLS
on the control connection, PBSZ 0 and PROT P so that the data connection is encrypted too),
except on port 990, the implicit-FTPS port, where TLS starts with the connection. As in
RFC 1738 the path is percent-decoded and taken relative to the login directory; a path that
starts with `%2F` is absolute.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

import aioftp
import structlog
from aioftp.client import BasicListInfo

from asyncsat.errors import (
    AuthError,
    NotFoundError,
    PermanentError,
    RetryableError,
    TransferError,
)
from asyncsat.transfer.base import Opened, RemoteEntry, Source, Validator

log = structlog.get_logger("asyncsat")

DEFAULT_PORT = 21
IMPLICIT_TLS_PORT = 990
ANONYMOUS_USER = "anonymous"
ANONYMOUS_PASSWORD = "anonymous@"
MASK = "***"
# how servers say that an account or an address has too many sessions (pyftpdlib, vsftpd,
# proftpd, pure-ftpd): a limit, so retried later without using up the retry budget
_LIMIT_TEXT = re.compile(
    r"too many|maximum number of|max(?:imum)?[ _-]?(?:clients|connections|sessions|users)"
    r"|connection limit|limit (?:of|on|for) (?:connections|sessions|clients)"
    r"|(?:clients|connections|sessions) (?:limit|exceeded)",
    re.IGNORECASE)
_TYPECODE = re.compile(r";type=[aid]$", re.IGNORECASE)

TlsMode = Literal["none", "explicit", "implicit"]


@dataclass(frozen=True)
class FtpTarget:
    """Where a file is on an FTP server, parsed from its URL."""

    host: str
    port: int
    path: str
    tls: TlsMode
    user: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, *, folder: bool = False) -> FtpTarget:
        """The target of a file URL, or of a folder URL when `folder` (its path then has no
        trailing slash, and is "" for the login directory)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise PermanentError(f"malformed FTP URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("ftp", "ftps") or not parts.hostname:
            raise PermanentError(f"not an FTP URL: {scheme}://{parts.hostname or ''}")
        raw = _TYPECODE.sub("", parts.path + (f"?{parts.query}" if parts.query else ""))
        # RFC 1738: the path is relative to the login directory; %2F makes it absolute
        path = unquote(raw[1:] if raw.startswith("/") else raw)
        if folder:
            path = path.rstrip("/") if path.strip("/") else path[:1]
        elif not path or path.endswith("/"):
            raise PermanentError("the FTP URL names a directory, not a file")
        if "\r" in path or "\n" in path or "\x00" in path:
            raise PermanentError("the FTP path contains a line break or a NUL character")
        tls: TlsMode = "none"
        if scheme == "ftps":
            tls = "implicit" if port == IMPLICIT_TLS_PORT else "explicit"
        return cls(
            host=parts.hostname, port=port or DEFAULT_PORT, path=path, tls=tls,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def reply_of(exc: aioftp.StatusCodeError) -> tuple[str, str]:
    """(code, text) of the reply that did not match: `("550", "No such file.")`."""
    code = str(exc.received_codes[-1]) if exc.received_codes else "???"
    info = exc.info if isinstance(exc.info, list) else [str(exc.info)]
    text = " ".join(" ".join(line.strip(" -") for line in info).split())
    return code, text[:200]


def is_limit(text: str) -> bool:
    """True when a reply says that there are too many connections or sessions."""
    return bool(_LIMIT_TEXT.search(text))


def error_for_reply(code: str, text: str, what: str = "") -> TransferError:
    """The asyncsat error for an FTP error reply (`what` says which step failed)."""
    reply = f"{code} {text}".strip()
    prefix = f"{what}: " if what else ""
    if code[:1] in ("4", "5") and is_limit(text):
        return RetryableError(f"{prefix}the FTP server allows no more connections now "
                              f"(FTP {reply})", throttled=True)
    if code == "530":
        return AuthError(f"{prefix}the FTP server refused the login (FTP {reply})")
    if code.startswith("4"):
        return RetryableError(f"{prefix}FTP {reply}")
    return PermanentError(f"{prefix}FTP {reply}")


@contextmanager
def map_exceptions(secret: str | None = None) -> Iterator[None]:
    """Translate aioftp, TLS and socket errors into asyncsat errors (the edge of the driver).

    `secret` (the password) is masked in every message, whatever the server echoed.
    """
    try:
        try:
            yield
        except TransferError:
            raise
        except aioftp.StatusCodeError as exc:
            raise error_for_reply(*reply_of(exc)) from None
        except ssl.SSLCertVerificationError as exc:  # before OSError and ValueError
            reason = exc.verify_message or exc.reason or "verification failed"
            raise PermanentError(f"the FTP server's TLS certificate is rejected: {reason}") \
                from None
        except ssl.SSLError as exc:
            raise RetryableError(f"TLS error on the FTP connection: {exc.reason or exc}") \
                from None
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                asyncio.IncompleteReadError):
            raise RetryableError("the FTP server closed the connection") from None
        except TimeoutError:  # before OSError, of which it is a subclass
            raise RetryableError("timed out waiting for the FTP server") from None
        except ConnectionRefusedError:
            raise RetryableError("cannot connect to the FTP server: connection refused") \
                from None
        except OSError as exc:
            raise RetryableError(f"network error: {type(exc).__name__}: "
                                 f"{exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise PermanentError("the FTP server's replies are not UTF-8") from None
        except aioftp.AIOFTPException as exc:
            raise PermanentError(f"FTP client error: {type(exc).__name__}: {exc}") from None
    except TransferError as exc:
        if secret and len(secret) >= 3 and secret in exc.message:
            exc.args = (exc.message.replace(secret, MASK), *exc.args[1:])
        raise


def _password(source: Source, target: FtpTarget) -> str | None:
    """The password this transfer logs in with (to mask it in messages)."""
    return source.password if source.user else target.password


def _changed(old: Validator, new: Validator) -> bool:
    """True when a validator both sides know differs (the size in `etag`, MDTM in the other).

    Not `Validator.differs`, which trusts the ETag alone: here a file of the same size with
    a new MDTM has changed too.
    """
    if old.etag and new.etag and old.etag != new.etag:
        return True
    return bool(old.last_modified and new.last_modified and
                old.last_modified != new.last_modified)


class FtpStream:
    """An open FTP transfer: the data connection, then the reply that ends it."""

    def __init__(self, client: aioftp.Client, opened: Opened,
                 data: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
                 *, read_timeout: float, ended: bool = False) -> None:
        self._client = client
        self._opened = opened
        self._data = data
        self._read_timeout = read_timeout
        self._ended = ended  # the server already said that the transfer is complete
        self._position = opened.offset
        self._stalled = False
        self._watchdog: asyncio.TimerHandle | None = None

    def _watch(self, seen: int | None) -> None:
        """Every `read_timeout` s: no byte since the last look ends the data connection."""
        if seen == self._position:
            self._stalled = True
            self.close_data()  # the pending read returns, and `chunks` says why
            return
        self._watchdog = asyncio.get_running_loop().call_later(
            self._read_timeout, self._watch, self._position)

    @property
    def opened(self) -> Opened:
        return self._opened

    def arrived(self) -> AsyncIterator[bytes]:
        return self.chunks(1 << 20)  # (a read returns what the buffer holds, at most that)

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """What the data connection delivers (at most `size` bytes at a time), as it comes.

        Ends only when the server confirmed the transfer (226) and, when SIZE was known,
        every byte arrived; a short transfer is a RetryableError, resumed from the part file.
        """
        if self._data is None:
            return
        reader = self._data[0]
        self._position = position = self._opened.offset
        # a watchdog, not a timeout per read: it costs nothing per chunk
        self._watch(None)
        try:
            while True:
                try:
                    chunk = await reader.read(size)
                except (OSError, asyncio.IncompleteReadError) as exc:
                    raise RetryableError(f"connection broken mid-file at byte {position}: "
                                         f"{type(exc).__name__}") from None
                if self._stalled:
                    raise RetryableError(f"no data from the FTP server for "
                                         f"{self._read_timeout:g} s (at byte {position})")
                if not chunk:
                    break
                self._position = position = position + len(chunk)
                yield chunk
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.close_data()
        with map_exceptions():
            await self._finish(position)

    async def _finish(self, position: int) -> None:
        """Read the reply that ends the transfer and check that nothing is missing."""
        total = self._opened.total
        short = total is not None and position < total
        failure: TransferError | None = None
        if not self._ended:
            try:
                async with asyncio.timeout(self._read_timeout):
                    await self._client.command(None, "2xx", "1xx")
            except aioftp.StatusCodeError as exc:
                failure = error_for_reply(*reply_of(exc), what="transfer aborted")
            except (OSError, asyncio.IncompleteReadError) as exc:  # TimeoutError included
                failure = RetryableError("no end-of-transfer reply from the FTP server: "
                                         f"{type(exc).__name__}")
        if short:
            detail = f" ({failure.message})" if failure else ""
            raise RetryableError(f"connection broken mid-file: got {position} of {total} "
                                 f"bytes{detail}")
        if failure is not None:
            raise failure

    def close_data(self) -> None:
        if self._data is not None:
            self._data[1].close()


class FtpFolders:
    """Lists folders on one logged-in control connection."""

    def __init__(self, client: aioftp.Client, read_timeout: float) -> None:
        self._client = client
        self._read_timeout = read_timeout

    async def listing(self, url: str) -> list[RemoteEntry]:
        """The entries of the folder at `url`; NotFoundError when there is no such folder.

        Lines no parser understands (a `total 8` header, an odd banner, a name that is not
        UTF-8) are skipped and logged, so that one of them cannot hide a whole folder.
        A symbolic link from LIST is asked for its SIZE: a file then, else a folder.
        """
        path = FtpTarget.parse(url, folder=True).path
        try:
            lines, mlsd = await self._lines(path)
        except aioftp.StatusCodeError as exc:
            code, text = reply_of(exc)
            if code == "550":
                raise NotFoundError(f"folder not found or not readable on the FTP server: "
                                    f"{path or '/'} (FTP {code} {text})") from None
            raise error_for_reply(code, text, what="listing") from None
        entries = []
        for line in lines:
            entry = self._parse(line, mlsd)
            if entry is None:
                log.warning("ftp listing line skipped", folder=path or "/",
                            line=line[:200].decode("utf-8", "replace").strip())
            elif entry.name not in ("", ".", ".."):
                entries.append(await self._resolve_link(path, entry))
        return [e for e in entries if e is not None]

    def _parse(self, line: bytes, mlsd: bool) -> _Listed | None:
        try:
            name, info = (self._client.parse_mlsx_line(line) if mlsd
                          else self._client.parse_list_line(line))
        except (ValueError, IndexError, KeyError, UnicodeDecodeError):
            return None
        kind = str(info.get("type", "")).lower()
        if kind in ("cdir", "pdir"):
            return _Listed("", None, False, False)
        size = str(info.get("size", ""))
        # LIST: `l...` lines; MLSD: `OS.unix=symlink` (vsftpd), `OS.unix=slink:<to>` (ProFTPD)
        link = "link_dst" in info or kind.endswith("symlink") or kind.startswith("os.unix=slink")
        is_dir = kind == "dir" and not link
        return _Listed(name.name, int(size) if size.isdigit() and not is_dir else None,
                       is_dir, link)

    async def _resolve_link(self, folder: str, entry: _Listed) -> RemoteEntry | None:
        if not entry.link:
            return RemoteEntry(entry.name, entry.size, entry.is_dir)
        target = f"{folder}/{entry.name}" if folder else entry.name
        try:
            async with asyncio.timeout(self._read_timeout):
                _code, info = await self._client.command(f"SIZE {target}", "213")
        except aioftp.StatusCodeError:  # not a file: a folder, or a dangling link
            return RemoteEntry(entry.name, None, is_dir=True)
        value = info[-1].strip().split()[-1] if info else ""
        return RemoteEntry(entry.name, int(value) if value.isdigit() else None)

    async def _lines(self, path: str) -> tuple[list[bytes], bool]:
        """The raw lines of MLSD, else (when the server does not know it) LIST.

        Not `Client.list()`: it leaves the data connection open when the command fails.
        """
        client = self._client
        for command in ("MLSD", "LIST"):
            async with asyncio.timeout(self._read_timeout):
                reader, writer = await client.get_passive_connection("I")
            try:
                try:
                    async with asyncio.timeout(self._read_timeout):
                        code, _info = await client.command(f"{command} {path}".strip(),
                                                           ("1xx", "2xx"))
                except aioftp.StatusCodeError as exc:
                    if command == "MLSD" and exc.received_codes[-1].matches("50x"):
                        continue
                    raise
                lines = []
                while True:
                    async with asyncio.timeout(self._read_timeout):
                        line = await reader.readline()
                    if not line:
                        break
                    if line.strip():
                        lines.append(line)
            finally:
                writer.close()
            if not code.matches("2xx"):
                async with asyncio.timeout(self._read_timeout):
                    await client.command(None, "2xx", "1xx")
            return lines, command == "MLSD"
        return [], True


@dataclass(frozen=True)
class _Listed:
    name: str
    size: int | None
    is_dir: bool
    link: bool


_DOS_LINE = re.compile(
    r"^\s*(\d{2})-(\d{2})-(\d{2}|\d{4})\s+(\d{1,2}):(\d{2})\s*([AaPp][Mm])?\s+"
    r"(<DIR>|\d+)\s+(.+?)\s*$")


def parse_dos_line(b: bytes) -> tuple[PurePosixPath, BasicListInfo]:
    """A Windows/IIS LIST line: `03-01-24  12:05PM       1234 name` or `<DIR>`."""
    match = _DOS_LINE.match(b.decode("utf-8"))
    if match is None:
        raise ValueError("not a DOS-style listing line")
    size = match.group(7)
    kind = "dir" if size == "<DIR>" else "file"
    return PurePosixPath(match.group(8)), BasicListInfo(
        modify="", type=kind, size="" if kind == "dir" else size)


class FtpDriver:
    """Downloads over FTP and FTPS with aioftp, one control connection per transfer."""

    def __init__(self, *, connect_timeout: float = 30.0, read_timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None, quit_timeout: float = 2.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.quit_timeout = quit_timeout
        self._ssl_context = ssl_context

    @classmethod
    def create(cls, *, connect_timeout: float = 30.0, read_timeout: float = 60.0) -> FtpDriver:
        return cls(connect_timeout=connect_timeout, read_timeout=read_timeout)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The system's trust store (SSL_CERT_FILE and SSL_CERT_DIR apply), made on first use."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def aclose(self) -> None:
        """Nothing is shared between transfers: each closes its own connections."""

    @asynccontextmanager
    async def open(self, source: Source, offset: int, validator: Validator) -> \
            AsyncIterator[FtpStream]:
        target = FtpTarget.parse(source.url)
        with map_exceptions(_password(source, target)):
            async with self._session(target, source) as client:
                async with asyncio.timeout(self.read_timeout):
                    stream = await self._start(client, target, source, offset, validator)
                try:
                    yield stream
                finally:
                    stream.close_data()

    async def list_dir(self, source: Source) -> list[RemoteEntry]:
        """The entries of the folder at `source.url` (MLSD, else LIST), `.` and `..` left out.

        A folder that does not exist is a NotFoundError.
        """
        async with self.folders(source) as folders:
            return await folders.listing(source.url)

    @asynccontextmanager
    async def folders(self, source: Source) -> AsyncIterator[FtpFolders]:
        """One logged-in session to list folders of the server of `source.url` (a search
        lists many folders: one login, not one per folder)."""
        target = FtpTarget.parse(source.url, folder=True)
        with map_exceptions(_password(source, target)):
            async with self._session(target, source) as client:
                yield FtpFolders(client, self.read_timeout)

    @asynccontextmanager
    async def _session(self, target: FtpTarget, source: Source) -> AsyncIterator[aioftp.Client]:
        """A logged-in control connection, closed with QUIT (or at once when cancelled)."""
        # no aioftp timeouts: it applies them with asyncio.wait_for, which on Python 3.11
        # can swallow a cancellation (CPython gh-86296); every step here has its own
        # asyncio.timeout, and data reads a watchdog
        client = aioftp.Client(
            socket_timeout=None, connection_timeout=None,
            ssl=self.ssl_context if target.tls == "implicit" else None,
            parse_list_line_custom=parse_dos_line)
        try:
            async with asyncio.timeout(self.connect_timeout + self.read_timeout):
                await self._login(client, target, source)
            yield client
        except (asyncio.CancelledError, GeneratorExit):
            client.close()
            raise
        except BaseException:
            await self._quit(client)
            raise
        await self._quit(client)

    async def _start(self, client: aioftp.Client, target: FtpTarget, source: Source,
                     offset: int, validator: Validator) -> FtpStream:
        try:  # TYPE I (which SIZE needs on many servers) and EPSV/PASV
            reader, writer = await client.get_passive_connection("I")
        except (IndexError, ValueError):
            raise RetryableError("unreadable passive-mode reply from the FTP server") from None
        try:
            return await self._request(client, target, source, offset, validator,
                                       (reader, writer))
        except BaseException:
            writer.close()
            raise

    async def _request(self, client: aioftp.Client, target: FtpTarget, source: Source,
                       offset: int, validator: Validator,
                       data: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> FtpStream:
        total = await _size(client, target.path)
        modified = await _mdtm(client, target.path)
        current = Validator(etag=f"size:{total}" if total is not None else None,
                            last_modified=modified)
        start = offset
        if offset > 0:
            if _changed(validator, current) or (total is not None and offset > total):
                log.info("ftp file changed, restarting from zero", url=source.url,
                         offset=offset, size=total, mdtm=modified)
                start = 0
            elif total is not None and offset == total:  # the part file is the whole file
                data[1].close()
                return FtpStream(client, Opened(offset=offset, total=total, validator=current),
                                 None, read_timeout=self.read_timeout)
        if start:
            start = await _rest(client, start, source.url)
        code, _info = await _retr(client, target.path)
        return FtpStream(client, Opened(offset=start, total=total, validator=current),
                         data, read_timeout=self.read_timeout, ended=code.matches("2xx"))

    async def _login(self, client: aioftp.Client, target: FtpTarget, source: Source) -> None:
        await client.connect(target.host, target.port)
        if target.tls == "explicit":
            try:
                await client.upgrade_to_tls(self.ssl_context)
            except aioftp.StatusCodeError as exc:
                code, text = reply_of(exc)
                if code.startswith("4"):
                    raise
                raise PermanentError(f"the FTP server refused TLS (FTP {code} {text})") \
                    from None
        elif target.tls == "implicit":
            await client.command("PBSZ 0", "200")
            await client.command("PROT P", "200")
        user = source.user or target.user
        password = (source.password if source.user else target.password) or ""
        if not user:
            user, password = ANONYMOUS_USER, password or ANONYMOUS_PASSWORD
        try:
            await client.login(user, password)
        except aioftp.StatusCodeError as exc:
            code, text = reply_of(exc)
            if code == "530" and not is_limit(text):
                who = "anonymous login" if user == ANONYMOUS_USER else f"login as {user!r}"
                raise AuthError(f"the FTP server refused the {who} (FTP {code} {text})") \
                    from None
            raise error_for_reply(code, text, what="FTP login") from None

    async def _quit(self, client: aioftp.Client) -> None:
        """Say QUIT and wait for 221, so that the server has let the session go; then close."""
        try:
            with suppress(Exception):
                async with asyncio.timeout(self.quit_timeout):
                    await client.stream.write(b"QUIT\r\n")
                    while True:  # a 426 for an aborted transfer may come first
                        code, _info = await client.parse_response()
                        if code.matches("221"):
                            break
        finally:  # also when cancelled meanwhile: the socket never outlives the transfer
            client.close()
        with suppress(Exception):
            async with asyncio.timeout(self.quit_timeout):
                await client.stream.writer.wait_closed()


async def _fact(client: aioftp.Client, command: str, path: str) -> str | None:
    """The answer to SIZE or MDTM (RFC 3659), or None when the server does not say
    (for a missing file RETR decides, with its 550)."""
    try:
        _code, info = await client.command(f"{command} {path}", "213")
    except aioftp.StatusCodeError as exc:
        if exc.received_codes[-1].matches("5xx"):
            return None
        raise
    return info[-1].strip() or None if info else None


async def _size(client: aioftp.Client, path: str) -> int | None:
    """SIZE in bytes, or None."""
    value = (await _fact(client, "SIZE", path) or "").split()
    return int(value[-1]) if value and value[-1].isdigit() else None


async def _mdtm(client: aioftp.Client, path: str) -> str | None:
    """MDTM as the server writes it (`YYYYMMDDHHMMSS[.sss]`), or None."""
    return await _fact(client, "MDTM", path)


async def _rest(client: aioftp.Client, offset: int, url: str) -> int:
    """REST to resume at `offset`; 0 when the server refuses it (the whole file comes)."""
    try:
        await client.command(f"REST {offset}", "350")
    except aioftp.StatusCodeError as exc:
        code, text = reply_of(exc)
        if not code.startswith("5"):
            raise
        log.warning("ftp rest refused", url=url, offset=offset, reply=f"{code} {text}")
        return 0
    return offset


async def _retr(client: aioftp.Client, path: str) -> tuple[aioftp.Code, list[str]]:
    try:
        return await client.command(f"RETR {path}", ("1xx", "2xx"))
    except aioftp.StatusCodeError as exc:
        code, text = reply_of(exc)
        if code == "550":
            raise NotFoundError(f"file not found or not readable on the FTP server: {path} "
                                 f"(FTP {code} {text})") from None
        raise error_for_reply(code, text, what=f"RETR {path}") from None
