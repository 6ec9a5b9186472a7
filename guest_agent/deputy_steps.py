"""The steps a zone's deputy (deputy.py) takes when a phase falls due and no controller
applied it: typed, each one monotonic and idempotent.

Monotonic: a step only ever tightens. `LowerLimit` writes a cgroup file only when its
target is below what the file holds, `NarrowCpus` only removes CPUs, `LinkDown` only takes
an interface down, `RemountReadOnly` only makes mounts read-only. Idempotent: a step whose
effect is already in the kernel (a limit already lower, an interface already down or gone,
a zone already frozen or empty) succeeds and says so. So the controller and the deputy may
both apply one phase, in either order, and the zone ends up where the phase says; the
controller's own writes of the same cgroup files go through these steps too, under the
zone's lock (`zone_lock`), so a read-then-write of one cannot interleave with the other's.

A step is sent by the controller as a dict (``to_dict``; `from_dict` checks it and raises
StepError naming the field) and carried out through a `System`, the one place that touches
the kernel (tests give a fake one).

Cgroup zones (the agent beside the zone, on the host): `LowerLimit` (memory.max,
memory.limit_in_bytes, memory.memsw.limit_in_bytes, memory.swap.max, pids.max, cpu.shares,
cpu.weight), `LowerCpuMax` (v2 cpu.max), `LowerCfsQuota` (v1 cpu.cfs_quota_us),
`NarrowCpus` (cpuset.cpus), `LinkDown`/`LoopbackDown` in the zone's network namespace,
`RemountReadOnly` of the zone's pinned mount namespace (a helper child joins it:
nsremount.py), `Freeze` and `Kill` of the zone's cgroup. Guests (the agent inside):
`LinkDown`/`LoopbackDown` in the guest's own namespace, `RemountReadOnly` of "/",
`FreezeWorkload` (SIGSTOP of the workload's processes: what the agent cannot cut itself,
CPU and memory, waits for the controller, which applies the real limit and thaws) and
`KillWorkload`.

Stdlib only, python >= 3.9.
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from guest_agent import admin
from guest_agent.deputy_system import (
    LOOPBACK_ADDRESSES,
    SETTLE_S,
    Context,
    Outcome,
    StepError,
    System,
    zone_lock,
)

#: a value a cgroup file holds when it does not limit ("max", v1's -1 or huge numbers)
UNLIMITED = 2**63 - 1


# --- the steps --------------------------------------------------------------------------------


def _limit_value(text: str) -> int:
    """A cgroup file's limit as a number (UNLIMITED for max, -1 and v1's page-rounded
    huge values)."""
    word = text.split()[0] if text.split() else ""
    if word in ("max", "-1"):
        return UNLIMITED
    try:
        value = int(word)
    except ValueError:
        raise StepError(f"not a limit: {text[:40]!r}") from None
    return UNLIMITED if value >= 2**62 else value


def _text(d: dict[str, Any], name: str) -> str:
    value = d.get(name)
    if not isinstance(value, str) or not value:
        raise StepError(f"step {d.get('op')!r}: field {name!r} must be a non-empty string")
    return value


def _path(d: dict[str, Any], name: str) -> str:
    value = _text(d, name)
    if not value.startswith("/") or "\0" in value or "/../" in value + "/":
        raise StepError(f"step {d.get('op')!r}: field {name!r} must be an absolute path")
    return value


def _opt_path(d: dict[str, Any], name: str) -> str | None:
    return None if d.get(name) is None else _path(d, name)


def _number(d: dict[str, Any], name: str) -> int:
    value = d.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise StepError(f"step {d.get('op')!r}: field {name!r} must be an integer >= 0")
    return value


def _paths(d: dict[str, Any], name: str) -> tuple[str, ...]:
    value = d.get(name)
    if not isinstance(value, list):
        raise StepError(f"step {d.get('op')!r}: field {name!r} must be a list of paths")
    return tuple(_path({"op": d.get("op"), name: v}, name) for v in value)


class Step(abc.ABC):
    """One monotonic, idempotent step (see the module docstring)."""

    op: ClassVar[str] = ""

    @abc.abstractmethod
    def run(self, ctx: Context) -> Outcome:
        """Put the step's effect in force; an effect already in force is success."""

    def thaw(self, ctx: Context) -> None:  # noqa: B027 (a no-op unless a stand-in)
        """Undo a stand-in freeze (STAND_INS); the other steps are never undone."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The step as the ``deputy`` message carries it."""

    @classmethod
    @abc.abstractmethod
    def parse(cls, d: dict[str, Any]) -> Step:
        """The step from its message form; StepError when it cannot be used."""


