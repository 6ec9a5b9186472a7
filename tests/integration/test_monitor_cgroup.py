"""Monitoring beside cgroup zones, end to end: the agent runs on the host next to each zone,
the default policy's profile is in force, and each misbehaving program of the corpus is
contained and named in the audit trail while each benign one finishes untouched."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager
from hvtsm.monitor import host_agent
from hvtsm.policy import load_policy
from hvtsm.policy.loader import parse_policy
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.store.models import ZoneState
from hvtsm.zones.base import WorkloadIO
from hvtsm.zones.cgroup.driver import CgroupDriver
from tests.integration.cli_helpers import audit, hvtsm, json_lines
from tests.integration.monitor_corpus import (
    DEFAULT_POLICY,
    DROPPED_MODES,
    Case,
    bad_cases,
    benign_cases,
    corpus_dir,
    decoy_key,
    dropped_cases,
    run_case,
)

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Manager, Store, Path]]:
    caps = probe_host()
    if os.geteuid() != 0:
        pytest.skip("cgroup zones need root")
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('mon') / 'hvtsm.db'}")
    manager = Manager(store, partial(CgroupDriver, caps=caps))
    manager.start()
    with corpus_dir() as corpus, decoy_key():
        yield manager, store, corpus
    manager.shutdown()
    store.dispose()


def ids(cases: list[Case]) -> list[str]:
    """A program's name, with its variant when the corpus runs it in several ways."""
    names = [c.program.removesuffix(".py") for c in cases]
    return [f"{n}-{c.args[0]}" if names.count(n) > 1 else n
            for n, c in zip(names, cases, strict=True)]


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


@pytest.mark.parametrize("mode", DROPPED_MODES)
def test_code_from_the_network_never_runs(
        setup: tuple[Manager, Store, Path], payload_port: int, mode: str) -> None:
    """Judged by where it came from, not by the directory it lies in (its scratch /tmp)."""
    manager, store, corpus = setup
    case = dropped_cases(payload_port)[DROPPED_MODES.index(mode)]
    outcome = run_case(manager, store, corpus, case, timeout=40)
    assert f"ACT {mode}" in outcome.output, outcome.output  # the code did arrive
    assert "SURVIVED" not in outcome.output and "payload-ran" not in outcome.output, \
        outcome.output
    assert "dropped-code" in outcome.categories, (outcome.categories, outcome.output)
    evidence = outcome.evidence[outcome.categories.index("dropped-code")]
    assert evidence.get("contained") in ("killed", "denied"), evidence
    assert outcome.run.state is ZoneState.TERMINATED  # the default policy ends such a zone


def test_code_from_a_trusted_origin_runs(
        setup: tuple[Manager, Store, Path], payload_port: int) -> None:
    """trusted_origins: the zones' gateways (a package mirror on the host, say)."""
    manager, store, corpus = setup
    text = DEFAULT_POLICY.read_text().replace(
        "max_forks_per_s = 200", 'trusted_origins = ["10.213.0.0/16"]\nmax_forks_per_s = 200')
    policy = parse_policy(text.encode(), source="default+trusted")
    case = dropped_cases(payload_port)[DROPPED_MODES.index("exec")]
    outcome = run_case(manager, store, corpus, case, timeout=40, policy=policy)
    assert "SURVIVED exec" in outcome.output, outcome.output
    assert outcome.categories == [], outcome.evidence


def test_ordinary_work_is_never_an_anomaly(
        setup: tuple[Manager, Store, Path], payload_port: int) -> None:
    """Compile and run C in /tmp, make, a library built and loaded, scripts written here,
    a package's own tests, compileall, tar, git, sqlite; data fetched and sorted."""
    manager, store, corpus = setup
    case = Case("benign_build.py", ("gateway", str(payload_port)), frozenset(), "OK build")
    outcome = run_case(manager, store, corpus, case, timeout=90)
    assert outcome.categories == [], (outcome.evidence, outcome.output)
    assert outcome.run.state is ZoneState.EXITED and outcome.run.exit_status == 0, \
        outcome.output
    assert case.output in outcome.output


