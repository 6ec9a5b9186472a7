"""The store and the timeline on a real PostgreSQL server (started by tests/pg_fixture.py)."""

from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import inspect
from sqlmodel import select

from hvtsm.lifecycle import Manager
from hvtsm.policy import parse_policy
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.store.models import Controller, PhaseApplied, ZoneState
from tests.integration.cli_helpers import audit, hvtsm, zones
from tests.unit.fake_driver import FakeDriver

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

POLICY = """
name = "pg"
[[phase]]
at = "0s"
memory = "256MiB"
[[phase]]
at = "300ms"
network = "loopback"
[[phase]]
at = "600ms"
action = "terminate"
"""


def test_timeline_and_audit_on_postgres(pg_empty_url: str) -> None:
    store = Store(pg_empty_url)
    driver = FakeDriver()
    manager = Manager(store, driver.bound)
    manager.start()
    table = manager.timeline.table
    assert inspect(store.engine).has_table(table)
    policy = parse_policy(POLICY.encode(), source="pg.toml")
    run = manager.launch(policy, ["true"], policy_toml=POLICY)
    assert run.ended.wait(10)
    manager.shutdown()
    assert run.state is ZoneState.TERMINATED
    with store.session() as session:
        phases = session.exec(select(PhaseApplied).order_by(PhaseApplied.phase_index)).all()
        assert [p.phase_index for p in phases] == [0, 1, 2]
        assert all(p.lag_ms < 500 for p in phases)
        kinds = [e.kind for e in zone_trail(session, zone_id=run.zone_id)]
        assert session.exec(select(Controller)).all() == []
    assert kinds[0] == "created" and kinds[-1] == "terminated"
    # a clean shutdown drops the controller's job table
    assert not inspect(store.engine).has_table(table)
    store.dispose()


def test_adoption_on_postgres(pg_empty_url: str) -> None:
    store = Store(pg_empty_url)
    driver = FakeDriver()
    first = Manager(store, driver.bound)
    first.start()
    policy = parse_policy(POLICY.encode(), source="pg.toml")
    run = first.launch(policy, ["sleep"], policy_toml=POLICY)
    first.timeline.scheduler.shutdown(wait=False)
    with store.session() as session:
        row = session.get(Controller, first.controller.id)
        assert row is not None
        row.pid_start = -1  # the recorded process is gone
    time.sleep(0.8)
    second = Manager(store, driver.bound)
    assert second.start(adopt=True) == [run.zone_id]
    assert second.zones[run.zone_id].ended.wait(10)
    second.shutdown()
    with store.session() as session:
        late = session.exec(select(PhaseApplied).where(PhaseApplied.late)).all()
    assert {p.phase_index for p in late} == {1, 2}
    assert not inspect(store.engine).has_table(first.timeline.table)
    store.dispose()


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root")
def test_hvtsm_run_with_a_postgres_store(pg_empty_url: str) -> None:
    result = hvtsm(pg_empty_url, "run", "--json", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr
    [zone] = zones(pg_empty_url)
    assert zone["state"] == "exited" and zone["exit_status"] == 3
    kinds = [t["kind"] for t in audit(pg_empty_url, zone["zone"])]
    # the agent's "monitor" line comes first: watching begins before the first instruction
    assert kinds[0] == "created" and kinds.index("monitor") < kinds.index("started")
    assert "phase" in kinds
