"""Egress allow-lists of guest zones: nftables rules on the host, on the guest's tap.

A guest's packets all enter the host through its tap, so filtering there (input for the
host itself, forward for anything beyond) needs nothing from inside the guest.
"""

from __future__ import annotations

from collections.abc import Sequence

from hvtsm.restrictions import EgressRule
from hvtsm.zones.cgroup.nft import allow_lines
from hvtsm.zones.command import run


def table_name(zone_id: str) -> str:
    return f"hvtsm_vm_{zone_id}"


def ruleset(zone_id: str, tap: str, rules: Sequence[EgressRule]) -> str:
    """One transaction replacing the zone's table as a whole."""
    table = table_name(zone_id)
    body = "\n".join(f'    iifname "{tap}" {line}' for line in allow_lines(rules))
    chains = "\n".join(
        f"  chain {hook} {{\n    type filter hook {hook} priority -10; policy accept;\n"
        f"{body}\n  }}"
        for hook in ("input", "forward")
    )
    return (f"table inet {table} {{}}\ndelete table inet {table}\n"
            f"table inet {table} {{\n{chains}\n}}\n")


def set_egress(zone_id: str, tap: str, rules: Sequence[EgressRule], *, nft: str) -> None:
    run([nft, "-f", "-"], input=ruleset(zone_id, tap, rules), zone_id=zone_id)


def remove_egress(zone_id: str, *, nft: str) -> bool:
    """Drop the zone's table if it exists; True when there was one."""
    result = run([nft, "delete", "table", "inet", table_name(zone_id)], check=False,
                 zone_id=zone_id)
    return result.returncode == 0


def has_egress(zone_id: str, *, nft: str) -> bool:
    """Whether the zone's table exists (nothing is changed)."""
    result = run([nft, "list", "table", "inet", table_name(zone_id)], check=False,
                 zone_id=zone_id)
    return result.returncode == 0
