"""Idempotent application in a real TCG guest: a phase whose effect the guest already has
(its NIC hot-unplugged, its balloon lower, its CPU shares lower, its loopback down) is
applied all the same, reported in force, and nothing is raised back; seen from inside the
guest through its agent. One guest boot (about 10 s of TCG), well under a minute."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import pytest
from lxml import etree

from hvtsm.host import probe_host
from hvtsm.restrictions import NetworkMode, Restrictions
from hvtsm.zones.base import Backend, InForce, WorkloadIO, ZoneSpec
from hvtsm.zones.logged import LoggedEvents

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]

MIB = 1 << 20


@pytest.fixture(scope="module")
def ready() -> None:
    from tests.integration.test_libvirt_zone import _libvirt_ready

    reason = _libvirt_ready()
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    assert reason is None, reason


def until(predicate: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_guest_already_tightened_is_in_force(ready: None, listener: int) -> None:
    import libvirt

    from hvtsm.zones.factory import driver_factory
    from hvtsm.zones.libvirt.driver import LibvirtOptions, domain_name

    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    driver: Any = driver_factory(Backend.LIBVIRT, probe_host(),
                                 libvirt=LibvirtOptions())(LoggedEvents())
    zone_id = f"zi{os.urandom(4).hex()}"
    handle = driver.create(ZoneSpec(zone_id, int.from_bytes(os.urandom(2), "big") % 4000,
                                    user="root"), Restrictions(memory=512 * MIB))
    try:
        workload = driver.start(handle, ["sleep", "60"],
                                WorkloadIO(stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        link = driver.agent_link(zone_id)
        gateway = handle.state.host_addr.split("/")[0]
        assert link.probe("tcp_connect", host=gateway, port=listener, timeout=3)["ok"]
        dom = driver.connection.get().lookupByName(domain_name(zone_id))

        # what a phase half-applied before its controller died would have left
        iface = etree.fromstring(dom.XMLDesc(0)).find("./devices/interface")
        dom.detachDeviceFlags(etree.tostring(iface, encoding="unicode"), live)
        until(lambda: etree.fromstring(dom.XMLDesc(0)).find("./devices/interface") is None,
              "the NIC never went")
        dom.setMemoryFlags(256 * 1024, live)
        dom.setSchedulerParametersFlags({"cpu_shares": 256}, live)
        until(lambda: int(link.probe("meminfo")["MemTotal"]) <= 300 * 1024,
              "the guest never saw the balloon")
        until(lambda: dom.info()[2] <= 256 * 1024, "libvirt never saw the balloon move")

        report = driver.apply(handle, handle.applied.merged(
            network=NetworkMode.LOOPBACK, memory=384 * MIB, cpu_shares=512))
        assert InForce("network", "NIC absent") in report.already, report
        assert InForce("cpu", "scheduler cpu_shares=256") in report.already, report
        assert any(a.field == "memory" and "balloon" in a.found for a in report.already)
        # nothing was raised back to the phase's values
        assert dom.schedulerParametersFlags(live)["cpu_shares"] == 256
        assert dom.info()[2] <= 256 * 1024
        assert int(link.probe("meminfo")["MemTotal"]) <= 300 * 1024
        assert not link.probe("tcp_connect", host=gateway, port=listener, timeout=2)["ok"]
        assert not handle.state.nic

        link.admin("link_down", iface="lo")
        report = driver.apply(handle, handle.applied.merged(network=NetworkMode.NONE))
        assert report.already == (InForce("network", "guest loopback down"),)
        interfaces = {i["name"]: i for i in link.probe("interfaces")["interfaces"]}
        assert interfaces["lo"]["operstate"] in ("down", "unknown")
        assert workload.poll() is None, "the zone goes on"
    finally:
        driver.terminate(handle)
        driver.remove(zone_id)
