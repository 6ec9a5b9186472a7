"""Monitoring inside real TCG guests: the agent in the guest watches the workload with the
default policy's profile; each misbehaving program of the corpus is contained and named in
the audit trail, each benign one finishes untouched. Guests boot two at a time (two
cores); every case is checked and all failures are reported together."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager
from hvtsm.store import Store
from hvtsm.store.models import ZoneState
from hvtsm.zones.base import Backend
from hvtsm.zones.factory import driver_factory
from tests.integration.monitor_corpus import (
    Case,
    Outcome,
    bad_cases,
    benign_cases,
    corpus_dir,
    decoy_key,
    run_case,
)
from tests.integration.test_libvirt_zone import _libvirt_ready

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]

#: guests booted at once: 3 fit two cores, 2 leave room for the host under CI load
PARALLEL = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Manager, Store, Path]]:
    reason = _libvirt_ready()
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    assert reason is None, reason
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('gmon') / 'hvtsm.db'}")
    manager = Manager(store, driver_factory(Backend.LIBVIRT, probe_host()))
    manager.start()
    with corpus_dir() as corpus, decoy_key():
        yield manager, store, corpus
    manager.shutdown()
    store.dispose()


def run_all(setup: tuple[Manager, Store, Path], cases: list[Case]) -> list[Outcome]:
    manager, store, corpus = setup
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(lambda c: run_case(manager, store, corpus, c, timeout=120),
                             cases))


def test_guest_corpus(setup: tuple[Manager, Store, Path], listener: int) -> None:
    bad, benign = bad_cases(listener), benign_cases(listener)
    outcomes = run_all(setup, bad + benign)
    failures = []
    for case, outcome in zip(bad, outcomes[:len(bad)], strict=True):
        named = [c for c in outcome.categories if c in case.expect]
        if "SURVIVED" in outcome.output or not named:
            failures.append(f"{case.program}: anomalies {outcome.categories}, "
                            f"output {outcome.output[-300:]!r}")
        elif not outcome.reactions:
            failures.append(f"{case.program}: no reaction")
    for case, outcome in zip(benign, outcomes[len(bad):], strict=True):
        if outcome.categories or outcome.run.state is not ZoneState.EXITED \
                or outcome.run.exit_status != 0 or case.output not in outcome.output:
            failures.append(f"{case.program}: anomalies {outcome.categories} "
                            f"{outcome.evidence}, state {outcome.run.state}, status "
                            f"{outcome.run.exit_status}, output {outcome.output[-300:]!r}")
    assert not failures, "\n".join(failures)
