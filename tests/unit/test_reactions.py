"""Anomalies to reactions: escalation, link problems (fail closed), hostile evidence, and
the audit trail that names the act. Real SQLite store and APScheduler, fake driver."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from hvtsm.cli.exits import EXIT_CONTAINED, EXIT_HOSTILE, from_outcome
from hvtsm.lifecycle import EndCause, Manager, Notice
from hvtsm.monitor.anomalies import AnomalyReport, from_agent_event, from_link_problem, zone_profile
from hvtsm.monitor.events import LinkEvents
from hvtsm.policy import parse_policy
from hvtsm.restrictions import EgressRule, NetworkMode, Restrictions
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.store.models import Anomaly, Reaction, Zone, ZoneState
from hvtsm.zones.logged import LoggedEvents
from tests.unit.fake_driver import FakeDriver

POLICY = """
name = "escalating"
[[phase]]
at = "0s"
memory = "256MiB"
[[phase]]
at = "30s"
network = "loopback"
[[phase]]
at = "60s"
network = "none"
[[phase]]
at = "90s"
action = "terminate"
[anomaly]
reaction = "accelerate"
factor = 2
escalate = ["jump", "freeze", "terminate"]
on = { "reverse-shell" = "terminate" }
"""

EVIDENCE = {"category": "denied-syscall", "detail": "ptrace(PTRACE_ATTACH) of pid 7",
            "pid": 42, "program": "/usr/bin/python3", "syscall": "ptrace",
            "args": {"request": 16, "target": 7}, "contained": "killed",
            "act_time": 1.0, "act_mono": 2.0, "contained_mono": 2.001}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'hvtsm.db'}")


def launch(store: Store, notices: list[Notice] | None = None) -> tuple[Manager, FakeDriver,
                                                                       str]:
    driver = FakeDriver()
    manager = Manager(store, driver.bound, listener=None if notices is None else notices.append)
    manager.start()
    run = manager.launch(parse_policy(POLICY.encode(), source="esc.toml"), ["true"],
                         policy_toml=POLICY)
    return manager, driver, run.zone_id


def react(manager: Manager, zone_id: str) -> str | None:
    return manager.report_anomaly(zone_id, kind="fork-rate", detail="x", source="t")


def reactions(store: Store) -> list[str]:
    with store.session() as session:
        return [r.action for r in session.exec(select(Reaction).order_by(Reaction.id))]


def test_repeated_anomalies_escalate(store: Store) -> None:
    manager, _, zone_id = launch(store)
    run = manager.zones[zone_id]
    first_due = min(run.pending.values())
    assert react(manager, zone_id) == "accelerate"
    assert min(run.pending.values()) < first_due - 10  # 30 s left became 15 s
    assert react(manager, zone_id) == "jump"
    assert react(manager, zone_id) == "freeze"
    assert run.state is ZoneState.FROZEN and run.handle.state.frozen
    assert react(manager, zone_id) == "terminate"
    assert run.ended.wait(5)
    # the zone is gone: still audited, its reaction recorded with no effect left to take,
    # and the zone's outcome says it was hostile
    assert react(manager, zone_id) == "terminate"
    manager.shutdown()
    assert reactions(store) == ["accelerate", "jump", "freeze", "terminate", "terminate"]
    assert run.outcome is not None and run.outcome.hostile and run.outcome.anomalies == 5
    with store.session() as session:
        assert len(session.exec(select(Anomaly)).all()) == 5


def test_category_override_terminates_at_once(store: Store) -> None:
    manager, _, zone_id = launch(store)
    manager.report_anomaly(zone_id, kind="reverse-shell", detail="sh on a socket", source="t")
    assert manager.zones[zone_id].ended.wait(5)
    manager.shutdown()
    assert reactions(store) == ["terminate"]


def test_agent_event_reaches_the_audit_with_its_evidence(store: Store) -> None:
    notices: list[Notice] = []
    manager, _, zone_id = launch(store, notices)
    on_event = LinkEvents.for_zone(manager.events, zone_id).event
    on_event({"type": "event", "kind": "anomaly", "seq": 3, "data": EVIDENCE})
    deadline = time.time() + 5
    while not reactions(store) and time.time() < deadline:
        time.sleep(0.01)
    manager.shutdown()
    assert reactions(store) == ["accelerate"]
    with store.session() as session:
        trail = zone_trail(session, zone_id=zone_id)
    anomaly = next(e for e in trail if e.kind == "anomaly")
    assert "denied-syscall: ptrace(PTRACE_ATTACH)" in anomaly.summary
    assert "pid 42" in anomaly.summary and "killed" in anomaly.summary
    assert anomaly.data["evidence"]["args"] == {"request": 16, "target": 7}
    seen = [n for n in notices if n.kind == "anomaly"]
    assert seen and seen[0].evidence["syscall"] == "ptrace"


def test_link_problems_fail_closed() -> None:
    got: list[tuple[str, str]] = []
    notes: list[tuple[str, str, str]] = []
    class Recorder(LoggedEvents):
        def anomaly(self, zone_id: str, report: AnomalyReport) -> None:
            got.append((zone_id, report.category))

        def note(self, zone_id: str, kind: str, detail: str) -> None:
            notes.append((zone_id, kind, detail))

    sink = LinkEvents.for_zone(Recorder(), "z1")
    on_problem, on_event = sink.problem, sink.event
    for kind in ("heartbeat_lost", "disconnected", "malformed", "oversized", "flood",
                 "seq_gap", "events_dropped", "something_new"):
        on_problem(kind, "detail")
    on_problem("output_dropped", "1 MiB of stdout")
    on_event({"type": "event", "kind": "no-such-kind", "seq": 1})
    on_event({"type": "event", "kind": "monitor", "seq": 2,
              "data": {"mechanisms": ["seccomp-unotify", "fanotify"], "warnings": []}})
    assert [c for _, c in got] == [
        "heartbeat-lost", "agent-lost", "malformed-message", "malformed-message",
        "message-flood", "seq-gap", "events-dropped", "malformed-message",
        "malformed-message"]
    assert [k for _, k, _ in notes] == ["agent-output-dropped", "monitor"]
    assert from_link_problem("agent_error", "x") is None


@pytest.mark.parametrize("data", [
    {},
    {"category": 7},
    {"category": "denied-syscall", "detail": "x" * 100000, "pid": "not a pid"},
    {"category": "sensitive-path", "args": {"k" * 200: [[[[[["deep"]]]]]]}, "pid": 10**40},
    {"category": "connect-out", "args": list(range(10000))},
])
def test_hostile_evidence_is_bounded(data: dict) -> None:
    report = from_agent_event(data)
    assert len(report.detail) <= 520
    assert len(report.evidence_json()) <= 8300
    json.loads(report.evidence_json())


def test_profile_follows_the_network() -> None:
    static = {"deny_syscalls": ["ptrace"], "contain": "kill"}
    assert zone_profile(static, Restrictions())["network"] == "full"
    allow = Restrictions(egress=(EgressRule.parse("192.0.2.1:443"),))
    assert zone_profile(static, allow)["egress"] == ["192.0.2.1:443"]
    assert zone_profile(static, Restrictions(egress=()))["network"] == "loopback"
    cut = Restrictions(network=NetworkMode.NONE)
    assert zone_profile(static, cut) == {**static, "network": "none", "egress": []}


def test_an_old_store_gains_the_evidence_column(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE anomaly (id INTEGER PRIMARY KEY, zone_id VARCHAR NOT NULL, "
                "ts FLOAT NOT NULL, kind VARCHAR NOT NULL, detail VARCHAR NOT NULL, "
                "source VARCHAR NOT NULL)")
    con.execute("INSERT INTO anomaly VALUES (1, 'z', 1.0, 'k', 'd', 's')")
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    with store.session() as session:
        row = session.exec(select(Anomaly)).one()
    assert row.evidence == "{}"


def test_drops_are_anomalies_only_when_the_policy_says_so(store: Store) -> None:
    text = POLICY + "drops_are_anomalies = false\n"
    manager = Manager(store, FakeDriver)
    manager.start()
    run = manager.launch(parse_policy(text.encode(), source="d.toml"), ["true"],
                         policy_toml=text)
    assert manager.report_anomaly(run.zone_id, kind="events-dropped", detail="3 lost",
                                  source="agent") is None
    assert react(manager, run.zone_id) == "accelerate"
    manager.shutdown()
    with store.session() as session:
        assert [a.kind for a in session.exec(select(Anomaly))] == ["fork-rate"]
        trail = zone_trail(session, zone_id=run.zone_id)
    assert any(e.kind == "events-dropped" for e in trail)


def test_an_anomaly_after_the_workload_exited_still_has_its_reaction(store: Store) -> None:
    """The agent's report of a containment can arrive a moment after the workload exited:
    its reaction is recorded, with no effect left to take, and the zone's outcome says it
    was hostile (the CLI's status is then not the workload's clean 0)."""
    manager, driver, zone_id = launch(store)
    run = manager.zones[zone_id]
    driver.workloads[zone_id].exit(0)
    assert run.ended.wait(5)
    assert run.outcome is not None and not run.outcome.hostile
    assert manager.report_anomaly(zone_id, kind="reverse-shell", detail="sh on a socket",
                                  source="agent") == "terminate"
    manager.shutdown()
    with store.session() as session:
        [row] = session.exec(select(Reaction)).all()
        zone = session.exec(select(Zone).where(Zone.id == zone_id)).one()
    assert row.action == "terminate" and "already ended" in row.reason
    assert run.outcome.hostile and zone.hostile
    assert from_outcome(run.outcome) == EXIT_HOSTILE


def test_the_root_killed_by_containment_is_the_containments_end(store: Store) -> None:
    manager, driver, zone_id = launch(store)
    run = manager.zones[zone_id]
    workload = driver.workloads[zone_id]
    evidence = dict(EVIDENCE, pid=workload.pid, contained="killed")
    manager.events.anomaly(zone_id, from_agent_event(evidence))
    workload.exit(-9)  # the agent's kill, which its report came before
    assert run.ended.wait(5)
    manager.shutdown()
    assert run.outcome is not None and run.outcome.cause is EndCause.CONTAINMENT
    assert "ended by the agent's containment" in run.outcome.describe()
    assert from_outcome(run.outcome) == EXIT_CONTAINED


class FreezeFails(FakeDriver):
    """A driver whose freeze of one zone raises something nobody expected."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: str | None = None

    def freeze(self, handle: Any) -> None:
        if handle.zone_id == self.broken:
            raise RuntimeError("the freezer went away")
        super().freeze(handle)


