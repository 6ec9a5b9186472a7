"""Which steps each backend gives its zone's deputy for a phase (pure): a cgroup zone's
limits, network, read-only switch and end on fake cgroup trees; a guest's link down,
read-only root, freeze and kill. And the controller's own limit writes through the same
steps: a limit the deputy lowered first is never raised by a late controller."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from guest_agent import deputy_steps as steps
from guest_agent.deputy import Schedule
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.units import parse_size
from hvtsm.zones.base import DeputyOrders, DeputyPhase
from hvtsm.zones.cgroup import deputy as cgroup_deputy
from hvtsm.zones.cgroup import limits
from hvtsm.zones.cgroup.cgroupfs import CgroupV1, CgroupV2
from hvtsm.zones.cgroup.state import CgroupZoneState
from hvtsm.zones.libvirt import deputy as guest_deputy
from tests.unit.test_cgroupfs import V1_FILES, V2_FILES, ZONE, kernel_mkdir

FULL = Restrictions(network=NetworkMode.FULL, memory=parse_size("512MiB"), pids=256)


@pytest.fixture
def v1(tmp_path: Path) -> CgroupV1:
    mounts = {}
    for controller, files in V1_FILES.items():
        mount = tmp_path / controller
        kernel_mkdir(mount / "hvtsm" / ZONE, files)
        mounts[controller] = str(mount)
    return CgroupV1(mounts, ZONE)


@pytest.fixture
def v2(tmp_path: Path) -> CgroupV2:
    root = tmp_path / "unified"
    kernel_mkdir(root / "hvtsm" / ZONE, V2_FILES)
    return CgroupV2(root, {"cpu", "cpuset", "memory", "pids"}, ZONE)


def state(**kw: object) -> CgroupZoneState:
    base = dict(cgroup_version=2, cgroups=[], netns=f"hvtsm-{ZONE}", host_if="hz", host_addr="",
                zone_addr="", net_index=0, nic=True, lo_up=True, pid=100,
                ns_ref=f"/run/hvtsm/ns/{ZONE}", agent_pid=5)
    base.update(kw)
    return CgroupZoneState(**base)  # type: ignore[arg-type]


def ops(found: list[steps.Step]) -> list[str]:
    return [s.op for s in found]


def test_a_cgroup_network_cut_is_a_link_down_in_the_zones_namespace(v2: CgroupV2) -> None:
    target = FULL.with_field("network", NetworkMode.LOOPBACK)
    found = cgroup_deputy.phase_steps(ZONE, v2, state(), FULL, target)
    assert found == [steps.LinkDown(f"/run/netns/hvtsm-{ZONE}", "eth0")]
    none = cgroup_deputy.phase_steps(ZONE, v2, state(), FULL,
                                     FULL.with_field("network", NetworkMode.NONE))
    assert ops(none) == ["link_down", "loopback_down"]
    # a NIC the controller unplugged already needs no step
    assert cgroup_deputy.phase_steps(ZONE, v2, state(nic=False), FULL, target) == []


def test_a_cgroup_v2_memory_cut_lowers_max_and_swap(v2: CgroupV2) -> None:
    target = FULL.with_field("memory", parse_size("256MiB"))
    found = cgroup_deputy.phase_steps(ZONE, v2, state(), FULL, target)
    assert found == [steps.LowerLimit(str(v2.path / "memory.max"), 256 * 2**20),
                     steps.LowerLimit(str(v2.path / "memory.swap.max"), 0)]


def test_a_cgroup_v1_memory_cut_lowers_the_limit_before_memsw(v1: CgroupV1) -> None:
    target = FULL.with_field("memory", parse_size("256MiB"))
    found = cgroup_deputy.phase_steps(ZONE, v1, state(cgroup_version=1), FULL, target)
    assert [Path(s.path).name for s in found if isinstance(s, steps.LowerLimit)] == [
        "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_cpu_pids_ro_and_egress(v2: CgroupV2) -> None:
    target = Restrictions(network=NetworkMode.FULL, memory=FULL.memory, pids=64,
                          cpu_quota=50.0, cpu_shares=512, cpus=frozenset({0}),
                          filesystem=FilesystemMode.RO, egress=("10.0.0.1/32:443",))
    found = cgroup_deputy.phase_steps(ZONE, v2, state(), FULL, target)
    assert ops(found) == ["freeze", "remount_ro", "narrow_cpus", "lower", "lower_cpu_max",
                          "lower"]
    remount = found[1]
    assert isinstance(remount, steps.RemountReadOnly) and remount.ns == f"/run/hvtsm/ns/{ZONE}"
    assert remount.procs == (str(v2.path / "cgroup.procs"),)


def test_the_schedule_ends_with_a_kill_and_fails_closed_with_one(v2: CgroupV2) -> None:
    orders = DeputyOrders((DeputyPhase(1, 1.8e9, FULL.with_field("pids", 64)),
                           DeputyPhase(2, 1.8e9 + 5, FULL, terminate=True)), 0, 0.3)
    msg = cgroup_deputy.schedule(ZONE, v2, state(), FULL, orders)
    parsed = Schedule.from_message({"id": ZONE, **msg})
    assert parsed.lock == f"/run/hvtsm/locks/{ZONE}.lock"
    assert [p.index for p in parsed.phases] == [1, 2] and parsed.phases[1].terminate
    assert parsed.phases[1].steps == (steps.Kill((str(v2.path / "cgroup.procs"),), 2,
                                                 kill=str(v2.path / "cgroup.kill")),)
    assert parsed.fail_closed == parsed.phases[1].steps


def test_a_late_controller_never_raises_what_the_deputy_lowered(v2: CgroupV2) -> None:
    (v2.path / "memory.max").write_text(str(128 * 2**20))  # the deputy's phase 2,
    (v2.path / "memory.swap.max").write_text("0")  # both of its steps
    done: list[str] = []
    already = limits.tighten(
        v2, FULL.with_field("memory", parse_size("256MiB")).with_field("pids", 64), FULL,
        lambda name, value: done.append(name), lock=None)
    assert (v2.path / "memory.max").read_text() == str(128 * 2**20)
    assert (v2.path / "pids.max").read_text() == "64"
    assert done == ["pids", "memory"] and [a.field for a in already] == ["memory"]


def test_the_v1_controller_path_lowers_memory_in_the_kernels_order(v1: CgroupV1) -> None:
    d = v1.dir("memory")
    assert d is not None
    limits.tighten(v1, FULL.with_field("memory", parse_size("256MiB")), FULL,
                   lambda name, value: None, lock=None)
    assert (d / "memory.limit_in_bytes").read_text() == str(256 * 2**20)
    assert (d / "memory.memsw.limit_in_bytes").read_text() == str(256 * 2**20)


# --- a guest's deputy -----------------------------------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [
    (FULL, []),
    (FULL.with_field("network", NetworkMode.LOOPBACK), ["link_down"]),
    (FULL.with_field("network", NetworkMode.NONE), ["link_down", "loopback_down"]),
    (FULL.with_field("filesystem", FilesystemMode.RO), ["remount_ro"]),
    (FULL.with_field("memory", parse_size("128MiB")), ["freeze_workload"]),
    (FULL.with_field("cpu_quota", 25.0), ["freeze_workload"]),
    (FULL.with_field("pids", 16), ["freeze_workload"]),
    (FULL.with_field("egress", ("10.0.0.1/32:443",)), ["freeze_workload"]),
    (FULL.with_field("network", NetworkMode.NONE).with_field("memory", parse_size("64MiB"))
     .with_field("filesystem", FilesystemMode.RO),
     ["link_down", "loopback_down", "remount_ro", "freeze_workload"]),
])
def test_a_guest_deputy_does_what_it_can_and_freezes_for_the_rest(
        target: Restrictions, expected: list[str]) -> None:
    found = guest_deputy.guest_steps("w1", FULL, target)
    assert ops(found) == expected
    for step in found:
        if isinstance(step, steps.LinkDown):
            assert step == steps.LinkDown(None, "*")
        if isinstance(step, steps.RemountReadOnly):
            assert step == steps.RemountReadOnly(None)
        if isinstance(step, steps.FreezeWorkload):
            assert step.workload == "w1"


def test_a_guest_schedule_kills_the_workload_at_the_end() -> None:
    orders = DeputyOrders((DeputyPhase(3, 1.8e9, FULL, terminate=True),), 2, 0.3)
    parsed = Schedule.from_message({"id": "z", **guest_deputy.schedule("w1", FULL, orders)})
    assert parsed.phases[0].steps == (steps.KillWorkload("w1"),)
    assert parsed.fail_closed == (steps.KillWorkload("w1"),) and parsed.in_force == 2


def test_the_controller_waits_for_the_deputy_holding_the_zone_lock(
        v2: CgroupV2, tmp_path: Path) -> None:
    """Both writers hold the lock from the look to the write: a controller that comes
    while the deputy lowers finds the deputy's value, never the one before it."""
    lock = str(tmp_path / "locks" / f"{ZONE}.lock")
    inside = threading.Event()
    release = threading.Event()

    def deputy() -> None:
        with steps.zone_lock(lock):
            inside.set()
            release.wait(10)
            (v2.path / "pids.max").write_text("32")

    writer = threading.Thread(target=deputy)
    writer.start()
    assert inside.wait(10)
    done: list[str] = []
    controller = threading.Thread(target=lambda: limits.tighten(
        v2, FULL.with_field("pids", 64), FULL, lambda name, _v: done.append(name), lock=lock))
    controller.start()
    controller.join(0.2)
    assert controller.is_alive() and done == []  # held at the lock, not at a sleep
    release.set()
    writer.join(10)
    controller.join(10)
    assert (v2.path / "pids.max").read_text() == "32" and done == ["pids"]
    assert oct(os.stat(lock).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.dirname(lock)).st_mode & 0o777) == "0o700"
