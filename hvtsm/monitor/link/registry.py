"""The link's table of workloads: those it started or attached, and the exits of workloads
nobody claimed yet (a previous controller's, kept for `attach`, at most `keep`)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Collection

from hvtsm.monitor.link.workload import RemoteWorkload


class Workloads:
    """Thread-safe: the reader records exits while callers start and attach."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._works: dict[str, RemoteWorkload] = {}
        self._unclaimed: collections.OrderedDict[str, int] = collections.OrderedDict()

    def get(self, workload_id: str) -> RemoteWorkload | None:
        with self._lock:
            return self._works.get(workload_id)

    def in_use(self, workload_id: str) -> bool:
        with self._lock:
            return workload_id in self._works

    def add(self, work: RemoteWorkload) -> None:
        with self._lock:
            self._works[work.id] = work

    def remove(self, work: RemoteWorkload) -> None:
        """Forget `work` (only it: another workload may have taken its id since)."""
        with self._lock:
            if self._works.get(work.id) is work:
                del self._works[work.id]

    def claim(self, workload_id: str, known: bool,
              make: Callable[[bool], RemoteWorkload]) -> tuple[RemoteWorkload, int | None]:
        """The workload of `workload_id`, made with `make(running)` unless one is here
        already, and its exit status if the exit came before anyone claimed it. KeyError
        when there is nothing to claim: no exit kept and not `known` to run."""
        with self._lock:
            work = self._works.get(workload_id)
            if work is not None:
                return work, None
            status = self._unclaimed.pop(workload_id, None)
            if status is None and not known:
                raise KeyError(workload_id)
            work = self._works[workload_id] = make(status is None)
        return work, status

    def exit_of(self, workload_id: str, status: int) -> RemoteWorkload | None:
        """The workload an exit is for; an exit nobody claimed is kept (the newest `keep`)."""
        with self._lock:
            work = self._works.get(workload_id)
            if work is None:
                self._unclaimed[workload_id] = status
                while len(self._unclaimed) > self.keep:
                    self._unclaimed.popitem(last=False)
            return work

    def running_unlisted(self, listed: Collection[str]) -> list[RemoteWorkload]:
        """Workloads the agent confirmed, not finished here, that `listed` lacks."""
        with self._lock:
            return [w for w in self._works.values()
                    if w.confirmed and w.poll() is None and w.id not in listed]

    def all(self) -> list[RemoteWorkload]:
        with self._lock:
            return list(self._works.values())

    def link_ended(self, reason: str | None = None) -> None:
        """Every workload loses its link (a LinkState close hook)."""
        for work in self.all():
            work.link_ended()

    @property
    def unclaimed(self) -> int:
        """Exits kept for workloads nobody claimed yet."""
        with self._lock:
            return len(self._unclaimed)
