"""The agent's ``start`` and ``signal`` requests, and the workloads they made.

A ``start`` with ``monitor`` runs the workload under watch: the profile is validated first
(a bad one is an error reply, nothing starts), seccomp user notification must be
available (else the start is refused: fail closed), and the child installs the filter
after the user switch, just before its exec, handing the listener to the monitor
(seccomp.py). A ``start`` naming a standby is offered to it first (standbys.py); one
without, but monitored, ends a waiting standby (its marks would otherwise answer opens
beside the new workload's). A workload stays listed (in hellos) until its ``exit`` is
written, so a host that connects meanwhile still hears of it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from guest_agent.monitor import Monitor
from guest_agent.outbox import NORMAL, Outbox
from guest_agent.profile import ProfileError
from guest_agent.protocol import Message
from guest_agent.standbys import Send, Standbys, error_message, watch_preexec
from guest_agent.workload import StartError, Workload, spawn

log = logging.getLogger("guest_agent")

#: the env a workload with a channel gets (ChannelRequests.env_for)
ChannelEnv = Callable[[str, Optional[dict[str, str]]], dict[str, str]]


class Starts:
    def __init__(self, monitor: Monitor, outbox: Outbox, stop: threading.Event, send: Send,
                 channel_env: ChannelEnv, standbys: Standbys) -> None:
        self.monitor = monitor
        self.outbox = outbox
        self.stop = stop
        self._send = send
        self._channel_env = channel_env
        self.standbys = standbys
        self._lock = threading.Lock()
        self._workloads: dict[str, Workload] = {}

    def busy(self, wid: str) -> bool:
        with self._lock:
            return wid in self._workloads

    def root_pid(self, wid: str) -> int | None:
        """The first process of workload `wid`, while it runs (the deputy's)."""
        with self._lock:
            work = self._workloads.get(wid)
        return work.pid if work is not None and work.status is None else None

    def running(self) -> list[dict[str, Any]]:
        """{id, pid} of the workloads whose exit is not written yet."""
        with self._lock:
            return [{"id": w.id, "pid": w.pid} for w in self._workloads.values()]

    def on_start(self, msg: Message) -> None:
        wid = msg["id"]
        if self.busy(wid):
            self._send(error_message(wid, f"workload id {wid} is already in use"))
            return
        env = msg.get("env")
        if msg.get("channel") is not None:
            try:
                env = self._channel_env(msg["channel"], env)
            except OSError as e:
                self._send(error_message(wid, f"workload {wid} not started: no channel "
                                              f"endpoint: {e}"))
                return
        note: Message | None = None
        if msg.get("standby") is None and msg.get("monitor") is not None:
            self.standbys.discard_idle()
        if msg.get("standby") is not None:
            try:
                popen, note = self.standbys.use(wid, msg, env)
            except (ProfileError, StartError) as e:
                self._send(error_message(wid, f"workload {wid} not started: {e}"))
                return
            if popen is not None:
                self.begin(wid, popen, msg, note)
                return
        preexec = None
        if msg.get("monitor") is not None:
            try:
                preexec = watch_preexec(self.monitor, wid, msg["monitor"])
            except (ProfileError, StartError) as e:
                self._send(error_message(wid, f"workload {wid} not started: {e}"))
                return
        try:
            popen = spawn(msg["argv"], env, msg.get("cwd"), msg.get("user"),
                          stdout=msg.get("stdout", "stream"), stderr=msg.get("stderr", "stream"),
                          preexec_fn=preexec)
        except StartError as e:
            self._send(error_message(wid, str(e)))
            return
        self.begin(wid, popen, msg, note)

    def begin(self, wid: str, popen: Any, msg: Message, note: Message | None) -> None:
        work = Workload(wid, popen, lambda m: self.outbox.put(m, NORMAL),
                        lambda m, size: self.outbox.put_output(m, size, self.stop),
                        self._ended)
        with self._lock:
            self._workloads[wid] = work
        started: Message = {"type": "started", "id": wid, "pid": popen.pid}
        if note is not None:
            started["standby"] = note
        self._send(started)
        log.info("started %s (pid %d%s): %s", wid, popen.pid,
                 ", from standby" if note and note.get("used") else "",
                 " ".join(msg["argv"])[:200])
        work.begin()

    def _ended(self, work: Workload, queued: bool) -> None:
        """The workload ended and its exit is queued (it stays listed in hellos until the
        exit is written: a host that connects now will still hear of it)."""
        log.info("workload %s exited with %s", work.id, work.status)
        if not queued:
            self.forget(work.id)

    def forget(self, wid: str) -> None:
        """The exit of `wid` is written: it is no longer listed."""
        with self._lock:
            work = self._workloads.get(wid)
            if work is not None and work.status is not None:
                del self._workloads[wid]

    def on_signal(self, msg: Message) -> None:
        with self._lock:
            work = self._workloads.get(msg["id"])
        if work is None:
            self._send(error_message(msg["id"], "no running workload {}".format(msg["id"])))
            return
        try:
            work.signal(msg["signal"])
        except OSError as e:
            self._send(error_message(msg["id"], "cannot signal workload {}: {}".format(
                msg["id"], e)))

    def kill_all(self) -> None:
        with self._lock:
            running = list(self._workloads.values())
        for work in running:
            work.kill()


__all__ = ["Starts"]
