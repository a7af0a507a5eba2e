from __future__ import annotations

from asyncsat.progress import RateMeter, duration, eta


def test_rate_over_the_last_seconds() -> None:
    meter = RateMeter(window=5.0)
    assert meter.add(0.0, 0) is None
    assert meter.add(0.01, 64_000) is None  # a burst, not a pace
    assert meter.add(1.0, 1000) is None  # less than before: the measure starts anew
    assert meter.add(2.0, 2000) == 1000.0
    for t in range(2, 11):  # 1000 B/s for 10 s, then 3000 B/s
        meter.add(float(t), 1000 * t)
    for t in range(11, 17):
        meter.add(float(t), 10_000 + 3000 * (t - 10))
    assert meter.rate() == 3000.0  # the slow start left the window


def test_a_restart_from_zero_starts_the_measure_anew() -> None:
    meter = RateMeter()
    meter.add(0.0, 5_000_000)
    meter.add(1.0, 6_000_000)
    assert meter.add(2.0, 0) is None
    assert meter.add(3.0, 500) == 500.0


def test_eta_and_duration() -> None:
    assert eta(1000, 100.0) == 10.0
    assert eta(1000, 0.0) is None and eta(None, 5.0) is None
    assert duration(100) == "0:01:40"
    assert duration(90061) == "25:01:01"
    assert duration(None) == "-"
