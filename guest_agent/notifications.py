"""Answering one watch's seccomp notifications, on the monitor's poll loop: receive (only
after POLLIN: the loop never blocks in an ioctl), decode the call (calls.py), gather the
facts its verdict needs, judge it (judge.py), then let it go on, fail it, hold it
(holds.py) or contain it (containment.py).

Every notification received is answered, whatever happens while judging it: an internal
error CONTINUEs the call and counts as a lost event. What was read from the caller's
memory is trusted only if the caller is still blocked in that call afterwards
(SECCOMP_IOCTL_NOTIF_ID_VALID); a caller that went away cannot be answered and is not
judged.

An exec is looked up in the caller's view first (inroot.py): one whose target does not
exist fails with the kernel's errno and is not judged, and the watch's first exec (the
workload's own program, always allowed) is the first one whose target exists.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from typing import Callable

from guest_agent import inroot, origin_facts, procmem, seccomp
from guest_agent.calls import (
    EXECS,
    O_CREAT,
    Call,
    ConnectCall,
    ExecCall,
    FileCall,
    MapCall,
    OpenCall,
    decode,
)
from guest_agent.containment import Containment
from guest_agent.holds import Holds
from guest_agent.judge import Action, Facts, Verdict, anomaly, creates_file, judge
from guest_agent.members import members
from guest_agent.procfs import Mem, ProcReadError, fd_target
from guest_agent.provenance import in_view
from guest_agent.reports import Reporter
from guest_agent.watch import Watch

log = logging.getLogger("guest_agent")
O_TRUNC = 0o1000


def _realpath(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return path


class Notifications:
    def __init__(self, reporter: Reporter, containment: Containment, holds: Holds,
                 end: Callable[[Watch], None]) -> None:
        self.reporter = reporter
        self.containment = containment
        self.holds = holds
        #: ends a watch whose listener is gone (every process of its tree ended)
        self._end = end

    def on_listener(self, watch: Watch, ev: int) -> None:
        listener = watch.listener
        if listener is None or listener.fd < 0:
            return
        if not ev & select.POLLIN:
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                self._end(watch)
            return
        try:
            notif = listener.recv()
        except OSError as e:
            log.warning("watch %s: %s", watch.id, e)
            watch.lost += 1
            if e.errno in (errno.EBADF, errno.EINVAL):
                self._end(watch)
            return
        if notif is not None:
            self.handle(watch, listener, notif)

    def handle(self, watch: Watch, listener: seccomp.Listener,
               notif: seccomp.Notification) -> None:
        act_mono = time.monotonic()
        act_time = time.time()
        watch.notifications += 1
        watch.known.add(notif.pid)
        verdict: Verdict | None = None
        gone = False
        mem = Mem(notif.pid)
        try:
            verdict = self._judge(watch, notif, mem, act_mono)
            # the caller is gone: what we read may not be its call's, and none can answer
            gone = not listener.valid(notif.id)
        except ProcReadError as e:
            gone = not listener.valid(notif.id)
            if not gone:
                watch.lost += 1
                log.debug("watch %s: %s", watch.id, e)
            if notif.nr in EXECS and not watch.first_exec_done:
                watch.first_exec(notif.pid)  # unread, as the workload's own program is
            verdict = None
        except Exception:
            self.reporter.failed(f"judging a notification of {watch.id}")
            watch.errors += 1
            watch.lost += 1  # a call let through unjudged is an event lost
            verdict = None
        finally:
            mem.close()
            if verdict is None and not gone:
                watch.answer(notif.id, allow=True)
        if gone or verdict is None:
            return
        if verdict.action is Action.FAIL:
            watch.answer(notif.id, allow=False, error=verdict.error)
        elif verdict.action is Action.HOLD:
            self.holds.hold(watch, notif, verdict, act_time, act_mono)
        else:
            self._contain(watch, notif, verdict, act_time, act_mono)

    def _contain(self, watch: Watch, notif: seccomp.Notification, verdict: Verdict,
                 act_time: float, act_mono: float) -> None:
        answered: list[bool] = []

        def answer(allow: bool, killed: bool) -> None:
            answered.append(allow)
            watch.answer(notif.id, allow=allow, killed=killed)

        try:
            self.containment.call(watch, verdict, notif.pid, act_time, act_mono, answer)
        except Exception:
            self.reporter.failed(f"containing in {watch.id}")
            watch.errors += 1
        finally:
            if not answered:  # never leave the caller blocked
                watch.answer(notif.id, allow=True)

    def _judge(self, watch: Watch, notif: seccomp.Notification, mem: Mem,
               now: float) -> Verdict | None:
        profile = watch.profile
        call = decode(notif, mem, profile.deny_syscalls)
        if call is None:
            return None
        verdict = judge(call, profile, self.facts(watch, call, notif.pid, now, mem))
        if isinstance(call, ExecCall) and verdict is None and not watch.first_exec_done:
            watch.first_exec(notif.pid)
        elif isinstance(call, ConnectCall) and verdict is None:
            self._connected(watch, call, notif.pid)
        elif isinstance(call, OpenCall) and verdict is None and call.writes:
            watch.provenance.opened_for_writing(notif.pid, call.path)
        elif isinstance(call, OpenCall) and verdict is not None \
                and verdict.category == "sensitive-path":
            # fanotify will see the same open: one report is enough
            watch.recent_sensitive[(notif.pid, call.path)] = time.monotonic()
        return verdict

    def _connected(self, watch: Watch, call: ConnectCall, pid: int) -> None:
        """The caller is still blocked in its connect: an interpreter about to run what it
        receives is contained before the first byte can arrive."""
        if not watch.profile.provenance or call.family not in ("inet", "inet6"):
            return
        fed = origin_facts.connected(watch, call, pid, members(watch))
        for reader, why in fed:
            act_mono, act_time = time.monotonic(), time.time()
            verdict = anomaly("dropped-code", why, None, {"pid": reader, "connect": call.args})
            self.containment.call(watch, verdict, reader, act_time, act_mono, None)

    @staticmethod
    def facts(watch: Watch, call: Call, pid: int, now: float, mem: Mem) -> Facts:
        """What judging `call` of `pid` needs to know beyond the call (judge.Facts). The
        watch's counts of new and removed files grow here when the call adds to them."""
        if isinstance(call, ExecCall):
            found = None if call.by_fd else inroot.lookup(pid, call.raw, call.dirfd)
            if found is not None and found.missing:
                return Facts(lookup_error=found.error)
            if not watch.first_exec_done:
                return Facts(first_exec_done=False)
            real = found.real if found is not None and found.real else _realpath(call.path)
            return Facts(pid=pid, root_pid=watch.root_pid, zone=watch.zone_of(pid),
                         real_path=real, stdio=(fd_target(pid, 0), fd_target(pid, 1)),
                         code_origin=origin_facts.exec_origin(watch, call, pid, real, mem))
        if isinstance(call, MapCall):
            return Facts(pid=pid, code_origin=origin_facts.map_origin(watch, call, pid))
        if isinstance(call, FileCall):
            if call.moves:
                watch.provenance.pin(pid)
                return Facts(pid=pid)
            return Facts(pid=pid, deletions=int(watch.deletions.add(now)))
        if isinstance(call, ConnectCall):
            zone = watch.zone_of(pid) if call.family in ("inet", "inet6") else None
            transient = watch.transients.get(zone) if zone is not None else None
            return Facts(pid=pid, root_pid=watch.root_pid, zone=zone,
                         zone_network=transient.network if transient else "full")
        if isinstance(call, OpenCall):
            truncates = bool(call.flags & O_TRUNC) and bool(watch.profile.max_deletes_per_s)
            exists = os.path.lexists(in_view(pid, call.path)) \
                if call.flags & O_CREAT or truncates else True
            foreign = procmem.foreign_mem(pid, call)
            deletions = int(watch.deletions.add(now)) if truncates and exists else 0
            if not creates_file(call, watch.profile, exists):
                return Facts(path_exists=exists, foreign_mem=foreign, deletions=deletions)
            return Facts(path_exists=exists, new_files=int(watch.new_files.add(now)),
                         foreign_mem=foreign, deletions=deletions)
        return Facts()


__all__ = ["Notifications"]