def test_mass_deletion_is_stopped(setup: tuple[Manager, Store, Path]) -> None:
    manager, store, corpus = setup
    case = Case("mass_delete.py", ("600",), frozenset({"deletion-rate"}))
    outcome = run_case(manager, store, corpus, case, timeout=40)
    assert "ACT mass-delete" in outcome.output, outcome.output
    assert "SURVIVED" not in outcome.output, outcome.output
    assert "deletion-rate" in outcome.categories, (outcome.categories, outcome.output)
    evidence = outcome.evidence[outcome.categories.index("deletion-rate")]
    assert evidence.get("contained") in ("killed", "denied"), evidence


#: dash's SIGCHLD handler has no SA_RESTART: a fork that waited for the agent while a
#: child's SIGCHLD landed failed with EINTR ("Cannot fork") in most of these runs
FORK_HEAVY = ("for i in $(seq 200); do printf x | cat >/dev/null || exit 9; done; echo ok")


def test_watched_shell_forks_never_fail(setup: tuple[Manager, Store, Path]) -> None:
    manager, store, _ = setup
    policy = load_policy(DEFAULT_POLICY)
    for attempt in range(4):
        with tempfile.TemporaryFile() as out:
            io = WorkloadIO(stdin=None, stdout=out.fileno(), stderr=out.fileno())
            run = manager.launch(policy, ["/bin/sh", "-c", FORK_HEAVY], io=io, user="nobody")
            assert run.ended.wait(60), "the shell loop did not end"
            manager.settle()
            out.seek(0)
            output = out.read().decode(errors="replace")
        assert run.state is ZoneState.EXITED and run.exit_status == 0, (attempt, output)
        assert output.strip() == "ok", (attempt, output)
        with store.session() as session:
            trail = zone_trail(session, zone_id=run.zone_id)
        assert not [e.data for e in trail if e.kind == "anomaly"], attempt


def test_a_killed_agent_ends_its_zone(setup: tuple[Manager, Store, Path]) -> None:
    """Fail closed: an agent that goes away (killed, crashed) leaves a zone nobody watches."""
    manager, store, _ = setup
    policy = load_policy(DEFAULT_POLICY)
    run = manager.launch(policy, ["/bin/sleep", "60"], user="nobody")
    os.kill(run.handle.state.agent_pid, signal.SIGKILL)
    assert run.ended.wait(15)
    manager.settle()
    assert run.state is ZoneState.TERMINATED
    with store.session() as session:
        trail = zone_trail(session, zone_id=run.zone_id)
    assert any(e.kind == "anomaly" and e.data["category"] == "agent-lost" for e in trail)
    assert any(e.kind == "reaction" and e.data["action"] == "terminate" for e in trail)


def test_hvtsm_run_shows_the_anomaly_and_audit_keeps_its_evidence(
        setup: tuple[Manager, Store, Path], tmp_path: Path) -> None:
    _, _, corpus = setup
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    program = str(corpus / "ptrace_attach.py")
    result = hvtsm(db, "run", "--json", "--", "/usr/bin/python3", program)
    events = json_lines(result.stdout)
    anomalies = [e for e in events if e["event"] == "anomaly"]
    assert anomalies, (result.stdout, result.stderr)
    anomaly = anomalies[0]
    assert anomaly["kind"] == "denied-syscall" and anomaly["evidence"]["syscall"] == "ptrace"
    assert anomaly["evidence"]["contained"] == "killed"
    assert any(e["event"] == "reaction" for e in events)
    text = hvtsm(db, "run", "--", "/usr/bin/python3", program)
    assert "ANOMALY denied-syscall" in text.stderr and "REACTION" in text.stderr
    trail = audit(db, anomaly["zone"])
    stored = next(e for e in trail if e["kind"] == "anomaly")
    assert stored["evidence"]["args"]["request"] and stored["evidence"]["pid"]
    table = hvtsm(db, "audit", anomaly["zone"]).stdout
    assert "ptrace()" in table and "killed" in table
