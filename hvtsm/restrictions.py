"""What a zone is allowed at one moment: the vocabulary shared by policies and zone drivers.

A policy phase names only what it changes; the zone drivers always receive the full,
accumulated `Restrictions`, so applying one twice is harmless.

Comparing two egress allow-lists (is every later rule covered by an earlier one?) goes
through an `EgressIndex` of the earlier rules: each later rule looks up only the networks
that contain it, one per prefix length the earlier rules use (at most 33 for IPv4, 129 for
IPv6), so a policy's validation stays linear in its egress entries (hvtsm.limits MAX_EGRESS
per phase) instead of comparing every pair.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any, TypeVar

from hvtsm.limits import shown
from hvtsm.units import format_cpuset, format_size

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
N = TypeVar("N", int, float)


class NetworkMode(StrEnum):
    FULL = "full"
    LOOPBACK = "loopback"
    NONE = "none"

    def rank(self) -> int:
        """Higher is tighter."""
        return list(NetworkMode).index(self)

    @property
    def has_nic(self) -> bool:
        return self is NetworkMode.FULL


class FilesystemMode(StrEnum):
    RW = "rw"
    RO = "ro"

    def rank(self) -> int:
        return list(FilesystemMode).index(self)


@dataclass(frozen=True, order=True)
class EgressRule:
    """One allowed destination: a network and an optional port range (TCP and UDP)."""

    network: IPNetwork
    port_low: int | None = None
    port_high: int | None = None

    @classmethod
    def parse(cls, text: str) -> EgressRule:
        """'10.0.0.5:443', '10.0.0.0/24:8000-8100', '[::1]:80', '192.0.2.1' (any port)."""
        host, port = text, ""
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":")
        elif text.count(":") == 1:
            host, _, port = text.partition(":")
        try:
            network = ipaddress.ip_network(host.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"{shown(text)}: {shown(host)} is not an IP address or network; write e.g. "
                "'192.0.2.10:443' (host names are not resolved: DNS may change under a zone)"
            ) from None
        if not port:
            return cls(network)
        lo_s, sep, hi_s = port.partition("-")
        if not lo_s.isdigit() or (sep and not hi_s.isdigit()):
            raise ValueError(
                f"{shown(text)}: {shown(port)} is not a port or port range like '443' or "
                "'8000-8100'"
            )
        if len(lo_s) > 5 or len(hi_s) > 5:  # int() of thousands of digits is slow
            raise ValueError(f"{shown(text)}: ports must lie in 1-65535")
        lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
        if not (1 <= lo <= hi <= 65535):
            raise ValueError(f"{shown(text)}: ports must lie in 1-65535, low before high")
        return cls(network, lo, hi)

    def sort_key(self) -> tuple[int, int, int, int, int]:
        """An order over IPv4 and IPv6 rules alike (networks of two versions do not
        compare)."""
        return (self.network.version, int(self.network.network_address),
                self.network.prefixlen, self.port_low or 0, self.port_high or 0)

    def covers(self, other: EgressRule) -> bool:
        """True when everything `other` allows is allowed by this rule."""
        if other.network.version != self.network.version:
            return False
        if not other.network.subnet_of(self.network):  # type: ignore[arg-type]
            return False
        if self.port_low is None:
            return True
        if other.port_low is None or other.port_high is None or self.port_high is None:
            return False
        return self.port_low <= other.port_low and other.port_high <= self.port_high

    def __str__(self) -> str:
        host = str(self.network.network_address) if self.network.num_addresses == 1 else str(
            self.network
        )
        if self.network.version == 6:
            host = f"[{host}]"
        if self.port_low is None:
            return host
        ports = str(self.port_low) if self.port_low == self.port_high else (
            f"{self.port_low}-{self.port_high}"
        )
        return f"{host}:{ports}"


class EgressIndex:
    """Rules indexed by network, to answer "does one of them cover this rule?" by looking
    up the rule's supernets, not by comparing it with every rule."""

    def __init__(self, rules: Iterable[EgressRule]) -> None:
        #: (version, prefix length, network address) -> the rules on exactly that network
        self._nets: dict[tuple[int, int, int], list[EgressRule]] = {}
        for rule in rules:
            net = rule.network
            self._nets.setdefault((net.version, net.prefixlen, int(net.network_address)),
                                  []).append(rule)
        self._prefixes = {v: sorted({p for ver, p, _ in self._nets if ver == v}, reverse=True)
                          for v in (4, 6)}
        #: per network: any port at all, and the port ranges sorted by their low port with
        #: the highest high port so far (a range covers [lo, hi] when one starting at or
        #: below lo reaches hi)
        self._ports: dict[tuple[int, int, int], tuple[bool, list[int], list[int]]] = {}
        for key, on_net in self._nets.items():
            ranges = sorted((r.port_low, r.port_high) for r in on_net
                            if r.port_low is not None and r.port_high is not None)
            reach: list[int] = []
            for _, high in ranges:
                reach.append(max(high, reach[-1]) if reach else high)
            self._ports[key] = (any(r.port_low is None for r in on_net),
                                [low for low, _ in ranges], reach)

    def covers(self, rule: EgressRule) -> bool:
        """Whether one indexed rule allows everything `rule` allows (EgressRule.covers)."""
        net = rule.network
        bits = net.max_prefixlen
        address = int(net.network_address)
        for prefix in self._prefixes[net.version]:
            if prefix > net.prefixlen:
                continue
            mask = ((1 << prefix) - 1) << (bits - prefix)
            ports = self._ports.get((net.version, prefix, address & mask))
            if ports is None:
                continue
            any_port, lows, reach = ports
            if any_port:
                return True
            if rule.port_low is None or rule.port_high is None:
                continue
            at = bisect.bisect_right(lows, rule.port_low)
            if at and reach[at - 1] >= rule.port_high:
                return True
        return False


