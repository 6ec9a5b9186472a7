"""Unit tests see a host of 8 CPUs, whatever runs them: the policies they load pin zones to
CPUs 0-1, and a policy naming CPUs the host lacks is refused (tests that are about that
pass `host_cpus` themselves)."""

from __future__ import annotations

import pytest

from hvtsm.policy import loader

FAKE_HOST_CPUS = frozenset(range(8))


@pytest.fixture(autouse=True)
def _eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_online_cpus", lambda: FAKE_HOST_CPUS)
