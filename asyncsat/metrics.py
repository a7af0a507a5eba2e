"""Prometheus metrics of one daemon, served on its own event loop (`run --metrics-port`).

The engine, the resolver and the listener report to a `Recorder`; the base class records
nothing (a daemon without a metrics port, `get --wait`), `Metrics` keeps the figures in a
registry of its own (no process-wide state) and serves them at `/metrics`. prometheus_client
and aiohttp's server are imported only by `Metrics`: commands that serve none do not pay
for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from asyncsat.errors import (
    AsyncsatError,
    AuthError,
    ChecksumError,
    DiskFullError,
    PayloadError,
    RetryableError,
    SizeError,
    TransferError,
    VerificationError,
)

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric

SlotFigures = Callable[[], Iterable[tuple[str, int, int]]]
"""(provider, free slots, capacity) for every provider the daemon knows."""

CATALOG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def retry_reason(error: TransferError) -> str:
    """A small fixed set of label values for the retries counter."""
    if isinstance(error, DiskFullError):
        return "disk_full"
    if isinstance(error, RetryableError) and error.throttled:
        return "throttled"
    for kind, reason in ((AuthError, "auth"), (ChecksumError, "checksum"), (SizeError, "size"),
                         (PayloadError, "payload"), (VerificationError, "verification")):
        if isinstance(error, kind):
            return reason
    return "transient"


class Recorder:
    """What the daemon reports as it works. This one records nothing."""

    def transfer_started(self, provider: str) -> None:
        """A transfer took a slot of `provider`."""

    def transfer_ended(self, provider: str) -> None:
        """A transfer gave its slot back, however it ended."""

    def downloaded(self, provider: str, size: int) -> None:
        """`size` more bytes of a product of `provider` are on disk."""

    def download_ended(self, provider: str, status: str) -> None:
        """A download reached a final status: done, failed, offline or cancelled."""

    def retried(self, provider: str, error: TransferError) -> None:
        """An attempt failed and the download goes back to the queue for another one."""

    def catalog_request(self, provider: str, seconds: float, *, ok: bool) -> None:
        """A catalog search or listing took `seconds` (`ok` False: it failed)."""

    def listener_reconnected(self) -> None:
        """The LISTEN connection was lost and is back."""

    def watch_slots(self, figures: SlotFigures) -> None:
        """Where the connection slots are read from when the figures are asked for."""


class _Slots:
    """A collector reading the slots at scrape time: a gauge that is never stale."""

    def __init__(self) -> None:
        self.figures: SlotFigures = list

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        free = GaugeMetricFamily("asyncsat_slots_free", "Connection slots free now",
                                 labels=["provider"])
        total = GaugeMetricFamily("asyncsat_slots_total", "Connection slots the accounts "
                                  "allow", labels=["provider"])
        for provider, available, capacity in self.figures():
            free.add_metric([provider], available)
            total.add_metric([provider], capacity)
        yield free
        yield total


class Metrics(Recorder):
    """The figures of one daemon, in a CollectorRegistry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._bytes: Counter = Counter(
            "asyncsat_downloaded_bytes", "Bytes of products written to disk",
            ["provider"], registry=r)
        self._downloads: Counter = Counter(
            "asyncsat_downloads", "Downloads that reached a final status", ["provider",
                                                                               "status"],
            registry=r)
        self._active: Gauge = Gauge(
            "asyncsat_transfers_active", "Transfers running now", ["provider"], registry=r)
        self._retries: Counter = Counter(
            "asyncsat_retries", "Failed attempts retried later, by reason",
            ["provider", "reason"], registry=r)
        self._catalog: Histogram = Histogram(
            "asyncsat_catalog_request_seconds", "Time a catalog search or listing took",
            ["provider", "outcome"], buckets=CATALOG_BUCKETS, registry=r)
        self._reconnects: Counter = Counter(
            "asyncsat_listener_reconnects", "Times the LISTEN connection was restored",
            registry=r)
        self._slots = _Slots()
        r.register(self._slots)

    def transfer_started(self, provider: str) -> None:
        self._active.labels(provider).inc()

    def transfer_ended(self, provider: str) -> None:
        self._active.labels(provider).dec()

    def downloaded(self, provider: str, size: int) -> None:
        if size > 0:
            self._bytes.labels(provider).inc(size)

    def download_ended(self, provider: str, status: str) -> None:
        self._downloads.labels(provider, status).inc()

    def retried(self, provider: str, error: TransferError) -> None:
        self._retries.labels(provider, retry_reason(error)).inc()

    def catalog_request(self, provider: str, seconds: float, *, ok: bool) -> None:
        self._catalog.labels(provider, "ok" if ok else "error").observe(seconds)

    def listener_reconnected(self) -> None:
        self._reconnects.inc()

    def watch_slots(self, figures: SlotFigures) -> None:
        self._slots.figures = figures

    def render(self) -> bytes:
        """The text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Serve `http://HOST:PORT/metrics` on the running loop; `cleanup()` the runner."""
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        async def scrape(_request: web.Request) -> web.Response:
            return web.Response(body=self.render(),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise AsyncsatError(f"cannot serve metrics on {host}:{port}: "
                                f"{exc.strerror or exc}") from None
        return runner
