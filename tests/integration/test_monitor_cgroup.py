"""Monitoring beside cgroup zones, end to end: the agent runs on the host next to each zone,
the default policy's profile is in force, and each misbehaving program of the corpus is
contained and named in the audit trail while each benign one finishes untouched."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvtsm.host import probe_host
from hvtsm.manager import Manager
from hvtsm.monitor import host_agent
from hvtsm.store import Store
from hvtsm.store.models import ZoneState
from hvtsm.zones.cgroup.driver import CgroupDriver
from tests.integration.monitor_corpus import (
    Case,
    bad_cases,
    benign_cases,
    corpus_dir,
    decoy_key,
    run_case,
)

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Manager, Store, Path]]:
    caps = probe_host()
    if os.geteuid() != 0:
        pytest.skip("cgroup zones need root")
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('mon') / 'hvtsm.db'}")
    manager = Manager(store, CgroupDriver(caps))
    manager.start()
    with corpus_dir() as corpus, decoy_key():
        yield manager, store, corpus
    manager.shutdown()
    store.dispose()


def ids(cases: list[Case]) -> list[str]:
    return [c.program.removesuffix(".py") for c in cases]


@pytest.mark.parametrize("index", range(len(bad_cases(1))), ids=ids(bad_cases(1)))
def test_misbehaving_program_is_contained_and_named(
        setup: tuple[Manager, Store, Path], listener: int, index: int) -> None:
    manager, store, corpus = setup
    case = bad_cases(listener)[index]
    outcome = run_case(manager, store, corpus, case, timeout=40)
    assert "SURVIVED" not in outcome.output, outcome.output
    assert outcome.run.ended.is_set()
    named = [c for c in outcome.categories if c in case.expect]
    assert named, f"anomalies {outcome.categories}, output {outcome.output!r}"
    first = outcome.evidence[outcome.categories.index(named[0])]
    assert isinstance(first.get("pid"), int) and first.get("program")
    assert first.get("contained") in ("killed", "denied")
    assert outcome.reactions, "the host reacted"
    assert not host_agent.socket_path(outcome.run.zone_id).exists()


@pytest.mark.parametrize("index", range(len(benign_cases(1))), ids=ids(benign_cases(1)))
def test_benign_program_finishes_without_anomaly(
        setup: tuple[Manager, Store, Path], listener: int, index: int) -> None:
    manager, store, corpus = setup
    case = benign_cases(listener)[index]
    outcome = run_case(manager, store, corpus, case, timeout=40)
    assert outcome.categories == [], outcome.evidence
    assert outcome.run.state is ZoneState.EXITED and outcome.run.exit_status == 0, \
        outcome.output
    assert case.output in outcome.output
