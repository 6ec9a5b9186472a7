"""The zone driver interface every backend implements.

A driver turns accumulated `Restrictions` into kernel or hypervisor state and
nothing else: it decides no timing and writes no audit rows (the manager does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from hvtsm.restrictions import Restrictions

if TYPE_CHECKING:
    from hvtsm.monitor.code_path import CodePath


class Backend(StrEnum):
    CGROUP = "cgroup"
    LIBVIRT = "libvirt"


@dataclass(frozen=True)
class ZoneSpec:
    """What a driver needs to make a zone."""

    zone_id: str
    #: small integer unique among live zones; drivers derive addresses and names from it
    net_index: int
    #: user the workload runs as (None: the controller's own user)
    user: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    #: keep a memory image when the zone is ended while its workload runs (if the
    #: backend has one: a guest does)
    memory_dump: bool = False
    #: the policy's part of the monitoring profile (AnomalyRules.profile()); None: the
    #: workload is not watched
    monitor: Mapping[str, Any] | None = None
    #: programs the workload may exec without being split into a transient zone, beside
    #: its own and the policy's [transient] expect_exec (what `hvtsm analyze` found); the
    #: manager puts them into the monitoring profile's `transient`
    expect_exec: tuple[str, ...] = ()
    #: a transient zone: the zone it is split from
    parent: str | None = None
    #: the zone's name among its group: the workload gets a channel endpoint (None: none)
    channel: str | None = None


@dataclass(frozen=True)
class WorkloadIO:
    """File descriptors (or subprocess.PIPE / None to inherit) for the workload."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


@dataclass
class ZoneHandle:
    """A live zone as a driver knows it.

    `state` is JSON-serialisable driver data (paths, names, pids); the manager stores
    it so a restarted controller can adopt the zone with `ZoneDriver.adopt`.
    """

    zone_id: str
    backend: Backend
    state: dict[str, Any] = field(default_factory=dict)
    applied: Restrictions = field(default_factory=Restrictions)


class Workload(Protocol):
    """The program running in a zone."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None:
        """Exit status once it ended (negative: killed by that signal), else None."""

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until it ends (or the timeout passes: None). Adopted workloads whose
        exit status cannot be known return 0 when their zone is empty."""

    @property
    def stdout(self) -> Any: ...

    @property
    def stderr(self) -> Any: ...


@dataclass(frozen=True)
class ApplyReport:
    """What `apply` changed, field -> printable value, plus anything worth auditing."""

    changed: dict[str, str]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZoneStats:
    procs: int
    memory_bytes: int | None
    cpu_usage_ns: int | None
    frozen: bool


class ZoneDriver(Protocol):
    backend: Backend

    def create(self, spec: ZoneSpec, initial: Restrictions) -> ZoneHandle:
        """Make the zone's resources with `initial` already in force. All or nothing:
        on failure nothing is left behind and ZoneError is raised."""

    def start(self, handle: ZoneHandle, argv: Sequence[str], io: WorkloadIO) -> Workload:
        """Start the workload inside the zone; returns once its first instruction ran
        (exec succeeded). Raises ZoneError (the zone stays, terminate it)."""

    def apply(self, handle: ZoneHandle, restrictions: Restrictions) -> ApplyReport:
        """Bring the zone to `restrictions` (always at least as tight as handle.applied).
        Updates handle.applied and handle.state."""

    def freeze(self, handle: ZoneHandle) -> None: ...

    def thaw(self, handle: ZoneHandle) -> None: ...

    def terminate(self, handle: ZoneHandle) -> None:
        """Kill everything in the zone and remove all its resources. Idempotent."""

    def stats(self, handle: ZoneHandle) -> ZoneStats: ...

    def adopt(self, zone_id: str, state: dict[str, Any], applied: Restrictions) -> tuple[
        ZoneHandle, Workload | None
    ]:
        """Rebuild a handle from stored state after a controller restart. The workload is
        None when nothing runs in the zone any more."""

    def split(self, parent: ZoneHandle, spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle, Workload]:
        """Make transient zone `spec` inside `parent` with `initial` in force, put the
        process of `request` (held by the parent's agent) in it, then let its held call
        proceed. Its later children are in it by inheritance. The workload ends when the
        zone holds no process. Raises ZoneError (nothing made; the caller then `refuse`s).
        `apply`, `freeze`, `thaw`, `terminate` and `stats` take the returned handle."""

    def refuse(self, parent: ZoneHandle, request: CodePath, reason: str) -> None:
        """Fail the held call of `request` (EPERM): its code path does not run."""

    def leftovers(self) -> set[str]:
        """Zone ids that still have resources (cgroups, namespaces, domains) on this host."""

    def remove(self, zone_id: str) -> list[str]:
        """Remove whatever resources of `zone_id` remain, killing its processes; returns
        a printable list of what was removed."""
