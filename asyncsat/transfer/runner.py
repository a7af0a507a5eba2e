"""One transfer attempt, protocol-independent: open, resume or restart, stream, verify, rename."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from asyncsat.errors import PermanentError, RetryableError, SizeError
from asyncsat.models import Checksum
from asyncsat.naming import name_from_url, sanitize
from asyncsat.tasks import run_to_end
from asyncsat.transfer.base import Driver, Opened, Source, Validator
from asyncsat.transfer.files import NameTaken, PartFile, synced

log = structlog.get_logger()

HOLD_MOST = 1 << 20
"""The largest file held (`chunk_size`, if smaller)."""
HOLD_SECONDS = 0.25
"""A new file no larger than a chunk is held in memory while it comes in, until the first
chunk past this many seconds: one that ends by then records its name with its slot's
hand-over (one statement, not two; a row of a run but its last, with the seals of the
others that end meanwhile); one that takes longer is written as it comes, resumable like
any other. (At most `HOLD_MOST` bytes and a chunk are held.)"""
HELD_WRITING = 16
"""New files held whole that are written to disk at once, at most (their bodies, up to
`HOLD_MOST` each, are in memory until written)."""
OVERLAP = 4096
"""Bytes fetched again at a resume that no size can verify, and compared with the kept ones."""


@dataclass(frozen=True)
class Job:
    """Everything a transfer needs to know about one download."""

    source: Source
    folder: Path
    name: str | None
    size: int | None
    checksum: Checksum | None
    validator: Validator = field(default_factory=Validator)
    fallback_name: str = "download"
    size_from_server: bool = False
    """`size` was announced by the server in an earlier attempt (not by a catalog)."""
    keep_cache: bool = False
    """Leave the file in the page cache (`keep_page_cache`); else its pages are dropped."""
    tried: bool = True
    """An earlier attempt may have renamed the file to its final name and stopped before it
    was recorded done (it got as far as sealing it: the row's `sealed_attempt`); false when
    none did, and nothing at the final name can be its own (a user's file there is never
    taken for its `.part`)."""


@dataclass(frozen=True)
class Outcome:
    """A finished transfer."""

    path: Path
    name: str
    size: int
    resumed_from: int
    restarted: bool


@dataclass(frozen=True)
class Naming:
    """What the server told of a new file: the name proposed for it, its size, validators."""

    name: str
    size: int | None
    validator: Validator


class Events(Protocol):
    """What the transfer tells its owner while it runs."""

    async def named(self, name: str, size: int | None, validator: Validator) -> str:
        """The file's name, size and validators are known; called before any byte is written.

        Returns the name to use: the one proposed, unless another download owns it.
        """
        ...

    async def elsewhere(self, name: str, size: int | None, validator: Validator) -> str:
        """A file this download did not write is at `name` (never replaced): the other
        name the file is to take, recorded (its size and validators with it), returned."""
        ...

    async def progress(self, done: int, total: int | None) -> None:
        """`done` bytes of the file are on disk (called per chunk; throttle in the callee).
        A file held whole is told once, when its body is in, before it is written."""
        ...

    def fenced(self) -> bool:
        """Whether the row is surely still this claim's since `sealing` checked it: its
        lease cannot have lapsed since (no other daemon can have taken it over)."""
        ...

    async def sealing(self, naming: Naming | None = None) -> str | None:
        """The body is in and its connection given back: called before the file is
        verified, flushed and renamed; raises to stop.

        With `naming` (a new file held whole in memory: nothing of it is on disk yet), its
        name, size and validators are recorded too, as `named` does, and the name to use
        is returned.
        """
        ...


@dataclass
class Attempt:
    """The state of one attempt, readable after it raised (for the retry decision)."""

    start_size: int = 0
    size: int = 0
    part: Path | None = None
    """The `.part` file, once its name is known: its size on disk is the true byte count."""
    renaming: bool = False
    """The file's rename to its final name was tried: it may be there, whatever ended the
    attempt (else a mark the attempt set when it sealed the file can go: the download's
    `sealed_attempt`)."""

    @property
    def progressed(self) -> bool:
        return self.size > self.start_size

    def on_disk(self) -> int:
        """Bytes of the `.part` file now (a stop may cut a chunk half-counted), else `size`."""
        if self.part is not None:
            try:
                return self.part.stat().st_size
            except OSError:
                pass
        return self.size


async def transfer(driver: Driver, job: Job, events: Events, attempt: Attempt,
                   chunk_size: int) -> Outcome:
    """Fetch `job` into `job.folder`, resuming from its `.part` file when there is one."""
    name = sanitize(job.name) if job.name else ""
    # the row's own name is its own file (a `.part` to resume, or a final file renamed
    # before a crash); a name that sanitizing changed (`sub/a.nc` inserted by psql) may be
    # another product's file, so it is checked by `named` before anything on disk is used
    part = PartFile(job.folder, name, job.checksum, keep_cache=job.keep_cache) \
        if name and name == job.name else None
    attempt.part = part.path if part is not None else None
    offset = part.recover(job.size, adopt=job.tried) if part is not None else 0
    attempt.start_size = attempt.size = offset
    validator = job.validator if offset else Validator()
    # with no size to check the result against, a resume starts a little early and the
    # bytes sent twice must equal the ones kept: a server that claims to resume but sends
    # from the start (or another version) is caught here, not in a corrupt product
    overlap = min(offset, OVERLAP) if offset and not job.size else 0
    ask = offset - overlap
    held: list[bytes] | None = None
    """A new file's whole body, read before anything of it is written."""
    try:
        async with driver.open(job.source, ask, validator) as stream:
            opened = stream.opened
            try:
                total = _expected_size(job, opened)
            except _SizeChanged:
                if part is not None:  # what is on disk belongs to another version
                    await part.open(0)
                    part.close()
                raise
            proposed = name or opened.name or name_from_url(job.source.url) or \
                sanitize(job.fallback_name)
            chunks: AsyncIterator[bytes] | None = stream.chunks(chunk_size)
            if not offset and not opened.offset and total is not None and \
                    total <= min(chunk_size, HOLD_MOST):
                # a new file no larger than a chunk that comes in at once is read whole
                # first: its name is then recorded with its slot's hand-over, one statement
                # where there were two (one that takes longer is written as it comes)
                came = await _held_or_rest(stream.arrived(), total, HOLD_SECONDS)
                if isinstance(came, list) and sum(len(chunk) for chunk in came) == total:
                    held, chunks = came, None
                else:  # (a body cut short is written as far as it came: resumable)
                    chunks = came if isinstance(came, _Rest) else _Rest(came)
            if chunks is not None:
                if part is None:
                    name = await events.named(proposed, total, opened.validator)
                    part = PartFile(job.folder, name, job.checksum, keep_cache=job.keep_cache)
                    attempt.part = part.path
                else:
                    _same_name(name, await events.named(name, total, opened.validator))
                start = await _stream(opened, chunks, part, events, attempt, total, ask,
                                      offset, overlap)
        # the body is in and its connection given back: the account's slot goes too, and the
        # next file starts while this one is checked, flushed to disk and renamed
        if held is not None:
            # (counted as it came, before the disk: a write that fails lost it all the same)
            assert total is not None  # (a body is held only when its size is known)
            await events.progress(total, total)
            # the slot goes on to the next file only once this body has a writer: bodies
            # waiting for the disk are never more than `HELD_WRITING` (a slow disk holds
            # the transfers back, not the memory)
            async with _writers():
                # (a row named already keeps its name: no other download of the folder
                # has it)
                chosen = await events.sealing(Naming(proposed, total, opened.validator))
                assert chosen is not None
                name = chosen
                part = PartFile(job.folder, name, job.checksum, keep_cache=job.keep_cache)
                attempt.part = part.path
                start = 0
                # locked while the row is surely still this claim's, and kept locked until
                # the rename (the fence the sealing statement checked, as a streamed
                # file's is)
                try:
                    path = await part.write_whole(held, total, name, events.fenced,
                                                  _WRITER_THREADS)
                except NameTaken:
                    name, path = await _elsewhere(part, attempt, events, name, total,
                                                  opened.validator)
                finally:
                    attempt.size = part.size
        else:
            assert part is not None
            await events.sealing()
            try:
                try:
                    path = await part.finish(total, name)
                except NameTaken:
                    name, path = await _elsewhere(part, attempt, events, name, total,
                                                  opened.validator)
            except RetryableError:
                attempt.size = part.size
                raise
    finally:
        if part is not None:
            part.close()
            attempt.renaming = attempt.renaming or part.renaming
    # the rename on disk too before the row says done (an fsync of the folder, shared with
    # the files renamed meanwhile; the writer of a held body is free for the next one)
    await synced(path.parent)
    return Outcome(path=path, name=name, size=part.size, resumed_from=start,
                   restarted=offset > 0 and start == 0)


def _writers() -> asyncio.Semaphore:
    """This loop's writers of held bodies (`HELD_WRITING` at once)."""
    loop = asyncio.get_running_loop()
    writers = _WRITERS.get(loop)
    if writers is None:
        writers = _WRITERS[loop] = asyncio.Semaphore(HELD_WRITING)
    return writers


_WRITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
    weakref.WeakKeyDictionary()


_WRITER_THREADS = ThreadPoolExecutor(max_workers=HELD_WRITING,
                                     thread_name_prefix="asyncsat-held")
"""The workers of the held bodies' writers, one free for each (`HELD_WRITING`): not the
loop's default pool, where a write would wait behind copies, hashes of large resumed
files and their fsyncs while its fence lapses (it is checked in the worker, as the file is
locked: lapsed, the row goes back to the queue and the file is fetched again). Its
threads start as they are first needed."""


async def _elsewhere(part: PartFile, attempt: Attempt, events: Events, name: str,
                     total: int | None, validator: Validator) -> tuple[str, Path]:
    """The file's final name is taken by a file this download did not write: its `.part`
    (whole, flushed) takes the other name the row records, and that name. A file at that
    one too fails the download: nothing is replaced."""
    async def rename() -> str:
        other = await events.elsewhere(name, total, validator)
        await part.move(other)
        return other

    # the name recorded and the `.part`'s go together, whatever stops the transfer
    # meanwhile: recorded, then stopped, the whole `.part` would keep a name no attempt
    # looks for (and the file be fetched again)
    step, cancelled = await run_to_end(rename())
    attempt.part = part.path
    other = step.result()
    if cancelled:
        raise asyncio.CancelledError
    try:
        return other, await part.finish(total, other)
    except NameTaken:
        part.close()
        raise PermanentError(f"files this download did not write are at {name!r} and at "
                             f"{other!r}: neither is replaced") from None


def _same_name(name: str, chosen: str) -> None:
    if chosen != name:  # another product has that name: the next attempt takes it
        raise RetryableError(f"the file is to be named {chosen!r}, not {name!r}")


async def _held_or_rest(chunks: AsyncIterator[bytes], total: int, seconds: float) -> \
        list[bytes] | _Rest:
    """Every chunk of a body of `total` bytes that ends within `seconds`; else an iterator
    of the chunks read so far, then the rest (or the error that cut the body: what came is
    written first). No more than `total` bytes and a chunk are held (a server may send more
    than it announced)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    it = aiter(chunks)
    held: list[bytes] = []
    got = 0
    while True:
        try:
            chunk = await anext(it)
        except StopAsyncIteration:
            return held
        except Exception as exc:
            return _Rest(held, error=exc)
        held.append(chunk)
        got += len(chunk)
        if got > total or loop.time() > deadline:
            return _Rest(held, it)


class _Rest:
    """The chunks read so far, then the rest of the body (or the error that cut it)."""

    def __init__(self, held: list[bytes], it: AsyncIterator[bytes] | None = None, *,
                 error: Exception | None = None) -> None:
        self._held = held
        self._it = it
        self._error = error

    def __aiter__(self) -> _Rest:
        return self

    async def __anext__(self) -> bytes:
        if self._held:
            return self._held.pop(0)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._it is None:
            raise StopAsyncIteration
        return await anext(self._it)


async def _stream(opened: Opened, chunks: AsyncIterator[bytes], part: PartFile,
                  events: Events, attempt: Attempt, total: int | None, ask: int, offset: int,
                  overlap: int) -> int:
    """Write the body into the part file, from where the server resumed; returns that."""
    if opened.offset not in (0, ask):
        await part.open(0)
        part.close()
        raise RetryableError(f"the server resumed at byte {opened.offset}, not {ask}")
    start = opened.offset
    if offset and not start:  # (the row's ids are in the task's log context)
        log.warning("download restarted from zero", kept=offset,
                    reason="the server sent the file from its start (it does not resume, "
                    "or the file changed there)")
    if overlap and opened.offset == ask:
        chunks = _after_overlap(chunks, part.read(ask, overlap), part)
        start = offset
    await part.open(start)
    # progress is measured against what was on disk before this attempt, so that a
    # restart from zero that dies at the same byte every time is not progress
    attempt.size = start
    try:
        async for chunk in chunks:
            if total is not None and part.size + len(chunk) > total:
                # more than the size to check against (no Content-Length, a growing file):
                # not this product: emptied, and never written past it
                part.truncate()
                raise SizeError(f"size mismatch: the server sends more than {total} bytes",
                                evidence=f"size:>{total}")
            await part.write(chunk)
            attempt.size = part.size
            await events.progress(part.size, total)
        if total is not None and part.size < total:
            # a bounded 206 or a body cut short: resumable, and progress if it grew
            raise RetryableError(f"the transfer ended at byte {part.size} of {total}")
    except RetryableError:
        attempt.size = part.size  # the part may have been emptied
        raise
    return start


async def _after_overlap(chunks: AsyncIterator[bytes], kept: bytes, part: PartFile) -> \
        AsyncIterator[bytes]:
    """The chunks after the first `len(kept)` bytes, which must equal `kept`."""
    head = b""
    async for chunk in chunks:
        if len(head) < len(kept):
            need = len(kept) - len(head)
            head, chunk = head + chunk[:need], chunk[need:]
            if len(head) == len(kept) and head != kept:
                at = part.size
                part.truncate()  # what is on disk cannot be trusted to continue
                raise RetryableError(
                    f"the server did not resume at byte {at}: the bytes it sent again "
                    "differ from the ones kept, so the file starts again from zero")
        if chunk:
            yield chunk
    if len(head) < len(kept):  # the file ends before the bytes kept do: not the same file
        at = part.size
        part.truncate()
        raise RetryableError(f"the server's file ends before byte {at} that was kept, so the "
                             "file starts again from zero")


def _expected_size(job: Job, opened: Opened) -> int | None:
    """The size the file must have: the known one, else the one the server announces.

    A size from a catalog or a user is binding: a server announcing another one is serving
    something else (a truncated cache, an error page). A size the server announced in an
    earlier attempt yields when the server starts the file again from zero; if it changed
    while resuming, the file changed without a new validator, and starts again from zero.
    A known size of 0 means unknown (catalogs report 0 for products they cannot size).
    """
    known = job.size or None
    if known is None or opened.total is None or opened.total == known:
        return known if known is not None else opened.total
    if not job.size_from_server:
        raise SizeError(f"the server announces {opened.total} bytes, {known} were expected",
                        evidence=f"size:{opened.total}")
    if opened.offset == 0:
        return opened.total
    raise _SizeChanged(f"the remote file changed size ({known} -> {opened.total} bytes)")


class _SizeChanged(RetryableError):
    """The file changed under a resume without a new validator: start again from zero."""
