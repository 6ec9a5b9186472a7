"""The agent's ``deputy`` and ``deputy_ack`` requests, and the deputy's thread
(deputy.py says what the deputy does).

In a guest the deputy freezes or kills "the workload": every process of the workload's
user (a guest serves one zone at a time, and its scrub clears that user between zones)
and every descendant of the workload's first process; beside a cgroup zone its steps name
the zone's cgroup instead.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Optional

from guest_agent import admin
from guest_agent.deputy import Deputy, ScheduleError
from guest_agent.deputy_steps import Context, System
from guest_agent.procfs import pids, ppid_of
from guest_agent.protocol import EVENT_DEPUTY, Message

log = logging.getLogger("guest_agent")

#: (workload id -> the pid of its first process, None when it runs no more)
RootPid = Callable[[str], Optional[int]]
Send = Callable[[Message], None]


def workload_processes(root: int | None, proc: str = "/proc") -> list[int]:
    """The processes of a guest workload whose first process is `root`: its descendants,
    and every process of its user unless that is root (a process that left the tree by a
    double fork still runs as the user). Never the agent itself."""
    if root is None:
        return []
    everyone = pids()
    me = os.getpid()
    tree = {root}
    grew = True
    while grew:  # parents listed after their children are found on the next pass
        grew = False
        for pid in everyone:
            if pid not in tree and ppid_of(pid) in tree:
                tree.add(pid)
                grew = True
    uid = admin.real_uid(proc, root)
    if uid not in (None, 0):
        tree.update(admin.processes_of(uid, proc))
    tree.discard(me)
    return sorted(p for p in tree if p > 1)


class DeputyRequests:
    def __init__(self, send: Send, connected: Callable[[], bool], root_pid: RootPid,
                 system: System | None = None) -> None:
        self._send = send
        self.deputy = Deputy(
            Context(system or System(), lambda wid: workload_processes(root_pid(wid))),
            self._emit, connected)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.deputy.run, name="deputy", daemon=True)
        self._thread.start()

    def on_deputy(self, msg: Message) -> None:
        try:
            self.deputy.schedule(msg)
        except ScheduleError as e:
            self._send({"type": "error", "id": msg["id"], "kind": "invalid",
                        "message": f"schedule of {msg['id']} refused: {e}"})

    def on_ack(self, msg: Message) -> None:
        self.deputy.ack(msg["id"], msg["seq"], thaw=bool(msg.get("thaw")))

    def report(self) -> dict[str, Any]:
        return self.deputy.report()

    def _emit(self, record: dict[str, Any]) -> None:
        self._send({"type": "event", "kind": EVENT_DEPUTY, "id": record["zone"],
                    "data": record})

    def close(self) -> None:
        self.deputy.close()
        if self._thread is not None:
            self._thread.join(2)


__all__ = ["DeputyRequests", "workload_processes"]
