"""The held path of a transfer (a small new file read whole before it is written), against
a driver that serves bytes from memory: the fence is kept up to the rename, the body is
let go once written, and no more than the file's size is held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from asyncsat.errors import LeaseLost, RetryableError, SizeError
from asyncsat.transfer import files, runner
from asyncsat.transfer.base import Opened, Source, Validator
from asyncsat.transfer.runner import Attempt, Job, Naming, transfer

CHUNK = 1 << 20


class _Stream:
    def __init__(self, body: Callable[[int], AsyncIterator[bytes]], total: int | None) -> None:
        self.opened = Opened(0, total, validator=Validator('"v"'))
        self._body = body

    def chunks(self, size: int) -> AsyncIterator[bytes]:
        return self._body(size)

    def arrived(self) -> AsyncIterator[bytes]:
        return self._body(64 << 10)  # (as a socket delivers it)


class _Driver:
    def __init__(self, body: Callable[[int], AsyncIterator[bytes]], total: int | None) -> None:
        self._body, self._total = body, total

    @asynccontextmanager
    async def open(self, source: Source, offset: int, validator: Validator) -> \
            AsyncIterator[_Stream]:
        yield _Stream(self._body, self._total)

    async def aclose(self) -> None:
        pass


def _body_of(data: bytes) -> Callable[[int], AsyncIterator[bytes]]:
    async def body(size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i:i + size]
    return body


class _Events:
    """A claim whose `sealing` runs `meanwhile` after its statement said "owned" (where a
    daemon paused past its lease would be), and whose lease then lapsed."""

    def __init__(self, meanwhile: Callable[[], Any] | None = None) -> None:
        self.meanwhile = meanwhile
        self.lapsed = False

    async def named(self, name: str, size: int | None, validator: Validator) -> str:
        return name

    async def progress(self, done: int, total: int | None) -> None:
        pass

    def fenced(self) -> bool:
        return not self.lapsed

    async def sealing(self, naming: Naming | None = None) -> str | None:
        if self.meanwhile is not None:
            await self.meanwhile()
            self.lapsed = True
        return None if naming is None else naming.name


def _job(folder: Path, size: int | None = None) -> Job:
    return Job(Source("http://x/a.nc"), folder, "a.nc", size, None)


@pytest.mark.parametrize("size", [100_000, 3 * CHUNK])
async def test_a_daemon_paused_after_its_seal_never_replaces_the_file_of_the_one_that_took_over(
        tmp_path: Path, size: int) -> None:
    """A seals, then is paused past its lease; B takes the row over, downloads the file
    (a new version of it), renames it and records it done. When A resumes, B's file stays:
    a held file (100 kB) is locked only while its row is surely its claim's, a streamed one
    (3 MiB) was locked before its seal (B could not write it)."""
    v1, v2 = b"1" * size, b"2" * size
    final = tmp_path / "a.nc"
    b_got: list[BaseException | Path] = []

    async def b_takes_over() -> None:
        try:
            done = await transfer(_Driver(_body_of(v2), len(v2)), _job(tmp_path), _Events(),
                                  Attempt(), CHUNK)
            b_got.append(done.path)
        except RetryableError as exc:
            b_got.append(exc)

    try:
        await transfer(_Driver(_body_of(v1), len(v1)), _job(tmp_path),
                       _Events(meanwhile=b_takes_over), Attempt(), CHUNK)
    except LeaseLost:
        assert size <= CHUNK  # (the held one finds out as it locks its file)
    [b] = b_got
    if isinstance(b, Path):
        assert final.read_bytes() == v2, "A, its lease lapsed, replaced B's file"
        assert all(p.stat().st_size == 0 for p in tmp_path.glob("*.part"))
    else:
        assert "another process" in str(b)


def _bytes_held(task: asyncio.Task[Any]) -> int:
    """Bytes a task's suspended coroutines hold in their locals (bytes, or lists of them)."""
    held = 0
    coro: Any = task.get_coro()
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        for value in coro.cr_frame.f_locals.values():
            if isinstance(value, (bytes, bytearray)):
                held += len(value)
            elif isinstance(value, list):
                held += sum(len(c) for c in value if isinstance(c, (bytes, bytearray)))
        coro = coro.cr_await
    return held


