"""Choosing and constructing a zone driver for a backend name."""

from __future__ import annotations

from hvtsm.host import HostCapabilities, require_cgroup_host
from hvtsm.zones.base import Backend, ZoneDriver


def make_driver(backend: Backend, caps: HostCapabilities, *,
                net_pool: str | None = None) -> ZoneDriver:
    if backend is Backend.CGROUP:
        from hvtsm.zones.cgroup.driver import CgroupDriver

        require_cgroup_host(caps)
        if net_pool:
            return CgroupDriver(caps, net_pool=net_pool)
        return CgroupDriver(caps)
    raise ValueError(f"backend {backend} has no driver")  # argparse choices prevent this


#: backends `hvtsm run --backend` offers
AVAILABLE_BACKENDS = (Backend.CGROUP,)
