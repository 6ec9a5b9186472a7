"""Tightening a running guest live (measured costs in ../shared/DESIGN.md):

* network `loopback`/`none`: the link goes down (a few ms, in force at once), then the NIC
  is hot-unplugged in the background; completion comes from the DEVICE_REMOVED event (or
  the live XML) and is reported as a `nic-unplugged` note. `none` also takes the guest's
  loopback down.
* egress allow-lists: nftables rules on the host, on the guest's tap.
* CPU: `setSchedulerParameters` (cpu_shares, vcpu and global quota), vCPU and emulator
  pinning. Memory: balloon target plus a memtune hard limit (target + QEMU's own overhead);
  what the guest then reports is a `guest-memory` note.
* pids: RLIMIT_NPROC on the workload (a guest has no cgroup between the workload and its
  kernel); `ro`: the guest's root remounted read-only. Both through the guest agent.

The same code puts a zone's initial restrictions on a guest (`first`): one way to limit a
guest, whether at boot, when a pooled guest is bound, or at a phase.

At a phase each step reads the guest first (the live XML, the balloon and memtune, the
scheduler parameters and pinning, what the agent found) and asks only for what is missing:
a phase half-applied before its controller died is finished, what was done reported in
force (`ApplyReport.already`), and a value found tighter than the phase's stays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt
from lxml import etree

from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones.base import ApplyReport, DriverEvents, InForce, ZoneHandle
from hvtsm.zones.libvirt import egress
from hvtsm.zones.libvirt.admin import GuestAdmin
from hvtsm.zones.libvirt.guests import Guests
from hvtsm.zones.libvirt.options import LibvirtOptions
from hvtsm.zones.libvirt.state import GuestZoneState

#: what QEMU itself needs beside guest memory, for the memtune hard limit
QEMU_OVERHEAD_KIB = {"kvm": 256 * 1024, "qemu": 768 * 1024}
LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
PERIOD_US = 100_000
#: what libvirt reports for a memtune limit that is not set (its C macro
#: VIR_DOMAIN_MEMORY_PARAM_UNLIMITED, 2**53 - 1 KiB, which libvirt-python does not export)
UNLIMITED_KIB = 9007199254740991


class Tightener:
    def __init__(self, caps: HostCapabilities, options: LibvirtOptions, guests: Guests,
                 admin: GuestAdmin, events: DriverEvents) -> None:
        self.caps = caps
        self.options = options
        self.guests = guests
        self.admin = admin
        self.events = events

    def apply(self, handle: ZoneHandle[GuestZoneState], restrictions: Restrictions, *,
              first: bool = False, workload_pid: int | None = None) -> ApplyReport:
        old = handle.applied
        state = handle.state
        changed = restrictions.changes_from(old)
        notes: list[str] = []
        # nothing is "already" in force at a guest's first limits: they are its own choice
        already: list[InForce] = []

        def found(field: str, what: str) -> None:
            if not first:
                already.append(InForce(field, what))

        dom = self.guests.domain(state.domain, handle.zone_id)
        # the recorded restrictions say a NIC is there even when the guest's state, read
        # again at adoption, knows it is gone: the unplug step then finds it in force
        expected = state.nic or (old.network.has_nic and not first)
        if restrictions.network is not NetworkMode.FULL and expected:
            notes += self._unplug(handle, dom, found)
        egress_changed = first or restrictions.egress != old.egress
        if (restrictions.network is NetworkMode.FULL and state.nic and egress_changed
                and restrictions.egress is not None and state.tap is not None):
            # one transaction replacing the table whatever it holds: idempotent
            egress.set_egress(state.guest, state.tap, restrictions.egress,
                              nft=self.caps.nft or "nft")
            notes.append(f"egress allow-list on tap {state.tap}: "
                         f"{len(restrictions.egress)} destination(s)")
        if restrictions.network is NetworkMode.NONE and (first or old.network
                                                         is not NetworkMode.NONE):
            if self.admin.link_down(handle, "lo"):
                notes.append("guest loopback down")
            else:
                found("network", "guest loopback down")
        self._cpu(dom, restrictions, old, notes, first, found)
        if restrictions.memory is not None and (first or restrictions.memory != old.memory):
            notes += self._memory(dom, handle, restrictions.memory, watch=not first,
                                  found=found)
        if (restrictions.pids is not None and restrictions.pids != old.pids
                and workload_pid is not None):
            previous = self.admin.nproc(handle, workload_pid, restrictions.pids)
            if previous is not None and all(0 <= p <= restrictions.pids for p in previous):
                found("pids", f"RLIMIT_NPROC {previous[0]} on the workload")
            else:
                notes.append(f"RLIMIT_NPROC {restrictions.pids} on the workload")
        if restrictions.filesystem is FilesystemMode.RO and (
                first or old.filesystem is not FilesystemMode.RO):
            if self.admin.remount_ro(handle, "/"):
                found("filesystem", "guest root read-only")
            else:
                notes.append("guest root remounted read-only")
        handle.applied = restrictions
        return ApplyReport(changed, tuple(notes), tuple(already))

    def reconcile(self, handle: ZoneHandle[GuestZoneState]) -> None:
        """After adoption: the NIC as the live XML has it (gone: the old controller's
        unplug completed unrecorded), and a cut NIC still plugged (its unplug died with
        the old controller, whose thread no longer waits for it) unplugged again, its
        link down first if it is not."""
        state = handle.state
        state.unplugging = False
        dom = self.guests.domain(state.domain, handle.zone_id)
        if _interface(dom) is None:
            state.nic = False
        elif state.nic and handle.applied.network is not NetworkMode.FULL:
            self._unplug(handle, dom, lambda _field, _what: None)

    # -- network -----------------------------------------------------------------------------

    def _unplug(self, handle: ZoneHandle[GuestZoneState], dom: Any, found: Found) -> list[str]:
        """Link down now (the cut is in force in milliseconds), then hot-unplug in the
        background: QEMU needs the guest's ACPI cooperation and takes a while. The live XML
        says what is done already: no interface (unplugged), or its link down."""
        state = handle.state
        if state.unplugging:
            return []
        iface = _interface(dom)
        if iface is None:
            state.nic = False
            found("network", "NIC absent")
            return []
        link = iface.find("link")
        if link is None:
            link = etree.SubElement(iface, "link")
        t0 = time.monotonic()
        said = "hot-unplug started"
        if link.get("state") == "down":
            found("network", "link down")
        else:
            link.set("state", "down")
            dom.updateDeviceFlags(etree.tostring(iface, encoding="unicode"), LIVE)
            said = f"link down in {(time.monotonic() - t0) * 1000:.1f} ms; {said}"
        state.unplugging = True
        threading.Thread(target=self._finish_unplug, args=(handle, dom, iface),
                         name=f"unplug-{handle.zone_id}", daemon=True).start()
        return [said]

    def _finish_unplug(self, handle: ZoneHandle[GuestZoneState], dom: Any, iface: Any) -> None:
        state = handle.state
        removed = self.guests.removed_event(state.domain)
        removed.clear()
        t1 = time.monotonic()
        try:
            dom.detachDeviceFlags(etree.tostring(iface, encoding="unicode"), LIVE)
            done = removed.wait(self.options.unplug_timeout)
            if not done:
                # the event can be missed across a reconnect: the live XML is the truth
                done = _interface(dom) is None
        except libvirt.libvirtError as exc:
            self.events.note(handle.zone_id, "nic-unplug-failed",
                             f"hot-unplug failed ({exc}); the link stays down")
            return
        finally:
            state.unplugging = False
        took = (time.monotonic() - t1) * 1000
        if done:
            state.nic = False
            self.events.note(handle.zone_id, "nic-unplugged",
                             f"NIC unplug complete {took:.0f} ms after the request")
        else:
            self.events.note(handle.zone_id, "nic-unplug-pending",
                             f"NIC still present {took:.0f} ms after the unplug request; "
                             "the link stays down")

    # -- CPU and memory ----------------------------------------------------------------------

    def _cpu(self, dom: Any, new: Restrictions, old: Restrictions, notes: list[str],
             first: bool, found: Found) -> None:
        wanted: dict[str, int] = {}
        if new.cpu_shares is not None and (first or new.cpu_shares != old.cpu_shares):
            wanted["cpu_shares"] = new.cpu_shares
        if new.cpu_quota is not None and (first or new.cpu_quota != old.cpu_quota):
            vcpus = self.options.vcpus
            per_vcpu = min(new.cpu_quota / vcpus, 100.0)
            wanted.update(vcpu_period=PERIOD_US, vcpu_quota=max(1000, int(per_vcpu * 1000)),
                          global_period=PERIOD_US,
                          global_quota=max(1000, int(new.cpu_quota * 1000)))
        present = {} if first or not wanted else dom.schedulerParametersFlags(LIVE)
        params, kept = scheduler_changes(wanted, present)
        if kept:
            found("cpu", "scheduler " + ", ".join(f"{k}={v}" for k, v in kept.items()))
        if params:
            dom.setSchedulerParametersFlags(params, LIVE)
            notes.append("scheduler " + ", ".join(f"{k}={v}" for k, v in params.items()))
        if new.cpus is not None and (first or new.cpus != old.cpus):
            if not first and pinned_within(dom, new.cpus):
                found("cpus", f"vCPUs and emulator pinned within {sorted(new.cpus)}")
                return
            host_cpus = max(self.caps.cpus | new.cpus) + 1
            cpumap = tuple(i in new.cpus for i in range(host_cpus))
            for vcpu in range(self.options.vcpus):
                dom.pinVcpuFlags(vcpu, cpumap, LIVE)
            dom.pinEmulator(cpumap, LIVE)
            notes.append(f"vCPUs and emulator pinned to {sorted(new.cpus)}")

    def _memory(self, dom: Any, handle: ZoneHandle[GuestZoneState], memory: int, *,
                watch: bool, found: Found) -> list[str]:
        """Balloon target and memtune hard limit, each only lowered: at a phase (`watch`)
        a balloon or limit already at or below the target stays."""
        kib = memory // 1024
        limit = kib + QEMU_OVERHEAD_KIB[handle.state.accel]
        t0 = time.monotonic()
        balloon = int(dom.info()[2]) if watch else None
        hard = int(dom.memoryParameters(LIVE).get("hard_limit", UNLIMITED_KIB)) \
            if watch else None
        notes = []
        if balloon is not None and balloon <= kib:
            found("memory", f"balloon at {balloon} KiB")
        else:
            dom.setMemoryFlags(kib, LIVE)
            notes.append(f"balloon target {kib} KiB")
            if watch:  # at creation the guest boots with this much: nothing to wait for
                threading.Thread(target=self._watch_guest_memory, args=(handle, kib, t0),
                                 name=f"balloon-{handle.zone_id}", daemon=True).start()
        if hard is not None and 0 < hard <= limit:
            found("memory", f"memtune hard_limit {hard} KiB")
        else:
            dom.setMemoryParameters({"hard_limit": limit}, LIVE)
            notes.append(f"memtune hard_limit {limit} KiB")
        return [", ".join(notes)] if notes else []

    def _watch_guest_memory(self, handle: ZoneHandle[GuestZoneState], target_kib: int,
                            since: float, timeout: float = 10.0) -> None:
        """Report what the guest says once the balloon moved (it takes it 1-3 s)."""
        link = self.guests.link(handle.state.guest)
        if link is None:
            return
        seen: int | None = None
        while time.monotonic() - since < timeout:
            try:
                seen = int(link.probe("meminfo", timeout=2)["MemTotal"])
            except (HvtsmError, KeyError, ValueError, TypeError):
                break
            if seen <= target_kib:
                break
            # the guest takes its balloon's new size in its own time: look again shortly
            time.sleep(0.05)
        took = (time.monotonic() - since) * 1000
        handle.state.guest_memtotal_kb = seen
        if seen is not None and seen <= target_kib:
            self.events.note(handle.zone_id, "guest-memory",
                             f"guest reports MemTotal {seen} kB {took:.0f} ms after the "
                             f"balloon target {target_kib} KiB")
        else:
            self.events.note(handle.zone_id, "guest-memory-pending",
                             f"guest still reports MemTotal {seen} kB {took:.0f} ms after "
                             f"the balloon target {target_kib} KiB")


#: `found(field, what)`: a step's effect was in force already (a no-op at a guest's start)
Found = Callable[[str, str], None]

#: scheduler parameters whose value is a limit (lower is tighter), each with the period
#: it is a share of (None: a weight, no period)
_SCHEDULER_LIMITS = {"cpu_shares": None, "vcpu_quota": "vcpu_period",
                     "global_quota": "global_period"}


def scheduler_changes(wanted: dict[str, int],
                      present: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """(what to set, what is kept) of the scheduler parameters `wanted`, given those in
    force: a limit the guest already has at or below the wanted one is kept (a quota
    compared as its share of its own period; 0 or below is unlimited, never in force);
    with no quota to set, its period goes too."""
    kept: dict[str, int] = {}
    for name, period in _SCHEDULER_LIMITS.items():
        have = present.get(name)
        if name not in wanted or not isinstance(have, int) or have <= 0:
            continue
        if period is None:
            tighter = have <= wanted[name]
        else:
            have_period = present.get(period)
            tighter = (isinstance(have_period, int) and have_period > 0
                       and have * wanted[period] <= wanted[name] * have_period)
        if tighter:
            kept[name] = have
    params = {k: v for k, v in wanted.items() if k not in kept}
    for quota, period in (("vcpu_quota", "vcpu_period"), ("global_quota", "global_period")):
        if quota not in params:
            params.pop(period, None)
    return params, kept


def pinned_within(dom: Any, cpus: frozenset[int]) -> bool:
    """Whether every vCPU and the emulator are pinned to CPUs of `cpus` already."""
    try:
        maps = [*dom.vcpuPinInfo(LIVE), dom.emulatorPinInfo(LIVE)]
    except libvirt.libvirtError:
        return False
    sets = [{i for i, on in enumerate(cpumap) if on} for cpumap in maps]
    return bool(sets) and all(s and s <= cpus for s in sets)


def _interface(dom: Any) -> Any:
    live = etree.fromstring(dom.XMLDesc(0))
    return live.find("./devices/interface")


def require_zone_state(handle: ZoneHandle[Any]) -> GuestZoneState:
    if not isinstance(handle.state, GuestZoneState):
        raise ZoneError("not a guest zone", zone_id=handle.zone_id)
    return handle.state
