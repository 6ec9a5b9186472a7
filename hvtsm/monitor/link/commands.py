"""What the host asks of the agent: starts, standbys, probes and pings (requests that wait
for their answer, bounded), and the messages that need none (signals, profiles, transient
zones, channel deliveries and verdicts). `AgentLink` documents each; every failure is a
`ZoneError` naming the zone and, when an answer did not come, what the link saw instead.

It is also what a `RemoteWorkload` reaches its link through (`workload.WorkloadHost`).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from guest_agent.protocol import Message, channel_pieces
from hvtsm.errors import ZoneError
from hvtsm.monitor.link.checks import clip, plain
from hvtsm.monitor.link.limits import PROBE_GRACE, TIMED_PROBES
from hvtsm.monitor.link.pending import Pending, PendingTable, Refused
from hvtsm.monitor.link.problems import ProblemLog
from hvtsm.monitor.link.registry import Workloads
from hvtsm.monitor.link.sink import check_target
from hvtsm.monitor.link.state import LinkState
from hvtsm.monitor.link.transport import Transport
from hvtsm.monitor.link.workload import RemoteWorkload


class Commands:
    """Thread-safe: any thread may ask while the reader answers."""

    def __init__(self, *, state: LinkState, transport: Transport, pending: PendingTable,
                 workloads: Workloads, problems: ProblemLog) -> None:
        self._state = state
        self._transport = transport
        self._pending = pending
        self._workloads = workloads
        self._problems = problems

    # -- what a RemoteWorkload needs (WorkloadHost) ----------------------------------------

    @property
    def zone_id(self) -> str | None:
        return self._state.zone_id

    def report_problem(self, kind: str, detail: str) -> None:
        self._problems.problem(kind, detail)

    # -- requests and their answers --------------------------------------------------------

    def _request(self, key: str, expect: str) -> Pending:
        try:
            return self._pending.add(key, expect)
        except Refused as e:
            if self._state.closed:
                raise self._state.closed_error() from None
            raise self._state.error(str(e)) from None

    def ask(self, msg: Message, expect: str, timeout: float, *, late: str,
            failed: str) -> Message:
        """Send `msg` (its id is the request's key) and return the agent's `expect` reply.
        ZoneError "`late`; what was seen" without one in `timeout` s, "`failed`: why" when
        the agent answered with an error."""
        key = str(msg["id"])
        pending = self._request(key, expect)
        try:
            self._transport.send(msg, timeout)
            if not pending.done.wait(timeout):
                raise self._state.error(f"{late}; {self._state.seen()}")
        finally:
            self._pending.forget(key)
        if pending.error is not None:
            raise self._state.error(f"{failed}: {pending.error}")
        assert pending.reply is not None
        return pending.reply

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None,
              cwd: str | None, user: str | int | None, timeout: float,
              stdout: int | None, stderr: int | None, workload_id: str | None,
              monitor: Mapping[str, Any] | None, channel: str | None,
              standby: str | None, owned: bool = False) -> RemoteWorkload:
        error = self._state.error
        if not argv:
            raise error("nothing to start: empty command")
        wid = workload_id or self._state.new_id("w")
        if self._workloads.in_use(wid):
            raise error(f"workload id {wid} is already in use on this link")
        check_target(stdout)
        check_target(stderr, stderr=True)
        msg: Message = {"type": "start", "id": wid, "argv": list(argv)}
        for name, value in (("env", None if env is None else dict(env)), ("cwd", cwd),
                            ("user", user), ("monitor", None if monitor is None
                                             else plain(monitor)),
                            ("channel", channel), ("standby", standby)):
            if value is not None:
                msg[name] = value
        # what nobody reads is not sent: the agent discards (or joins) it at the source
        if stdout is None or stdout == subprocess.DEVNULL:
            msg["stdout"] = "discard"
        if stderr == subprocess.STDOUT:
            msg["stderr"] = "stdout"
        elif stderr is None or stderr == subprocess.DEVNULL:
            msg["stderr"] = "discard"
        pending = self._request(wid, "started")
        work = RemoteWorkload(self, wid, argv, stdout=stdout, stderr=stderr, own=owned)
        self._workloads.add(work)
        try:
            self._transport.send(msg, timeout)
        except ZoneError:
            self._abandon(work, kill=False)
            raise
        if not pending.done.wait(timeout):
            self._abandon(work, kill=True)
            raise error(f"the guest agent did not confirm the start of {argv[0]} within "
                        f"{timeout:g} s; {self._state.seen()}",
                        hint="the guest may be overloaded (TCG?) or frozen")
        self._pending.forget(wid)
        if pending.error is not None:
            # an error message means it did not start; any other failed answer may hide a
            # started workload, which must not run unseen
            self._abandon(work, kill=pending.reply is None)
            raise error(f"cannot start {argv[0]} in the guest: {pending.error}")
        return work

    def _abandon(self, work: RemoteWorkload, *, kill: bool) -> None:
        """Forget a workload whose start failed or was not confirmed in time."""
        self._pending.forget(work.id)
        self._workloads.remove(work)
        work.link_ended()
        if kill and not self._state.closed:  # it may start after all: never let it run unseen
            with contextlib.suppress(ZoneError):
                self._transport.send({"type": "signal", "id": work.id, "signal": 9}, 1.0)

    def prepare_standby(self, standby_id: str, *, mode: str, monitor: Mapping[str, Any],
                        user: str | int | None, python: str | None, program: str | None,
                        timeout: float) -> dict[str, Any]:
        msg: Message = {"type": "standby", "id": standby_id, "mode": mode,
                        "monitor": plain(monitor)}
        for name, value in (("user", user), ("python", python), ("program", program)):
            if value is not None:
                msg[name] = value
        reply = self.ask(msg, "standby_ready", timeout,
                         late=f"the standby {standby_id} was not ready within {timeout:g} s",
                         failed="no standby in the guest")
        return {k: reply.get(k) for k in ("id", "pid", "prepared", "mode")}

    def attach(self, workload_id: str, *, stdout: int | None,
               stderr: int | None) -> RemoteWorkload:
        hello = self._state.hello
        pids = dict(hello.workloads) if hello else {}

        def make(running: bool) -> RemoteWorkload:
            return RemoteWorkload(self, workload_id, (), stdout=stdout, stderr=stderr,
                                  pid=pids.get(workload_id, 0), confirmed=running)

        try:
            work, status = self._workloads.claim(workload_id, workload_id in pids, make)
        except KeyError:
            raise self._state.error(f"the guest agent runs no workload {workload_id}") from None
        if status is not None:
            work.exited(status)
        return work

    def probe(self, kind: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        wait = timeout
        if kind in TIMED_PROBES:
            params.setdefault("timeout", timeout)
            with contextlib.suppress(TypeError, ValueError):
                wait = max(timeout, float(params["timeout"]) + PROBE_GRACE)
        pid = self._state.new_id("p")
        reply = self.ask({"type": "probe", "id": pid, "kind": kind, "args": params},
                         "probe_result", wait,
                         late=f"no answer to the {kind} probe within {wait:g} s",
                         failed=f"probe {kind} failed in the guest")
        result: dict[str, Any] = reply["result"]
        return result

    def admin(self, op: str, fields: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        mid = self._state.new_id("a")
        reply = self.ask({"type": "admin", "id": mid, "op": op, **plain(dict(fields))},
                         "admin_result", timeout,
                         late=f"no answer to the {op} request within {timeout:g} s",
                         failed=f"{op} failed in the guest")
        return {k: v for k, v in reply.items() if k not in ("type", "id", "seq", "ok")}

    def ping(self, timeout: float) -> float:
        pid = self._state.new_id("k")
        began = time.monotonic()
        self.ask({"type": "ping", "id": pid}, "heartbeat", timeout,
                 late=f"no answer to a ping within {timeout:g} s", failed="ping failed")
        return time.monotonic() - began

    # -- messages that need no answer ------------------------------------------------------

    def signal(self, workload_id: str, sig: int) -> None:
        work = self._workloads.get(workload_id)
        if work is None:
            raise self._state.error(f"no workload {workload_id} on this link")
        if work.poll() is not None:
            return
        self._transport.send({"type": "signal", "id": workload_id, "signal": int(sig)})

    def update_profile(self, workload_id: str, monitor: Mapping[str, Any]) -> None:
        work = self._workloads.get(workload_id)
        if work is not None and work.poll() is not None:
            return
        self._transport.send({"type": "profile", "id": workload_id,
                              "monitor": plain(monitor)})

    def transient(self, workload_id: str, op: str, fields: Mapping[str, Any]) -> None:
        msg: Message = {"type": "transient", "id": workload_id, "op": op}
        msg.update({k: plain(v) for k, v in fields.items() if v is not None})
        self._transport.send(msg)

    def deputy(self, zone_id: str, schedule: Mapping[str, Any], ack: int | None,
               thaw: bool) -> None:
        if ack is not None or thaw:
            msg: Message = {"type": "deputy_ack", "id": zone_id, "seq": ack or 0}
            if thaw:
                msg["thaw"] = True
            self._transport.send(msg)
        self._transport.send({"type": "deputy", "id": zone_id, **plain(dict(schedule)),
                              "sent": time.time()})

    def channel_deliver(self, delivery_id: str, sender: str, data: bytes,
                        timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for piece in channel_pieces("channel_deliver", delivery_id, "from", sender, data):
            self._transport.send(piece, max(0.1, deadline - time.monotonic()))

    def channel_verdict(self, message_id: str, verdict: str, reason: str,
                        timeout: float) -> None:
        self._transport.send({"type": "channel_verdict", "id": message_id,
                              "verdict": verdict, "reason": clip(reason)}, timeout)
