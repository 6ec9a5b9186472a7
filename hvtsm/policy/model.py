"""Typed, validated policies. Built only by `hvtsm.policy.loader`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from guest_agent.profile import POLICY_FIELDS, Profile
from hvtsm.restrictions import Restrictions


class Reaction(StrEnum):
    """What the host does about an anomaly, mildest first."""

    ACCELERATE = "accelerate"  # divide the time left before each pending phase
    JUMP = "jump"  # bring the next phase forward to now
    FREEZE = "freeze"  # stop every process of the zone where it stands
    TERMINATE = "terminate"


class Containment(StrEnum):
    """What the agent does at once, inside the zone, to the process that misbehaved."""

    NONE = "none"  # report only: the call goes ahead
    DENY = "deny"  # the call fails with EPERM (an open of a sensitive file is refused)
    KILL = "kill"  # SIGKILL, before the call takes effect


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
    """The policy's [anomaly] table: what the agent watches for (`watch`: the profile fields
    a policy sets, guest_agent.profile POLICY_FIELDS, declared there once) and how the host
    reacts."""

    #: watch the workload at all (off only for benchmarks and trusted code)
    monitor: bool = True
    watch: Profile = field(default_factory=Profile)
    #: the reaction to the first anomaly
    reaction: Reaction = Reaction.ACCELERATE
    #: remaining lifespan is divided by this on each accelerate reaction
    factor: float = 4.0
    #: reactions to the 2nd, 3rd, ... anomaly of a zone (the last one repeats)
    escalate: tuple[Reaction, ...] = ()
    #: category -> reaction, overriding the sequence above for that category
    on: dict[str, Reaction] = field(default_factory=dict)

    @property
    def drops_are_anomalies(self) -> bool:
        return self.watch.drops_are_anomalies

    @property
    def contain(self) -> Containment:
        return Containment(self.watch.contain)

    def reaction_for(self, category: str, count: int) -> Reaction:
        """The reaction to a zone's `count`-th anomaly (1-based), of `category`."""
        if category in self.on:
            return self.on[category]
        if count <= 1 or not self.escalate:
            return self.reaction
        return self.escalate[min(count - 2, len(self.escalate) - 1)]

    def profile(self) -> dict[str, object]:
        """The agent's profile fields this table decides; the network fields come from the
        phase in force (hvtsm.monitor.anomalies.zone_profile)."""
        full = self.watch.to_dict()
        return {name: full[name] for name in POLICY_FIELDS}


@dataclass(frozen=True)
class SegmentSelector:
    """Segments matching role and/or capability get their lifespan scaled and, when `policy`
    is set, another policy (a name in the policy directory or a path beside this file)."""

    role: str | None
    capabilities: tuple[str, ...]
    lifespan_scale: float
    policy: str | None = None

    def matches(self, role: str | None, capabilities: frozenset[str]) -> bool:
        if self.role is not None and self.role != role:
            return False
        return all(c in capabilities for c in self.capabilities)


@dataclass(frozen=True)
class ChannelGrant:
    """[[channel]]: zone `source` may send to zone `target` (and back when `both`), names as
    in the zones' group (a pipeline's segment names)."""

    source: str
    target: str
    both: bool = False
    max_message: int = 64 * 1024
    #: messages per second, per direction
    max_rate: float = 100.0
    #: the sender's phase indices in which the channel is open (None: every phase)
    phases: tuple[int, ...] | None = None
    #: keep the message bytes in the audit trail (otherwise only size and digest)
    audit_content: bool = False

    def allows(self, sender: str, receiver: str) -> bool:
        if (sender, receiver) == (self.source, self.target):
            return True
        return self.both and (sender, receiver) == (self.target, self.source)


@dataclass(frozen=True)
class TransientRules:
    """[transient]: when a process of the zone starts a code path the analysis did not
    foresee, its subtree gets a transient zone of its own with a shorter policy."""

    enabled: bool = False
    #: "exec" (a program outside the expected ones) and/or "connect" (the first connect
    #: of a process that had made none)
    triggers: tuple[str, ...] = ("exec",)
    #: programs the zone may exec without a transient zone (beside what analysis found)
    expect_exec: tuple[str, ...] = ()
    #: the transient zone's policy (name in the policy directory or path); None: this one
    policy: str | None = None
    lifespan_scale: float = 0.25
    #: transient zones one zone may split off; one more is an anomaly (fail closed)
    max_zones: int = 8


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    source: str
    digest: str
    phases: tuple[Phase, ...]
    anomaly: AnomalyRules = field(default_factory=AnomalyRules)
    segments: tuple[SegmentSelector, ...] = ()
    channels: tuple[ChannelGrant, ...] = ()
    transient: TransientRules = field(default_factory=TransientRules)
    #: keep the guest's memory for forensics when the zone is ended while its workload runs
    #: (libvirt zones; a cgroup zone has no memory image of its own)
    memory_dump: bool = False
    #: the TOML it was loaded from: what a zone's row keeps (and `resume` parses again) is
    #: what was validated, not what the file holds by then ("" when built otherwise)
    text: str = field(default="", repr=False, compare=False)

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

    def grant_for(self, sender: str, receiver: str) -> ChannelGrant | None:
        for grant in self.channels:
            if grant.allows(sender, receiver):
                return grant
        return None

    @property
    def lifespan_ms(self) -> int | None:
        """When the zone is terminated by policy, if ever."""
        for phase in self.phases:
            if phase.terminate:
                return phase.at_ms
        return None
