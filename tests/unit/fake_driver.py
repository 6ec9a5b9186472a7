"""An in-memory zone driver for fast tests of manager and timeline logic (no kernel)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from hvtsm.errors import ZoneError
from hvtsm.restrictions import Restrictions
from hvtsm.zones.base import (
    ApplyReport,
    Backend,
    WorkloadIO,
    ZoneHandle,
    ZoneSpec,
    ZoneStats,
)


class FakeWorkload:
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
    backend = Backend.CGROUP

    def __init__(self) -> None:
        self.applied: list[tuple[str, float, Restrictions]] = []
        self.workloads: dict[str, FakeWorkload] = {}
        self.live: set[str] = set()
        self.fail_apply: str | None = None
        self.fail_start = False

    def create(self, spec: ZoneSpec, initial: Restrictions) -> ZoneHandle:
        self.live.add(spec.zone_id)
        return ZoneHandle(spec.zone_id, self.backend, {"net_index": spec.net_index}, initial)

    def start(self, handle: ZoneHandle, argv: Sequence[str], io: WorkloadIO) -> FakeWorkload:
        if self.fail_start:
            raise ZoneError(f"cannot execute {argv[0]}", zone_id=handle.zone_id)
        workload = FakeWorkload(10_000 + len(self.workloads))
        self.workloads[handle.zone_id] = workload
        return workload

    def apply(self, handle: ZoneHandle, restrictions: Restrictions) -> ApplyReport:
        if self.fail_apply and self.fail_apply in restrictions.describe():
            raise ZoneError(f"cannot apply {self.fail_apply}", zone_id=handle.zone_id)
        changed = restrictions.changes_from(handle.applied)
        handle.applied = restrictions
        self.applied.append((handle.zone_id, time.time(), restrictions))
        return ApplyReport(changed)

    def freeze(self, handle: ZoneHandle) -> None:
        handle.state["frozen"] = True

    def thaw(self, handle: ZoneHandle) -> None:
        handle.state["frozen"] = False

    def terminate(self, handle: ZoneHandle) -> None:
        self.live.discard(handle.zone_id)
        if handle.zone_id in self.workloads:
            self.workloads[handle.zone_id].exit(-9)

    def stats(self, handle: ZoneHandle) -> ZoneStats:
        return ZoneStats(procs=1, memory_bytes=0, cpu_usage_ns=0, frozen=False)

    def adopt(self, zone_id: str, state: dict[str, Any], applied: Restrictions) -> tuple[
        ZoneHandle, FakeWorkload | None
    ]:
        handle = ZoneHandle(zone_id, self.backend, state, applied)
        workload = self.workloads.get(zone_id)
        if workload is None or workload.done.is_set():
            return handle, None
        return handle, workload

    def leftovers(self) -> set[str]:
        return set(self.live)

    def remove(self, zone_id: str) -> list[str]:
        self.live.discard(zone_id)
        return [f"fake {zone_id}"]
