"""The monitor's sampler (its ``monitor-sample`` thread): every sample interval it reads
what no notified call shows, from /proc, for each running watch.

* Resident memory growth, judged over MEMORY_WINDOW against the oldest snapshot in it (one
  large allocation is no spike, growth that goes on is, and a slow CPU still gets there);
  a process seen for the first time starts from its current figures, so its start-up is
  not growth. Read/write syscall rates from /proc/<pid>/io. Both: ``memory-spike`` and
  ``syscall-rate``, contained on the process that grew or called most.
* Process accounting (proccount.py): process creation is never notified (a notified fork
  can fail with EINTR), so ``max_processes`` is judged on the processes alive at each
  sample and ``max_forks_per_s`` on the processes new since the previous one, or, in a
  guest with one workload, on the kernel's count of created tasks (``fork-rate``).
* Sustained CPU use (``cpu-hog``): the CPU time the members used over the last
  ``cpu_window`` seconds (their own and their reaped children's, from /proc/<pid>/stat)
  against ``max_cpu_share`` of the CPUs the zone may run on (its first process's
  affinity: a cgroup zone's cpuset), once the window is covered; contained on the process
  that used most of it.
* OOM kills (the header's oom_file beside a cgroup zone, /proc/vmstat in a guest), and
  lost events (``events-dropped``, when the profile says drops are anomalies).
* A ``stats`` event every STATS_PERIOD seconds, and, in a guest, a look at whether a
  transient zone's cgroup emptied (done on the poll loop, which owns the zones).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from guest_agent import proccount
from guest_agent.containment import Containment
from guest_agent.judge import anomaly
from guest_agent.members import members, proc_table
from guest_agent.procfs import PAGE, io_syscalls, read_counter
from guest_agent.profile import Profile
from guest_agent.reports import Reporter
from guest_agent.watch import Watch

STATS_PERIOD = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: seconds over which memory growth is judged
MEMORY_WINDOW = 1.0
MIB = 1 << 20
VMSTAT = "/proc/vmstat"


class Sampler:
    def __init__(self, reporter: Reporter, containment: Containment, *,
                 watches: Callable[[], list[Watch]], system_counter: bool,
                 zones_changed: Callable[[Watch], None]) -> None:
        self.reporter = reporter
        self.containment = containment
        #: the running watches
        self._watches = watches
        #: the system's created-tasks counter is the workloads' own (a guest): with one
        #: watch, it counts the children that live shorter than a sample interval too
        self.system_counter = system_counter
        #: asks for a look at a watch's transient zones (on the poll loop)
        self._zones_changed = zones_changed

    def run(self, closed: threading.Event) -> None:
        while not closed.wait(self.interval()):
            now = time.monotonic()
            for watch in self._watches():
                if now < watch.next_sample:
                    continue
                watch.next_sample = now + watch.profile.sample_interval * 0.9
                try:
                    self.sample(watch)
                except Exception:
                    self.reporter.failed(f"sampling {watch.id}")

    def interval(self) -> float:
        intervals = [w.profile.sample_interval for w in self._watches()]
        return min(intervals) if intervals else 0.2

    @staticmethod
    def oom_count(watch: Watch) -> int | None:
        """The OOM kill counter that covers the watch (None: none does, or unreadable)."""
        if watch.oom_file:
            return read_counter(watch.oom_file, "oom_kill")
        if watch.procs_file is None:
            return read_counter(VMSTAT, "oom_kill")
        return None

    def sample(self, watch: Watch) -> None:
        profile = watch.profile
        now = time.monotonic()
        dt = max(now - watch.sampled_at, 1e-3)
        rss: dict[int, int] = {}
        io: dict[int, int] = {}
        procs: dict[int, proccount.Proc] = {}
        for pid in members(watch):
            proc = proccount.read_proc(pid)
            if proc is None:
                continue  # ended between the listing and now
            procs[pid] = proc
            rss[pid] = proc.rss_pages * PAGE
            try:
                count = io_syscalls(pid)
            except PermissionError:
                watch.lost += 1
                continue
            if count is not None:
                io[pid] = count
        watch.rss_history.append((now, rss))
        while now - watch.rss_history[0][0] > MEMORY_WINDOW:
            watch.rss_history.popleft()
        if watch.rss or watch.io:
            self._check_rates(watch, profile, rss, io, dt)
        self._check_processes(watch, procs, now)
        self._check_cpu(watch, procs, now)
        watch.rss, watch.io, watch.sampled_at = rss, io, now
        self._check_oom(watch)
        self._check_drops(watch, now)
        if watch.transients:
            self._zones_changed(watch)
        if now - watch.last_stats >= STATS_PERIOD:
            watch.last_stats = now
            self.reporter.stats(watch)

    def _check_rates(self, watch: Watch, profile: Profile, rss: dict[int, int],
                     io: dict[int, int], dt: float) -> None:
        then, old = watch.rss_history[0]
        now = watch.rss_history[-1][0]
        if profile.memory_spike_mib_per_s and now - then >= MEMORY_WINDOW / 2:
            growth = {p: rss[p] - old[p] for p in rss if p in old}
            rate = sum(growth.values()) / (now - then) / MIB
            if rate > profile.memory_spike_mib_per_s and growth:
                top = max(growth, key=lambda p: growth[p])
                self._rate_anomaly(watch, "memory-spike",
                                   f"resident memory grew {rate:.0f} MiB/s (limit "
                                   f"{profile.memory_spike_mib_per_s:g}); pid {top} grew "
                                   f"{growth[top] / MIB:.0f} MiB", top,
                                   {"rss_mib": round(rss[top] / MIB, 1),
                                    "rate_mib_per_s": round(rate, 1)})
        if profile.max_syscalls_per_s:
            calls = {p: io[p] - watch.io[p] for p in io if p in watch.io}
            rate = sum(calls.values()) / dt
            if rate > profile.max_syscalls_per_s and calls:
                top = max(calls, key=lambda p: calls[p])
                self._rate_anomaly(watch, "syscall-rate",
                                   f"{rate:.0f} read/write syscalls per second (limit "
                                   f"{profile.max_syscalls_per_s:g})", top,
                                   {"rate_per_s": round(rate)})

    def _check_cpu(self, watch: Watch, procs: dict[int, proccount.Proc], now: float) -> None:
        ticks = {pid: p.cpu_ticks for pid, p in procs.items()}
        first = not watch.cpu and not watch.cpu_history
        # a process new since the last sample used all its ticks within the interval
        used = {pid: t - watch.cpu.get(pid, 0) for pid, t in ticks.items()
                if t > watch.cpu.get(pid, 0)}
        watch.cpu = ticks
        if first:
            # what ran before the watch's first sample is the workload's start, not use
            watch.cpu_history.append((now, {}))
            return
        watch.cpu_history.append((now, used))
        window = watch.profile.cpu_window
        while len(watch.cpu_history) > 1 and now - watch.cpu_history[1][0] >= window:
            watch.cpu_history.popleft()
        limit = watch.profile.max_cpu_share
        began = watch.cpu_history[0][0]
        if not limit or now - began < window:
            return
        per_pid: dict[int, int] = {}
        for _, sample in list(watch.cpu_history)[1:]:
            for pid, count in sample.items():
                per_pid[pid] = per_pid.get(pid, 0) + count
        cpus = _cpus_of(watch.root_pid or next(iter(procs), 0))
        share = sum(per_pid.values()) / CLK_TCK / (now - began) / cpus
        if share <= limit or not per_pid:
            return
        top = max(per_pid, key=lambda p: per_pid[p])
        self._rate_anomaly(watch, "cpu-hog",
                           f"{share:.0%} of {cpus} CPU(s) used over the last "
                           f"{now - began:.0f} s (limit {limit:.0%}); pid {top} used "
                           f"{per_pid[top] / CLK_TCK:.1f} s of it", top,
                           {"share": round(share, 3), "cpus": cpus,
                            "window_s": round(now - began, 1)})

    def _rate_anomaly(self, watch: Watch, category: str, detail: str, pid: int,
                      args: dict[str, object]) -> None:
        now = time.monotonic()
        if watch.rate_emitted(category, now):
            return  # reported within the period: contained again once it is over
        self.containment.call(watch, anomaly(category, detail, None, args, rate=True), pid,
                              time.time(), now, None)

    def _births(self, watch: Watch, fresh: list[proccount.Proc]) -> tuple[int, str]:
        """How many processes the tree created since the last sample, and how that was
        counted. New pids miss a child that lived shorter than a sample interval; in a
        guest with one workload the kernel's count of created tasks does not (it counts
        threads as well, so it is used only when it says more than the pids do)."""
        born = sum(1 for p in fresh if p.pid != watch.root_pid)
        if not self.system_counter or watch.procs_file is not None:
            return born, "new pids"
        total = proccount.tasks_created()
        base, watch.tasks_base = watch.tasks_base, total
        alone = len(self._watches()) == 1
        if total is None or base is None or not alone or total - base <= born:
            return born, "new pids"
        return total - base, "tasks created"

    def _check_processes(self, watch: Watch, procs: dict[int, proccount.Proc],
                         now: float) -> None:
        profile = watch.profile
        fresh = proccount.new_since(watch.procs, procs)
        watch.procs = procs
        born, counted = self._births(watch, fresh)
        rate = int(watch.births.add(now, born))
        most = profile.max_processes
        if most and len(procs) > most:
            excess = proccount.newest(procs, int(len(procs) - most), keep=watch.root_pid)
            self.containment.processes(
                watch, f"{len(procs)} processes alive (limit {most:g})", excess, procs,
                {"processes": len(procs), "limit": most}, lambda: proc_table(watch))
            return
        limit = profile.max_forks_per_s
        if limit and rate > limit:
            offenders = [p for p in fresh if p.pid != watch.root_pid]
            over = int(min(len(offenders), rate - limit))
            self.containment.processes(
                watch, f"{rate} process creations in the last second (limit {limit:g}, "
                f"counted by {counted})", offenders[len(offenders) - over:], procs,
                {"forks_per_s": rate, "limit": limit, "counted_by": counted},
                lambda: proc_table(watch), created=offenders)

    def _check_oom(self, watch: Watch) -> None:
        count = self.oom_count(watch)
        if count is None:
            return
        if watch.oom_base is not None and count > watch.oom_base:
            act_mono, act_time = time.monotonic(), time.time()
            killed = count - watch.oom_base
            self.reporter.anomaly(watch, anomaly("oom-kill", f"{killed} process(es) killed by "
                                                 "the OOM killer", None,
                                                 {"oom_kills": killed}),
                                  None, "", "none", act_time, act_mono, None)
        watch.oom_base = count

    def _check_drops(self, watch: Watch, now: float) -> None:
        if watch.lost <= watch.lost_reported or not watch.profile.drops_are_anomalies:
            return
        if watch.rate_emitted("events-dropped", now):
            return
        new = watch.lost - watch.lost_reported
        watch.lost_reported = watch.lost
        verdict = anomaly("events-dropped",
                          f"{new} monitoring events lost ({watch.lost} in total)", None,
                          {"lost": watch.lost}, rate=True)
        self.reporter.anomaly(watch, verdict, None, "", "none", time.time(), now, None)


def _cpus_of(pid: int) -> int:
    """How many CPUs `pid` may run on (a cgroup zone's cpuset); all of them if unknown."""
    try:
        return max(1, len(os.sched_getaffinity(pid)))
    except OSError:
        return os.cpu_count() or 1


__all__ = ["MEMORY_WINDOW", "STATS_PERIOD", "Sampler"]