def test_a_failing_reaction_fails_closed_and_the_next_zone_is_still_reacted_to(
        store: Store) -> None:
    text = POLICY.replace('reaction = "accelerate"', 'reaction = "freeze"')
    driver = FreezeFails()
    manager = Manager(store, driver.bound)
    manager.start()
    policy = parse_policy(text.encode(), source="freeze.toml")
    first = manager.launch(policy, ["true"], policy_toml=text)
    second = manager.launch(policy, ["true"], policy_toml=text)
    driver.broken = first.zone_id
    manager.events.anomaly(first.zone_id, AnomalyReport("fork-rate", "x", "agent"))
    manager.events.anomaly(second.zone_id, AnomalyReport("fork-rate", "y", "agent"))
    assert manager.settle(5)
    # the failed reaction was not dropped: the zone was ended, to fail closed, audited
    assert first.ended.wait(5) and first.outcome is not None
    assert first.outcome.cause is EndCause.FAIL_CLOSED
    # the reactions thread lived on: the other zone's anomaly got its own reaction
    assert second.state is ZoneState.FROZEN and not second.ended.is_set()
    manager.shutdown()
    with store.session() as session:
        trail = zone_trail(session, zone_id=first.zone_id)
    assert any(e.kind == "controller-fault" and "the freezer went away" in e.summary
               for e in trail)
