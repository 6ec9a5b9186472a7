"""What the libvirt driver keeps about each zone and pooled guest (stored for adoption, and
in the pool's registry for a guest that serves no zone yet)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hvtsm.zones import state as stored
from hvtsm.zones.base import StartFacts

STATE_VERSION = 1


@dataclass
class GuestZoneState:
    """A zone in a guest of its own (a cold zone: `guest` is the zone id) or in a pooled
    guest (`bound`)."""

    #: the guest the zone runs in: domain, state dir, tap and address slot are named by it
    guest: str
    domain: str = ""
    #: per-guest files (console log, channel socket)
    dir: str = ""
    accel: str = "qemu"
    memory_dump: bool = False
    user: str | None = None
    nic: bool = False
    tap: str | None = None
    host_addr: str | None = None
    zone_addr: str | None = None
    net_index: int | None = None
    #: the unix socket of the agent's virtio-serial channel
    channel_path: str | None = None
    console: str | None = None
    image: str | None = None
    boot_ms: float | None = None
    #: what the agent said of itself (version, protocol, capabilities)
    agent: dict[str, Any] = field(default_factory=dict)
    #: the policy's part of the agent's profile (None: not watched)
    monitor: dict[str, Any] | None = None
    uuid: str | None = None
    cwd: str | None = None
    #: the zone's name in its group when it has a channel
    channel_name: str | None = None
    #: the agent's id of the workload
    workload: str | None = None
    #: a pool's guest: booted to serve zones one after another
    pooled: bool = False
    #: a zone made in a pooled guest
    bound: bool = False
    #: the pool's baseline the guest booted with (Restrictions JSON)
    baseline: dict[str, Any] | None = None
    #: the start may name the guest's standby
    standby: bool = False
    #: the zone let go of its pooled guest (the workload ended on its own)
    released: bool = False
    #: the guest was destroyed with the zone
    destroyed: bool = False
    #: where the memory dump went
    dump: str | None = None
    unplugging: bool = False
    guest_memtotal_kb: int | None = None
    frozen: bool = False
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return stored.dump(self)

    def facts(self) -> StartFacts:
        return StartFacts(accel=self.accel, boot_ms=self.boot_ms)


@dataclass(kw_only=True)
class GuestTransientState(stored.TransientState):
    """A transient zone in a guest: a cgroup the guest agent manages."""

    domain: str
    #: the agent's id of the parent's workload (the `transient` messages name it)
    workload: str
    cgroup: str | None


GuestState = GuestZoneState | GuestTransientState


def load_state(data: Mapping[str, Any], zone_id: str) -> GuestState:
    if data.get("parent"):
        return stored.load(GuestTransientState, data)
    return stored.load(GuestZoneState, {"guest": zone_id, **data})
