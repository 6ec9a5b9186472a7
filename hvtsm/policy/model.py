"""Typed, validated policies. Built only by `hvtsm.policy.loader`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from hvtsm.restrictions import Restrictions


class Reaction(StrEnum):
    ACCELERATE = "accelerate"
    TERMINATE = "terminate"


@dataclass(frozen=True)
class Phase:
    index: int
    at_ms: int
    #: field -> value exactly as the phase sets it (what tightens at this point)
    sets: dict[str, object]
    #: the accumulated restrictions in force from this phase on
    restrictions: Restrictions
    terminate: bool = False


@dataclass(frozen=True)
class AnomalyRules:
    deny_syscalls: tuple[str, ...] = ()
    sensitive_paths: tuple[str, ...] = ()
    reaction: Reaction = Reaction.ACCELERATE
    #: remaining lifespan is divided by this on each anomaly when reaction is accelerate
    factor: float = 4.0


@dataclass(frozen=True)
class SegmentSelector:
    """Segments matching role and/or capability get their lifespan scaled."""

    role: str | None
    capabilities: tuple[str, ...]
    lifespan_scale: float

    def matches(self, role: str | None, capabilities: frozenset[str]) -> bool:
        if self.role is not None and self.role != role:
            return False
        return all(c in capabilities for c in self.capabilities)


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    source: str
    digest: str
    phases: tuple[Phase, ...]
    anomaly: AnomalyRules = field(default_factory=AnomalyRules)
    segments: tuple[SegmentSelector, ...] = ()
    #: keep the guest's memory for forensics when the zone is ended while its workload runs
    #: (libvirt zones; a cgroup zone has no memory image of its own)
    memory_dump: bool = False

    def initial(self) -> Restrictions:
        """Restrictions in force when the workload starts (phases at 0 included)."""
        current = Restrictions()
        for phase in self.phases:
            if phase.at_ms == 0 and not phase.terminate:
                current = phase.restrictions
        return current

    def later_phases(self) -> tuple[Phase, ...]:
        """Phases that need a scheduled transition (those at 0 are in force from the start,
        except a terminate at 0, which still has to be carried out)."""
        return tuple(p for p in self.phases if p.at_ms > 0 or p.terminate)

    def lifespan_scale(self, role: str | None = None,
                       capabilities: frozenset[str] = frozenset()) -> float:
        """The first matching segment selector's scale, else 1."""
        for selector in self.segments:
            if selector.matches(role, capabilities):
                return selector.lifespan_scale
        return 1.0

    @property
    def lifespan_ms(self) -> int | None:
        """When the zone is terminated by policy, if ever."""
        for phase in self.phases:
            if phase.terminate:
                return phase.at_ms
        return None
