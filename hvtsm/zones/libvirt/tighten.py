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
"""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt
from lxml import etree

from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones.base import ApplyReport, DriverEvents, ZoneHandle
from hvtsm.zones.libvirt import egress
from hvtsm.zones.libvirt.admin import GuestAdmin
from hvtsm.zones.libvirt.guests import Guests
from hvtsm.zones.libvirt.options import LibvirtOptions
from hvtsm.zones.libvirt.state import GuestZoneState

#: what QEMU itself needs beside guest memory, for the memtune hard limit
QEMU_OVERHEAD_KIB = {"kvm": 256 * 1024, "qemu": 768 * 1024}
LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
PERIOD_US = 100_000


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
        dom = self.guests.domain(state.domain, handle.zone_id)
        if restrictions.network is not NetworkMode.FULL and state.nic:
            notes += self._unplug(handle, dom)
        egress_changed = first or restrictions.egress != old.egress
        if (restrictions.network is NetworkMode.FULL and state.nic and egress_changed
                and restrictions.egress is not None and state.tap is not None):
            egress.set_egress(state.guest, state.tap, restrictions.egress,
                              nft=self.caps.nft or "nft")
            notes.append(f"egress allow-list on tap {state.tap}: "
                         f"{len(restrictions.egress)} destination(s)")
        if restrictions.network is NetworkMode.NONE and (first or old.network
                                                         is not NetworkMode.NONE):
            self.admin.link_down(handle, "lo")
            notes.append("guest loopback down")
        self._cpu(dom, restrictions, old, notes, first)
        if restrictions.memory is not None and (first or restrictions.memory != old.memory):
            notes += self._memory(dom, handle, restrictions.memory, watch=not first)
        if (restrictions.pids is not None and restrictions.pids != old.pids
                and workload_pid is not None):
            self.admin.nproc(handle, workload_pid, restrictions.pids)
            notes.append(f"RLIMIT_NPROC {restrictions.pids} on the workload")
        if restrictions.filesystem is FilesystemMode.RO and (
                first or old.filesystem is not FilesystemMode.RO):
            self.admin.remount_ro(handle, "/")
            notes.append("guest root remounted read-only")
        handle.applied = restrictions
        return ApplyReport(changed, tuple(notes))

    # -- network -----------------------------------------------------------------------------

    def _unplug(self, handle: ZoneHandle[GuestZoneState], dom: Any) -> list[str]:
        """Link down now (the cut is in force in milliseconds), then hot-unplug in the
        background: QEMU needs the guest's ACPI cooperation and takes a while."""
        state = handle.state
        if state.unplugging:
            return []
        iface = _interface(dom)
        if iface is None:
            state.nic = False
            return ["NIC already gone"]
        link = iface.find("link")
        if link is None:
            link = etree.SubElement(iface, "link")
        link.set("state", "down")
        t0 = time.monotonic()
        dom.updateDeviceFlags(etree.tostring(iface, encoding="unicode"), LIVE)
        state.unplugging = True
        threading.Thread(target=self._finish_unplug, args=(handle, dom, iface),
                         name=f"unplug-{handle.zone_id}", daemon=True).start()
        return [f"link down in {(time.monotonic() - t0) * 1000:.1f} ms; hot-unplug started"]

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
             first: bool) -> None:
        params: dict[str, int] = {}
        if new.cpu_shares is not None and (first or new.cpu_shares != old.cpu_shares):
            params["cpu_shares"] = new.cpu_shares
        if new.cpu_quota is not None and (first or new.cpu_quota != old.cpu_quota):
            vcpus = self.options.vcpus
            per_vcpu = min(new.cpu_quota / vcpus, 100.0)
            params.update(vcpu_period=PERIOD_US, vcpu_quota=max(1000, int(per_vcpu * 1000)),
                          global_period=PERIOD_US,
                          global_quota=max(1000, int(new.cpu_quota * 1000)))
        if params:
            dom.setSchedulerParametersFlags(params, LIVE)
            notes.append("scheduler " + ", ".join(f"{k}={v}" for k, v in params.items()))
        if new.cpus is not None and (first or new.cpus != old.cpus):
            host_cpus = max(self.caps.cpus | new.cpus) + 1
            cpumap = tuple(i in new.cpus for i in range(host_cpus))
            for vcpu in range(self.options.vcpus):
                dom.pinVcpuFlags(vcpu, cpumap, LIVE)
            dom.pinEmulator(cpumap, LIVE)
            notes.append(f"vCPUs and emulator pinned to {sorted(new.cpus)}")

    def _memory(self, dom: Any, handle: ZoneHandle[GuestZoneState], memory: int, *,
                watch: bool) -> list[str]:
        kib = memory // 1024
        t0 = time.monotonic()
        dom.setMemoryFlags(kib, LIVE)
        overhead = QEMU_OVERHEAD_KIB[handle.state.accel]
        dom.setMemoryParameters({"hard_limit": kib + overhead}, LIVE)
        if watch:  # at creation the guest boots with this much: nothing to wait for
            threading.Thread(target=self._watch_guest_memory, args=(handle, kib, t0),
                             name=f"balloon-{handle.zone_id}", daemon=True).start()
        return [f"balloon target {kib} KiB, memtune hard_limit {kib + overhead} KiB"]

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


def _interface(dom: Any) -> Any:
    live = etree.fromstring(dom.XMLDesc(0))
    return live.find("./devices/interface")


def require_zone_state(handle: ZoneHandle[Any]) -> GuestZoneState:
    if not isinstance(handle.state, GuestZoneState):
        raise ZoneError("not a guest zone", zone_id=handle.zone_id)
    return handle.state
