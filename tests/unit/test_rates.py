"""The one rate window (guest_agent/rates.py), driven by an explicit clock."""

from __future__ import annotations

import pytest

from guest_agent.rates import RateWindow


def test_sliding_window_forgets_each_addition_after_its_span() -> None:
    w = RateWindow(1.0)
    assert w.add(0.0) == 1
    assert w.add(0.5, 2) == 3
    assert w.count(1.0) == 3  # the first is exactly one span old: still in
    assert w.count(1.01) == 2
    assert w.count(1.51) == 0


def test_fixed_window_restarts_as_a_whole() -> None:
    w = RateWindow(1.0, fixed=True)
    w.add(10.0, 5)
    w.add(10.9, 5)
    assert w.started(10.95) == 10.0
    assert w.count(10.99) == 10
    assert w.count(11.0) == 0
    assert w.started(11.0) is None
    w.add(11.2)
    assert w.started(11.3) == 11.2


def test_admit_keeps_the_limit() -> None:
    w = RateWindow(1.0, limit=3)
    assert [w.admit(0.1 * i) for i in range(5)] == [True, True, True, False, False]
    assert not w.over(0.4)
    assert w.admit(1.2)  # the first ones slid out


def test_over_compares_with_the_limit_and_no_limit_is_never_over() -> None:
    w = RateWindow(1.0, limit=2)
    w.add(0.0, 3)
    assert w.over(0.5)
    free = RateWindow(1.0)
    free.add(0.0, 10**6)
    assert not free.over(0.0)
    assert free.admit(0.0)


def test_once_per_period() -> None:
    throttle = RateWindow(1.0, limit=1)
    assert throttle.admit(0.0)
    assert not throttle.admit(0.99)
    assert throttle.admit(1.01)


def test_bad_span_is_refused() -> None:
    with pytest.raises(ValueError):
        RateWindow(0)
