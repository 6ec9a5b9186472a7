"""Manager + timeline logic against a real SQLite store and real APScheduler, fake driver."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from sqlmodel import select

from hvtsm.errors import ZoneError
from hvtsm.lifecycle import Manager, Notice
from hvtsm.policy import parse_policy
from hvtsm.restrictions import NetworkMode
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.store.models import Controller, PhaseApplied, Reaction, Zone, ZoneState
from tests.unit.fake_driver import FakeDriver

POLICY = """
name = "quick"
[[phase]]
at = "0s"
memory = "256MiB"
[[phase]]
at = "300ms"
network = "loopback"
[[phase]]
at = "600ms"
memory = "128MiB"
[[phase]]
at = "900ms"
action = "terminate"
[anomaly]
reaction = "accelerate"
factor = 10
"""

#: the same timeline stretched so nothing falls due during a test
SLOW = POLICY.replace('"300ms"', '"20s"').replace('"600ms"', '"40s"').replace('"900ms"', '"60s"')


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'hvtsm.db'}")


def policy(text: str = POLICY):
    return parse_policy(text.encode(), source="quick.toml")


def test_phases_apply_in_order_then_terminate(store: Store) -> None:
    driver = FakeDriver()
    notices: list[Notice] = []
    manager = Manager(store, driver.bound, listener=notices.append)
    manager.start()
    run = manager.launch(policy(), ["true"], policy_toml=POLICY)
    assert run.ended.wait(5)
    manager.shutdown()
    assert run.state is ZoneState.TERMINATED
    assert run.exit_status == -9
    assert [r.network for _, _, r in driver.applied] == [NetworkMode.LOOPBACK] * 2
    assert driver.applied[1][2].memory == 128 * 1024**2
    with store.session() as session:
        rows = session.exec(select(PhaseApplied).order_by(PhaseApplied.phase_index)).all()
        assert [r.phase_index for r in rows] == [0, 1, 2, 3]
        assert all(r.lag_ms < 200 and not r.late for r in rows)
        zone = session.exec(select(Zone)).one()
        assert zone.state == "terminated" and "lifespan ended" in (zone.end_reason or "")
        kinds = [e.kind for e in zone_trail(session, zone_id=zone.id)]
    assert kinds[:2] == ["created", "started"] and kinds[-1] == "terminated"
    assert [n.kind for n in notices].count("phase") == 4


def test_workload_exit_cancels_pending_transitions(store: Store) -> None:
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    run = manager.launch(policy(), ["true"], policy_toml=POLICY)
    driver.workloads[run.zone_id].exit(3)
    assert run.ended.wait(5)
    assert run.state is ZoneState.EXITED and run.exit_status == 3
    assert manager.timeline.pending() == {}
    manager.shutdown()
    assert driver.applied == []


def test_accelerate_divides_time_left(store: Store) -> None:
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    text = SLOW
    run = manager.launch(policy(text), ["true"], policy_toml=text)
    before = dict(run.pending)
    moved = manager.accelerate(run.zone_id, 4, reason="test")
    now = time.time()
    for index, due in moved.items():
        assert abs((due - now) - (before[index] - now) / 4) < 0.1
    assert pytest.approx(manager.timeline.pending()[f"{run.zone_id}:1"], abs=1e-3) == moved[1]
    assert manager.jump(run.zone_id, reason="now") == 1
    deadline = time.time() + 3
    while run.phase_index < 1 and time.time() < deadline:
        time.sleep(0.01)
    assert run.phase_index == 1
    manager.shutdown()


def test_anomaly_reaction_is_audited(store: Store) -> None:
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    text = SLOW
    run = manager.launch(policy(text), ["true"], policy_toml=text)
    manager.report_anomaly(run.zone_id, kind="syscall", detail="ptrace", source="test")
    assert max(run.pending.values()) - time.time() < 6.5
    manager.shutdown()
    with store.session() as session:
        reaction = session.exec(select(Reaction)).one()
    assert reaction.action == "accelerate" and reaction.anomaly_id is not None


def test_failed_tightening_fails_closed(store: Store) -> None:
    driver = FakeDriver()
    driver.fail_apply = "network"
    manager = Manager(store, driver.bound)
    manager.start()
    run = manager.launch(policy(), ["true"], policy_toml=POLICY)
    assert run.ended.wait(5)
    manager.shutdown()
    assert run.state is ZoneState.TERMINATED
    assert "fail closed" in (run.end_reason or "")


def test_start_failure_leaves_a_failed_record_and_nothing_else(store: Store) -> None:
    driver = FakeDriver()
    driver.fail_start = True
    manager = Manager(store, driver.bound)
    manager.start()
    with pytest.raises(ZoneError):
        manager.launch(policy(), ["nope"], policy_toml=POLICY)
    manager.shutdown()
    assert driver.live == set()
    with store.session() as session:
        zone = session.exec(select(Zone)).one()
    assert zone.state == "failed"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_restart_applies_overdue_tightenings_at_once_and_late(store: Store) -> None:
    driver = FakeDriver()
    first = Manager(store, driver.bound)
    first.start()
    run = first.launch(policy(), ["sleep"], policy_toml=POLICY)
    # the controller "dies": its scheduler stops, its table and rows stay as they were
    first.timeline.scheduler.shutdown(wait=False)
    with store.session() as session:
        row = session.get(Controller, first.controller.id)
        assert row is not None
        row.pid = _dead_pid()
    time.sleep(1.5)  # phases 1-2 and the terminate fall due while nobody runs
    assert driver.applied == []
    second = Manager(store, driver.bound)
    adopted = second.start(adopt=True)
    assert adopted == [run.zone_id]
    adopted_run = second.zones[run.zone_id]
    assert adopted_run.ended.wait(5)
    second.shutdown()
    assert adopted_run.state is ZoneState.TERMINATED
    with store.session() as session:
        rows = session.exec(select(PhaseApplied).where(PhaseApplied.phase_index > 0)).all()
        assert {r.phase_index for r in rows} == {1, 2, 3}
        assert all(r.late and r.lag_ms > 500 for r in rows)
        assert session.exec(select(Controller)).all() == []
        trail = zone_trail(session, zone_id=run.zone_id)
    assert "adopted" in [e.kind for e in trail]
    assert json.loads(json.dumps([e.summary for e in trail]))
