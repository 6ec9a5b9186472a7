"""Workloads of guest zones, as the manager waits on them."""

from __future__ import annotations

import threading
import time
from typing import Any

#: status reported when the guest itself went away under the workload (like SIGKILL)
KILLED = -9


class GuestWorkload:
    """The agent's workload, which also ends when its whole domain stops or crashes."""

    def __init__(self, remote: Any, domain_gone: threading.Event) -> None:
        self.remote = remote
        self.domain_gone = domain_gone
        #: how it started, for the zone's audit trail (a standby used or passed over)
        self.start_note: str | None = None

    @property
    def pid(self) -> int:
        return int(self.remote.pid)

    @property
    def stdout(self) -> Any:
        return self.remote.stdout

    @property
    def stderr(self) -> Any:
        return self.remote.stderr

    def poll(self) -> int | None:
        status: int | None = self.remote.poll()
        if status is None and self.domain_gone.is_set():
            return KILLED
        return status

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.remote.wait(0.2)
            if status is not None:
                return int(status)
            if self.domain_gone.is_set():
                # the agent's exit message may still be on its way: give it a moment
                status = self.remote.wait(0.5)
                return KILLED if status is None else int(status)
            if deadline is not None and time.monotonic() >= deadline:
                return None


class DomainWorkload:
    """An adopted guest zone: its stream went with the dead controller, so it lives as
    long as its domain does."""

    start_note: str | None = None

    def __init__(self, domain_gone: threading.Event) -> None:
        self.domain_gone = domain_gone
        self.stdout = None
        self.stderr = None

    @property
    def pid(self) -> int:
        return 0

    def poll(self) -> int | None:
        return 0 if self.domain_gone.is_set() else None

    def wait(self, timeout: float | None = None) -> int | None:
        return 0 if self.domain_gone.wait(timeout) else None
