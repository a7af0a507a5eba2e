"""The `.part` file: append, hash while writing, verify, fsync, rename atomically."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import stat
import sys
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from asyncsat.checksums import Hasher, new_hasher
from asyncsat.errors import (
    ChecksumError,
    DiskFullError,
    LeaseLost,
    PermanentError,
    RetryableError,
    SizeError,
    TransferError,
)
from asyncsat.models import Checksum
from asyncsat.tasks import run_to_end
from asyncsat.transfer import payload

PART_SUFFIX = ".part"
_HASH_BLOCK = 4 << 20
_THREADED = 256 << 10
"""A chunk this large is hashed (MD5 of a megabyte takes ~2 ms), and written past
`_ON_LOOP`, in a worker thread: on the loop every other transfer would wait meanwhile."""
_ON_LOOP = 8 << 20
"""Bytes of a file written on the loop before its large chunks go to a worker thread. A
file is flushed to disk when it ends, so its writes go to the page cache until its dirty
pages pile up; past that a write can wait for writeback or the journal (another
transfer's fsync) for milliseconds. Below it, a hop to a thread costs more than the write:
the answer waits for the loop to hand over the GIL (measured with 500 files of 1 MiB: 10%
more wall time, 0.4 ms of CPU per hop)."""
DROP_EVERY = 32 << 20
"""Unless the page cache is kept (`keep_page_cache`), every this many bytes a file's pages
written more than `DROP_LAG` bytes ago are handed to writeback and, once clean, dropped
from the page cache; the rest go when the file is flushed. An ingest host keeps what it
downloads: without this, every new file needs pages the kernel must first free (or, in a
virtual machine, have backed by the host); with it, one file's pages serve the next.
Measured on this project's VM writing 500 x 1 MiB and keeping the files, as a daemon does:
1.8-2.5 ms per MiB written, against 0.16 with the pages dropped after each fsync."""
DROP_LAG = 16 << 20
WRITE_SLICE = 128 << 10
"""Bytes handed to one write(2). On this project's VM (Linux 6.18) 1 MiB writes were at
times ten times slower per byte than 64-128 KiB ones (2.6 against 0.25 ms per MiB; at other
times both took about 0.2): slices cost a few more system calls and never measured slower."""

T = TypeVar("T")


class NameTaken(Exception):
    """A file this download did not write is at its final name: it is never replaced (a
    user's, another program's, or one of a download whose row was deleted). The `.part`
    stays whole, flushed and locked, to be given another name (`move`)."""

    def __init__(self, final: Path) -> None:
        super().__init__(f"{final} is there already")
        self.final = final


async def _in_thread(fn: Callable[[], T], threads: Executor | None = None) -> T:
    """Run a step on the file descriptor in a worker thread (of `threads`, else of the
    loop's default pool), to its end even if the task is cancelled meanwhile (then
    cancelled after): the descriptor must not be closed, and its number reused by another
    file, under a write or an fsync."""
    step = asyncio.to_thread(fn) if threads is None else \
        asyncio.get_running_loop().run_in_executor(threads, fn)
    return await _to_its_end(step)


async def _to_its_end(step: Awaitable[T]) -> T:
    """`step`'s result, awaited to its end even if the task is cancelled meanwhile; the
    cancel is then passed on (and wins over the step's failure)."""
    done, cancelled = await run_to_end(step)
    if cancelled:
        if not done.cancelled():
            done.exception()  # (retrieved: the stop wins over the step's failure)
        raise asyncio.CancelledError
    return done.result()


class PartFile:
    """`<folder>/<name>.part`, written in order; its size on disk is the resume offset.

    Every chunk goes straight to the file descriptor (no user-space buffer), so a killed
    process loses at most the chunk it was holding.
    """

    def __init__(self, folder: Path, name: str, checksum: Checksum | None, *,
                 keep_cache: bool = False) -> None:
        self.final = folder / name
        self.path = folder / (name + PART_SUFFIX)
        self.checksum = checksum
        self.keep_cache = keep_cache
        self._fd: int | None = None
        self._hasher: Hasher | None = None
        self.size = 0
        self._drop_at = sys.maxsize
        """The size at which the pages written so far are dropped from the page cache."""
        self._head: bytes | None = None
        """The file's first bytes, as written by this attempt (None: it resumed)."""
        self.renaming = False
        """Its rename to the final name was tried (it may be there now)."""

    def recover(self, size: int | None = None, *, adopt: bool = True) -> int:
        """Bytes of the part file already on disk (0 when there is none).

        A final file without its part was renamed before a crash but never recorded as
        done: it becomes the part again, to be verified like any other. Only a regular file
        of the file's size (`size`, when it is known) can be that: anything else at the
        final name (a folder, a shorter file of someone else's) is not resumed from. Nor is
        anything when no earlier attempt can have renamed the file (`adopt` false: the
        download's first): a file there is someone else's, of whatever size.
        """
        try:
            if adopt and not self.path.exists():
                try:
                    there = self.final.lstat()
                except FileNotFoundError:
                    there = None
                if there is not None and stat.S_ISREG(there.st_mode) and \
                        (not size or there.st_size == size):
                    self.final.replace(self.path)
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _local_error(self.path, exc) from None

    async def open(self, offset: int, fenced: Callable[[], bool] | None = None) -> None:
        """Open for appending at `offset` (truncating anything after it); hash what is kept.
        With `fenced`, once the file is locked: LeaseLost unless its row is still surely
        this claim's (a daemon paused past its lease must not take the file of the daemon
        that took the download over). (On the loop: a worker thread costs more than the
        create, measured with 2,000 files of 64 KiB, in lock handoffs between the threads.)"""
        if self.checksum is not None:  # (an unknown algorithm fails before a file is made)
            self._hasher = new_hasher(self.checksum.algo)
        self._open(offset, fenced)
        self.size = offset
        self._drop_at = sys.maxsize if self.keep_cache else offset + DROP_LAG + DROP_EVERY
        self._head = b"" if offset == 0 else None
        if self.checksum is not None and offset:
            await asyncio.to_thread(self._hash_existing, offset)

    def _open(self, offset: int, fenced: Callable[[], bool] | None = None) -> None:
        if fenced is not None and not fenced():  # (lapsed already: no file made)
            raise LeaseLost()
        # a file fetched from its start is created here if it can be (O_EXCL), so it is
        # empty: no truncation, no measure, no seek. Each system call saved counts: in a
        # worker thread, every one hands the GIL to and from the event loop's thread.
        made = offset == 0
        try:
            try:
                # (a .part measured to be resumed is never made anew: gone since, it may be
                # the final file now, renamed by the daemon the download was taken from,
                # which the next attempt finds there; an empty .part would hide it)
                self._fd = self._create(os.O_EXCL) if made else \
                    os.open(self.path, os.O_WRONLY)
            except FileExistsError:  # (a .part of an earlier attempt: emptied once locked)
                made = False
                self._fd = self._create(0)
            self._lock()
            if fenced is not None and not fenced():  # (left as it is: it may be the file
                self.close()  # of the daemon that took the download over, just created)
                raise LeaseLost()
            if offset > 0 and offset > os.fstat(self._fd).st_size:  # changed since measured
                self.close()
                raise RetryableError(f"{self.path} changed while it was being resumed")
            if not made:
                os.ftruncate(self._fd, offset)
            if offset > 0:
                os.lseek(self._fd, offset, os.SEEK_SET)
        except OSError as exc:
            self.close()
            raise _local_error(self.path, exc) from None

    def _create(self, flags: int) -> int:
        """Open the .part for writing, created if missing (with its folder, the first time)."""
        try:
            return os.open(self.path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        except FileNotFoundError:  # (the folder's first file: one mkdir, not one per file)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_WRONLY | os.O_CREAT | flags, 0o644)

    def _lock(self) -> None:
        """One writer per part file, across processes and hosts (a daemon paused past its
        lease may still hold it: the one that took the download over waits for it)."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise RetryableError(f"another process is writing {self.path}",
                                 throttled=True) from None

    def _hash_existing(self, length: int) -> None:
        assert self._hasher is not None
        with self.path.open("rb") as f:
            remaining = length
            while remaining:
                block = f.read(min(_HASH_BLOCK, remaining))
                if not block:
                    break
                self._hasher.update(block)
                remaining -= len(block)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the part file on disk (a few kB, to compare a resume with). Blocking."""
        try:
            with self.path.open("rb") as f:
                f.seek(offset)
                return f.read(length)
        except OSError as exc:
            raise _local_error(self.path, exc) from None

    def truncate(self) -> None:
        """Empty the part file: its bytes are not the product's."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, 0)
        except OSError as exc:
            raise _local_error(self.path, exc) from None
        self.size = 0
        self._head = None  # (the attempt ends: the next one writes from zero)

    async def write(self, chunk: bytes) -> None:
        """Append one chunk, and hash it (a large one in a worker thread when it is hashed
        or the file is past its first `_ON_LOOP` bytes; hashlib and blake3 release the GIL)."""
        if len(chunk) >= _THREADED and (self._hasher is not None or self.size >= _ON_LOOP):
            await _in_thread(lambda: self._write(chunk))
        else:
            self._write(chunk)
        if self.size >= self._drop_at:  # (a writeback may wait for the disk: in a thread)
            self._drop_at = self.size + DROP_EVERY
            upto = self.size - DROP_LAG
            await _in_thread(lambda: self._drop(upto))

    def _drop(self, upto: int) -> None:
        """Start the writeback of the file's first `upto` bytes (0: all) and drop from the
        page cache the pages among them that are clean (written back already)."""
        assert self._fd is not None
        if sys.platform != "darwin":  # (no posix_fadvise there)
            with contextlib.suppress(OSError):  # (advice: a file system may not take it)
                os.posix_fadvise(self._fd, 0, upto, os.POSIX_FADV_DONTNEED)

    def _write(self, chunk: bytes) -> None:
        assert self._fd is not None
        try:
            view = memoryview(chunk)
            while view:
                written = os.write(self._fd, view[:WRITE_SLICE])
                view = view[written:]
        except OSError as exc:
            raise _local_error(self.path, exc) from None
        if self._head is not None and len(self._head) < payload.HEAD:
            self._head += chunk[:payload.HEAD - len(self._head)]
        self.size += len(chunk)
        if self._hasher is not None:
            self._hasher.update(chunk)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def write_whole(self, chunks: list[bytes], expected_size: int | None, name: str,
                          fenced: Callable[[], bool], threads: Executor | None = None) -> Path:
        """A new file held whole in memory: created, written, verified, flushed and renamed in
        one worker-thread step, as `open(0, fenced)`, `write` and `finish` would do, its
        body let go once written (`chunks` emptied). Nothing of it runs on the event loop,
        which every transfer shares: a file's creation alone cost the loop 0.25-0.35 ms
        per file at the median (1 ms at the 99th percentile) on this project's VM (ext4,
        2,000 files of 64 KiB), a fifth of its time with many small files. `fenced` is
        checked in the worker, as the file is locked: the step must start at once
        (`threads`: a pool with a worker free for it), not after whatever else waits for a
        worker of a shared pool. Its folder is flushed apart (`synced`): the writer is free
        for the next file meanwhile."""
        if self.checksum is not None:  # (an unknown algorithm fails before a file is made)
            self._hasher = new_hasher(self.checksum.algo)
        self.size = 0
        self._head = b""

        def whole() -> None:
            self._open(0, fenced)
            while chunks:
                self._write(chunks.pop(0))
            self._verify(expected_size)
            self._seal(name)

        try:
            await _in_thread(whole, threads)
        except OSError as exc:
            self.close()
            raise _local_error(self.path, exc) from None
        return self.final

    async def finish(self, expected_size: int | None, name: str) -> Path:
        """Verify size, checksum and content, fsync, rename to the final name (its folder is
        flushed apart: `synced`)."""
        self._verify(expected_size)
        try:
            await _in_thread(lambda: self._seal(name))
        except OSError as exc:
            self.close()
            raise _local_error(self.path, exc) from None
        return self.final

    async def move(self, name: str) -> None:
        """Give the whole, flushed `.part` another name (its final one was taken: the
        `NameTaken` it raised); it stays open and locked."""
        final = self.final.with_name(name)
        path = final.with_name(name + PART_SUFFIX)
        try:
            await _in_thread(lambda: _rename_new(self.path, path))
        except FileExistsError:  # (its lock is on the file, not its name)
            self.close()
            raise RetryableError(f"another process is writing {path}", throttled=True) \
                from None
        except OSError as exc:
            self.close()
            raise _local_error(self.path, exc, f"rename {self.path} to {path}") from None
        self.final, self.path = final, path

    def _verify(self, expected_size: int | None) -> None:
        """Size and checksum as expected, else the part is closed (and dropped when it
        cannot be the file: too large, or another checksum)."""
        assert self._fd is not None
        if expected_size is not None and self.size != expected_size:
            self.close()
            if self.size > expected_size:
                self.path.unlink(missing_ok=True)
            raise SizeError(f"size mismatch: got {self.size} bytes, expected {expected_size}",
                            evidence=f"size:{self.size}")
        if self.checksum is not None and self._hasher is not None:
            digest = self._hasher.hexdigest()
            if digest != self.checksum.value:
                self.close()
                self.path.unlink(missing_ok=True)
                raise ChecksumError(
                    f"{self.checksum.algo} mismatch: got {digest}, expected {self.checksum.value}",
                    evidence=f"{self.checksum.algo}:{digest}")

    def _seal(self, name: str) -> None:
        assert self._fd is not None
        try:
            payload.check(self.path, name, self._head)
        except Exception:
            self.close()
            self.path.unlink(missing_ok=True)
            raise
        os.fsync(self._fd)
        if not self.keep_cache:
            self._drop(0)
        # renamed while still locked: a daemon that took the download over cannot open the
        # .part between the two and write into what becomes the final file; never over
        # anything at the final name (this download's own file from an earlier attempt
        # became its .part at the start, `recover`: a file there now is not its own)
        self.renaming = True
        try:
            _rename_new(self.path, self.final)
        except FileExistsError:  # (nothing renamed)
            self.renaming = False
            raise NameTaken(self.final) from None
        except OSError as exc:
            self.close()
            raise _local_error(self.path, exc, f"rename {self.path} to {self.final}") from None
        self.close()


class _FolderSync:
    """fsync of folders, shared (group commit), on the event loop: a rename is durable once
    an fsync of its folder that started after it has ended, so the files renamed while one
    runs share the next one. Each fsync is one worker-thread step, and its waiters are told
    together on the loop. (The writer threads used to share it through a condition
    variable, each waiting in its thread: every fsync's end woke them all, and each then
    took the GIL back from the busy loop in turn. 2,000 files of 64 KiB: 13 % less wall
    time and 27 % fewer context switches without any folder fsync; see `synced`.)"""

    def __init__(self) -> None:
        self._waiting: dict[Path, list[asyncio.Future[None]]] = {}
        """Per folder: the callers waiting for an fsync that has not started yet."""
        self._running: dict[Path, asyncio.Task[None]] = {}

    def waiter(self, folder: Path) -> asyncio.Future[None]:
        """Done once the renames made in `folder` before this call are durable."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(folder, []).append(waiter)
        if folder not in self._running:
            self._running[folder] = asyncio.create_task(  # (every file's: no one's context)
                self._syncs(folder), context=contextvars.Context())
        return waiter

    async def _syncs(self, folder: Path) -> None:
        """fsync `folder` until nobody waits for it: each fsync covers the callers that came
        before it started."""
        waiters: list[asyncio.Future[None]] = []
        try:
            while waiters := self._waiting.pop(folder, []):
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        _SYNC_THREADS, _fsync_folder, folder)
                except OSError as exc:
                    for waiter in waiters:  # (an exception of its own each: raised apart)
                        if not waiter.done():
                            waiter.set_exception(OSError(exc.errno, exc.strerror, str(folder)))
                else:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:  # (the loop's end: nobody is left waiting for ever)
            del self._running[folder]
            for waiter in waiters + self._waiting.pop(folder, []):
                waiter.cancel()


_SYNC_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="asyncsat-fsync")
"""The workers of folder fsyncs (one at a time per folder): not the loop's default pool,
where an fsync that every file of the folder waits for would queue behind copies and the
hashes of large resumed files."""

_FOLDERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _FolderSync] = \
    weakref.WeakKeyDictionary()


async def synced(folder: Path) -> None:
    """Return once the renames made in `folder` before this call are on disk (an fsync of
    the folder, shared with the files renamed meanwhile); a cancel waits for it, then is
    passed on. A file is recorded done only after this: its name, not only its bytes,
    survives a power cut."""
    loop = asyncio.get_running_loop()
    folders = _FOLDERS.get(loop)
    if folders is None:
        folders = _FOLDERS[loop] = _FolderSync()
    try:
        await _to_its_end(folders.waiter(folder))  # (a future: no task)
    except OSError as exc:
        raise _local_error(folder, exc, f"flush the folder {folder}") from None


_NO_FOLDER_SYNC = (errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP, errno.ENOTSUP)
"""What a file system that cannot fsync a folder answers (some FUSE and network ones):
ignored, as PostgreSQL ignores it; the rename stands."""


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_SYNC:
            raise
    finally:
        os.close(dir_fd)


_NO_LINKS = (errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP)


def place(source: Path, target: Path) -> str:
    """Put a done product's file at `target` as well: a hard link (the same file, no space
    used), else (another file system) a copy written under a temporary name, fsynced and
    linked into place. Nothing is ever overwritten. Returns `linked`, `copied`, `there`
    when the product is at that name already (`placed`), else why it was not put there
    (`NOT_THE_PRODUCT`: someone else's file has the name). Blocking (a copy may take
    long): run it in a thread.
    """
    if os.path.lexists(target):
        return _already(source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return "linked"
    except FileExistsError:
        return _already(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV and exc.errno not in _NO_LINKS:
            raise
    temporary = target.with_name(f".{target.name}.{os.getpid()}.copy")
    try:
        shutil.copyfile(source, temporary)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, target)  # unlike a rename, never replaces a file
        except FileExistsError:
            return _already(source, target)
        except OSError as exc:  # a file system without hard links
            if exc.errno not in _NO_LINKS or target.exists():
                raise
            os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return "copied"


NOT_THE_PRODUCT = "not put there: a file that is not this product has its name"


def placed(source: Path, target: Path) -> bool:
    """Whether `target` is the done product at `source` put there: the same file (a link),
    or one of its size (a copy; a file of another size at the name is someone else's)."""
    try:
        if os.path.samefile(source, target):
            return True
        there = target.stat()
        return stat.S_ISREG(there.st_mode) and there.st_size == source.stat().st_size
    except OSError:  # (either gone, a broken link)
        return False


def _already(source: Path, target: Path) -> str:
    """What is at a product's name in the folder it is to be put into: the product put there
    before (`there`), or someone else's file, left alone (why it was not put there)."""
    return "there" if placed(source, target) else NOT_THE_PRODUCT


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_new(source: Path, target: Path) -> None:
    """Rename `source` to `target`, never over anything there (FileExistsError): one atomic
    system call where the kernel and file system have it (Linux's `renameat2` with
    `RENAME_NOREPLACE`: no more calls than a rename), else a hard link then an unlink (a
    file system without hard links: looked at, then renamed)."""
    renameat2 = _c_renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                     _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(source), None, str(target))
    try:  # (a kernel or file system without it)
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) \
                from None
        os.replace(source, target)
        return
    os.unlink(source)


@functools.cache
def _c_renameat2() -> Callable[..., int] | None:
    """Linux's renameat2(2) from the C library (looked up once), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # (a C library without it)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _local_error(path: Path, exc: OSError, doing: str | None = None) -> TransferError:
    """A full disk is waited out (the .part stays); a part file removed while it was
    written (its folder cleaned up) starts again; other local file errors are permanent."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left to write {path}")
    if exc.errno == errno.ENOENT and not path.exists():
        return RetryableError(f"{path} was removed while it was written: it starts again")
    return PermanentError(f"cannot {doing or f'write {path}'}: {exc.strerror or exc}")
