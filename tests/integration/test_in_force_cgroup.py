"""Idempotent application against the real kernel: a phase whose effect a cgroup zone
already has (its NIC gone, its loopback down, a limit lower, its mounts read-only) is
applied all the same and reported in force, never failed and never loosened; the effect is
checked from inside the zone."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvtsm.host import HostCapabilities, probe_host
from hvtsm.lifecycle.adoption import drift
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones.base import InForce, ZoneHandle
from hvtsm.zones.cgroup import launcher
from hvtsm.zones.cgroup.cgroupfs import CgroupV1, read_file, write_file
from hvtsm.zones.cgroup.driver import CgroupDriver
from hvtsm.zones.logged import LoggedEvents
from tests.integration.test_cgroup_zone import SCRATCH, Listener, Zones, host_ip

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

MIB = 1 << 20


@pytest.fixture(scope="module")
def caps() -> HostCapabilities:
    caps = probe_host()
    if caps.cgroup_version is None:
        pytest.skip("no cgroup hierarchy on this host")
    return caps


@pytest.fixture
def zones(caps: HostCapabilities) -> Iterator[Zones]:
    made = Zones(CgroupDriver(LoggedEvents(), caps))
    try:
        yield made
    finally:
        made.cleanup()


def in_netns(handle: ZoneHandle, *lines: str) -> None:
    """Do part of a cut by hand, as a controller killed right after it would have left it."""
    subprocess.run(["ip", "-n", handle.state.netns, "-batch", "-"], check=True,
                   input="\n".join(lines) + "\n", text=True)


def test_a_network_cut_already_in_the_kernel_is_in_force(zones: Zones) -> None:
    handle = zones.create()
    listener = Listener(host_ip(handle), 1)
    try:
        agent = zones.agent(handle)
        host = f"connect {host_ip(handle)} {listener.ports[0]}"
        assert agent.ask(host) == "ok"
        in_netns(handle, "link set eth0 down", "link del eth0")

        report = zones.driver.apply(handle,
                                    handle.applied.merged(network=NetworkMode.LOOPBACK))
        assert report.changed == {"network": "loopback"}
        assert report.already == (InForce("network", "NIC absent"),)
        assert report.notes == ()
        assert handle.applied.network is NetworkMode.LOOPBACK and not handle.state.nic
        assert agent.ask(host).startswith("fail")
        assert agent.ask("connect 127.0.0.1 1") == "fail ECONNREFUSED"  # lo still up

        # half of the next cut: lo down, its addresses still there
        in_netns(handle, "link set lo down")
        report = zones.driver.apply(handle, handle.applied.merged(network=NetworkMode.NONE))
        assert report.notes == ("loopback down",)  # the flush was still to do
        assert agent.ask("connect 127.0.0.1 1") == "fail ENETUNREACH"
        assert agent.workload.poll() is None, "the zone goes on"
    finally:
        listener.close()


def test_a_loopback_already_down_is_in_force(zones: Zones) -> None:
    handle = zones.create(Restrictions(network=NetworkMode.LOOPBACK))
    agent = zones.agent(handle)
    in_netns(handle, "link set lo down", "addr flush dev lo")
    report = zones.driver.apply(handle, handle.applied.merged(network=NetworkMode.NONE))
    assert report.already == (InForce("network", "loopback down"),)
    assert agent.ask("connect 127.0.0.1 1") == "fail ENETUNREACH"


def _limit_files(handle: ZoneHandle, caps: HostCapabilities) -> dict[str, Path]:
    cgroup = CgroupDriver(LoggedEvents(), caps).cgroup(handle.zone_id)
    if isinstance(cgroup, CgroupV1):
        memory, pids = cgroup.dir("memory"), cgroup.dir("pids")
        assert memory is not None and pids is not None
        files = {"memory": memory / "memory.limit_in_bytes", "pids": pids / "pids.max"}
        memsw = memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            files["memsw"] = memsw
        return files
    d = cgroup.dirs()[0]
    return {"memory": d / "memory.max", "pids": d / "pids.max"}


def inside(handle: ZoneHandle, path: Path) -> str:
    """Where the zone sees one of its cgroup files: its cgroup is the root of its cgroup
    namespace, mounted where the host mounts the hierarchy."""
    return str(path).replace(f"/hvtsm/{handle.zone_id}/", "/")


def test_a_limit_already_lower_stays_lower(zones: Zones, caps: HostCapabilities) -> None:
    """Something lowered the zone's limits below the next phase's (a reaction, a deputy,
    the phase before a crash): the phase leaves them there, seen from inside the zone."""
    handle = zones.create(Restrictions(memory=512 * MIB, pids=100))
    files = _limit_files(handle, caps)
    write_file(files["memory"], str(128 * MIB))
    if "memsw" in files:
        write_file(files["memsw"], str(128 * MIB))
    write_file(files["pids"], "20")
    agent = zones.agent(handle)

    report = zones.driver.apply(handle, handle.applied.merged(memory=256 * MIB, pids=50))
    assert report.changed == {"memory": "256MiB", "pids": "50"}
    assert {a.field for a in report.already} == {"memory", "pids"}
    assert "tighter than" in str(report.already[0])
    assert handle.applied.memory == 256 * MIB and handle.applied.pids == 50
    # the zone's own view of its cgroups: the root of its cgroup namespace
    assert agent.ask(f"cat {inside(handle, files['memory'])}") == f"{128 * MIB}|"
    assert agent.ask(f"cat {inside(handle, files['pids'])}") == "20|"
    if "memsw" in files:
        assert read_file(files["memsw"]) == str(128 * MIB)


def test_a_read_only_switch_already_done_is_in_force(zones: Zones) -> None:
    shared = SCRATCH  # the zone's own, the one place it may write
    handle = zones.create()
    agent = zones.agent(handle)
    assert agent.ask(f"write {shared}/before") == "ok"
    assert handle.state.ns_ref is not None
    launcher.remount_readonly_live(handle.state.ns_ref, handle.zone_id)
    assert agent.ask(f"write {shared}/between") == "fail EROFS"
    report = zones.driver.apply(handle, handle.applied.merged(filesystem=FilesystemMode.RO))
    assert report.changed == {"filesystem": "ro"}
    [found] = report.already
    assert found.field == "filesystem" and "every mount read-only" in found.found
    assert agent.ask(f"write {shared}/after") == "fail EROFS"


def test_adoption_reads_the_network_from_the_kernel(zones: Zones,
                                                   caps: HostCapabilities) -> None:
    handle = zones.create()
    zones.start(handle, ["sleep", "60"], stdout=False)
    state = json.loads(json.dumps(handle.state.to_json()))  # as the store keeps it
    assert state["nic"] is True
    in_netns(handle, "link set eth0 down", "link del eth0")  # then the controller died

    fresh = CgroupDriver(LoggedEvents(), caps)
    adopted, running = fresh.adopt(handle.zone_id, state, handle.applied)
    assert running is not None
    assert adopted.state.nic is False and adopted.state.lo_up is True
    assert adopted.applied.network is NetworkMode.FULL  # the store's word, left as it was
    assert drift(state, adopted.state.to_json()) == ["nic true -> false"]
    report = fresh.apply(adopted, adopted.applied.merged(network=NetworkMode.LOOPBACK))
    assert report.already == (InForce("network", "NIC absent"),)
    zones.handles.append(adopted)