@dataclass(frozen=True)
class LowerLimit(Step):
    """Write `value` to the cgroup file `path` if it holds more (or no limit)."""

    path: str
    value: int
    op: ClassVar[str] = "lower"

    def run(self, ctx: Context) -> Outcome:
        name = os.path.basename(self.path)
        try:
            current = _limit_value(ctx.system.read(self.path))
        except OSError as e:
            raise StepError(f"cannot read {self.path}: {e.strerror or e}") from None
        if current <= self.value:
            return Outcome(False, f"{name} already {_show(current)} (<= {self.value})")
        try:
            ctx.system.write(self.path, str(self.value))
        except OSError as e:
            raise StepError(f"cannot lower {self.path} to {self.value}: "
                            f"{e.strerror or e}", e.errno) from None
        return Outcome(True, f"{name} {self.value} (was {_show(current)})")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "value": self.value}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> LowerLimit:
        return cls(_path(d, "path"), _number(d, "value"))


@dataclass(frozen=True)
class LowerCpuMax(Step):
    """cgroup v2 cpu.max: `quota` us per `period` us, if the file allows more."""

    path: str
    quota: int
    period: int
    op: ClassVar[str] = "lower_cpu_max"

    def run(self, ctx: Context) -> Outcome:
        try:
            words = ctx.system.read(self.path).split()
        except OSError as e:
            raise StepError(f"cannot read {self.path}: {e.strerror or e}") from None
        if len(words) != 2:
            raise StepError(f"{self.path} holds {' '.join(words)!r}, not 'QUOTA PERIOD'")
        quota, period = _limit_value(words[0]), int(words[1])
        if quota != UNLIMITED and quota * self.period <= self.quota * period:
            return Outcome(False, f"cpu.max already {quota} {period}")
        try:
            ctx.system.write(self.path, f"{self.quota} {self.period}")
        except OSError as e:
            raise StepError(f"cannot lower {self.path}: {e.strerror or e}") from None
        return Outcome(True, f"cpu.max {self.quota} {self.period} (was {' '.join(words)})")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "quota": self.quota, "period": self.period}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> LowerCpuMax:
        period = _number(d, "period")
        if period == 0:
            raise StepError("step 'lower_cpu_max': field 'period' must be above 0")
        return cls(_path(d, "path"), _number(d, "quota"), period)


@dataclass(frozen=True)
class LowerCfsQuota(Step):
    """cgroup v1 cpu.cfs_quota_us to `quota` us per `period` us, if it allows more (the
    quota is scaled to the period the file's cgroup has)."""

    path: str
    period_path: str
    quota: int
    period: int
    op: ClassVar[str] = "lower_cfs_quota"

    def run(self, ctx: Context) -> Outcome:
        try:
            current = _limit_value(ctx.system.read(self.path))
            period = int(ctx.system.read(self.period_path))
        except (OSError, ValueError) as e:
            raise StepError(f"cannot read {self.path}: {e}") from None
        wanted = max(1000, self.quota * period // self.period)
        if current != UNLIMITED and current <= wanted:
            return Outcome(False, f"cpu.cfs_quota_us already {current} per {period}")
        try:
            ctx.system.write(self.path, str(wanted))
        except OSError as e:
            raise StepError(f"cannot lower {self.path}: {e.strerror or e}") from None
        return Outcome(True, f"cpu.cfs_quota_us {wanted} per {period} (was {_show(current)})")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "period_path": self.period_path,
                "quota": self.quota, "period": self.period}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> LowerCfsQuota:
        period = _number(d, "period")
        if period == 0:
            raise StepError("step 'lower_cfs_quota': field 'period' must be above 0")
        return cls(_path(d, "path"), _path(d, "period_path"), _number(d, "quota"), period)


