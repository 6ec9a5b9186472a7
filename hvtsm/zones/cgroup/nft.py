"""nftables rules of cgroup zones: a zone's egress allow-list (inside its namespace) and
the host's shared NAT for the zone address pool."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Callable, Sequence

from hvtsm.errors import ZoneError
from hvtsm.restrictions import EgressRule
from hvtsm.zones.cgroup import libc
from hvtsm.zones.cgroup.netns import HOST_IF_PREFIX, netns_path
from hvtsm.zones.command import run

EGRESS_TABLE = "hvtsm_egress"
NAT_TABLE = "hvtsm_nat"


def allow_lines(rules: Sequence[EgressRule]) -> list[str]:
    """nft statements accepting the allowed destinations, then rejecting the rest."""
    allow = []
    for rule in rules:
        family = "ip" if rule.network.version == 4 else "ip6"
        dest = f"{family} daddr {rule.network}"
        if rule.port_low is None:
            allow.append(f"{dest} accept")
            continue
        ports = str(rule.port_low) if rule.port_low == rule.port_high else (
            f"{rule.port_low}-{rule.port_high}")
        allow += [f"{dest} tcp dport {ports} accept", f"{dest} udp dport {ports} accept"]
    # a rejection, unlike a silent drop, fails connect() at once instead of after the
    # caller's timeout (TCP retransmits a dropped SYN); the policy drop is the backstop
    allow += ["meta l4proto tcp reject with tcp reset",
              "reject with icmpx type admin-prohibited"]
    return allow


def egress_ruleset(rules: Sequence[EgressRule]) -> str:
    """One nft transaction replacing the zone's allow-list as a whole: there is no moment
    with the old list gone and the new one not yet in force."""
    body = "\n".join(f"    {line}" for line in allow_lines(rules))
    return (
        f"table inet {EGRESS_TABLE} {{}}\n"
        f"delete table inet {EGRESS_TABLE}\n"
        f"table inet {EGRESS_TABLE} {{\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy drop;\n"
        '    oif "lo" accept\n'
        f"{body}\n"
        "  }\n"
        "}\n"
    )


def _enter_netns(fd: int) -> Callable[[], None]:
    def enter() -> None:
        libc.setns(fd, libc.CLONE_NEWNET)
    return enter


def run_in_netns(zone_id: str, argv: Sequence[str], *, input: str | None = None) -> None:
    """Run a tool inside the zone's network namespace, entered in the forked child
    (one exec fewer than nsenter)."""
    try:
        fd = os.open(netns_path(zone_id), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ZoneError(f"the zone's network namespace is gone: {exc.strerror}",
                        zone_id=zone_id) from exc
    try:
        run(argv, input=input, zone_id=zone_id, preexec_fn=_enter_netns(fd))
    except subprocess.SubprocessError as exc:
        raise ZoneError(f"cannot enter the zone's network namespace to run {argv[0]}",
                        zone_id=zone_id) from exc
    finally:
        os.close(fd)


def set_egress(zone_id: str, rules: Sequence[EgressRule], *, nft: str | None) -> None:
    if nft is None:
        raise ZoneError("an egress allow-list needs nftables, and `nft` is not installed",
                        zone_id=zone_id, hint="apt-get install nftables")
    run_in_netns(zone_id, [nft, "-f", "-"], input=egress_ruleset(rules))


def drop_egress(zone_id: str, *, nft: str | None) -> None:
    """Remove the zone's allow-list, whether or not it is there: the table is declared
    before it is deleted, in one transaction, so a removal done already is no error."""
    if nft is None:
        return  # without nft no allow-list was ever made
    run_in_netns(zone_id, [nft, "-f", "-"],
                 input=f"table inet {EGRESS_TABLE} {{}}\ndelete table inet {EGRESS_TABLE}\n")


def nat_ruleset(pool: ipaddress.IPv4Network) -> str:
    comment = f'comment "hvtsm pool {pool}"'
    return (
        f"add table ip {NAT_TABLE}\n"
        f"add chain ip {NAT_TABLE} postrouting "
        "{ type nat hook postrouting priority 100; policy accept; }\n"
        f"add chain ip {NAT_TABLE} forward "
        "{ type filter hook forward priority 0; policy accept; }\n"
        f"add rule ip {NAT_TABLE} postrouting ip saddr {pool} ip daddr != {pool} "
        f"masquerade {comment}\n"
        # zones reach the outside, never each other through the host
        f'add rule ip {NAT_TABLE} forward iifname "{HOST_IF_PREFIX}*" '
        f'oifname "{HOST_IF_PREFIX}*" drop {comment}\n'
    )


def ensure_nat(pool: ipaddress.IPv4Network, *, nft: str) -> bool:
    """Masquerade the pool's traffic out of the host, once per pool (several controllers
    share the table). Returns True when rules were added."""
    listed = run([nft, "list", "table", "ip", NAT_TABLE], check=False)
    if listed.returncode == 0 and f"hvtsm pool {pool}" in listed.stdout:
        return False
    run([nft, "-f", "-"], input=nat_ruleset(pool))
    return True
