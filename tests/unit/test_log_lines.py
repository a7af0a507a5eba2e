"""The log's lines: each event one JSON line; the lines of one step of the event loop
written together (one write(2) on the loop's thread, where a system call may hand the GIL
to a worker thread); none lost at the loop's end or at exit."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from asyncsat import logs


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def out() -> Iterator[CountingStream]:
    stream = CountingStream()
    logs.configure(logs.Redactor(), fmt="json", level="info", stream=stream)
    yield stream
    logs.reset()


def _events(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]


def test_a_loop_steps_lines_are_written_together_and_in_order(out: CountingStream) -> None:
    log = structlog.get_logger()

    async def main() -> None:
        for n in range(50):
            log.info(f"event {n}")
        assert out.writes == 0  # (not yet: once the ready callbacks have run)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert _events(out) == [f"event {n}" for n in range(50)]
        assert out.writes == 1
        log.info("later")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert out.writes == 2

    asyncio.run(main())
    assert _events(out)[-1] == "later"


def test_without_a_loop_each_line_is_written_at_once(out: CountingStream) -> None:
    structlog.get_logger().info("now")
    assert _events(out) == ["now"]


def test_lines_pending_when_a_loop_ends_are_not_lost(out: CountingStream) -> None:
    log = structlog.get_logger()
    loop = asyncio.new_event_loop()

    async def last_words() -> None:
        log.info("first loop")

    loop.run_until_complete(last_words())  # (stops before the flush it scheduled runs)
    loop.close()

    async def again() -> None:  # a new loop's lines: a flush of their own
        log.info("second loop")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(again())
    assert _events(out) == ["first loop", "second loop"]


def test_the_last_lines_are_written_at_exit() -> None:
    """A process that logs and ends with the loop still holding the lines prints them."""
    code = (
        "import asyncio, os, sys\n"
        "import structlog\n"
        "from asyncsat import logs\n"
        "logs.configure(logs.Redactor())\n"
        "loop = asyncio.new_event_loop()\n"
        "async def main():\n"
        "    structlog.get_logger().info('the last words')\n"
        "loop.run_until_complete(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert [json.loads(line)["event"] for line in done.stdout.splitlines()] == \
        ["the last words"]


def test_a_warning_is_written_at_once_after_the_lines_before_it(out: CountingStream) -> None:
    """A step's lines wait for its end; a step that never ends (a blocking call that hangs
    the loop, then systemd's watchdog abort) must not take the warning or error that tells
    why with it. The info lines logged before it come first."""
    log = structlog.get_logger()

    async def main() -> None:
        log.info("before")
        log.warning("the disk does not answer")
        assert _events(out) == ["before", "the disk does not answer"]
        assert out.writes == 1
        log.info("after")
        log.error("it failed")
        assert _events(out)[-2:] == ["after", "it failed"]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert _events(out) == ["before", "the disk does not answer", "after", "it failed"]

    asyncio.run(main())


def test_an_error_logged_before_the_loop_hangs_and_is_aborted_is_written() -> None:
    """`WatchdogSec=` ends a hung loop with SIGABRT: no atexit, no flush."""
    code = (
        "import asyncio, os, time\n"
        "import structlog\n"
        "from asyncsat import logs\n"
        "logs.configure(logs.Redactor())\n"
        "async def main():\n"
        "    structlog.get_logger().error('the disk does not answer')\n"
        "    os.abort()  # (the step never ends)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert [json.loads(line)["event"] for line in done.stdout.splitlines()] == \
        ["the disk does not answer"]


def test_a_librarys_log_record_is_one_of_our_json_lines(out: CountingStream) -> None:
    """asyncpg's pool, retrying a connection while PostgreSQL is down, logs a warning with
    its exception: one redacted JSON line on our stream, not Python's text and traceback
    on stderr. A debug record is not forwarded at `info`, whatever the root logger's level
    (a test runner lowers it)."""
    redactor = logs.Redactor()
    redactor.add("pw-of-the-dsn")
    logs.configure(redactor, fmt="json", level="info", stream=out)
    try:
        raise ConnectionRefusedError(111, "Connect call failed: pw-of-the-dsn")
    except ConnectionRefusedError:
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor; retrying", exc_info=True)
    logging.getLogger("aiohttp.client").info("not shown below warning")
    logging.getLogger().setLevel(logging.DEBUG)
    logging.getLogger("aioftp.client").debug("530 Login incorrect: password pw-of-the-dsn")
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "Failed to restore the pool connection floor; retrying"
    assert (event["level"], event["logger"]) == ("warning", "asyncpg.pool")
    assert event["error"] == "ConnectionRefusedError: [Errno 111] Connect call failed: ***"
    assert "timestamp" in event