def parse_cpus(text: str) -> frozenset[int]:
    """'0-2,5' -> {0, 1, 2, 5}."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return frozenset(out)


def format_cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class NarrowCpus(Step):
    """cpuset.cpus down to `cpus`: CPUs are only ever taken away (to `cpus` and what the
    file holds, both), never added. `effective` is read when `path` is empty (v2: the
    parent's)."""

    path: str
    cpus: tuple[int, ...]
    effective: str | None = None
    op: ClassVar[str] = "narrow_cpus"

    def run(self, ctx: Context) -> Outcome:
        try:
            current = parse_cpus(ctx.system.read(self.path))
            if not current and self.effective is not None:
                current = parse_cpus(ctx.system.read(self.effective))
        except (OSError, ValueError) as e:
            raise StepError(f"cannot read {self.path}: {e}") from None
        target = frozenset(self.cpus) & current if current else frozenset(self.cpus)
        if not target or target == current:
            return Outcome(False, f"cpuset.cpus already {format_cpus(current)}")
        try:
            ctx.system.write(self.path, format_cpus(target))
        except OSError as e:
            raise StepError(f"cannot narrow {self.path}: {e.strerror or e}") from None
        return Outcome(True, f"cpuset.cpus {format_cpus(target)} (was {format_cpus(current)})")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "cpus": list(self.cpus),
                "effective": self.effective}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> NarrowCpus:
        cpus = d.get("cpus")
        if not isinstance(cpus, list) or not cpus or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 65536 for c in cpus):
            raise StepError("step 'narrow_cpus': field 'cpus' must be a list of CPU numbers")
        return cls(_path(d, "path"), tuple(sorted(set(cpus))), _opt_path(d, "effective"))


@dataclass(frozen=True)
class LinkDown(Step):
    """Interface `ifname` down in the network namespace at `netns` (None: the agent's own);
    `ifname` "*" is every interface but the loopback. A missing interface is down."""

    netns: str | None
    ifname: str
    op: ClassVar[str] = "link_down"

    def run(self, ctx: Context) -> Outcome:
        def act() -> list[str]:
            names = ([n for n in ctx.system.interfaces() if n != "lo"] if self.ifname == "*"
                     else [self.ifname])
            out = []
            for name in names:
                was_up = ctx.system.link_down(name)
                out.append(f"{name} " + ("down" if was_up else "already down" if was_up
                                         is False else "gone"))
            return out

        try:
            said = ctx.system.in_netns(self.netns, act)
        except OSError as e:
            raise StepError(f"cannot reach the network namespace {self.netns}: "
                            f"{e.strerror or e}") from None
        changed = any(s.endswith(" down") and not s.endswith("already down") for s in said)
        return Outcome(changed, ", ".join(said) or "no interface")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "netns": self.netns, "ifname": self.ifname}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> LinkDown:
        name = _text(d, "ifname")
        if name != "*" and (len(name.encode()) >= admin.IFNAMSIZ or "/" in name):
            raise StepError(f"step 'link_down': {name!r} is not an interface name")
        return cls(_opt_path(d, "netns"), name)


@dataclass(frozen=True)
class LoopbackDown(Step):
    """The loopback down and without its addresses (a connect then fails at once), in the
    network namespace at `netns` (None: the agent's own)."""

    netns: str | None
    op: ClassVar[str] = "loopback_down"

    def run(self, ctx: Context) -> Outcome:
        def act() -> tuple[bool, int]:
            was_up = ctx.system.link_down("lo")
            dropped = 0
            for family, address, prefix in LOOPBACK_ADDRESSES:
                with contextlib.suppress(OSError):  # no IPv6 in this kernel
                    dropped += ctx.system.drop_address(family, address, prefix, "lo")
            return bool(was_up), dropped

        try:
            was_up, dropped = ctx.system.in_netns(self.netns, act)
        except OSError as e:
            raise StepError(f"cannot reach the network namespace {self.netns}: "
                            f"{e.strerror or e}") from None
        if not was_up and not dropped:
            return Outcome(False, "loopback already down")
        return Outcome(True, f"loopback down, {dropped} address(es) removed")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "netns": self.netns}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> LoopbackDown:
        return cls(_opt_path(d, "netns"))


