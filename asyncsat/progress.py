"""Transfer rates and times left: pure arithmetic on (time, bytes) samples, no I/O."""

from __future__ import annotations

from collections import deque


class RateMeter:
    """Bytes per second over the last `window` seconds of samples of a growing byte count.

    A count that goes down (a file started again from zero) starts the measure anew. Until
    the samples span `least` seconds the rate is unknown (None): the first chunks of a
    transfer come in a burst that says nothing of its pace.
    """

    def __init__(self, window: float = 5.0, least: float = 1.0) -> None:
        self.window = window
        self.least = least
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> float | None:
        """Record `done` bytes at time `at` (seconds, monotonic); the rate now."""
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((at, done))
        # keep one sample at or before the start of the window, as the base of the measure
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.window:
            self._samples.popleft()
        return self.rate()

    def rate(self) -> float | None:
        """Bytes per second over the window; None until the samples span `least` seconds."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 - t0 >= self.least else None


def eta(left: int | None, rate: float | None) -> float | None:
    """Seconds until `left` bytes have arrived at `rate` bytes/s (None: unknown)."""
    if left is None or not rate or rate <= 0:
        return None
    return max(0.0, left / rate)


def duration(seconds: float | None) -> str:
    """`0:01:40` (hours unbounded); `-` when unknown."""
    if seconds is None:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