async def test_a_held_body_is_let_go_before_its_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files wait for their fsync: they must not keep their bodies meanwhile (nowhere in
    the transfer: its coroutines' locals are looked at when the file is flushed)."""
    data = b"x" * 200_000
    tasks: list[asyncio.Task[Any]] = []
    kept: list[int] = []
    real_whole = files.PartFile.write_whole
    real_fsync = files.os.fsync

    async def write_whole(self: files.PartFile, *args: Any) -> Path:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        return await real_whole(self, *args)

    def fsync(fd: int) -> None:
        kept.extend(_bytes_held(task) for task in tasks)
        real_fsync(fd)

    monkeypatch.setattr(files.PartFile, "write_whole", write_whole)
    monkeypatch.setattr(files.os, "fsync", fsync)
    done = await asyncio.create_task(transfer(
        _Driver(_body_of(data), len(data)), _job(tmp_path), _Events(), Attempt(), CHUNK))
    assert len(tasks) == 1 and kept and set(kept) == {0}
    assert done.path.read_bytes() == data


async def test_bodies_waiting_for_the_disk_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk slower than the network holds the transfers back (before their slot goes on),
    not their bodies in memory: no more than `HELD_WRITING` are written at once."""
    monkeypatch.setattr(runner, "HELD_WRITING", 3)
    gate = asyncio.Event()
    writing = 0
    most = 0
    real_whole = files.PartFile.write_whole

    async def write_whole(self: files.PartFile, *args: Any) -> Path:
        nonlocal writing, most
        writing += 1
        most = max(most, writing)
        await gate.wait()  # (a disk that does not answer yet)
        try:
            return await real_whole(self, *args)
        finally:
            writing -= 1

    monkeypatch.setattr(files.PartFile, "write_whole", write_whole)
    sealed: list[str] = []

    class Events(_Events):
        async def sealing(self, naming: Naming | None = None) -> str | None:
            assert naming is not None
            sealed.append(naming.name)
            return naming.name

    data = b"y" * 5000
    jobs = [asyncio.create_task(transfer(
        _Driver(_body_of(data), len(data)), _job(tmp_path / str(i)), Events(), Attempt(),
        CHUNK)) for i in range(8)]
    for _ in range(50):
        await asyncio.sleep(0)
    assert most == 3 and len(sealed) == 3  # the others wait before their slot goes on
    gate.set()
    done = await asyncio.gather(*jobs)
    assert most == 3 and len(sealed) == 8
    assert all(d.path.read_bytes() == data for d in done)


async def test_no_more_than_the_announced_size_is_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalog size of 1 kB and a server that sends much more, and fast, with no
    Content-Length: what is held stops past the size, and nothing past it is written."""
    blob = b"z" * CHUNK
    held: list[int] = []

    async def endless(size: int) -> AsyncIterator[bytes]:
        for _ in range(2000):
            await asyncio.sleep(0)
            yield blob

    real = runner._held_or_rest

    async def spy(chunks: AsyncIterator[bytes], total: int, seconds: float) -> Any:
        came = await real(chunks, total, seconds)
        got = came if isinstance(came, list) else came._held
        held.append(sum(len(c) for c in got))
        return came

    monkeypatch.setattr(runner, "_held_or_rest", spy)
    attempt = Attempt()
    with pytest.raises(SizeError) as raised:
        await transfer(_Driver(endless, None), _job(tmp_path, size=1000), _Events(),
                       attempt, CHUNK)
    assert held == [CHUNK]
    # nor is more than the size written: the part is emptied at the first chunk past it
    assert raised.value.evidence == "size:>1000"
    assert (tmp_path / "a.nc.part").stat().st_size == 0 and attempt.size == 0


async def test_a_paused_daemon_that_finds_its_fence_lapsed_leaves_the_new_owners_part_alone(
        tmp_path: Path) -> None:
    """B (which took the download over) has created `a.nc.part` and is about to lock it; A
    (paused past its lease) opens the same file and locks it first, finds its fence
    lapsed, and lets it go: B then writes and renames its file (an unlink by A would have
    left B writing into a file with no name)."""
    data = b"x" * 100_000
    b = files.PartFile(tmp_path, "a.nc", None)
    a = files.PartFile(tmp_path, "a.nc", None)
    lock = b._lock

    def a_first() -> None:  # between B's open(2) and B's flock(2)
        with pytest.raises(LeaseLost):
            a._open(0, lambda: False)
        lock()

    b._lock = a_first  # type: ignore[method-assign]
    await b.open(0)
    await b.write(data)
    assert (await b.finish(len(data), "a.nc")).read_bytes() == data
