"""How a libvirt driver is set up (the CLI's libvirt options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LibvirtOptions:
    uri: str = "qemu:///system"
    template: str = "lab"
    accel: str = "auto"
    net_pool: str = "10.214.0.0/16"
    vcpus: int = 1
    #: where per-guest files (console log, channel socket) live
    state_root: Path = Path("/run/hvtsm/zones")
    #: interpreter the guest runs the agent with (a path in the host root it shares)
    guest_python: str | None = None
    boot_timeout: float = 120.0
    unplug_timeout: float = 10.0
    #: where memory dumps go when a zone's policy asks for them (forensics)
    dump_dir: Path = Path("/var/lib/hvtsm/dumps")
