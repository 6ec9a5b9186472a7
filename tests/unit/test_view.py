"""What a cgroup zone's view binds back from the places it hides, and which cgroup
hierarchies it mounts again (worked out before the fork)."""

from __future__ import annotations

from pathlib import Path

from guest_agent.mountinfo import parse as parse_mountinfo
from hvtsm.zones.cgroup.view import CgroupMount, cgroup_mounts, hidden, named_binds


def test_hidden_places() -> None:
    for path in ("/tmp", "/tmp/x", "/var/tmp/y", "/dev/shm/z", "/run/user/0",
                 "/var/lib/hvtsm/hvtsm.db", "/var/spool/hvtsm/invoke/r1"):
        assert hidden(path), path
    for path in ("/usr/bin/python3", "/tmpfoo", "/var/lib/other", "/etc/passwd"):
        assert not hidden(path), path


def test_a_script_brings_its_directory_but_a_hidden_root_is_never_bound(
        tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "main.py").write_text("")
    (project / "data").mkdir()
    binds = named_binds(["python3", str(project / "main.py"), str(project / "data"),
                         "/tmp", "/etc/passwd", "relative.py"], cwd="/")
    assert binds == (bytes(project),)
    # the working directory /tmp is the zone's own /tmp, not the host's
    assert named_binds(["sh"], cwd="/tmp") == ()
    assert named_binds(["sh"], cwd=str(project)) == (bytes(project),)


def test_a_file_straight_in_a_hidden_root_comes_alone(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"hvtsm-view-test-{tmp_path.name}"
    shm.write_text("")
    try:
        assert named_binds(["cat", str(shm)], cwd="/") == (bytes(shm),)
    finally:
        shm.unlink()


def test_a_path_in_a_unit_brings_the_unit_alone(tmp_path: Path) -> None:
    units = tmp_path / "programs"
    snapshot = units / "abc123"
    (snapshot / "pkg").mkdir(parents=True)
    (snapshot / "pkg" / "prog.py").write_text("")
    (units / "other").mkdir()
    binds = named_binds(["python3", str(snapshot / "pkg" / "prog.py")], cwd="/",
                        units=[units])
    assert binds == (bytes(snapshot),)


def test_missing_paths_are_not_bound(tmp_path: Path) -> None:
    assert named_binds(["cat", str(tmp_path / "missing")], cwd="/") == ()


MOUNTINFO = b"""\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_the_hierarchies_holding_the_zone_are_mounted_again() -> None:
    dirs = ["/sys/fs/cgroup/memory/hvtsm/z1", "/sys/fs/cgroup/pids/hvtsm/z1"]
    assert cgroup_mounts(dirs, parse_mountinfo(MOUNTINFO)) == (
        CgroupMount(b"/sys/fs/cgroup/memory", b"cgroup", b"memory"),
        CgroupMount(b"/sys/fs/cgroup/pids", b"cgroup", b"pids"),
    )
    assert cgroup_mounts(["/sys/fs/cgroup/unified/hvtsm/z1"], parse_mountinfo(MOUNTINFO)) == (
        CgroupMount(b"/sys/fs/cgroup/unified", b"cgroup2", b"nsdelegate"),)
