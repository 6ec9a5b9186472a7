"""Process accounting of a watched tree without stopping its forks: who is alive, who is
new since the last sample, how many tasks the system created (where that counter is the
workload's alone), which processes to end when a limit is passed, and ending them.

Process creation is deliberately not a seccomp notification: while a notified caller waits
for the agent, any signal (a child's SIGCHLD) interrupts the kernel's
wait_for_completion_interruptible in seccomp_do_user_notification and the call returns
-ERESTARTSYS, which a handler without SA_RESTART turns into EINTR. fork() never fails
with EINTR otherwise, so shells report "Cannot fork". Watching must not change whether a
fork succeeds, so forks run at full speed and are counted here, after the fact.
"""

from __future__ import annotations

import collections
import os
import signal
from dataclasses import dataclass
from typing import Callable

#: where the kernel counts every task it created since boot (``processes`` line)
PROC_STAT = "/proc/stat"


@dataclass(frozen=True)
class Proc:
    """One sampled process: its parent, its start time (clock ticks since boot: with the
    pid it names the process, a reused pid has another) and its resident memory."""

    pid: int
    ppid: int
    start: int
    rss_pages: int
    #: CPU time used (clock ticks): its own and its reaped children's
    cpu_ticks: int = 0


def read_proc(pid: int) -> Proc | None:
    """/proc/<pid>/stat of a live process, or None when it is gone (or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # comm may hold spaces and parentheses: the fields follow the last ')'
        fields = data[data.rindex(b")") + 2:].split()
        return Proc(pid, int(fields[1]), int(fields[19]), int(fields[21]),
                    sum(int(f) for f in fields[11:15]))  # utime stime cutime cstime
    except (OSError, ValueError, IndexError):
        return None


def tasks_created() -> int | None:
    """The kernel's count of tasks created since boot (threads included: copy_process
    counts every task), or None when unreadable."""
    try:
        with open(PROC_STAT) as f:
            for line in f:
                if line.startswith("processes "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def new_since(before: dict[int, Proc], now: dict[int, Proc]) -> list[Proc]:
    """Processes in `now` that `before` did not have (a reused pid counts as new), oldest
    first."""
    fresh = [p for pid, p in now.items()
             if pid not in before or before[pid].start != p.start]
    return sorted(fresh, key=lambda p: (p.start, p.pid))


def forker_of(procs: list[Proc], members: dict[int, Proc]) -> Proc | None:
    """The member that created most of `procs` (a fork loop's parent), or None when none
    of their parents is a member any more."""
    counts = collections.Counter(p.ppid for p in procs if p.ppid in members)
    if not counts:
        return None
    # ties: the older parent, the one that has been forking longest
    best = max(counts.items(), key=lambda kv: (kv[1], -members[kv[0]].start))
    return members[best[0]]


def subtree(root: int, members: dict[int, Proc]) -> list[Proc]:
    """`root` and its descendants among `members`, parents before their children."""
    children: dict[int, list[Proc]] = collections.defaultdict(list)
    for p in members.values():
        children[p.ppid].append(p)
    out: list[Proc] = [members[root]] if root in members else []
    i = 0
    while i < len(out):
        out.extend(c for c in children.get(out[i].pid, ()) if c.pid != root)
        i += 1
    return out


def newest(members: dict[int, Proc], count: int, keep: int = 0) -> list[Proc]:
    """The `count` most recently started members, never `keep` (the workload's first
    process: ending it is the whole workload's end, which is the host's decision)."""
    ordered = sorted((p for p in members.values() if p.pid != keep),
                     key=lambda p: (p.start, p.pid), reverse=True)
    return ordered[:max(count, 0)]


def _signal(proc: Proc, sig: int) -> bool:
    """Send `sig` through a pidfd, after checking the pid still names the sampled process
    (no pid-reuse race between the check and the signal)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        return False
    try:
        now = read_proc(proc.pid)
        if now is None or now.start != proc.start:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def end(victims: list[Proc], rescan: Callable[[], dict[int, Proc]] | None = None,
        root: int | None = None) -> list[int]:
    """SIGKILL `victims`. They are stopped first (a stopped process forks no more), and
    when `rescan` is given the subtree of `root` is listed again after the stop, so a
    child born between the sample and the stop is ended too. Returns the pids killed."""
    stopped = [p for p in victims if _signal(p, signal.SIGSTOP)]
    if rescan is not None and root is not None:
        known = {p.pid for p in victims}
        fresh = rescan()
        late = [p for p in subtree(root, fresh) if p.pid not in known]
        stopped += [p for p in late if _signal(p, signal.SIGSTOP)]
    killed = []
    for p in stopped:
        if _signal(p, signal.SIGKILL):
            killed.append(p.pid)
    return killed

__all__ = ["PROC_STAT", "Proc", "end", "forker_of", "new_since", "newest",
           "read_proc", "subtree", "tasks_created"]
