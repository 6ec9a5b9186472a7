"""Choosing and constructing a zone driver for a backend name."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from hvtsm.errors import HvtsmError
from hvtsm.host import HostCapabilities, require_cgroup_host
from hvtsm.zones.base import Backend, ZoneDriver

if TYPE_CHECKING:
    from hvtsm.zones.libvirt.driver import LibvirtOptions

log = logging.getLogger(__name__)

#: backends `hvtsm run --backend` offers
AVAILABLE_BACKENDS = (Backend.CGROUP, Backend.LIBVIRT)


def make_driver(backend: Backend, caps: HostCapabilities, *, net_pool: str | None = None,
                libvirt: LibvirtOptions | None = None) -> ZoneDriver:
    if backend is Backend.CGROUP:
        from hvtsm.zones.cgroup.driver import CgroupDriver

        require_cgroup_host(caps)
        if net_pool:
            return CgroupDriver(caps, net_pool=net_pool)
        return CgroupDriver(caps)
    from hvtsm.zones.libvirt.driver import LibvirtDriver, LibvirtOptions

    require_cgroup_host(caps)  # the same needs: root, and `ip` for the host end of the NIC
    options = libvirt or LibvirtOptions()
    if net_pool:
        from dataclasses import replace

        options = replace(options, net_pool=net_pool)
    return LibvirtDriver(caps, options)


def drivers_for(backends: Iterable[Backend], caps: HostCapabilities, *,
                libvirt: LibvirtOptions | None = None,
                optional: bool = False) -> list[ZoneDriver]:
    """A driver per backend; with `optional`, a backend this host cannot drive right now
    (libvirtd down, say) is skipped with a warning instead of failing everything."""
    out: list[ZoneDriver] = []
    for backend in dict.fromkeys(backends):
        try:
            out.append(make_driver(backend, caps, libvirt=libvirt))
        except HvtsmError as exc:
            if not optional:
                raise
            log.warning("skipping %s zones: %s", backend, exc)
    return out
