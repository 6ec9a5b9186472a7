"""An in-memory zone driver for fast tests of manager and timeline logic (no kernel)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hvtsm.errors import ZoneError
from hvtsm.monitor.deputy import DeputyReport
from hvtsm.restrictions import Restrictions
from hvtsm.zones.base import (
    ApplyReport,
    Backend,
    DeputyOrders,
    DriverEvents,
    InForce,
    StartFacts,
    WorkloadIO,
    ZoneHandle,
    ZoneSpec,
    ZoneStats,
)


@dataclass
class FakeState:
    net_index: int = 0
    frozen: bool = False
    user: str | None = None
    parent: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"net_index": self.net_index, "frozen": self.frozen, "user": self.user,
                "parent": self.parent}

    def facts(self) -> StartFacts:
        return StartFacts()


class FakeWorkload:
    start_note: str | None = None

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.status: int | None = None
        self.done = threading.Event()
        self.stdout = None
        self.stderr = None

    @property
    def pid(self) -> int:
        return self._pid

    def exit(self, status: int) -> None:
        if not self.done.is_set():
            self.status = status
            self.done.set()

    def poll(self) -> int | None:
        return self.status

    def wait(self, timeout: float | None = None) -> int | None:
        self.done.wait(timeout)
        return self.status


class FakeDriver:
    """Made by the lifecycle: `Manager(store, FakeDriver)` (or `driver.bound`)."""

    backend = Backend.CGROUP

    def __init__(self, events: DriverEvents | None = None) -> None:
        self.events = events
        self.applied: list[tuple[str, float, Restrictions]] = []
        self.workloads: dict[str, FakeWorkload] = {}
        self.live: set[str] = set()
        self.fail_apply: str | None = None
        self.fail_start = False
        #: what each apply reports as already in force (a zone ahead of its store)
        self.already: tuple[InForce, ...] = ()
        #: each zone's schedules as its deputy got them, in order
        self.delegated: dict[str, list[DeputyOrders]] = {}
        self.delegation = threading.Condition()
        #: what a zone's deputy reports when its zone is adopted
        self.reports: dict[str, DeputyReport] = {}

    def wait_delegated(self, zone_id: str, done: Callable[[DeputyOrders], bool],
                       timeout: float = 5.0) -> DeputyOrders:
        """The zone's latest orders once `done` holds for them (AssertionError on timeout)."""
        with self.delegation:
            ok = self.delegation.wait_for(
                lambda: bool(self.delegated.get(zone_id)) and done(self.delegated[zone_id][-1]),
                timeout)
            assert ok, f"no orders for {zone_id} met the condition: {self.delegated.get(zone_id)}"
            return self.delegated[zone_id][-1]

    def bound(self, events: DriverEvents) -> FakeDriver:
        """This fake as a driver factory: `Manager(store, driver.bound)` keeps the test's
        own instance (configured before the manager exists)."""
        self.events = events
        return self

    def create(self, spec: ZoneSpec, initial: Restrictions) -> ZoneHandle[Any]:
        self.live.add(spec.zone_id)
        return ZoneHandle(spec.zone_id, self.backend, FakeState(spec.net_index, user=spec.user),
                          initial)

    def start(self, handle: ZoneHandle[Any], argv: Sequence[str], io: WorkloadIO) -> FakeWorkload:
        if self.fail_start:
            raise ZoneError(f"cannot execute {argv[0]}", zone_id=handle.zone_id)
        workload = FakeWorkload(10_000 + len(self.workloads))
        self.workloads[handle.zone_id] = workload
        return workload

    def apply(self, handle: ZoneHandle[Any], restrictions: Restrictions) -> ApplyReport:
        if self.fail_apply and self.fail_apply in restrictions.describe():
            raise ZoneError(f"cannot apply {self.fail_apply}", zone_id=handle.zone_id)
        changed = restrictions.changes_from(handle.applied)
        handle.applied = restrictions
        self.applied.append((handle.zone_id, time.time(), restrictions))
        return ApplyReport(changed, already=self.already)

    def freeze(self, handle: ZoneHandle[Any]) -> None:
        handle.state.frozen = True

    def thaw(self, handle: ZoneHandle[Any]) -> None:
        handle.state.frozen = False

    def terminate(self, handle: ZoneHandle[Any]) -> None:
        self.live.discard(handle.zone_id)
        if handle.zone_id in self.workloads:
            self.workloads[handle.zone_id].exit(-9)

    def stats(self, handle: ZoneHandle[Any]) -> ZoneStats:
        return ZoneStats(procs=1, memory_bytes=0, cpu_usage_ns=0, frozen=False)

    def adopt(self, zone_id: str, state: Mapping[str, Any], applied: Restrictions) -> tuple[
        ZoneHandle[Any], FakeWorkload | None
    ]:
        handle = ZoneHandle(zone_id, self.backend, FakeState(**state), applied)
        workload = self.workloads.get(zone_id)
        if workload is None or workload.done.is_set():
            return handle, None
        return handle, workload

    def leftovers(self) -> set[str]:
        return set(self.live)

    def resources(self, zone_id: str) -> list[str]:
        return [f"fake {zone_id}"] if zone_id in self.live else []

    def remove(self, zone_id: str) -> list[str]:
        self.live.discard(zone_id)
        return [f"fake {zone_id}"]

    def channel_link(self, zone_id: str) -> None:
        return None

    def deputy(self, handle: ZoneHandle[Any]) -> FakeDeputy:
        return FakeDeputy(self, handle)

    def close(self) -> None:
        pass


class FakeDeputy:
    def __init__(self, driver: FakeDriver, handle: ZoneHandle[Any]) -> None:
        self.driver = driver
        self.handle = handle

    def delegate(self, orders: DeputyOrders) -> None:
        with self.driver.delegation:
            self.driver.delegated.setdefault(self.handle.zone_id, []).append(orders)
            self.driver.delegation.notify_all()
        if orders.thaw:
            self.handle.state.frozen = False

    def report(self, timeout: float) -> DeputyReport | None:
        return self.driver.reports.get(self.handle.zone_id)
