"""A workload the agent runs in the guest, as the host sees it.

`RemoteWorkload` satisfies `hvtsm.zones.base.Workload` for its callers; the link's reader
feeds it through its public `started`/`output`/`exited`/... methods, and it needs three
things of its link in return (`WorkloadHost`): the zone's name for its threads, a way to
signal it, and a way to report that its output is being dropped.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from typing import IO, Any, Protocol

from hvtsm.monitor.link.limits import ERRORS_KEPT
from hvtsm.monitor.link.sink import OutputSink, sink_for


class WorkloadHost(Protocol):
    """What a RemoteWorkload needs of the link it runs over."""

    @property
    def zone_id(self) -> str | None: ...

    def signal(self, workload_id: str, sig: int) -> None: ...

    def report_problem(self, kind: str, detail: str) -> None: ...


class RemoteWorkload:
    """A workload the agent runs in the guest; satisfies `hvtsm.zones.base.Workload`.

    `pid` is the guest's pid. `stdout`/`stderr` are readable binary files when the start
    asked for PIPE (they reach EOF after the exit), else None.
    """

    def __init__(self, host: WorkloadHost, workload_id: str, argv: Sequence[str], *,
                 stdout: int | None, stderr: int | None, pid: int = 0,
                 confirmed: bool = False, own: bool = False) -> None:
        self._host = host
        self.id = workload_id
        self.argv = tuple(argv)
        self._sinks: dict[str, OutputSink | None] = {}
        self._files: dict[str, IO[bytes] | None] = {}
        for stream, target in (("stdout", stdout), ("stderr", stderr)):
            if stream == "stderr" and target == subprocess.STDOUT:
                self._sinks[stream], self._files[stream] = self._sinks["stdout"], None
                continue
            self._sinks[stream], self._files[stream] = sink_for(
                target, f"{host.zone_id or 'guest'}-{workload_id}-{stream}", own=own)
        self._pid = pid
        self._status: int | None = None
        self._exited = threading.Event()
        #: time.monotonic() of the agent's `started`
        self.started_at: float | None = None
        #: the agent's word on the standby the start named (guest_agent.protocol `started`)
        self.standby: dict[str, Any] | None = None
        #: what the agent said went wrong with this workload, last first
        self.errors: list[str] = []
        #: the link went away while the workload ran: its exit status is unknown
        self.link_lost = False
        #: its exit message was discarded in a flood: the status (MAX_STATUS) is made up
        self.exit_lost = False
        self._confirmed = confirmed
        self._overflow_reported = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stdout(self) -> IO[bytes] | None:
        return self._files["stdout"]

    @property
    def stderr(self) -> IO[bytes] | None:
        return self._files["stderr"]

    @property
    def output_dropped(self) -> int:
        sinks = {id(s): s for s in self._sinks.values() if s is not None}
        return sum(s.dropped for s in sinks.values())

    @property
    def confirmed(self) -> bool:
        """The agent said it runs (started, or listed in a hello when attached)."""
        return self._confirmed

    def poll(self) -> int | None:
        return self._status

    def wait(self, timeout: float | None = None) -> int | None:
        self._exited.wait(timeout)
        return self._status

    def send_signal(self, sig: int) -> None:
        self._host.signal(self.id, sig)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)

    def assume_exit(self, status: int) -> None:
        """Record an exit the agent can no longer report (its guest is gone)."""
        if self._status is None:
            self.exited(status)

    # -- fed by the link's reader thread ---------------------------------------------------

    def started(self, pid: int, standby: dict[str, Any] | None = None,
                now: float | None = None) -> None:
        self._pid = pid
        self._confirmed = True
        self.started_at = time.monotonic() if now is None else now
        if standby is not None:
            self.standby = standby

    def output(self, stream: str, data: str) -> None:
        """Output after the exit is ignored: the first exit closed the pipes."""
        sink = self._sinks.get(stream)
        if sink is None or self._status is not None:
            return
        if not sink.write(data.encode("utf-8", errors="replace")) \
                and not self._overflow_reported:
            self._overflow_reported = True
            self._host.report_problem(
                "output_dropped", f"workload {self.id} {stream}: more than {sink.limit} bytes "
                                  "waited for a reader; output is being dropped")

    def agent_error(self, text: str) -> None:
        self.errors.insert(0, text)
        del self.errors[ERRORS_KEPT:]

    def exited(self, status: int) -> None:
        self._status = status
        for sink in self._sinks.values():
            if sink is not None:
                sink.finish()
        self._exited.set()

    def exit_discarded(self, status: int) -> None:
        """Its exit was among lines discarded in a flood: `status` is made up."""
        self.exit_lost = True
        self.agent_error("its exit was discarded in a flood: the status is unknown")
        self.exited(status)

    def link_ended(self) -> None:
        """The link is gone: the exit will never be known here (the pipes reach EOF)."""
        if self._status is None:
            self.link_lost = True
            for sink in self._sinks.values():
                if sink is not None:
                    sink.finish()
