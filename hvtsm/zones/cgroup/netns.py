"""A zone's network namespace and its NIC, a veth pair, driven through `ip -batch`.

Each zone gets `hvtsm-<zone_id>` (listed by `ip netns`), a host-side veth `hz...` whose
ifalias names the zone, and the peer renamed `eth0` inside. Addresses: the /30 number
`net_index` of the pool, host side .1, zone side .2.

A cut reads the namespace first (`NetPresent`) and asks the kernel only for what it does
not have yet: a cut half-done before a controller died is finished, not failed on a NIC
that is already gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvtsm.errors import ZoneError
from hvtsm.zones import netslots
from hvtsm.zones.command import run

NETNS_PREFIX = "hvtsm-"
HOST_IF_PREFIX = "hz"
#: the ifalias of a host-side veth: maps an interface back to its zone in `leftovers`
ALIAS_PREFIX = "hvtsm:"
NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")
#: the zone's end of its veth pair, inside the namespace
ZONE_IF = "eth0"
#: IFNAMSIZ - 1
_IFNAME_MAX = 15
_IFNAME_OK = re.compile(r"^[A-Za-z0-9_.-]+$")


def netns_name(zone_id: str) -> str:
    return NETNS_PREFIX + zone_id


def netns_path(zone_id: str) -> Path:
    return NETNS_DIR / netns_name(zone_id)


def host_if_name(zone_id: str) -> str:
    """'hz' + the zone id without its leading 'z' when that fits an interface name,
    else a digest of the id (the ifalias still names the zone)."""
    name = HOST_IF_PREFIX + zone_id.removeprefix("z")
    if len(name) <= _IFNAME_MAX and _IFNAME_OK.match(name):
        return name
    return HOST_IF_PREFIX + hashlib.sha256(zone_id.encode()).hexdigest()[:_IFNAME_MAX - 2]


@dataclass(frozen=True)
class ZoneNet:
    zone_id: str
    host_addr: ipaddress.IPv4Interface
    zone_addr: ipaddress.IPv4Interface

    @classmethod
    def for_zone(cls, zone_id: str, net_index: int, pool: ipaddress.IPv4Network) -> ZoneNet:
        # the driver reserves the slot host-wide first (netslots.py), so no live zone of
        # any controller holds the same /30
        base = pool.network_address + 4 * (net_index % netslots.slot_count(pool))
        return cls(zone_id, ipaddress.IPv4Interface(f"{base + 1}/30"),
                   ipaddress.IPv4Interface(f"{base + 2}/30"))

    @property
    def netns(self) -> str:
        return netns_name(self.zone_id)

    @property
    def host_if(self) -> str:
        return host_if_name(self.zone_id)


def create(net: ZoneNet, *, nic: bool, lo_up: bool, ip: str = "ip") -> None:
    """Make the namespace, with the veth pair when `nic`; one `ip` run per namespace."""
    host = [f"netns add {net.netns}"]
    inside = ["link set lo up"] if lo_up else []
    if nic:
        host += [
            # made in the zone's namespace at once: no clash with the host's own eth0
            f"link add {net.host_if} type veth peer name eth0 netns {net.netns}",
            f"link set {net.host_if} alias {ALIAS_PREFIX}{net.zone_id}",
            f"addr add {net.host_addr} dev {net.host_if}",
            f"link set {net.host_if} up",
        ]
        inside += [
            f"addr add {net.zone_addr} dev eth0",
            "link set eth0 up",
            f"route add default via {net.host_addr.ip}",
        ]
    run([ip, "-batch", "-"], input="\n".join(host) + "\n", zone_id=net.zone_id)
    if inside:
        run([ip, "-n", net.netns, "-batch", "-"], input="\n".join(inside) + "\n",
            zone_id=net.zone_id)


@dataclass(frozen=True)
class NetPresent:
    """What a zone's namespace holds now, as the kernel says (`ip -j addr show`)."""

    #: eth0 exists in the namespace
    nic: bool
    #: lo is up
    lo_up: bool
    #: lo has an address (a down lo keeps 127.0.0.1 unless flushed)
    lo_addressed: bool

    @classmethod
    def parse(cls, text: str) -> NetPresent:
        links: list[dict[str, Any]] = json.loads(text or "[]")
        by_name = {str(link.get("ifname")): link for link in links}
        lo = by_name.get("lo", {})
        return cls(nic=ZONE_IF in by_name, lo_up="UP" in lo.get("flags", ()),
                   lo_addressed=bool(lo.get("addr_info")))

    def cut_lines(self, *, lo_down: bool) -> list[str]:
        """The `ip` lines that take the namespace from here to no NIC (and with `lo_down`
        to a loopback down without addresses): none when that is in force already."""
        # down first: that drops eth0's routes at once, so connects fail from here on,
        # while the deletion after it waits on the kernel's teardown of the device (~20 ms)
        lines = [f"link set {ZONE_IF} down", f"link del {ZONE_IF}"] if self.nic else []
        if lo_down:
            if self.lo_up:
                lines.append("link set lo down")
            if self.lo_addressed:
                # without its addresses a down lo fails connects at once (ENETUNREACH)
                # instead of swallowing them until they time out
                lines.append("addr flush dev lo")
        return lines


