"""A transient zone inside a real TCG guest: the agent in the guest holds the unforeseen
exec, makes a cgroup of its own (cgroup v2, mounted by the agent: the lab guest's init does
not), moves the process there and lets the exec go on; the transient zone is killed on its
shorter schedule while the workload goes on and exits with its output. What the guest sees
is read inside the guest (the agent's read_file probe of /proc/PID/cgroup)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager
from hvtsm.policy import load_policy
from hvtsm.store import Store
from hvtsm.store.models import Zone, ZoneEvent, ZoneState
from hvtsm.zones.base import Backend, WorkloadIO
from hvtsm.zones.factory import driver_factory
from tests.integration.test_libvirt_zone import _libvirt_ready
from tests.integration.test_transient_cgroup import CHILD, PARENT

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Manager, Store, Path]]:
    reason = _libvirt_ready()
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    assert reason is None, reason
    tmp = tmp_path_factory.mktemp("gtransient")
    # a TCG guest is slow: the transient zone lives 20 s x 0.25 = 5 s
    (tmp / "child.toml").write_text(CHILD)
    (tmp / "parent.toml").write_text(PARENT.format(max_zones=4).replace(
        "lifespan_scale = 0.1", "lifespan_scale = 0.25"))
    store = Store(f"sqlite:///{tmp / 'hvtsm.db'}")
    manager = Manager(store, driver_factory(Backend.LIBVIRT, probe_host()))
    manager.start()
    yield manager, store, tmp
    manager.shutdown()
    store.dispose()


def test_unexpected_exec_in_a_guest_gets_a_transient_cgroup(
        setup: tuple[Manager, Store, Path]) -> None:
    manager, store, tmp = setup
    script = ('/bin/sleep 60 & pid=$!; echo "child $pid"; wait $pid; echo "child ended $?"; '
              'echo parent done')
    run = manager.launch(load_policy(tmp / "parent.toml"), ["/bin/sh", "-c", script],
                         user="nobody", io=WorkloadIO(stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while not run.children and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.children, "no transient zone was made"
    child = manager.zones[run.children[0]]
    assert child.kind == "transient" and child.parent == run.zone_id
    pid = child.workload.pid  # type: ignore[union-attr]  # a pid in the guest
    link = manager.driver.agent_link(run.zone_id)  # type: ignore[attr-defined]
    seen = link.probe("read_file", {"path": f"/proc/{pid}/cgroup"}, timeout=20)
    text = str(seen)
    assert f"/hvtsm/{child.zone_id}" in text, text
    limits = link.probe("read_file", {"path": f"/sys/fs/cgroup/hvtsm/{child.zone_id}/pids.max"},
                        timeout=20)
    assert "16" in str(limits), limits
    # killed on its own schedule (5 s), the parent goes on and exits with its output
    assert child.ended.wait(30)
    assert child.state is ZoneState.TERMINATED and "lifespan ended" in (child.end_reason or "")
    assert run.ended.wait(60)
    assert run.workload is not None and run.workload.stdout is not None
    output = run.workload.stdout.read().decode()
    assert run.state is ZoneState.EXITED and run.exit_status == 0, output
    assert f"child {pid}" in output and "child ended 137" in output
    assert output.rstrip().endswith("parent done"), output
    with store.session() as session:
        row = session.exec(select(Zone).where(Zone.id == child.zone_id)).one()
        assert (row.kind, row.parent_id) == ("transient", run.zone_id)
        created = session.exec(select(ZoneEvent).where(ZoneEvent.zone_id == child.zone_id,
                                                       ZoneEvent.kind == "created")).one()
        assert f"split from {run.zone_id} on exec of /bin/sleep" in created.detail
