"""Process accounting (guest_agent.proccount): which processes are new, who forked them,
which to end, and the ending itself on real processes."""

from __future__ import annotations

import os
import subprocess
import time

from guest_agent import proccount
from guest_agent.proccount import Proc
from guest_agent.rates import RateWindow


def table(*rows: tuple[int, int, int]) -> dict[int, Proc]:
    return {pid: Proc(pid, ppid, start, 0) for pid, ppid, start in rows}


def test_new_since_counts_reused_pids_as_new() -> None:
    before = table((10, 1, 100), (11, 10, 101))
    now = table((10, 1, 100), (11, 10, 250), (12, 10, 240))
    assert [p.pid for p in proccount.new_since(before, now)] == [12, 11]


def test_forker_is_the_parent_of_most_new_processes() -> None:
    procs = table((10, 1, 100), (11, 10, 101), (20, 11, 110), (21, 11, 111), (22, 10, 112))
    fresh = [procs[20], procs[21], procs[22]]
    forker = proccount.forker_of(fresh, procs)
    assert forker is not None and forker.pid == 11
    # parents gone from the tree: nobody to name
    assert proccount.forker_of([Proc(30, 99, 5, 0)], procs) is None


def test_subtree_and_newest() -> None:
    procs = table((10, 1, 100), (11, 10, 101), (12, 11, 102), (13, 10, 103), (14, 12, 104))
    assert [p.pid for p in proccount.subtree(11, procs)] == [11, 12, 14]
    assert [p.pid for p in proccount.newest(procs, 2)] == [14, 13]
    # the workload's first process is never among the newest to end
    assert 10 not in [p.pid for p in proccount.newest(procs, 5, keep=10)]


def test_birth_window_keeps_one_second() -> None:
    w = RateWindow()  # the watch's births: the sliding second
    assert w.add(0.0, 5) == 5
    assert w.add(0.5, 7) == 12
    assert w.add(1.2, 1) == 8  # the sample at 0.0 left the window


def test_tasks_created_is_the_kernel_counter() -> None:
    before = proccount.tasks_created()
    subprocess.run(["true"], check=True)
    after = proccount.tasks_created()
    assert before is not None and after is not None and after > before


def test_end_kills_only_the_sampled_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        proc = proccount.read_proc(child.pid)
        assert proc is not None and proc.ppid == os.getpid()
        # a different start time is another process under a reused pid: left alone
        assert proccount.end([Proc(child.pid, proc.ppid, proc.start + 1, 0)]) == []
        assert child.poll() is None
        assert proccount.end([proc]) == [child.pid]
        assert child.wait(5) == -9
    finally:
        child.kill()
        child.wait()


def test_end_rescans_for_late_children() -> None:
    """A child born after the sample, in the subtree being ended, is ended too."""
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            kids = [p for p in (proccount.read_proc(int(x)) for x in os.listdir("/proc")
                                if x.isdigit()) if p is not None and p.ppid == parent.pid]
            if len(kids) == 2:
                break
            time.sleep(0.02)
        root = proccount.read_proc(parent.pid)
        assert root is not None and len(kids) == 2

        def rescan() -> dict[int, Proc]:
            return {p.pid: p for p in [root, *kids]}

        # the sample knew only the parent
        killed = proccount.end([root], rescan, root.pid)
        assert sorted(killed) == sorted([root.pid, *(k.pid for k in kids)])
        assert parent.wait(5) == -9
        for k in kids:
            deadline = time.monotonic() + 5
            while proccount.read_proc(k.pid) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            state = proccount.read_proc(k.pid)
            assert state is None or state.ppid != parent.pid
    finally:
        parent.kill()
        parent.wait()
