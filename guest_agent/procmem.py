"""Whether an open for writing targets another process's memory (/proc/PID/mem, or
/proc/PID/task/TID/mem): code injection, as ptrace and process_vm_writev are, which the
deny list names; this path it cannot, since the call is an ordinary open.

The target is looked up as the caller sees it (inroot.lookup: its root, its /proc, symlinks
followed), so a link in /tmp to /proc/5/mem is the same write. PID numbers are the caller's
own PID namespace's (a cgroup zone's /proc is its own): its own memory (self, thread-self,
or its own number there) is not another process's."""

from __future__ import annotations

import contextlib
import os
import re

from guest_agent import inroot
from guest_agent.calls import O_ACCMODE, OpenCall

_FD = re.compile(r"\A/proc/(?P<pid>\d+|self|thread-self)(?:/task/\d+)?/fd/(?P<fd>\d+)\Z")
_SELF = re.compile(r"\A/proc/(?:self|thread-self)/")
_MEM = re.compile(r"/proc/(?P<pid>\d+|self|thread-self)(?:/task/\d+)?/mem\Z")


def ns_pid(pid: int, proc: str = "/proc") -> int:
    """`pid`'s number in its own (innermost) PID namespace; 0 when unknown."""
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def foreign_mem(pid: int, call: OpenCall, proc: str = "/proc") -> str:
    """The /proc/.../mem path of another process that `call` (of `pid`) opens for
    writing, or ""."""
    if not call.flags & O_ACCMODE:
        return ""
    candidates = [call.path]
    own = ns_pid(pid, proc)
    reopened = _FD.match(call.path)
    if reopened is not None and reopened.group("pid") in ("self", "thread-self", str(own)):
        # one of its own descriptors reopened (a read-only fd of /proc/N/mem made writable):
        # a magic link, which a lookup in its root does not follow; its fd table tells
        with contextlib.suppress(OSError):
            candidates.append(os.readlink(f"{proc}/{pid}/fd/{reopened.group('fd')}"))
    elif call.raw:
        # the caller's /proc/self is itself; looked up by the agent it would be the agent
        raw = _SELF.sub(f"/proc/{own}/" if own else "/proc/self/", call.raw)
        found = inroot.lookup(pid, raw, call.dirfd, proc=proc)
        if found is not None and found.real:
            candidates.append(found.real)
    for path in candidates:
        m = _MEM.match(path)
        if m is None:
            continue
        who = m.group("pid")
        if who in ("self", "thread-self"):
            continue
        if own and int(who) == own:
            continue
        return path
    return ""


__all__ = ["foreign_mem", "ns_pid"]
