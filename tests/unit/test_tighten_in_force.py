"""A guest's live tightening when the guest already has the phase's effect (an interface
detached, its link down, the balloon or memtune at or below the target, scheduler limits
lower, vCPUs pinned within the set, loopback down, a lower RLIMIT_NPROC): success, reported
in force, nothing loosened. Against a fake libvirt domain and a fake agent (no guest)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from guest_agent import admin as guest_admin
from hvtsm.host import HostCapabilities
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones.base import Backend, InForce, ZoneHandle
from hvtsm.zones.libvirt.options import LibvirtOptions
from hvtsm.zones.libvirt.state import GuestZoneState
from hvtsm.zones.libvirt.tighten import (
    QEMU_OVERHEAD_KIB,
    UNLIMITED_KIB,
    Tightener,
    scheduler_changes,
)
from hvtsm.zones.logged import LoggedEvents

MIB = 1 << 20
NIC = "<interface type='ethernet'><target dev='hvtz1'/>{link}</interface>"


class FakeDomain:
    """The calls Tightener makes, recorded; the live state they would change, kept."""

    def __init__(self, guests: FakeGuests, *, nic: bool = True, link: str = "") -> None:
        self.guests = guests
        self.nic = NIC.format(link=link) if nic else ""
        self.balloon_kib = 1024 * 1024
        self.hard_limit_kib = UNLIMITED_KIB
        self.scheduler: dict[str, int] = {"cpu_shares": 1024, "vcpu_period": 100000,
                                          "vcpu_quota": -1, "global_period": 100000,
                                          "global_quota": -1}
        self.pins: list[tuple[bool, ...]] = [(True, True)]
        self.emulator: tuple[bool, ...] = (True, True)
        self.calls: list[str] = []

    def XMLDesc(self, _flags: int) -> str:
        return f"<domain><devices>{self.nic}</devices></domain>"

    def updateDeviceFlags(self, xml: str, _flags: int) -> None:
        self.calls.append("link-down")
        self.nic = xml

    def detachDeviceFlags(self, _xml: str, _flags: int) -> None:
        self.calls.append("detach")
        self.nic = ""
        self.guests.removed_event("hvtsm-z1").set()

    def info(self) -> list[int]:
        return [1, 4 * 1024 * 1024, self.balloon_kib, 1, 0]

    def setMemoryFlags(self, kib: int, _flags: int) -> None:
        self.calls.append(f"balloon {kib}")
        self.balloon_kib = kib

    def memoryParameters(self, _flags: int) -> dict[str, int]:
        return {"hard_limit": self.hard_limit_kib}

    def setMemoryParameters(self, params: dict[str, int], _flags: int) -> None:
        self.calls.append(f"hard_limit {params['hard_limit']}")
        self.hard_limit_kib = params["hard_limit"]

    def schedulerParametersFlags(self, _flags: int) -> dict[str, int]:
        return dict(self.scheduler)

    def setSchedulerParametersFlags(self, params: dict[str, int], _flags: int) -> None:
        self.calls.append("scheduler " + ",".join(sorted(params)))
        self.scheduler.update(params)

    def vcpuPinInfo(self, _flags: int) -> list[tuple[bool, ...]]:
        return list(self.pins)

    def emulatorPinInfo(self, _flags: int) -> tuple[bool, ...]:
        return self.emulator

    def pinVcpuFlags(self, vcpu: int, cpumap: tuple[bool, ...], _flags: int) -> None:
        self.calls.append(f"pin vcpu{vcpu}")
        self.pins[vcpu] = cpumap

    def pinEmulator(self, cpumap: tuple[bool, ...], _flags: int) -> None:
        self.calls.append("pin emulator")
        self.emulator = cpumap


class FakeGuests:
    def __init__(self) -> None:
        self.dom: FakeDomain | None = None
        self._removed: dict[str, threading.Event] = {}

    def domain(self, _name: str, _zone_id: str) -> FakeDomain:
        assert self.dom is not None
        return self.dom

    def removed_event(self, domain: str) -> threading.Event:
        return self._removed.setdefault(domain, threading.Event())

    def link(self, _guest: str) -> None:
        return None  # nobody to ask what the guest sees of its memory


class FakeAdmin:
    """What the agent answers: was the link up, was the root read-only, the old limit."""

    def __init__(self, *, lo_up: bool = True, ro: bool = False,
                 nproc: tuple[int, int] | None = (-1, -1)) -> None:
        self.lo_up, self.ro, self.previous = lo_up, ro, nproc
        self.asked: list[str] = []

    def link_down(self, _handle: Any, iface: str) -> bool:
        self.asked.append(f"link_down {iface}")
        return self.lo_up

    def remount_ro(self, _handle: Any, path: str) -> bool:
        self.asked.append(f"remount_ro {path}")
        return self.ro

    def nproc(self, _handle: Any, _pid: int, limit: int) -> tuple[int, int] | None:
        self.asked.append(f"nproc {limit}")
        return self.previous


class Notes(LoggedEvents):
    def __init__(self) -> None:
        super().__init__()
        self.said: list[str] = []
        self.done = threading.Event()

    def note(self, zone_id: str, kind: str, detail: str) -> None:
        self.said.append(kind)
        self.done.set()


def tightener(*, nic: bool = True, link: str = "",
              admin: FakeAdmin | None = None) -> tuple[Tightener, FakeDomain, Notes, FakeAdmin]:
    guests = FakeGuests()
    guests.dom = FakeDomain(guests, nic=nic, link=link)
    notes = Notes()
    admin = admin or FakeAdmin()
    caps = HostCapabilities(is_root=True, cgroup_version=1, cpus=frozenset({0, 1}))
    t = Tightener(caps, LibvirtOptions(unplug_timeout=2), guests, admin,  # type: ignore[arg-type]
                  notes)
    return t, guests.dom, notes, admin


def zone(applied: Restrictions | None = None, *, nic: bool = True) -> ZoneHandle[GuestZoneState]:
    state = GuestZoneState(guest="z1", domain="hvtsm-z1", nic=nic)
    return ZoneHandle("z1", Backend.LIBVIRT, state, applied or Restrictions())


def test_an_interface_already_detached_is_in_force() -> None:
    t, dom, _, _ = tightener(nic=False)
    handle = zone()
    report = t.apply(handle, Restrictions(network=NetworkMode.LOOPBACK))
    assert report.already == (InForce("network", "NIC absent"),)
    assert dom.calls == [] and not handle.state.nic


def test_adoption_found_the_nic_gone_the_recorded_restrictions_still_expect_it() -> None:
    """The guest's state read again at adoption says no NIC; the store's restrictions
    still say full: the cut is audited as in force, not skipped unsaid."""
    t, _, _, _ = tightener(nic=False)
    handle = zone(nic=False)
    report = t.apply(handle, Restrictions(network=NetworkMode.LOOPBACK))
    assert report.already == (InForce("network", "NIC absent"),)


def test_a_link_already_down_is_unplugged_without_a_second_link_change() -> None:
    t, dom, notes, _ = tightener(link="<link state='down'/>")
    handle = zone()
    report = t.apply(handle, Restrictions(network=NetworkMode.LOOPBACK))
    assert report.already == (InForce("network", "link down"),)
    assert report.notes == ("hot-unplug started",)
    assert notes.done.wait(5) and notes.said == ["nic-unplugged"]
    assert dom.calls == ["detach"] and not handle.state.nic


def test_reconcile_unplugs_a_cut_nic_whose_unplug_died_with_its_controller() -> None:
    t, dom, notes, _ = tightener(link="<link state='down'/>")
    handle = zone(Restrictions(network=NetworkMode.LOOPBACK))
    handle.state.unplugging = True  # as the store kept it
    t.reconcile(handle)
    assert notes.done.wait(5) and dom.calls == ["detach"] and not handle.state.nic
    gone, _, _, _ = tightener(nic=False)
    handle = zone()
    gone.reconcile(handle)
    assert not handle.state.nic and not handle.state.unplugging


def test_memory_already_at_or_below_the_target_stays() -> None:
    t, dom, _, _ = tightener()
    overhead = QEMU_OVERHEAD_KIB["qemu"]
    dom.balloon_kib, dom.hard_limit_kib = 256 * 1024, 256 * 1024 + overhead
    report = t.apply(zone(Restrictions(memory=1024 * MIB)), Restrictions(memory=512 * MIB))
    assert dom.calls == []
    assert {a.field for a in report.already} == {"memory"}
    assert "balloon at 262144 KiB" in str(report.already[0])


def test_half_a_memory_change_is_finished_without_raising_the_other_half() -> None:
    t, dom, _, _ = tightener()
    dom.balloon_kib = 256 * 1024  # the balloon moved, memtune was never set
    report = t.apply(zone(Restrictions(memory=1024 * MIB)), Restrictions(memory=512 * MIB))
    assert dom.calls == [f"hard_limit {512 * 1024 + QEMU_OVERHEAD_KIB['qemu']}"]
    assert dom.balloon_kib == 256 * 1024
    assert report.already == (InForce("memory", "balloon at 262144 KiB"),)


def test_scheduler_limits_already_lower_stay() -> None:
    t, dom, _, _ = tightener()
    dom.scheduler["cpu_shares"] = 256
    report = t.apply(zone(), Restrictions(cpu_shares=512, cpu_quota=50))
    assert dom.scheduler["cpu_shares"] == 256
    assert dom.calls == ["scheduler global_period,global_quota,vcpu_period,vcpu_quota"]
    assert report.already == (InForce("cpu", "scheduler cpu_shares=256"),)


def test_scheduler_changes_keep_lower_limits_and_their_periods() -> None:
    wanted = {"cpu_shares": 512, "vcpu_period": 100000, "vcpu_quota": 50000,
              "global_period": 100000, "global_quota": 50000}
    present = {"cpu_shares": 1024, "vcpu_period": 100000, "vcpu_quota": 20000,
               "global_period": 100000, "global_quota": -1}
    params, kept = scheduler_changes(wanted, present)
    assert kept == {"vcpu_quota": 20000}
    assert params == {"cpu_shares": 512, "global_period": 100000, "global_quota": 50000}
    assert scheduler_changes(wanted, {}) == (wanted, {})
    # a quota is a share of its own period: 40 ms of a 200 ms period is 20%, within 50%
    other_period = {"vcpu_period": 200000, "vcpu_quota": 40000}
    assert scheduler_changes(wanted, other_period)[1] == {"vcpu_quota": 40000}
    assert scheduler_changes(wanted, {"vcpu_period": 50000, "vcpu_quota": 40000})[1] == {}


def test_vcpus_pinned_within_the_set_stay() -> None:
    t, dom, _, _ = tightener()
    dom.pins, dom.emulator = [(False, True)], (False, True)
    report = t.apply(zone(), Restrictions(cpus=frozenset({0, 1})))
    assert dom.calls == [] and [a.field for a in report.already] == ["cpus"]
    report = t.apply(zone(), Restrictions(cpus=frozenset({0})))
    assert dom.calls == ["pin vcpu0", "pin emulator"] and report.already == ()


def test_loopback_root_and_nproc_the_agent_found_done() -> None:
    agent = FakeAdmin(lo_up=False, ro=True, nproc=(32, 32))
    t, _, _, _ = tightener(nic=False, admin=agent)
    before = Restrictions(network=NetworkMode.LOOPBACK, pids=100)
    report = t.apply(zone(before, nic=False), before.merged(
        network=NetworkMode.NONE, pids=64, filesystem=FilesystemMode.RO), workload_pid=7)
    assert [str(a) for a in report.already] == [
        "network (guest loopback down)", "pids (RLIMIT_NPROC 32 on the workload)",
        "filesystem (guest root read-only)"]
    assert report.notes == ()


def test_a_guests_first_limits_are_never_in_force() -> None:
    """At boot or bind the guest's first limits are its own: nothing is 'already'."""
    t, dom, _, _ = tightener(nic=False, admin=FakeAdmin(lo_up=False, ro=True))
    dom.balloon_kib = 512 * 1024
    report = t.apply(zone(), Restrictions(network=NetworkMode.NONE, memory=512 * MIB,
                                          cpu_shares=2048, filesystem=FilesystemMode.RO),
                     first=True)
    assert report.already == ()
    assert "scheduler cpu_shares" in dom.calls and f"balloon {512 * 1024}" in dom.calls


@pytest.mark.parametrize(("current", "limit", "kept"), [
    (guest_admin.resource.RLIM_INFINITY, 64, 64), (32, 64, 32), (100, 64, 64), (64, 64, 64)])
def test_the_agent_never_raises_a_process_limit(current: int, limit: int, kept: int) -> None:
    assert guest_admin.lowered(current, limit) == kept