@dataclass(frozen=True)
class Restrictions:
    """The full set of limits in force in a zone. None means 'not limited'."""

    network: NetworkMode = NetworkMode.FULL
    #: None: no allow-list (all egress allowed while network is full)
    egress: tuple[EgressRule, ...] | None = None
    cpu_shares: int | None = None
    #: percent of one CPU (150 = one and a half CPUs)
    cpu_quota: float | None = None
    cpus: frozenset[int] | None = None
    memory: int | None = None
    pids: int | None = None
    filesystem: FilesystemMode = FilesystemMode.RW

    def merged(self, **changes: object) -> Restrictions:
        """These restrictions with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    def loosenings(self, later: Restrictions) -> list[tuple[str, str]]:
        """(field, explanation) for every way `later` grants more than `self`."""
        out: list[tuple[str, str]] = []
        if later.network.rank() < self.network.rank():
            out.append(
                ("network", f"'{later.network}' is looser than the earlier '{self.network}'")
            )
        if self.egress is not None and later.network is NetworkMode.FULL:
            if later.egress is None:
                out.append(("egress", "drops the earlier egress allow-list"))
            else:
                earlier = EgressIndex(self.egress)
                wider = [r for r in later.egress if not earlier.covers(r)]
                if wider:
                    out.append((
                        "egress",
                        "allows " + _some(wider) + " which the earlier allow-list "
                        f"({_some(self.egress)}) does not",
                    ))
        for name in ("cpu_shares", "cpu_quota", "memory", "pids"):
            before, after = getattr(self, name), getattr(later, name)
            if before is not None and (after is None or after > before):
                out.append(
                    (name, f"{_show(name, after)} is more than the earlier {_show(name, before)}")
                )
        if self.cpus is not None and (later.cpus is None or not later.cpus <= self.cpus):
            out.append(("cpus", f"{_show('cpus', later.cpus)} is not within the earlier "
                                f"{_show('cpus', self.cpus)}"))
        if later.filesystem.rank() < self.filesystem.rank():
            out.append(("filesystem", f"'{later.filesystem}' is looser than the earlier "
                                      f"'{self.filesystem}'"))
        return out

    def with_field(self, name: str, value: object) -> Restrictions:
        """These restrictions with field `name` set to `value` (None included: a driver
        records each field as it puts it in force)."""
        return replace(self, **{name: value})  # type: ignore[arg-type]

    def tighter(self, other: Restrictions) -> Restrictions:
        """Each field at the tighter of these and `other`: what a transient zone may do is
        never more than its parent may."""
        network = self.network if self.network.rank() >= other.network.rank() else other.network
        egress: tuple[EgressRule, ...] | None
        if self.egress is None:
            egress = other.egress
        elif other.egress is None:
            egress = self.egress
        else:  # destinations both allow: each side's rules the other side covers
            theirs, ours = EgressIndex(other.egress), EgressIndex(self.egress)
            both = [r for r in self.egress if theirs.covers(r)]
            both += [r for r in other.egress if ours.covers(r)]
            egress = tuple(sorted(set(both), key=EgressRule.sort_key))
        cpus = self.cpus if other.cpus is None else other.cpus if self.cpus is None else (
            self.cpus & other.cpus or other.cpus)
        return Restrictions(
            network=network, egress=egress if network is NetworkMode.FULL else None,
            cpu_shares=_least(self.cpu_shares, other.cpu_shares),
            cpu_quota=_least(self.cpu_quota, other.cpu_quota), cpus=cpus,
            memory=_least(self.memory, other.memory), pids=_least(self.pids, other.pids),
            filesystem=self.filesystem if self.filesystem.rank() >= other.filesystem.rank()
            else other.filesystem)

    def changes_from(self, before: Restrictions) -> dict[str, str]:
        """Field -> printable new value, for every field that differs from `before`."""
        return {
            f.name: _show(f.name, getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(before, f.name)
        }

    def describe(self) -> dict[str, str]:
        """Every field that limits something, printable."""
        return self.changes_from(Restrictions())

    def to_json(self) -> dict[str, object]:
        return {
            "network": str(self.network),
            "egress": None if self.egress is None else [str(r) for r in self.egress],
            "cpu_shares": self.cpu_shares,
            "cpu_quota": self.cpu_quota,
            "cpus": None if self.cpus is None else sorted(self.cpus),
            "memory": self.memory,
            "pids": self.pids,
            "filesystem": str(self.filesystem),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Restrictions:
        """What `to_json` wrote (the store's own rows: trusted, not validated again)."""
        egress = data.get("egress")
        cpus = data.get("cpus")
        return cls(
            network=NetworkMode(str(data.get("network", "full"))),
            egress=None if egress is None else tuple(EgressRule.parse(str(e)) for e in egress),
            cpu_shares=data.get("cpu_shares"),
            cpu_quota=data.get("cpu_quota"),
            cpus=None if cpus is None else frozenset(int(c) for c in cpus),
            memory=data.get("memory"),
            pids=data.get("pids"),
            filesystem=FilesystemMode(str(data.get("filesystem", "rw"))),
        )


def _some(rules: Iterable[EgressRule], most: int = 5) -> str:
    """The first few rules, for a message that must stay readable with a thousand."""
    listed = list(rules)
    text = ", ".join(map(str, listed[:most]))
    return text + (f" and {len(listed) - most} more" if len(listed) > most else "")


def _least(a: N | None, b: N | None) -> N | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _show(name: str, value: object) -> str:
    if value is None:
        return "unlimited"
    if name == "memory":
        return format_size(value)  # type: ignore[arg-type]
    if name == "cpus":
        return format_cpuset(value)  # type: ignore[arg-type]
    if name == "cpu_quota":
        return f"{value:g}%"
    if name == "egress":
        return "allow " + (", ".join(map(str, value)) or "nothing")  # type: ignore[call-overload]
    return str(value)
