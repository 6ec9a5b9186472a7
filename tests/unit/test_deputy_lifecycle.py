"""The lifecycle's side of a zone's deputy, with the fake driver: the schedule it is given
whenever it changes, what it applied audited at its own times (live, and when a controller
takes the zone over), the stretch without a controller, a thaw only after the real limit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlmodel import select

from hvtsm.lifecycle import Manager
from hvtsm.lifecycle.deputy import DEPUTY_GRACE_S
from hvtsm.monitor.deputy import DeputyRecord, DeputyReport
from hvtsm.restrictions import NetworkMode
from hvtsm.store import Store
from hvtsm.store.models import Controller, PhaseApplied, UnattendedSpan, Zone, ZoneState
from tests.unit.fake_driver import FakeDriver
from tests.unit.test_manager import POLICY, SLOW, _dead_pid, policy


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'hvtsm.db'}")


def record(zone: str, phase: int, due: float, *, seq: int = 1, lag: float = 0.31,
           terminate: bool = False, froze: bool = False, ok: bool = True) -> DeputyRecord:
    return DeputyRecord(seq, zone, phase, due, due + lag - 0.01, due + lag, ok, terminate,
                        froze, True, (), ("eth0 down",), None if ok else "EPERM")


def test_the_deputy_hears_of_every_change_of_the_schedule(store: Store) -> None:
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    run = manager.launch(policy(SLOW), ["sleep"], policy_toml=SLOW)
    [first] = driver.delegated[run.zone_id]
    assert [p.index for p in first.phases] == [1, 2, 3] and first.in_force == 0
    assert first.grace == DEPUTY_GRACE_S and first.phases[-1].terminate
    assert first.phases[0].restrictions.network is NetworkMode.LOOPBACK
    assert first.phases[0].due == pytest.approx(run.pending[1])
    manager.accelerate(run.zone_id, 4, reason="test")
    moved = driver.delegated[run.zone_id][-1]
    assert moved.phases[0].due == pytest.approx(run.pending[1])
    assert moved.phases[0].due < first.phases[0].due
    manager.jump(run.zone_id, reason="test")
    after = driver.wait_delegated(run.zone_id, lambda orders: orders.in_force == 1)
    assert run.phase_index == 1
    assert [p.index for p in after.phases] == [2, 3]
    manager.shutdown()


def test_a_phase_the_deputy_applied_for_a_late_controller_is_audited_at_its_time(
        store: Store) -> None:
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    run = manager.launch(policy(SLOW), ["sleep"], policy_toml=SLOW)
    due = run.pending[1]
    manager.events.deputy(run.zone_id, DeputyReport((record(run.zone_id, 1, due, seq=4),)))
    assert manager.settle(5)
    assert run.phase_index == 1 and 1 not in run.pending
    assert driver.applied[-1][2].network is NetworkMode.LOOPBACK  # completed by the controller
    after = driver.delegated[run.zone_id][-1]
    assert after.ack == 4 and after.in_force == 1 and not after.thaw
    with store.session() as session:
        row = session.exec(select(PhaseApplied).where(PhaseApplied.phase_index == 1)).one()
    assert row.applied_at == pytest.approx(due + 0.31) and not row.late
    assert "applied by the zone's agent" in row.note and "completed by the controller" in row.note
    assert f"{run.zone_id}:1" not in manager.timeline.pending()
    manager.shutdown()


def _die(manager: Manager, store: Store) -> None:
    """The controller "dies": its scheduler and inbox stop (so its waiter's news of the end
    is never recorded), its table and rows stay as they were."""
    manager.timeline.scheduler.shutdown(wait=False)
    manager.events.stop()
    with store.session() as session:
        row = session.get(Controller, manager.controller.id)
        assert row is not None
        row.pid = _dead_pid()


def test_what_the_deputy_applied_alone_is_audited_when_a_controller_returns(
        store: Store) -> None:
    driver = FakeDriver()
    first = Manager(store, driver.bound)
    first.start()
    run = first.launch(policy(), ["sleep"], policy_toml=POLICY)
    dues = dict(run.pending)
    lost = time.time()
    _die(first, store)
    time.sleep(1.5)  # phases 1-2 and the terminate fall due while no controller runs
    driver.reports[run.zone_id] = DeputyReport(
        (record(run.zone_id, 1, dues[1], seq=1), record(run.zone_id, 2, dues[2], seq=2),
         record(run.zone_id, 3, dues[3], seq=3, terminate=True)), alone_since=lost)
    second = Manager(store, driver.bound)
    assert second.start(adopt=True) == []  # its deputy ended it, on time
    adopted = second.zones[run.zone_id]
    assert adopted.ended.is_set() and adopted.state is ZoneState.TERMINATED
    assert adopted.outcome is not None and str(adopted.outcome.cause) == "policy"
    assert second.timeline.pending() == {}
    second.shutdown()
    with store.session() as session:
        rows = session.exec(select(PhaseApplied).where(PhaseApplied.phase_index > 0)
                            .order_by(PhaseApplied.phase_index)).all()
        zone = session.exec(select(Zone)).one()
        [span] = session.exec(select(UnattendedSpan)).all()
    assert [r.phase_index for r in rows] == [1, 2, 3]
    assert [r.applied_at for r in rows] == pytest.approx([dues[i] + 0.31 for i in (1, 2, 3)])
    assert not any(r.late for r in rows)
    assert all("while no controller ran" in r.note for r in rows)
    assert zone.ended_at == pytest.approx(dues[3] + 0.31) and zone.ended_by == "policy"
    assert span.since == pytest.approx(lost) and span.until > dues[3]
    assert span.controller_id == first.controller.id and '"phase": 3' in span.phases


def test_without_a_report_the_overdue_phases_are_the_controllers_and_late(store: Store) -> None:
    driver = FakeDriver()
    first = Manager(store, driver.bound)
    first.start()
    run = first.launch(policy(), ["sleep"], policy_toml=POLICY)
    _die(first, store)
    time.sleep(1.5)
    second = Manager(store, driver.bound)
    second.start(adopt=True)
    assert second.zones[run.zone_id].ended.wait(5)
    second.shutdown()
    with store.session() as session:
        rows = session.exec(select(PhaseApplied).where(PhaseApplied.phase_index > 0)).all()
        assert session.exec(select(UnattendedSpan)).all() == []
    assert {r.phase_index for r in rows} == {1, 2, 3} and all(r.late for r in rows)


def test_a_stand_in_freeze_is_thawed_after_the_real_limit_unless_frozen_before(
        store: Store) -> None:
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    run = manager.launch(policy(SLOW), ["sleep"], policy_toml=SLOW)
    manager.events.deputy(run.zone_id, DeputyReport((record(run.zone_id, 1, run.pending[1],
                                                            froze=True),)))
    assert manager.settle(5)
    assert driver.delegated[run.zone_id][-1].thaw
    other = manager.launch(policy(SLOW), ["sleep"], policy_toml=SLOW)
    manager.freeze(other.zone_id, reason="operator")
    manager.events.deputy(other.zone_id, DeputyReport((record(other.zone_id, 1,
                                                              other.pending[1], froze=True),)))
    assert manager.settle(5)
    assert not driver.delegated[other.zone_id][-1].thaw  # the operator's freeze stays
    assert other.state is ZoneState.FROZEN
    manager.shutdown()


def test_a_step_that_failed_in_the_agent_ends_the_zone_closed(store: Store) -> None:
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    run = manager.launch(policy(SLOW), ["sleep"], policy_toml=SLOW)
    bad = record(run.zone_id, 1, run.pending[1], ok=False, terminate=True)
    manager.events.deputy(run.zone_id, DeputyReport((bad,)))
    assert run.ended.wait(5)
    assert run.outcome is not None and str(run.outcome.cause) == "fail-closed"
    assert "could not be applied by the zone's agent" in (run.end_reason or "")
    manager.shutdown()