@dataclass(frozen=True)
class RemountReadOnly(Step):
    """Every mount read-only: of the mount namespace pinned at `ns` and of any other the
    zone's processes (`procs`: cgroup.procs files) are in, or, with neither, the agent's
    own root (a guest)."""

    ns: str | None
    procs: tuple[str, ...] = ()
    op: ClassVar[str] = "remount_ro"

    def run(self, ctx: Context) -> Outcome:
        if self.ns is None and not self.procs:
            said = ctx.system.remount_root()
            return Outcome(not said.startswith("already"), f"root {said}")
        host = ctx.system.own_mount_namespace()
        seen: dict[int, str] = {}
        pinned = None if self.ns is None else ctx.system.namespace_at(self.ns)
        if pinned is not None and self.ns is not None:
            seen[pinned] = self.ns
        for pid in _pids(ctx.system, self.procs):
            found = ctx.system.mount_namespace(pid)
            if found is not None:
                seen.setdefault(found[0], found[1])
        seen.pop(host, None)  # never the host's own mounts
        if not seen:
            return Outcome(False, "no mount namespace of the zone left")
        total = sum(ctx.system.remount_namespace(path) for path in seen.values())
        return Outcome(True, f"{total} mount(s) read-only in {len(seen)} mount namespace(s)")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "ns": self.ns, "procs": list(self.procs)}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> RemountReadOnly:
        return cls(_opt_path(d, "ns"), _paths(d, "procs") if d.get("procs") else ())


def _pids(system: System, procs: tuple[str, ...]) -> set[int]:
    out: set[int] = set()
    for path in procs:
        with contextlib.suppress(OSError, ValueError):
            out.update(int(p) for p in system.read(path).split())
    return out


@dataclass(frozen=True)
class Freeze(Step):
    """The zone's cgroup frozen (v1: `path` is freezer.state; v2: cgroup.freeze). It stands
    in for what the deputy cannot apply itself; the controller thaws once it has."""

    path: str
    version: int
    op: ClassVar[str] = "freeze"

    def _frozen(self, system: System) -> bool:
        if self.version == 1:
            return system.read(self.path) == "FROZEN"
        events = os.path.join(os.path.dirname(self.path), "cgroup.events")
        return "frozen 1" in system.read(events).splitlines()

    def run(self, ctx: Context) -> Outcome:
        try:
            if self._frozen(ctx.system):
                return Outcome(False, "already frozen")
            ctx.system.write(self.path, "FROZEN" if self.version == 1 else "1")
            if not ctx.system.wait_until(lambda: self._frozen(ctx.system), SETTLE_S):
                raise StepError(f"the zone did not freeze within {SETTLE_S:g} s")
        except OSError as e:
            raise StepError(f"cannot freeze ({self.path}): {e.strerror or e}") from None
        return Outcome(True, "frozen")

    def thaw(self, ctx: Context) -> None:
        with contextlib.suppress(OSError):  # a zone already gone needs no thaw
            ctx.system.write(self.path, "THAWED" if self.version == 1 else "0")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "version": self.version}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Freeze:
        return cls(_path(d, "path"), _version(d))


def _version(d: dict[str, Any]) -> int:
    version = d.get("version")
    if version not in (1, 2):
        raise StepError(f"step {d.get('op')!r}: field 'version' must be 1 or 2")
    return int(version)


@dataclass(frozen=True)
class Kill(Step):
    """Every process of the zone's cgroup killed: v2 writes `kill` (cgroup.kill); v1
    freezes (`freezer`: freezer.state, so none forks past the signals), SIGKILLs the pids of
    `procs` and thaws, until they are empty."""

    procs: tuple[str, ...]
    version: int
    kill: str | None = None
    freezer: str | None = None
    op: ClassVar[str] = "kill"

    def _all(self, system: System) -> set[int]:
        """The zone's processes, those of its transient zones (nested cgroups) included."""
        return _pids(system, self.procs + tuple(
            nested for path in self.procs for nested in system.nested(path)))

    def run(self, ctx: Context) -> Outcome:
        system = ctx.system
        pids = self._all(system)
        if not pids:
            return Outcome(False, "no process left")
        if self.kill is not None and system.exists(self.kill):
            # one write kills the whole subtree, forking processes included (Linux 5.14+)
            with contextlib.suppress(FileNotFoundError):
                system.write(self.kill, "1")
        else:
            frozen = False
            if self.freezer is not None:
                with contextlib.suppress(OSError):  # v1's freezer holds the subtree
                    system.write(self.freezer, "FROZEN")
                    frozen = True
            for pid in self._all(system):
                system.kill(pid, signal.SIGKILL)
            if frozen and self.freezer is not None:
                with contextlib.suppress(OSError):  # v1 frozen tasks die once thawed
                    system.write(self.freezer, "THAWED")

        def empty() -> bool:
            left = self._all(system)
            for pid in left:  # one that slipped past the first pass
                system.kill(pid, signal.SIGKILL)
            return not left

        if not system.wait_until(empty, SETTLE_S):
            raise StepError(f"processes {sorted(self._all(system))[:8]} still in the "
                            f"zone {SETTLE_S:g} s after SIGKILL")
        return Outcome(True, f"{len(pids)} process(es) killed")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "procs": list(self.procs), "version": self.version,
                "kill": self.kill, "freezer": self.freezer}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Kill:
        return cls(_paths(d, "procs"), _version(d), _opt_path(d, "kill"),
                   _opt_path(d, "freezer"))


