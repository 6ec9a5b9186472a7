"""Idempotent application: the decisions that find a step's effect already in force (the
network namespace as `ip -j` shows it, cgroup limits on fake v1/v2 trees, mountinfo), that
never raise a limit found lower, and the lifecycle's audit of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlmodel import select

from hvtsm.lifecycle import Manager, Notice
from hvtsm.lifecycle.adoption import drift
from hvtsm.lifecycle.notices import PhaseApplied as PhaseNotice
from hvtsm.restrictions import NetworkMode, Restrictions
from hvtsm.store import Store
from hvtsm.store.models import PhaseApplied
from hvtsm.zones.base import ApplyReport, InForce
from hvtsm.zones.cgroup import limits, mounts
from hvtsm.zones.cgroup.cgroupfs import CgroupV1, CgroupV2
from hvtsm.zones.cgroup.netns import NetPresent
from tests.unit.fake_driver import FakeDriver
from tests.unit.test_cgroupfs import V1_FILES, V2_FILES, ZONE, kernel_mkdir, record_writes
from tests.unit.test_manager import POLICY, policy

MIB = 1 << 20


@pytest.fixture
def v1(tmp_path: Path) -> CgroupV1:
    """A zone's v1 cgroup just made, with the kernel's defaults (and a cpuset of 0-3 on
    the parents)."""
    mounts_ = {}
    for controller, files in V1_FILES.items():
        mount = tmp_path / controller
        root_files = dict(files)
        if controller == "cpuset":
            root_files.update({"cpuset.cpus": "0-3", "cpuset.mems": "0"})
        kernel_mkdir(mount, root_files)
        kernel_mkdir(mount / "hvtsm", root_files)
        kernel_mkdir(mount / "hvtsm" / ZONE, files)
        mounts_[controller] = str(mount)
    return CgroupV1(mounts_, ZONE)


@pytest.fixture
def v2(tmp_path: Path) -> CgroupV2:
    root = tmp_path / "unified"
    kernel_mkdir(root, {"cgroup.controllers": "cpuset cpu io memory pids",
                        "cgroup.subtree_control": ""})
    kernel_mkdir(root / "hvtsm", V2_FILES)
    kernel_mkdir(root / "hvtsm" / ZONE, V2_FILES)
    return CgroupV2(root, {"cpu", "cpuset", "memory", "pids"}, ZONE)

# -- the network namespace -----------------------------------------------------------------

LO_UP = {"ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"],
         "addr_info": [{"family": "inet", "local": "127.0.0.1"}]}
LO_DOWN = {"ifname": "lo", "flags": ["LOOPBACK"], "addr_info": []}
ETH0 = {"ifname": "eth0", "flags": ["BROADCAST", "UP"],
        "addr_info": [{"family": "inet", "local": "10.213.0.2"}]}


def ip_json(*links: dict[str, object]) -> str:
    return json.dumps(list(links))


def test_a_namespace_with_its_nic_is_cut_whole() -> None:
    found = NetPresent.parse(ip_json(LO_UP, ETH0))
    assert found == NetPresent(nic=True, lo_up=True, lo_addressed=True)
    assert found.cut_lines(lo_down=False) == ["link set eth0 down", "link del eth0"]
    assert found.cut_lines(lo_down=True) == ["link set eth0 down", "link del eth0",
                                             "link set lo down", "addr flush dev lo"]


def test_a_nic_already_gone_is_not_deleted_again() -> None:
    """The issue's failure: the cut was in the kernel, and `link del eth0` said `Cannot
    find device "eth0"`."""
    found = NetPresent.parse(ip_json(LO_UP))
    assert not found.nic
    assert found.cut_lines(lo_down=False) == []
    assert found.cut_lines(lo_down=True) == ["link set lo down", "addr flush dev lo"]


def test_a_loopback_down_but_addressed_is_only_flushed() -> None:
    half = {**LO_DOWN, "addr_info": [{"family": "inet", "local": "127.0.0.1"}]}
    assert NetPresent.parse(ip_json(half)).cut_lines(lo_down=True) == ["addr flush dev lo"]
    assert NetPresent.parse(ip_json(LO_DOWN)).cut_lines(lo_down=True) == []


def test_an_empty_answer_is_a_namespace_with_nothing() -> None:
    assert NetPresent.parse("") == NetPresent(nic=False, lo_up=False, lo_addressed=False)


# -- cgroup limits ---------------------------------------------------------------------------

def memory_v1(tmp_path: Path) -> Path:
    return tmp_path / "memory" / "hvtsm" / ZONE


def test_v1_a_memory_limit_already_lower_stays_lower(v1: CgroupV1, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (memory_v1(tmp_path) / name).write_text(str(128 * MIB))
    writes = record_writes(monkeypatch)
    applied = Restrictions(memory=512 * MIB)
    done: list[str] = []
    already = limits.tighten(v1, Restrictions(memory=256 * MIB), applied,
                             lambda name, _value: done.append(name), lock=None)
    assert writes == []
    assert already == [InForce("memory", "128MiB in the kernel, tighter than 256MiB")]
    assert done == ["memory"]  # the store follows: at least the phase's value is in force


def test_v1_a_memory_limit_at_the_target_is_in_force(v1: CgroupV1, tmp_path: Path) -> None:
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (memory_v1(tmp_path) / name).write_text(str(256 * MIB))
    assert limits.in_force(v1, "memory", 256 * MIB) == "256MiB in the kernel"


def test_v1_half_a_memory_limit_is_finished_without_raising_the_other_half(
        v1: CgroupV1, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between the limit's write and memsw's: the limit stays where it is (lower),
    memsw comes down to the target."""
    (memory_v1(tmp_path) / "memory.limit_in_bytes").write_text(str(128 * MIB))
    assert limits.in_force(v1, "memory", 256 * MIB) is None
    writes = record_writes(monkeypatch)
    limits.tighten(v1, Restrictions(memory=256 * MIB), Restrictions(), lambda *_: None, lock=None)
    assert writes == [("memory.memsw.limit_in_bytes", str(256 * MIB))]
    assert (memory_v1(tmp_path) / "memory.limit_in_bytes").read_text() == str(128 * MIB)


def test_v1_a_looser_kernel_is_written(v1: CgroupV1, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    writes = record_writes(monkeypatch)
    already = limits.tighten(v1, Restrictions(memory=256 * MIB, pids=64), Restrictions(),
                             lambda *_: None, lock=None)
    assert already == []
    assert ("pids.max", "64") in writes and ("memory.limit_in_bytes", str(256 * MIB)) in writes


def test_v1_cpu_pids_and_cpus_in_force(v1: CgroupV1, tmp_path: Path) -> None:
    cpu = tmp_path / "cpu" / "hvtsm" / ZONE
    (cpu / "cpu.shares").write_text("256")
    (cpu / "cpu.cfs_quota_us").write_text("25000")
    (tmp_path / "pids" / "hvtsm" / ZONE / "pids.max").write_text("32")
    (tmp_path / "cpuset" / "hvtsm" / ZONE / "cpuset.cpus").write_text("1")
    assert limits.in_force(v1, "cpu_shares", 512) == \
        "cpu.shares 256 in the kernel, tighter than cpu.shares 512"
    assert limits.in_force(v1, "cpu_shares", 128) is None
    assert limits.in_force(v1, "cpu_quota", 50) == "25% in the kernel, tighter than 50%"
    assert limits.in_force(v1, "cpu_quota", 25) == "25% in the kernel"
    assert limits.in_force(v1, "cpu_quota", 10) is None
    assert limits.in_force(v1, "pids", 64) == "pids.max 32 in the kernel, tighter than " \
        "pids.max 64"
    assert limits.in_force(v1, "pids", 16) is None
    assert limits.in_force(v1, "cpus", frozenset({0, 1})) == \
        "1 in the kernel, tighter than 0-1"
    assert limits.in_force(v1, "cpus", frozenset({0})) is None


def test_v1_unlimited_and_unreadable_are_never_in_force(v1: CgroupV1, tmp_path: Path) -> None:
    assert limits.in_force(v1, "memory", 256 * MIB) is None  # the kernel's huge max
    assert limits.in_force(v1, "pids", 64) is None  # "max"
    assert limits.in_force(v1, "cpu_quota", 50) is None  # -1
    assert limits.in_force(v1, "cpus", frozenset({0})) is None  # an empty v1 cpuset
    (tmp_path / "pids" / "hvtsm" / ZONE / "pids.max").unlink()
    assert limits.in_force(v1, "pids", 64) is None


def test_an_unchanged_field_is_neither_read_nor_written(v1: CgroupV1, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    writes = record_writes(monkeypatch)
    same = Restrictions(memory=256 * MIB)
    assert limits.tighten(v1, same, same, lambda *_: None, lock=None) == []
    assert writes == []


def test_creation_writes_a_policy_value_above_the_default(v1: CgroupV1, tmp_path: Path) -> None:
    """cpu shares are a weight: 2048 at the start is the policy's choice, not a loosening
    of the kernel's 1024."""
    limits.write(v1, Restrictions(cpu_shares=2048))
    assert (tmp_path / "cpu" / "hvtsm" / ZONE / "cpu.shares").read_text() == "2048"


def test_v2_readings(v2: CgroupV2, tmp_path: Path) -> None:
    zone = tmp_path / "unified" / "hvtsm" / ZONE
    (zone / "cpu.weight").write_text("20")
    (zone / "cpu.max").write_text("50000 100000")
    (zone / "memory.max").write_text(str(128 * MIB))
    assert limits.in_force(v2, "cpu_shares", 1024) == \
        "cpu.weight 20 in the kernel, tighter than cpu.weight 39"
    assert limits.in_force(v2, "cpu_quota", 50) == "50% in the kernel"
    # a memory.max without its swap half is not a memory limit in force
    assert limits.in_force(v2, "memory", 256 * MIB) is None
    (zone / "memory.swap.max").write_text("0")
    assert limits.in_force(v2, "memory", 256 * MIB) == \
        "128MiB in the kernel, tighter than 256MiB"
    assert limits.in_force(v2, "cpus", frozenset({0})) is None  # empty: the parent's


def test_v2_memory_is_never_raised(v2: CgroupV2, tmp_path: Path) -> None:
    zone = tmp_path / "unified" / "hvtsm" / ZONE
    (zone / "memory.max").write_text(str(128 * MIB))
    limits.tighten(v2, Restrictions(memory=256 * MIB), Restrictions(), lambda *_: None, lock=None)
    assert (zone / "memory.max").read_text() == str(128 * MIB)
    assert (zone / "memory.swap.max").read_text() == "0"


# -- mounts ----------------------------------------------------------------------------------

MOUNTINFO = (b"22 1 8:1 / / {root} shared:1 - ext4 /dev/sda1 rw\n"
             b"23 22 0:5 / /proc {proc} shared:2 - proc proc rw\n"
             b"24 22 0:4 net:[4026532] /run/netns/x rw shared:3 - nsfs nsfs rw\n")


def entries(root: str, proc: str) -> list[mounts.MountEntry]:
    return mounts.parse_mountinfo(MOUNTINFO.replace(b"{root}", root.encode())
                                  .replace(b"{proc}", proc.encode()))


def test_a_view_is_read_only_when_every_mount_but_nsfs_is() -> None:
    assert mounts.readonly_view(entries("ro,relatime", "ro,nosuid"))
    assert not mounts.readonly_view(entries("ro,relatime", "rw,nosuid"))
    assert not mounts.readonly_view([])


def test_a_mount_covered_by_another_on_its_point_does_not_count() -> None:
    """The remount by path reaches only the top of a stack (a second /dev/pts over the
    first), and so does the zone."""
    stacked = (b"22 1 8:1 / / ro - ext4 /dev/sda1 rw\n"
               b"25 22 0:24 / /dev/pts rw,relatime - devpts devpts rw\n"
               b"29 25 0:26 / /dev/pts ro,relatime - devpts devpts rw\n")
    assert mounts.readonly_view(mounts.parse_mountinfo(stacked))
    top_rw = stacked.replace(b"29 25 0:26 / /dev/pts ro", b"29 25 0:26 / /dev/pts rw")
    assert not mounts.readonly_view(mounts.parse_mountinfo(top_rw))


def test_an_unreadable_mountinfo_is_not_read_only(tmp_path: Path) -> None:
    assert not mounts.all_readonly(str(tmp_path / "gone"))
    path = tmp_path / "mountinfo"
    path.write_bytes(MOUNTINFO.replace(b"{root}", b"ro").replace(b"{proc}", b"ro"))
    assert mounts.all_readonly(str(path))


# -- the audit -------------------------------------------------------------------------------

def test_the_report_says_what_was_in_force() -> None:
    report = ApplyReport({"network": "loopback"}, ("loopback down",),
                         (InForce("network", "NIC absent"),))
    assert report.audit_note() == "loopback down; already in force: network (NIC absent)"
    assert ApplyReport({}).audit_note() == ""


def test_a_phase_already_in_force_is_applied_and_audited_as_such(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'hvtsm.db'}")
    driver = FakeDriver()
    driver.already = (InForce("network", "NIC absent"),)
    notices: list[Notice] = []
    manager = Manager(store, driver.bound, listener=notices.append)
    manager.start()
    run = manager.launch(policy(), ["sleep"], policy_toml=POLICY)
    assert run.ended.wait(5)
    manager.shutdown()
    with store.session() as session:
        row = session.exec(select(PhaseApplied).where(PhaseApplied.phase_index == 1)).one()
    assert "already in force: network (NIC absent)" in row.note
    assert json.loads(row.changes) == {"network": "loopback"}
    phase = next(n for n in notices if isinstance(n, PhaseNotice) and n.phase == 1)
    assert phase.already == ("network (NIC absent)",)
    assert phase.to_json()["already"] == ["network (NIC absent)"]
    # the zone went on to its policy's end, not ended early to fail closed
    assert run.end_cause is not None and str(run.end_cause) == "policy"
    assert [r.network for _, _, r in driver.applied][:1] == [NetworkMode.LOOPBACK]
    assert time.time() - (run.started_at or 0) >= 0.9


def test_adoption_audits_what_the_zone_said_beyond_its_stored_state() -> None:
    stored = {"nic": True, "lo_up": True, "frozen": False, "pid": 12}
    now = {"nic": False, "lo_up": True, "frozen": False, "pid": 12, "new_field": 1}
    assert drift(stored, now) == ["nic true -> false"]
    assert drift(stored, dict(stored)) == []
