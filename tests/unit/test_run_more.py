"""How many rows a slot claims in a run: as many as the pace of its last file fits in half
of RUN_WAIT (slower files, shorter runs; none past RUN)."""

from __future__ import annotations

from asyncsat import engine


def test_fast_files_take_full_runs() -> None:
    assert engine.run_more(0.002) == engine.RUN - 1
    assert engine.run_more(0.0) == engine.RUN - 1


def test_a_run_of_slower_files_fits_in_half_of_run_wait() -> None:
    for took in (0.04, 0.05, 0.1, 0.2):
        more = engine.run_more(took)
        assert 0 <= more < engine.RUN - 1
        assert (1 + more) * took <= engine.RUN_WAIT / 2  # its last row's turn in time
        assert (2 + more) * took > engine.RUN_WAIT / 2  # and not one row fewer than fits


def test_files_slower_than_half_of_run_wait_take_no_run() -> None:
    assert engine.run_more(0.3) == 0
    assert engine.run_more(5.0) == 0
