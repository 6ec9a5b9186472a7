"""Choosing a zone driver for a backend name: the factories the lifecycle makes its
drivers with (each driver gets the events it reports to at construction)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from hvtsm.errors import HvtsmError
from hvtsm.host import HostCapabilities, require_cgroup_host
from hvtsm.zones.base import Backend, DriverEvents, DriverFactory, ZoneDriver

if TYPE_CHECKING:
    from hvtsm.zones.libvirt.options import LibvirtOptions

log = logging.getLogger(__name__)

#: backends `hvtsm run --backend` offers
AVAILABLE_BACKENDS = (Backend.CGROUP, Backend.LIBVIRT)


def driver_factory(backend: Backend, caps: HostCapabilities, *, net_pool: str | None = None,
                   libvirt: LibvirtOptions | None = None) -> DriverFactory:
    """How to make the driver of `backend`; the host is checked now, so an unusable
    backend fails before any zone is recorded."""
    require_cgroup_host(caps)  # both need root, and `ip` for the host end of a NIC
    if backend is Backend.CGROUP:
        from hvtsm.zones.cgroup.driver import CgroupDriver

        def cgroup(events: DriverEvents) -> ZoneDriver:
            if net_pool:
                return CgroupDriver(events, caps, net_pool=net_pool)
            return CgroupDriver(events, caps)
        return cgroup
    from hvtsm.zones.libvirt.driver import LibvirtDriver
    from hvtsm.zones.libvirt.options import LibvirtOptions

    options = libvirt or LibvirtOptions()
    if net_pool:
        options = replace(options, net_pool=net_pool)

    def guest(events: DriverEvents) -> ZoneDriver:
        return LibvirtDriver(events, caps, options)
    return guest


def factories_for(backends: Iterable[Backend], caps: HostCapabilities, *,
                  libvirt: LibvirtOptions | None = None) -> list[DriverFactory]:
    return [driver_factory(b, caps, libvirt=libvirt) for b in dict.fromkeys(backends)]


def drivers_for(backends: Iterable[Backend], caps: HostCapabilities, *,
                events: DriverEvents, libvirt: LibvirtOptions | None = None,
                optional: bool = False) -> list[ZoneDriver]:
    """A driver per backend, outside any lifecycle (`hvtsm cleanup`); with `optional`, a
    backend this host cannot drive right now (libvirtd down, say) is skipped with a warning
    instead of failing everything."""
    out: list[ZoneDriver] = []
    for backend in dict.fromkeys(backends):
        try:
            out.append(driver_factory(backend, caps, libvirt=libvirt)(events))
        except HvtsmError as exc:
            if not optional:
                raise
            log.warning("skipping %s zones: %s", backend, exc)
    return out
