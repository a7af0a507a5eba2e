"""One transfer attempt, protocol-independent: open, resume or restart, stream, verify, rename."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from asyncsat.errors import RetryableError
from asyncsat.models import Checksum
from asyncsat.naming import name_from_url, sanitize
from asyncsat.transfer.base import Driver, Source, Validator
from asyncsat.transfer.files import PartFile


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


@dataclass(frozen=True)
class Outcome:
    """A finished transfer."""

    path: Path
    name: str
    size: int
    resumed_from: int
    restarted: bool


class Events(Protocol):
    """What the transfer tells its owner while it runs."""

    async def named(self, name: str, size: int | None, validator: Validator) -> str:
        """The file's name, size and validators are known; called before any byte is written.

        Returns the name to use: the one proposed, unless another download owns it.
        """
        ...

    async def progress(self, done: int, total: int | None) -> None:
        """`done` bytes of the file are on disk (called per chunk; throttle in the callee)."""
        ...


@dataclass
class Attempt:
    """The state of one attempt, readable after it raised (for the retry decision)."""

    start_size: int = 0
    size: int = 0

    @property
    def progressed(self) -> bool:
        return self.size > self.start_size


async def transfer(driver: Driver, job: Job, events: Events, attempt: Attempt,
                   chunk_size: int) -> Outcome:
    """Fetch `job` into `job.folder`, resuming from its `.part` file when there is one."""
    name = sanitize(job.name) if job.name else ""
    part = PartFile(job.folder, name, job.checksum) if name else None
    offset = 0
    if part is not None:
        if part.final.exists() and not part.path.exists():
            # renamed before a crash but never recorded: verify it again as a part
            part.final.replace(part.path)
        offset = part.existing_size
    attempt.start_size = attempt.size = offset
    validator = job.validator if offset else Validator()
    async with driver.open(job.source, offset, validator) as stream:
        opened = stream.opened
        total = opened.total if opened.total is not None else job.size
        if part is None:
            proposed = opened.name or name_from_url(job.source.url) or \
                sanitize(job.fallback_name)
            name = await events.named(proposed, total, opened.validator)
            part = PartFile(job.folder, name, job.checksum)
        else:
            await events.named(name, total, opened.validator)
        if opened.offset not in (0, offset):
            await part.open(0)
            part.close()
            raise RetryableError(f"the server resumed at byte {opened.offset}, not {offset}")
        await part.open(opened.offset)
        attempt.start_size = attempt.size = opened.offset
        try:
            async for chunk in stream.chunks(chunk_size):
                part.write(chunk)
                attempt.size = part.size
                await events.progress(part.size, total)
            path = await part.finish(total, name)
        finally:
            part.close()
    return Outcome(path=path, name=name, size=part.size, resumed_from=opened.offset,
                   restarted=offset > 0 and opened.offset == 0)
