"""The seams between the lifecycle and the zone drivers.

A driver turns accumulated `Restrictions` into kernel or hypervisor state and nothing else:
it decides no timing and writes no audit rows (the lifecycle does). What a driver learns
on its own (an agent's anomaly, a held code path, a fact that arrives after `apply`
returned, a channel message, a problem of a pooled guest that serves no zone) it hands to
the `DriverEvents` it was constructed with; it never holds a reference to the manager.

Each backend keeps its own typed per-zone state (`DriverState`), which the lifecycle
stores as JSON so a restarted controller can adopt the zone (`ZoneDriver.adopt`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from hvtsm.restrictions import Restrictions

if TYPE_CHECKING:
    from guest_agent.protocol import Message
    from hvtsm.monitor.anomalies import AnomalyReport
    from hvtsm.monitor.code_path import CodePath
    from hvtsm.monitor.deputy import DeputyReport
    from hvtsm.monitor.link import AgentLink


#: `ZoneSpec.user` for a workload that runs under an identity of its own: a uid and gid
#: no other zone and nothing on the host has (cgroup zones: hvtsm/zones/identity.py; a
#: guest, which is a machine of its own, runs it as its unprivileged user)
ZONE_USER = "zone"
#: who ZONE_USER is inside a guest
GUEST_ZONE_USER = "nobody"


def guest_user(user: str | None) -> str | None:
    """The guest's user for `ZoneSpec.user`: a guest is a machine of the zone's own, so its
    unprivileged user is already an identity no other zone has."""
    return GUEST_ZONE_USER if user == ZONE_USER else user


class Backend(StrEnum):
    CGROUP = "cgroup"
    LIBVIRT = "libvirt"


@dataclass(frozen=True)
class ZoneSpec:
    """What a driver needs to make a zone."""

    zone_id: str
    #: small integer unique among live zones; drivers derive addresses and names from it
    net_index: int
    #: user the workload runs as: ZONE_USER (an identity of its own), a user name, or None
    #: (the controller's own user)
    user: str | None = None
    cwd: str | None = None
    #: the workload's environment; never part of the stored state (it carries secrets)
    env: Mapping[str, str] | None = None
    #: keep a memory image when the zone is ended while its workload runs (if the
    #: backend has one: a guest does)
    memory_dump: bool = False
    #: the policy's part of the monitoring profile (AnomalyRules.profile()); None: the
    #: workload is not watched
    monitor: Mapping[str, Any] | None = None
    #: programs the workload may exec without being split into a transient zone, beside
    #: its own and the policy's [transient] expect_exec (what `hvtsm analyze` found)
    expect_exec: tuple[str, ...] = ()
    #: a transient zone: the zone it is split from
    parent: str | None = None
    #: the zone's name among its group: the workload gets a channel endpoint (None: none)
    channel: str | None = None
    #: the zone has phases after its start: an agent beside or inside it keeps them while
    #: no controller runs (`ZoneDriver.delegate`)
    deputy: bool = False


@dataclass(frozen=True)
class WorkloadIO:
    """File descriptors (or subprocess.PIPE / None to inherit) for the workload.

    The caller may close its descriptors as soon as `ZoneDriver.start` returns: a driver
    that writes to one later (a guest's output arrives over the agent link) keeps a
    duplicate of its own."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


@dataclass(frozen=True)
class StartFacts:
    """What a driver knows about how a zone came to be, for the zone's start notice."""

    #: the accelerator of a guest ("kvm" or "qemu", i.e. TCG)
    accel: str | None = None
    boot_ms: float | None = None
    #: worth auditing at the start (a transient zone's placement, a limit not enforced)
    notes: tuple[str, ...] = ()


class DriverState(Protocol):
    """A backend's typed per-zone state; stored as JSON with the zone."""

    @property
    def user(self) -> str | None: ...

    def to_json(self) -> dict[str, Any]: ...

    def facts(self) -> StartFacts: ...


S = TypeVar("S", bound=DriverState)


@dataclass
class ZoneHandle(Generic[S]):
    """A live zone as a driver knows it: its typed state and what is in force."""

    zone_id: str
    backend: Backend
    state: S
    applied: Restrictions = field(default_factory=Restrictions)


T = TypeVar("T")


def narrowed(handle: ZoneHandle[Any], kind: type[T]) -> ZoneHandle[T] | None:  # type: ignore[type-var]
    """The handle typed by its state's class when its state is a `kind` (a driver's
    handles of zones and of transient zones carry different states), else None."""
    return cast("ZoneHandle[T]", handle) if isinstance(handle.state, kind) else None  # type: ignore[type-var]


class Workload(Protocol):
    """The program running in a zone."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """Exit status once it ended (negative: killed by that signal), else None."""

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until it ends (or the timeout passes: None). Returns only once every event
        the zone's agent sent about the workload before its end has been handed to the
        driver's `DriverEvents`, so whoever learns of the end learns of its cause first.
        Adopted workloads whose exit status cannot be known return 0 when their zone is
        empty."""

    @property
    def stdout(self) -> Any: ...

    @property
    def stderr(self) -> Any: ...

    @property
    def start_note(self) -> str | None:
        """How it started, for the audit trail (a pooled guest's standby), or None."""


@dataclass(frozen=True)
class InForce:
    """A step of an application whose effect the zone already had when the driver looked
    (a phase half-applied before its controller died, a limit something else lowered
    further): the step succeeds and changes nothing, and a limit found tighter than the
    target stays as tight."""

    #: the restriction field ("network", "memory", ...)
    field: str
    #: what the driver found, in the kernel's or hypervisor's words ("NIC absent")
    found: str

    def __str__(self) -> str:
        return f"{self.field} ({self.found})"


@dataclass(frozen=True)
class ApplyReport:
    """What `apply` changed, field -> printable value, plus anything worth auditing."""

    changed: dict[str, str]
    notes: tuple[str, ...] = ()
    #: the steps whose effect was already in force (audited as such, never failed)
    already: tuple[InForce, ...] = ()

    def audit_note(self) -> str:
        """The notes and what was already in force, as one line for the audit trail."""
        parts = list(self.notes)
        if self.already:
            parts.append("already in force: " + ", ".join(map(str, self.already)))
        return "; ".join(parts)


@dataclass(frozen=True)
class DeputyPhase:
    """A pending phase as the zone's deputy gets it: when, and what is in force from then."""

    index: int
    #: epoch seconds
    due: float
    restrictions: Restrictions
    #: the lifespan's end
    terminate: bool = False


@dataclass(frozen=True)
class DeputyOrders:
    """The zone's schedule for its deputy (the agent beside or inside it), which applies a
    phase on its own `grace` seconds after its due time unless the controller said it is in
    force (guest_agent/deputy.py)."""

    phases: tuple[DeputyPhase, ...]
    #: the highest phase in force (-1: none)
    in_force: int
    grace: float
    #: the deputy's records up to this seq are audited: it may forget them (None: none)
    ack: int | None = None
    #: what the deputy froze in place of a restriction is applied now: thaw it
    thaw: bool = False


class ZoneDeputy(Protocol):
    """A zone's deputy as its driver reaches it (guest_agent/deputy.py)."""

    def delegate(self, orders: DeputyOrders) -> None:
        """Give the deputy its schedule (replacing the one before), translated into the
        backend's monotonic steps; acknowledge and thaw as `orders` say. ZoneError when it
        cannot be reached."""

    def report(self, timeout: float) -> DeputyReport | None:
        """After `ZoneDriver.adopt`: what the deputy applied while no controller ran, once
        its agent is back (within `timeout`); None when it did not come back."""


@dataclass(frozen=True)
class ZoneStats:
    procs: int
    memory_bytes: int | None
    cpu_usage_ns: int | None
    frozen: bool


class DriverEvents(Protocol):
    """Where a driver reports what it learns on its own (any thread; each call returns
    quickly: anomalies and code paths are queued for the lifecycle's reactions)."""

    def anomaly(self, zone_id: str, report: AnomalyReport) -> None: ...

    def note(self, zone_id: str, kind: str, detail: str) -> None:
        """A fact worth auditing that arrived after the call that caused it returned (an
        unplug completing, what a guest sees of its memory, a memory dump)."""

    def code_path(self, zone_id: str, request: CodePath) -> None:
        """A held code path of the zone's agent (transient zones)."""

    def channel(self, zone_id: str, message: Message) -> None:
        """A validated channel_send or channel_ack of the zone's workload; raises
        `hvtsm.monitor.link.ChannelFault` for one that cannot be used."""

    def idle(self, guest: str, kind: str, detail: str) -> None:
        """Something of a pooled guest that serves no zone (its pool taints it)."""

    def deputy(self, zone_id: str, report: DeputyReport) -> None:
        """Phases the zone's deputy applied on its own while the controller was connected
        (it was late)."""


class ZoneDriver(Protocol):
    backend: Backend

    def create(self, spec: ZoneSpec, initial: Restrictions) -> ZoneHandle[Any]:
        """Make the zone's resources with `initial` already in force. All or nothing:
        on failure nothing is left behind and ZoneError is raised."""

    def start(self, handle: ZoneHandle[Any], argv: Sequence[str], io: WorkloadIO) -> Workload:
        """Start the workload inside the zone; returns once its first instruction ran
        (exec succeeded). Raises ZoneError (the zone stays, terminate it)."""

    def apply(self, handle: ZoneHandle[Any], restrictions: Restrictions) -> ApplyReport:
        """Bring the zone to `restrictions` (always at least as tight as handle.applied).
        Updates handle.applied and handle.state. Idempotent against the zone itself: each
        step looks at what is in force first, so a step whose effect is already there (the
        kernel ahead of handle.applied after a crash) succeeds and is reported in
        `ApplyReport.already`, and nothing is ever loosened to reach `restrictions` (a
        limit found tighter stays)."""

    def freeze(self, handle: ZoneHandle[Any]) -> None: ...

    def thaw(self, handle: ZoneHandle[Any]) -> None: ...

    def terminate(self, handle: ZoneHandle[Any]) -> None:
        """Kill everything in the zone and remove all its resources. Idempotent."""

    def stats(self, handle: ZoneHandle[Any]) -> ZoneStats: ...

    def adopt(self, zone_id: str, state: Mapping[str, Any],
              applied: Restrictions) -> tuple[ZoneHandle[Any], Workload | None]:
        """Rebuild a handle from stored state after a controller restart, its state read
        again from the zone itself where the store may be behind (a NIC gone, a loopback
        down: what a phase half-applied before the crash already did). `applied` stays
        what the store says; the overdue phase's `apply` finds the rest in force. The
        workload is None when nothing runs in the zone any more."""

    def split(self, parent: ZoneHandle[Any], spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle[Any], Workload]:
        """Make transient zone `spec` inside `parent` with `initial` in force, put the
        process of `request` (held by the parent's agent) in it, then let its held call
        proceed. Its later children are in it by inheritance. The workload ends when the
        zone holds no process. Raises ZoneError (nothing made; the caller then `refuse`s).
        `apply`, `freeze`, `thaw`, `terminate` and `stats` take the returned handle."""

    def refuse(self, parent: ZoneHandle[Any], request: CodePath, reason: str) -> None:
        """Fail the held call of `request` (EPERM): its code path does not run."""

    def channel_link(self, zone_id: str) -> AgentLink | None:
        """The open link a zone's channel messages travel on (None: none)."""

    def deputy(self, handle: ZoneHandle[Any]) -> ZoneDeputy | None:
        """The zone's deputy: the agent beside or inside it that keeps its schedule while no
        controller runs (None: the zone has none, as a transient zone)."""

    def leftovers(self) -> set[str]:
        """Zone ids that still have resources (cgroups, namespaces, domains) on this host."""

    def resources(self, zone_id: str) -> list[str]:
        """What `remove(zone_id)` would remove now, in its words (no change made)."""

    def remove(self, zone_id: str) -> list[str]:
        """Remove whatever resources of `zone_id` remain, killing its processes; returns
        a printable list of what was removed."""

    def close(self) -> None:
        """The controller is done with the driver (spare agents, connections)."""


#: how the lifecycle makes its drivers: each gets the events it reports to
DriverFactory = Callable[[DriverEvents], ZoneDriver]


class PooledDriver(ZoneDriver, Protocol):
    """A driver whose guests outlive their zones (a warm pool's)."""

    def boot_guest(self, guest: str, net_index: int,
                   baseline: Restrictions) -> Mapping[str, Any]:
        """Boot a guest that serves no zone yet; returns its state for `bind`."""

    def attach_guest(self, state: Mapping[str, Any], *, timeout: float = 10.0) -> None: ...

    def detach_guest(self, guest: str) -> None: ...

    def bind(self, spec: ZoneSpec, initial: Restrictions, state: Mapping[str, Any],
             baseline: Restrictions, *, standby: bool = False) -> ZoneHandle[Any]:
        """Make zone `spec` in the running pooled guest `state`; `standby`: its start may
        name the guest's standby."""

    def scrub(self, guest: str, user: str, scratch: str, *, timeout: float = 30.0) -> float:
        """Between two zones of one guest: nothing of the previous workload's user left;
        returns the seconds it took."""

    def prepare_standby(self, guest: str, runtime: str, user: str,
                        monitor: Mapping[str, Any]) -> dict[str, Any] | None: ...

    def destroy_guest(self, guest: str) -> list[str]: ...

    def guest_alive(self, guest: str) -> bool: ...

    def guest_python(self) -> str: ...

    def released(self, handle: ZoneHandle[Any]) -> GuestRelease:
        """How a zone left its pooled guest (for the pool's rules)."""


@dataclass(frozen=True)
class GuestRelease:
    """What a pooled guest's zone did to the guest."""

    #: the guest was destroyed with its zone (ended under a running workload)
    destroyed: bool
    #: the guest's NIC is gone (a network cut unplugs it for good)
    nic_lost: bool
