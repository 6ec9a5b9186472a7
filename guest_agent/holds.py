"""Transient zones, agent side: calls held while the host decides where an unforeseen code
path goes, and the zones split from a watch.

A held call (`hold`) stays blocked in the kernel while a ``code-path`` event goes to the
host; the poll loop goes on answering everything else. The host's ``transient`` message
(op split or deny) releases it: split moves the process into the zone's cgroup first when
the agent manages it (a guest: tcgroup.py; beside a cgroup zone the host placed it
already) and lets the call proceed; deny fails it with EPERM. A call nobody answered
within the profile's hold_timeout fails with EPERM and a ``transient-timeout`` anomaly
follows (`expire`): an unforeseen path never runs unplaced. The other ops (update, kill,
freeze, thaw, stats) act on a zone's cgroup; every message is answered by a ``transient``
event, and a zone the agent manages ends (op ``ended``) once its cgroup is empty.

Everything here runs on the monitor's poll loop, which owns the held calls.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

from guest_agent import seccomp, tcgroup
from guest_agent.judge import Verdict, anomaly
from guest_agent.procfs import ppid_of, program_of
from guest_agent.protocol import EVENT_CODE_PATH, EVENT_TRANSIENT
from guest_agent.reports import Reporter
from guest_agent.watch import Hold, Transient, Watch


class Holds:
    def __init__(self, reporter: Reporter, watches: Callable[[], list[Watch]],
                 find: Callable[[Any], Watch | None]) -> None:
        self.reporter = reporter
        #: the running watches, and the running watch of an id (None: no such watch)
        self._watches = watches
        self._find = find
        self._next = 1

    def hold(self, watch: Watch, n: seccomp.Notification, verdict: Verdict,
             act_time: float, act_mono: float) -> Hold:
        """Keep the caller blocked and ask the host where its subtree goes."""
        profile = watch.profile.transient
        timeout = profile.hold_timeout if profile is not None else 0.0
        args = verdict.args
        trigger = verdict.trigger or "exec"
        program = args.get("path") if trigger == "exec" else program_of(n.pid)
        held = Hold(self._next, n.id, n.pid, trigger, str(program or ""), verdict.syscall,
                    args, act_time, act_mono, act_mono + timeout)
        self._next += 1
        watch.holds[held.id] = held
        data: dict[str, Any] = {"hold": held.id, "pid": n.pid, "ppid": ppid_of(n.pid),
                                "trigger": trigger, "program": held.program}
        if trigger == "exec":
            data["argv"] = args.get("argv", [])
        else:
            data.update(family=args.get("family"), address=args.get("address"),
                        port=args.get("port"))
        if not self.reporter.raw(EVENT_CODE_PATH, watch.id, data):
            # the host will never hear of it: refuse now rather than wait for nothing
            watch.dropped += 1
            held.deadline = act_mono
        return held

    def timeout_ms(self) -> int:
        """ms until the nearest held call's deadline, at most a second."""
        deadlines = [h.deadline for w in self._watches() for h in w.holds.values()]
        if not deadlines:
            return 1000
        return max(0, min(1000, int((min(deadlines) - time.monotonic()) * 1000) + 1))

    def expire(self) -> None:
        now = time.monotonic()
        for watch in self._watches():
            for held in [h for h in watch.holds.values() if h.deadline <= now]:
                del watch.holds[held.id]
                watch.answer(held.notif_id, allow=False)
                waited = now - held.act_mono
                what = f"exec of {held.program}" if held.trigger == "exec" else \
                    f"connect of pid {held.pid}"
                verdict = anomaly("transient-timeout",
                                  f"the host did not place the {what} in a transient zone "
                                  f"within {waited:.1f} s: the call was refused",
                                  held.syscall, held.args)
                self.reporter.anomaly(watch, verdict, held.pid, program_of(held.pid),
                                      "denied", held.act_time, held.act_mono,
                                      time.monotonic())

    def on_message(self, msg: dict[str, Any]) -> None:
        """A host ``transient`` message, answered by a ``transient`` event."""
        op, wid, zone = msg.get("op"), msg.get("id"), msg.get("zone")
        reply: dict[str, Any] = {"op": op, "zone": zone, "hold": msg.get("hold"), "ok": True}
        watch = self._find(wid) if isinstance(wid, str) else None
        try:
            if watch is None:
                raise tcgroup.CgroupError(f"no watched workload {wid}")
            if op in ("split", "deny"):
                self._release(watch, msg, reply)
            else:
                self._zone_op(watch, op, zone, msg, reply)
        except (tcgroup.CgroupError, OSError) as e:
            reply.update(ok=False, error=str(e))
        if watch is not None:
            self.reporter.send(EVENT_TRANSIENT, watch, reply)
        elif isinstance(wid, str):
            self.reporter.raw(EVENT_TRANSIENT, wid, reply)

    def _release(self, watch: Watch, msg: dict[str, Any], reply: dict[str, Any]) -> None:
        held = watch.holds.pop(msg.get("hold"), None)  # type: ignore[arg-type]
        if held is None:
            raise tcgroup.CgroupError(f"no held call {msg.get('hold')} (it timed out, or its "
                                      "process ended)")
        reply.update(pid=held.pid, held_ms=round((time.monotonic() - held.act_mono) * 1000, 3))
        zone = msg.get("zone")
        if msg["op"] == "deny" or not isinstance(zone, str):
            watch.answer(held.notif_id, allow=False)
            if msg["op"] != "deny":
                raise tcgroup.CgroupError("split without a zone: the call was refused")
            return
        path = None
        try:
            if msg.get("cgroup"):
                path = tcgroup.create(str(msg["cgroup"]), msg.get("limits") or {})
                tcgroup.move(path, held.pid)
        except (tcgroup.CgroupError, OSError):
            # fail closed: a subtree that could not be placed does not run
            watch.answer(held.notif_id, allow=False)
            if path is not None:
                with contextlib.suppress(tcgroup.CgroupError, OSError):
                    tcgroup.kill(path)
            raise
        watch.transients[zone] = Transient(path, str(msg.get("network") or "full"))
        watch.answer(held.notif_id, allow=True)
        if path is not None:
            reply["cgroup"] = path

    def _zone_op(self, watch: Watch, op: Any, zone: Any, msg: dict[str, Any],
                 reply: dict[str, Any]) -> None:
        transient = watch.transients.get(zone) if isinstance(zone, str) else None
        if transient is None:
            raise tcgroup.CgroupError(f"no transient zone {zone} in {watch.id}")
        path = transient.cgroup
        if op == "update":
            if msg.get("network"):
                transient.network = str(msg["network"])
            if path is not None:
                reply["set"] = tcgroup.set_limits(path, msg.get("limits") or {})
        elif path is None:
            raise tcgroup.CgroupError(f"the agent does not manage transient zone {zone}'s "
                                      "cgroup (the host does)")
        elif op == "kill":
            reply["procs"] = tcgroup.kill(path)
            del watch.transients[zone]
        elif op in ("freeze", "thaw"):
            tcgroup.freeze(path, op == "freeze")
        elif op == "stats":
            reply.update(tcgroup.stats(path))

    def check_ended(self, watch: Watch) -> None:
        """Guest: a transient cgroup whose processes are all gone ends its zone."""
        for zone, transient in list(watch.transients.items()):
            if transient.cgroup is None:
                continue
            populated = tcgroup.populated(transient.cgroup)
            if populated:
                continue
            watch.transients.pop(zone, None)
            if populated is False:
                with contextlib.suppress(tcgroup.CgroupError, OSError):
                    tcgroup.kill(transient.cgroup)
                self.reporter.send(EVENT_TRANSIENT, watch,
                                   {"op": "ended", "zone": zone, "ok": True})


__all__ = ["Holds"]
