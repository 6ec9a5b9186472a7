"""Host probing against fake /proc and /sys trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvtsm.errors import HostError
from hvtsm.host import HostCapabilities, probe_host, require_cgroup_host

BASE = [
    "22 27 0:21 / /proc rw,relatime - proc proc rw",
    "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw",
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
]
V1 = [
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
    "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset",
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
    "37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer",
    "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids",
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd",
]
UNIFIED = ["41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw"]
V2 = ["31 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 "
      "cgroup2 rw,nsdelegate,memory_recursiveprot"]


def fake_host(tmp_path: Path, mounts: list[str], *, ip_forward: str = "0",
              controllers: dict[str, str] | None = None) -> tuple[str, str]:
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("\n".join(BASE + mounts) + "\n")
    (proc / "sys" / "net" / "ipv4").mkdir(parents=True)
    (proc / "sys" / "net" / "ipv4" / "ip_forward").write_text(ip_forward + "\n")
    (proc / "sys" / "kernel").mkdir(parents=True)
    (proc / "sys" / "kernel" / "hostname").write_text("fakehost\n")
    for rel, text in (controllers or {}).items():
        path = sys_ / rel
        path.mkdir(parents=True, exist_ok=True)
        (path / "cgroup.controllers").write_text(text + "\n")
    return str(sys_), str(proc)


def test_v1_host(tmp_path: Path) -> None:
    sysfs, proc = fake_host(tmp_path, V1 + UNIFIED, ip_forward="1",
                            controllers={"fs/cgroup/unified": ""})
    caps = probe_host(sysfs_root=sysfs, proc_root=proc)
    assert caps.cgroup_version == 1
    cgroup = tmp_path / "sys" / "fs" / "cgroup"
    assert caps.cgroup_mounts == {
        "cpu": str(cgroup / "cpu,cpuacct"), "cpuacct": str(cgroup / "cpu,cpuacct"),
        "cpuset": str(cgroup / "cpuset"), "memory": str(cgroup / "memory"),
        "freezer": str(cgroup / "freezer"), "pids": str(cgroup / "pids"),
    }
    assert caps.cgroup_root is None
    assert caps.cgroup_controllers == {"cpu", "cpuacct", "cpuset", "memory", "freezer", "pids"}
    assert caps.ip_forward is True
    assert caps.hostname == "fakehost"
    assert caps.ncpus == len(caps.cpus) >= 1


def test_v2_host(tmp_path: Path) -> None:
    sysfs, proc = fake_host(tmp_path, V2,
                            controllers={"fs/cgroup": "cpuset cpu io memory hugetlb pids"})
    caps = probe_host(sysfs_root=sysfs, proc_root=proc)
    assert caps.cgroup_version == 2
    assert caps.cgroup_root == str(tmp_path / "sys" / "fs" / "cgroup")
    assert caps.cgroup_controllers == {"cpuset", "cpu", "memory", "pids"}
    assert caps.cgroup_mounts == {}
    assert caps.ip_forward is False


def test_hybrid_host_with_empty_unified_tree_is_v2_when_no_v1_controller(
        tmp_path: Path) -> None:
    only_named = [m for m in V1 if "name=systemd" in m or "tmpfs" in m]
    sysfs, proc = fake_host(tmp_path, only_named + UNIFIED,
                            controllers={"fs/cgroup/unified": "memory pids"})
    caps = probe_host(sysfs_root=sysfs, proc_root=proc)
    assert caps.cgroup_version == 2
    assert caps.cgroup_root == str(tmp_path / "sys" / "fs" / "cgroup" / "unified")


def test_no_cgroups(tmp_path: Path) -> None:
    sysfs, proc = fake_host(tmp_path, [])
    caps = probe_host(sysfs_root=sysfs, proc_root=proc)
    assert caps.cgroup_version is None
    with pytest.raises(HostError, match=r"^no cgroup v1 or v2 hierarchy found at "
                                        r"/sys/fs/cgroup") as info:
        require_cgroup_host(HostCapabilities(is_root=True, cgroup_version=None, ip="/x/ip"))
    assert info.value.hint


def test_escaped_mount_point(tmp_path: Path) -> None:
    spaced = ["39 31 0:36 / /sys/fs/cgroup/my\\040pids rw - cgroup cgroup rw,pids"]
    sysfs, proc = fake_host(tmp_path, spaced)
    caps = probe_host(sysfs_root=sysfs, proc_root=proc)
    assert caps.cgroup_mounts == {"pids": str(tmp_path / "sys" / "fs" / "cgroup" / "my pids")}


def test_probe_is_cached(tmp_path: Path) -> None:
    sysfs, proc = fake_host(tmp_path, V1)
    assert probe_host(sysfs_root=sysfs, proc_root=proc) is probe_host(sysfs_root=sysfs,
                                                                       proc_root=proc)


def test_missing_proc_files_mean_no_support(tmp_path: Path) -> None:
    caps = probe_host(sysfs_root=str(tmp_path / "nosys"), proc_root=str(tmp_path / "noproc"))
    assert caps.cgroup_version is None and caps.ip_forward is False


def test_require_root_first() -> None:
    caps = HostCapabilities(is_root=False, cgroup_version=None)
    with pytest.raises(HostError, match=r"^hvtsm run needs root: "):
        require_cgroup_host(caps)


def test_require_ip_tool() -> None:
    caps = HostCapabilities(is_root=True, cgroup_version=2, cgroup_root="/sys/fs/cgroup",
                            ip=None)
    with pytest.raises(HostError, match="`ip` command"):
        require_cgroup_host(caps)


def test_usable_host_passes() -> None:
    require_cgroup_host(HostCapabilities(is_root=True, cgroup_version=1,
                                         cgroup_mounts={"pids": "/x"}, ip="/usr/sbin/ip"))
