"""Unit tests see a host of 8 CPUs, whatever runs them: the policies they load pin zones to
CPUs 0-1, and a policy naming CPUs the host lacks is refused (tests that are about that
pass `host_cpus` themselves). The property-based tests run the `ci` hypothesis profile
(150 examples, no example database) unless HYPOTHESIS_PROFILE says `thorough`."""

from __future__ import annotations

import os

import pytest

from hvtsm.policy import loader

FAKE_HOST_CPUS = frozenset(range(8))


@pytest.fixture(autouse=True)
def _eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_online_cpus", lambda: FAKE_HOST_CPUS)


try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the fuzz tests skip themselves
    pass
else:
    # modest and reproducible by default (no example database left in the tree);
    # HYPOTHESIS_PROFILE=thorough for a long run
    settings.register_profile("ci", max_examples=150, database=None, derandomize=False,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=2000, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
