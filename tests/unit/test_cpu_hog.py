"""Sustained CPU use (`cpu-hog`) judged by the sampler on plain values: the CPU time the
members used over the window against max_cpu_share of the zone's CPUs; a burst within the
window is no hog, use that goes on is, and the one that used most is named."""

from __future__ import annotations

import os
from typing import Any

from guest_agent.judge import Verdict
from guest_agent.proccount import Proc
from guest_agent.profile import Profile
from guest_agent.sampling import CLK_TCK, Sampler, _cpus_of
from guest_agent.watch import Watch

ME = os.getpid()
CPUS = _cpus_of(ME)


class Contained:
    def __init__(self) -> None:
        self.calls: list[tuple[Verdict, int]] = []

    def call(self, _watch: Watch, verdict: Verdict, pid: int, *_args: Any) -> None:
        self.calls.append((verdict, pid))


def feed(shares: list[float], *, limit: float = 0.5, window: float = 10,
         helper_share: float = 0.0) -> list[tuple[Verdict, int]]:
    """One sample a second; the zone uses `shares[i]` of its CPUs in second i (its first
    process), and a second process `helper_share`."""
    contained = Contained()
    sampler = Sampler(None, contained, watches=lambda: [], system_counter=False,  # type: ignore[arg-type]
                      zones_changed=lambda _w: None)
    watch = Watch("w", Profile(max_cpu_share=limit, cpu_window=window), None, frozenset())
    watch.root_pid = ME
    main = helper = 0.0
    for second, share in enumerate([0.0, *shares]):
        main += share * CPUS * CLK_TCK
        helper += helper_share * CPUS * CLK_TCK
        procs = {ME: Proc(ME, 1, 1, 0, int(main)), 2: Proc(2, ME, 2, 0, int(helper))}
        sampler._check_cpu(watch, procs, float(second))
    return contained.calls


def test_use_that_goes_on_is_a_hog_named_by_its_process() -> None:
    calls = feed([0.9] * 12)
    assert calls, "no anomaly"
    verdict, pid = calls[0]
    assert verdict.category == "cpu-hog" and pid == ME
    assert f"of {CPUS} CPU(s)" in verdict.detail and "limit 50%" in verdict.detail


def test_a_burst_within_the_window_is_no_hog() -> None:
    assert feed([1.0] * 4 + [0.0] * 10) == []  # 4 s of 14 at full use: 40% at most
    assert feed([0.4] * 30) == []  # steady, under the limit


def test_nothing_is_judged_before_the_window_is_covered() -> None:
    assert feed([1.0] * 8) == []  # 8 s of a 10 s window
    assert feed([1.0] * 8, limit=0) == [] and feed([1.0] * 30, limit=0) == []


def test_the_process_that_used_most_is_the_one_contained() -> None:
    calls = feed([0.1] * 12, helper_share=0.8)
    assert calls and calls[0][1] == 2