@dataclass(frozen=True)
class FreezeWorkload(Step):
    """A guest: every process of workload `workload` stopped (SIGSTOP) until the controller
    returns, applies what this stands in for (CPU, memory) and thaws (SIGCONT)."""

    workload: str
    op: ClassVar[str] = "freeze_workload"

    def run(self, ctx: Context) -> Outcome:
        pids = ctx.workload_pids(self.workload)
        if not pids:
            return Outcome(False, "no process of the workload left")
        for pid in pids:
            ctx.system.kill(pid, signal.SIGSTOP)
        # a child forked before its parent stopped: stop what appeared meanwhile
        late = [p for p in ctx.workload_pids(self.workload) if p not in pids]
        for pid in late:
            ctx.system.kill(pid, signal.SIGSTOP)
        return Outcome(True, f"{len(pids) + len(late)} process(es) stopped")

    def thaw(self, ctx: Context) -> None:
        for pid in ctx.workload_pids(self.workload):
            ctx.system.kill(pid, signal.SIGCONT)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "workload": self.workload}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> FreezeWorkload:
        return cls(_text(d, "workload"))


@dataclass(frozen=True)
class KillWorkload(Step):
    """A guest: every process of workload `workload` killed (its lifespan ended)."""

    workload: str
    op: ClassVar[str] = "kill_workload"

    def run(self, ctx: Context) -> Outcome:
        pids = ctx.workload_pids(self.workload)
        if not pids:
            return Outcome(False, "no process of the workload left")
        for pid in pids:  # stopped first, so none forks past the kills
            ctx.system.kill(pid, signal.SIGSTOP)
        everyone = sorted(set(pids) | set(ctx.workload_pids(self.workload)))
        for pid in everyone:
            ctx.system.kill(pid, signal.SIGKILL)
        return Outcome(True, f"{len(everyone)} process(es) killed")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "workload": self.workload}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> KillWorkload:
        return cls(_text(d, "workload"))


STEPS: dict[str, type[Step]] = {cls.op: cls for cls in (
    LowerLimit, LowerCpuMax, LowerCfsQuota, NarrowCpus, LinkDown, LoopbackDown,
    RemountReadOnly, Freeze, Kill, FreezeWorkload, KillWorkload)}
#: the steps that stand in for a restriction the deputy cannot apply itself: the controller
#: thaws once it has applied the real one
STAND_INS = (Freeze, FreezeWorkload)


def from_dict(d: Any) -> Step:
    if not isinstance(d, dict):
        raise StepError("a step must be an object")
    cls = STEPS.get(d.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise StepError("unknown step op {!r} (known: {})".format(
            str(d.get("op"))[:40], ", ".join(sorted(STEPS))))
    return cls.parse(d)


def steps_from(items: Any, what: str) -> tuple[Step, ...]:
    if not isinstance(items, list):
        raise StepError(f"{what} must be a list of steps")
    return tuple(from_dict(i) for i in items)


def run_all(steps: tuple[Step, ...], ctx: Context) -> Iterator[Outcome]:
    """Each step in order; the first that fails raises StepError (the caller fails closed)."""
    for step in steps:
        try:
            yield step.run(ctx)
        except StepError:
            raise
        except OSError as e:
            raise StepError(f"{step.op}: {e.strerror or e}") from None


def _show(value: int) -> str:
    return "max" if value == UNLIMITED else str(value)


__all__ = ["STAND_INS", "STEPS", "Context", "Freeze", "FreezeWorkload", "Kill",
           "KillWorkload", "LinkDown", "LoopbackDown", "LowerCfsQuota", "LowerCpuMax",
           "LowerLimit", "NarrowCpus", "Outcome", "RemountReadOnly", "Step",
           "StepError", "System", "from_dict", "run_all", "steps_from", "zone_lock"]
