"""cgroup v1/v2 control-file writes against fake trees (no kernel, no root)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from hvtsm.errors import ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.zones.cgroup import cgroupfs
from hvtsm.zones.cgroup.cgroupfs import (
    CgroupV1,
    CgroupV2,
    quota_us,
    shares_to_weight,
    zone_cgroup,
    zone_ids,
)

ZONE = "zfake01"

V1_FILES = {
    "cpu": {"cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"},
    "cpuacct": {"cpuacct.usage": "0"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cpuset.effective_cpus": ""},
    "memory": {"memory.limit_in_bytes": "9223372036854771712",
               "memory.memsw.limit_in_bytes": "9223372036854771712",
               "memory.usage_in_bytes": "0"},
    "pids": {"pids.max": "max"},
    "freezer": {"freezer.state": "THAWED"},
}

V2_FILES = {
    "cgroup.procs": "", "cgroup.freeze": "0", "cgroup.events": "populated 0\nfrozen 0",
    "cgroup.subtree_control": "", "cpu.weight": "100", "cpu.max": "max 100000",
    "cpuset.cpus": "", "cpuset.cpus.effective": "0-3", "memory.max": "max",
    "memory.swap.max": "max", "memory.current": "0", "pids.max": "max",
    "cpu.stat": "usage_usec 1500\nuser_usec 1000",
}


def kernel_mkdir(path: Path, files: dict[str, str]) -> None:
    """What the kernel does on mkdir in a cgroup tree: the directory with its files."""
    path.mkdir(parents=True, exist_ok=True)
    for name, value in {"cgroup.procs": "", **files}.items():
        (path / name).write_text(value)


@pytest.fixture
def v1(tmp_path: Path) -> CgroupV1:
    mounts = {}
    for controller, files in V1_FILES.items():
        mount = tmp_path / controller
        root_files = dict(files)
        if controller == "cpuset":
            root_files.update({"cpuset.cpus": "0-3", "cpuset.mems": "0",
                               "cpuset.effective_cpus": "0-3"})
        kernel_mkdir(mount, root_files)
        kernel_mkdir(mount / "hvtsm", files)
        kernel_mkdir(mount / "hvtsm" / ZONE, files)
        mounts[controller] = str(mount)
    return CgroupV1(mounts, ZONE)


@pytest.fixture
def v2(tmp_path: Path) -> CgroupV2:
    root = tmp_path / "unified"
    kernel_mkdir(root, {"cgroup.controllers": "cpuset cpu io memory pids",
                        "cgroup.subtree_control": ""})
    kernel_mkdir(root / "hvtsm", V2_FILES)
    kernel_mkdir(root / "hvtsm" / ZONE, V2_FILES)
    return CgroupV2(root, {"cpu", "cpuset", "memory", "pids"}, ZONE)


def read(path: Path) -> str:
    return path.read_text()


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    writes: list[tuple[str, str]] = []
    real = cgroupfs.write_file

    def spy(path: Path, value: str) -> None:
        writes.append((path.name, value))
        real(path, value)

    monkeypatch.setattr(cgroupfs, "write_file", spy)
    return writes


# -- conversions ---------------------------------------------------------------------------

def test_shares_to_weight_matches_the_usual_formula() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 39
    assert shares_to_weight(262144) == 10000
    assert shares_to_weight(1) == 1 and shares_to_weight(10**9) == 10000


def test_quota_percent_to_microseconds() -> None:
    assert quota_us(50) == 50_000
    assert quota_us(150) == 150_000
    assert quota_us(0.1) == 1000  # the kernel's minimum


# -- v1 ------------------------------------------------------------------------------------

def test_v1_dirs_one_per_hierarchy(v1: CgroupV1, tmp_path: Path) -> None:
    assert [d.relative_to(tmp_path).parts[0] for d in v1.dirs()] == list(V1_FILES)
    shared = CgroupV1({"cpu": tmp_path / "cpu", "cpuacct": tmp_path / "cpu"}, ZONE)
    assert shared.dirs() == [tmp_path / "cpu" / "hvtsm" / ZONE]


def test_v1_create_copies_cpuset_from_parent(v1: CgroupV1, tmp_path: Path) -> None:
    v1.create()
    for d in (tmp_path / "cpuset" / "hvtsm", tmp_path / "cpuset" / "hvtsm" / ZONE):
        assert read(d / "cpuset.cpus") == "0-3"
        assert read(d / "cpuset.mems") == "0"


def test_v1_cpu_writes(v1: CgroupV1, tmp_path: Path) -> None:
    v1.set_cpu_shares(512)
    v1.set_cpu_quota(150)
    zone_cpu = tmp_path / "cpu" / "hvtsm" / ZONE
    assert read(zone_cpu / "cpu.shares") == "512"
    assert read(zone_cpu / "cpu.cfs_period_us") == "100000"
    assert read(zone_cpu / "cpu.cfs_quota_us") == "150000"
    v1.set_cpu_quota(None)
    assert read(zone_cpu / "cpu.cfs_quota_us") == "-1"


def test_v1_cpus_and_pids(v1: CgroupV1, tmp_path: Path) -> None:
    (tmp_path / "cpuset" / "hvtsm" / "cpuset.effective_cpus").write_text("0-3")
    v1.set_cpus(frozenset({1, 2, 3}))
    assert read(tmp_path / "cpuset" / "hvtsm" / ZONE / "cpuset.cpus") == "1-3"
    with pytest.raises(ZoneError, match=r"CPUs 7: .* only 0-3"):
        v1.set_cpus(frozenset({7}))
    v1.set_pids(32)
    assert read(tmp_path / "pids" / "hvtsm" / ZONE / "pids.max") == "32"
    v1.set_pids(None)
    assert read(tmp_path / "pids" / "hvtsm" / ZONE / "pids.max") == "max"


def test_v1_memory_lowering_writes_limit_before_memsw(v1: CgroupV1, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    writes = record_writes(monkeypatch)
    v1.set_memory(256 << 20)
    assert writes == [("memory.limit_in_bytes", str(256 << 20)),
                      ("memory.memsw.limit_in_bytes", str(256 << 20))]
    writes.clear()
    v1.set_memory(None)  # raising: memsw first, so limit <= memsw holds throughout
    assert writes == [("memory.memsw.limit_in_bytes", "-1"), ("memory.limit_in_bytes", "-1")]


def test_v1_memory_without_memsw(v1: CgroupV1, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "memory" / "hvtsm" / ZONE / "memory.memsw.limit_in_bytes").unlink()
    writes = record_writes(monkeypatch)
    v1.set_memory(64 << 20)
    assert writes == [("memory.limit_in_bytes", str(64 << 20))]


def test_v1_memory_below_usage_is_a_clear_error(v1: CgroupV1, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "memory" / "hvtsm" / ZONE / "memory.usage_in_bytes").write_text(
        str(100 << 20))

    def busy(path: Path, value: str) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(cgroupfs, "write_file", busy)
    with pytest.raises(ZoneError) as info:
        v1.set_memory(8 << 20)
    message = str(info.value)
    assert message.startswith(f"zone {ZONE}: ")
    assert "8MiB" in message and "uses 100MiB" in message
    assert info.value.hint and "terminate" in info.value.hint


def test_v1_missing_controller(tmp_path: Path) -> None:
    kernel_mkdir(tmp_path / "memory" / "hvtsm" / ZONE, V1_FILES["memory"])
    only_memory = CgroupV1({"memory": tmp_path / "memory"}, ZONE)
    only_memory.set_pids(None)  # nothing to limit, nothing to complain about
    with pytest.raises(ZoneError, match="no cgroup v1 'pids' hierarchy"):
        only_memory.set_pids(10)
    with pytest.raises(ZoneError, match="freezer"):
        only_memory.freeze()


def test_v1_freeze_and_thaw(v1: CgroupV1, tmp_path: Path) -> None:
    v1.freeze(timeout=0.5)
    assert read(tmp_path / "freezer" / "hvtsm" / ZONE / "freezer.state") == "FROZEN"
    assert v1.frozen()
    v1.thaw(timeout=0.5)
    assert not v1.frozen()


def test_v1_stats_pids_and_remove(v1: CgroupV1, tmp_path: Path) -> None:
    (tmp_path / "memory" / "hvtsm" / ZONE / "memory.usage_in_bytes").write_text("4096")
    (tmp_path / "cpuacct" / "hvtsm" / ZONE / "cpuacct.usage").write_text("123")
    (tmp_path / "pids" / "hvtsm" / ZONE / "cgroup.procs").write_text("10\n11\n")
    (tmp_path / "freezer" / "hvtsm" / ZONE / "cgroup.procs").write_text("11\n12\n")
    assert v1.memory_usage() == 4096
    assert v1.cpu_usage_ns() == 123
    assert v1.pids() == {10, 11, 12}
    with pytest.raises(ZoneError, match="cannot remove"):
        v1.remove()  # a fake tree's directories are not empty, like a busy cgroup


def test_v1_remove_is_idempotent(tmp_path: Path) -> None:
    for controller in ("pids", "freezer"):
        (tmp_path / controller / "hvtsm" / ZONE).mkdir(parents=True)
    cg = CgroupV1({"pids": tmp_path / "pids", "freezer": tmp_path / "freezer"}, ZONE)
    assert len(cg.remove()) == 2
    assert cg.remove() == []
    assert not cg.exists() and cg.pids() == set()


# -- v2 ------------------------------------------------------------------------------------

def test_v2_create_enables_controllers(v2: CgroupV2, tmp_path: Path) -> None:
    v2.create()
    expected = "+cpu +cpuset +memory +pids"
    assert read(tmp_path / "unified" / "cgroup.subtree_control") == expected
    assert read(tmp_path / "unified" / "hvtsm" / "cgroup.subtree_control") == expected


def test_v2_create_skips_enabled_and_unavailable(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "unified"
    kernel_mkdir(root, {"cgroup.subtree_control": "cpu memory"})
    kernel_mkdir(root / "hvtsm", {"cgroup.subtree_control": "cpu memory"})
    writes = record_writes(monkeypatch)
    CgroupV2(root, {"cpu", "memory"}, ZONE).create()
    assert writes == []
    assert (root / "hvtsm" / ZONE).is_dir()


def test_v2_limits(v2: CgroupV2, tmp_path: Path) -> None:
    zone = tmp_path / "unified" / "hvtsm" / ZONE
    v2.set_cpu_shares(1024)
    v2.set_cpu_quota(50)
    v2.set_cpus(frozenset({0, 2}))
    v2.set_memory(128 << 20)
    v2.set_pids(64)
    assert read(zone / "cpu.weight") == "39"
    assert read(zone / "cpu.max") == "50000 100000"
    assert read(zone / "cpuset.cpus") == "0,2"
    assert read(zone / "memory.max") == str(128 << 20)
    assert read(zone / "memory.swap.max") == "0"
    assert read(zone / "pids.max") == "64"
    v2.set_cpu_quota(None)
    v2.set_cpus(None)
    v2.set_memory(None)
    assert read(zone / "cpu.max") == "max 100000"
    assert read(zone / "cpuset.cpus") == ""
    assert read(zone / "memory.max") == "max" and read(zone / "memory.swap.max") == "max"


def test_v2_missing_controller(tmp_path: Path) -> None:
    cg = CgroupV2(tmp_path, {"memory"}, ZONE)
    cg.set_cpu_quota(None)
    with pytest.raises(ZoneError, match="'cpu' controller is not available"):
        cg.set_cpu_quota(10)


def test_v2_freeze_waits_for_events(v2: CgroupV2, tmp_path: Path) -> None:
    zone = tmp_path / "unified" / "hvtsm" / ZONE
    (zone / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    v2.freeze(timeout=0.5)
    assert read(zone / "cgroup.freeze") == "1"
    assert v2.frozen()
    with pytest.raises(ZoneError, match="did not thaw"):
        v2.thaw(timeout=0.05)  # the fake kernel never reports "frozen 0"


def test_v2_kill_uses_cgroup_kill(v2: CgroupV2, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    zone = tmp_path / "unified" / "hvtsm" / ZONE
    (zone / "cgroup.kill").write_text("")
    writes = record_writes(monkeypatch)
    v2.kill(timeout=0.1)
    assert writes == [("cgroup.kill", "1")]


def test_v2_kill_reports_survivors(v2: CgroupV2, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    zone = tmp_path / "unified" / "hvtsm" / ZONE
    (zone / "cgroup.kill").write_text("")
    (zone / "cgroup.procs").write_text("4194304\n")  # above any pid_max: nothing to kill
    with pytest.raises(ZoneError, match=r"\[4194304\] still in the zone"):
        v2.kill(timeout=0.05)


def test_v2_stats(v2: CgroupV2, tmp_path: Path) -> None:
    (tmp_path / "unified" / "hvtsm" / ZONE / "memory.current").write_text("8192")
    assert v2.memory_usage() == 8192
    assert v2.cpu_usage_ns() == 1_500_000


# -- choosing and listing ------------------------------------------------------------------

def test_zone_cgroup_and_ids_follow_the_host(tmp_path: Path) -> None:
    for name in ("za", "zb"):
        (tmp_path / "pids" / "hvtsm" / name).mkdir(parents=True)
    (tmp_path / "memory" / "hvtsm" / "zc").mkdir(parents=True)
    v1_caps = HostCapabilities(is_root=True, cgroup_version=1,
                               cgroup_mounts={"pids": str(tmp_path / "pids"),
                                              "memory": str(tmp_path / "memory")})
    assert isinstance(zone_cgroup(v1_caps, "za"), CgroupV1)
    assert zone_ids(v1_caps) == {"za", "zb", "zc"}

    (tmp_path / "unified" / "hvtsm" / "zd").mkdir(parents=True)
    v2_caps = HostCapabilities(is_root=True, cgroup_version=2,
                               cgroup_root=str(tmp_path / "unified"),
                               cgroup_controllers=frozenset({"pids"}))
    cg = zone_cgroup(v2_caps, "zd")
    assert isinstance(cg, CgroupV2) and cg.controllers == {"pids"}
    assert zone_ids(v2_caps) == {"zd"}
