"""Which processes are a watch's.

With a ``procs_file`` (host mode: the zone's cgroup.procs, plus those of the transient
zones' child cgroups beside it) those files say. Without it (guest mode) a process is a
watch's when it notified on that watch's listener, or descends from one that did, and has
a seccomp filter (a descendant that had none would not be the watched tree's).
"""

from __future__ import annotations

import contextlib
import os

from guest_agent import proccount
from guest_agent.procfs import pids, ppid_of, seccomp_filtered
from guest_agent.watch import Watch

#: parents followed up from a process before it is taken for no member
MAX_DEPTH = 64


def is_member(watch: Watch, pid: int) -> bool:
    if watch.procs_file is not None:
        return pid in procs_of(watch)
    if pid in watch.known:
        return True
    chain: list[int] = []
    p = pid
    for _ in range(MAX_DEPTH):
        p = ppid_of(p)
        if p <= 1:
            return False
        if p in watch.known:
            break
        chain.append(p)
    else:
        return False
    if not seccomp_filtered(pid):
        return False
    watch.known.add(pid)
    watch.known.update(chain)
    return True


def procs_of(watch: Watch) -> set[int]:
    """Host mode: the pids the watch's procs files list (an unreadable one is a lost
    event)."""
    try:
        with open(watch.procs_file or "") as f:
            found = {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        watch.lost += 1
        return set()
    if watch.transients:
        base = os.path.dirname(watch.procs_file or "")
        name = os.path.basename(watch.procs_file or "")
        for zone in list(watch.transients):
            with contextlib.suppress(OSError, ValueError), \
                    open(os.path.join(base, zone, name)) as f:
                found.update(int(x) for x in f.read().split())
    return found


def members(watch: Watch) -> set[int]:
    """Every live member now (guest mode: and `watch.known` forgets the dead)."""
    if watch.procs_file is not None:
        return procs_of(watch)
    parents = {pid: ppid_of(pid) for pid in pids()}
    known = watch.known
    found: set[int] = set()
    for pid in parents:
        chain: list[int] = []
        p = pid
        for _ in range(MAX_DEPTH):
            if p in known or p in found:
                found.update(chain)
                found.add(p)
                break
            chain.append(p)
            p = parents.get(p, 0)
            if p <= 1:
                break
    found = {p for p in found if p in parents and seccomp_filtered(p)}
    watch.known = found | {p for p in known if p in parents}
    return found


def proc_table(watch: Watch) -> dict[int, proccount.Proc]:
    """The members with their sampled /proc/<pid>/stat."""
    table = {}
    for pid in members(watch):
        proc = proccount.read_proc(pid)
        if proc is not None:
            table[pid] = proc
    return table


__all__ = ["is_member", "members", "proc_table", "procs_of"]
