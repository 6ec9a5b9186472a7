"""The warm pool's rules, as pure functions: which request a pooled guest may serve, what a
zone's restrictions become in it, and whether it may serve again afterwards.

A guest is never loosened: what a zone tightened in it (NIC unplugged, memory ballooned
down, CPU capped, root remounted read-only) stays, so such a guest is retired rather than
handed to a request that expects the pool's baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from hvtsm.errors import InvokeError
from hvtsm.restrictions import NetworkMode, Restrictions
from hvtsm.store.models import ZoneState

#: requests a guest serves before it is retired anyway (a long-lived guest accumulates
#: state no scrub sees: kernel caches, the agent's own memory)
DEFAULT_MAX_USES = 20
#: the pool's guests get this much memory unless told otherwise: the default policy's
#: first phase asks for 1 GiB, and a request that needs more than the guest has boots cold
DEFAULT_POOL_MEMORY = 1 << 30
#: the CPU weight a guest boots with (the domain template's), so asking for it is no change
BASE_CPU_SHARES = 1024
#: fields a zone changes in the guest itself (pids is a limit on the workload's processes
#: and goes with them)
GUEST_FIELDS = ("network", "egress", "cpu_shares", "cpu_quota", "cpus", "memory",
                "filesystem")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


@dataclass(frozen=True, order=True)
class PoolKey:
    """Guests serve only requests of their own key: the same runtime and trust level."""

    runtime: str
    trust: str

    def __post_init__(self) -> None:
        for what, value in (("runtime", self.runtime), ("trust level", self.trust)):
            if not _NAME.match(value):
                raise InvokeError(f"invalid {what} {value!r}",
                                  hint="use lower-case letters, digits, '-', '_' or '.' "
                                  "(at most 32), e.g. python3 / untrusted")

    def __str__(self) -> str:
        return f"{self.runtime}/{self.trust}"


def baseline(memory: int = DEFAULT_POOL_MEMORY) -> Restrictions:
    """What a pooled guest boots with: the loosest restrictions a request may get in it."""
    return Restrictions(network=NetworkMode.FULL, memory=memory, cpu_shares=BASE_CPU_SHARES)


def misfit(base: Restrictions, initial: Restrictions, *,
           default_memory: int) -> str | None:
    """Why a zone starting with `initial` cannot run in a guest booted with `base` (it
    needs more than the guest has), or None. `default_memory` is what a cold guest gets
    when the policy names no memory."""
    if base.network.rank() > initial.network.rank():
        return f"it needs network {initial.network}, the guest has {base.network}"
    wanted = initial.memory if initial.memory is not None else default_memory
    if base.memory is not None and wanted > base.memory:
        return f"it needs {wanted} bytes of memory, the guest has {base.memory}"
    if base.loosenings(bound(base, initial)):
        return "it needs more than the guest's baseline allows"
    return None


def bound(base: Restrictions, initial: Restrictions) -> Restrictions:
    """A zone's restrictions in a guest booted with `base`: the zone's own, with what
    it leaves unlimited limited as the guest is (memory, CPU weight)."""
    return replace(initial,
                   memory=initial.memory if initial.memory is not None else base.memory,
                   cpu_shares=(initial.cpu_shares if initial.cpu_shares is not None
                               else base.cpu_shares),
                   cpus=initial.cpus if initial.cpus is not None else base.cpus,
                   cpu_quota=(initial.cpu_quota if initial.cpu_quota is not None
                              else base.cpu_quota))


def tightened(base: Restrictions, applied: Restrictions) -> tuple[str, ...]:
    """Fields of the guest itself that `applied` holds tighter than `base`."""
    return tuple(n for n in GUEST_FIELDS if getattr(applied, n) != getattr(base, n))


@dataclass(frozen=True)
class Outcome:
    """What happened to a guest while it served one request."""

    #: the guest serves only requests of its own key
    key: PoolKey
    request_key: PoolKey
    #: anomalies recorded for any zone the guest has served (this one included)
    anomalies: int
    zone_state: ZoneState
    #: guest fields the zone tightened beyond the baseline (see `tightened`)
    tightened: tuple[str, ...]
    #: the driver destroyed the guest with the zone (ended under a running workload)
    destroyed: bool
    #: requests served, this one included
    uses: int
    max_uses: int = DEFAULT_MAX_USES
    #: set when the NIC the baseline has is gone
    nic_lost: bool = False


def retire_reason(outcome: Outcome) -> str | None:
    """Why the guest must not serve again, or None when it may go back to the pool (after
    its scrub: the workload's leftovers killed, its scratch directory emptied)."""
    if outcome.destroyed:
        return "destroyed with its zone (ended under a running workload)"
    if outcome.request_key != outcome.key:
        return f"served a {outcome.request_key} request from the {outcome.key} pool"
    if outcome.anomalies:
        return f"tainted: {outcome.anomalies} anomal{'y' if outcome.anomalies == 1 else 'ies'}"
    if outcome.zone_state is not ZoneState.EXITED:
        return f"its zone ended {outcome.zone_state}, not by its workload exiting"
    if outcome.tightened:
        return "tightened beyond the pool baseline (" + ", ".join(outcome.tightened) + \
            "), which is never loosened again"
    if outcome.nic_lost:
        return "its NIC is gone"
    if outcome.uses >= outcome.max_uses:
        return f"served {outcome.uses} requests (max {outcome.max_uses})"
    return None