def present(zone_id: str, *, ip: str = "ip") -> NetPresent:
    """Read the zone's namespace (one `ip` run, ~2 ms)."""
    result = run([ip, "-n", netns_name(zone_id), "-j", "addr", "show"], zone_id=zone_id)
    try:
        return NetPresent.parse(result.stdout)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ZoneError(f"cannot read the zone's network namespace: `ip -j` said "
                        f"{result.stdout[:200]!r} ({exc})", zone_id=zone_id) from exc


def tighten(zone_id: str, *, lo_down: bool, ip: str = "ip") -> NetPresent:
    """Take the NIC away (deleting eth0 inside removes the host side too) and, with
    `lo_down`, the loopback, in one `ip` run inside the namespace; only what the kernel
    does not have already. Returns the namespace as it was found."""
    found = present(zone_id, ip=ip)
    lines = found.cut_lines(lo_down=lo_down)
    if not lines:
        return found
    argv = [ip, "-n", netns_name(zone_id), "-batch", "-"]
    result = run(argv, input="\n".join(lines) + "\n", check=False, zone_id=zone_id)
    if result.returncode != 0:
        # the batch stops at its first error: one that only says a step was done meanwhile
        # (by another hand) leaves the rest, which the kernel's word now tells
        rest = present(zone_id, ip=ip).cut_lines(lo_down=lo_down)
        if rest:
            run(argv, input="\n".join(rest) + "\n", zone_id=zone_id)
    return found


def destroy(zone_id: str, *, ip: str = "ip") -> list[str]:
    """Remove the host veth and the namespace, whichever exist; returns what was removed.
    The veth goes explicitly: a deleted namespace frees its devices asynchronously."""
    host_if = host_if_name(zone_id)
    lines, removed = [], []
    if (SYS_NET / host_if).exists():
        lines.append(f"link del {host_if}")
        removed.append(f"veth {host_if}")
    if netns_path(zone_id).exists():
        lines.append(f"netns del {netns_name(zone_id)}")
        removed.append(f"netns {netns_name(zone_id)}")
    if not lines:
        return []
    result = run([ip, "-force", "-batch", "-"], input="\n".join(lines) + "\n", check=False,
                 zone_id=zone_id)
    if (SYS_NET / host_if).exists() or netns_path(zone_id).exists():
        raise ZoneError(f"cannot remove the zone's network: {result.stderr.strip()}",
                        zone_id=zone_id)
    return removed


def would_destroy(zone_id: str) -> list[str]:
    """What `destroy` would remove now (nothing is changed)."""
    host_if = host_if_name(zone_id)
    out = [f"veth {host_if}"] if (SYS_NET / host_if).exists() else []
    if netns_path(zone_id).exists():
        out.append(f"netns {netns_name(zone_id)}")
    return out


def zone_ids() -> set[str]:
    """Zones with a namespace or a host-side veth of ours on this host."""
    out: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        out.update(n.removeprefix(NETNS_PREFIX) for n in os.listdir(NETNS_DIR)
                   if n.startswith(NETNS_PREFIX))
    try:
        links = [n for n in os.listdir(SYS_NET) if n.startswith(HOST_IF_PREFIX)]
    except FileNotFoundError:
        links = []
    for link in links:
        try:
            alias = (SYS_NET / link / "ifalias").read_text().strip()
        except OSError:
            continue
        if alias.startswith(ALIAS_PREFIX):
            out.add(alias.removeprefix(ALIAS_PREFIX))
    return out
