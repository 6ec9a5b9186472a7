"""Zone start: launch -> the workload's first instruction, against a plain subprocess start.

"First instruction" is the moment exec succeeded: subprocess.Popen returns then (it waits
for the child's close-on-exec error pipe), for the zone's workload and the baseline alike.
Three figures, each against a baseline measured in the same run:
  driver      create + start of a cgroup zone (cgroups, netns with NIC, mount ns)
  manager     the same plus the audit rows and the scheduled timeline, with and without
              the agent that watches the zone (started beside it, the workload handed
              over before its first instruction); unwatched, with and without the agent
              that keeps the zone's schedule while no controller runs (its deputy: every
              zone with phases after its start has one)
  cli         the whole `hvtsm run -- true` command, Python start-up included

Run as root: python3 bench/zone_start.py [--n 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import bare_driver, cgroup_driver, percentile, progress, summary, temp_store

from hvtsm.lifecycle import Manager
from hvtsm.policy import load_policy, parse_policy
from hvtsm.restrictions import Restrictions
from hvtsm.zones.base import WorkloadIO, ZoneHandle, ZoneSpec

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["/bin/true"]


def baseline(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.Popen(COMMAND)
        out.append((time.perf_counter() - t0) * 1000)
        proc.wait()
    return out


def driver_starts(n: int) -> tuple[list[float], list[float]]:
    driver = bare_driver()
    policy = load_policy(REPO / "policies" / "default.toml")
    starts, ends = [], []
    for i in range(n):
        progress(f"driver {i + 1}/{n}")
        t0 = time.perf_counter()
        handle = driver.create(ZoneSpec(zone_id=f"zb{i:07x}", net_index=60000 + i, user="root"),
                               policy.initial())
        workload = driver.start(handle, COMMAND, WorkloadIO())
        starts.append((time.perf_counter() - t0) * 1000)
        workload.wait()
        t1 = time.perf_counter()
        driver.terminate(handle)
        ends.append((time.perf_counter() - t1) * 1000)
    progress("")
    return starts, ends


def manager_starts(n: int, *, monitor: bool, deputy: bool = True) -> list[float]:
    manager = Manager(temp_store(), cgroup_driver())
    manager.start()
    text = (REPO / "policies" / "default.toml").read_text()
    if not monitor:
        text = text.replace("monitor = true", "monitor = false")
    policy = parse_policy(text.encode(), source="default.toml")
    driver = manager.driver

    def create(spec: ZoneSpec, initial: Restrictions) -> ZoneHandle[Any]:
        # the zone as it was made before every zone with phases got an agent
        return driver.create(dataclasses.replace(spec, deputy=False), initial)

    out = []
    for i in range(n):
        progress(f"manager {'with' if monitor else 'without'} monitoring"
                 f"{'' if deputy else ', no deputy'} {i + 1}/{n}")
        t0 = time.perf_counter()
        run = manager.launch(policy, COMMAND, user="root", policy_toml=text,
                             create=None if deputy else create)
        out.append((time.perf_counter() - t0) * 1000)
        run.ended.wait(10)
    progress("")
    manager.shutdown()
    return out


def cli_runs(n: int) -> tuple[list[float], list[float]]:
    db = f"sqlite:///{temp_store().url.removeprefix('sqlite:///')}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    hv, plain = [], []
    for i in range(n):
        progress(f"cli {i + 1}/{n}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hvtsm.cli.main", "--db", db, "run", "--user",
                        "root", "--", *COMMAND], env=env, check=True, capture_output=True)
        hv.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        subprocess.run(COMMAND, check=True)
        plain.append((time.perf_counter() - t0) * 1000)
    progress("")
    return hv, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--cli-n", type=int, default=10)
    args = parser.parse_args()
    base = baseline(args.n)
    starts, ends = driver_starts(args.n)
    bare = manager_starts(args.n, monitor=False, deputy=False)
    managed = manager_starts(args.n, monitor=False)
    watched = manager_starts(args.n, monitor=True)
    base_after = baseline(args.n)
    base_all = base + base_after
    b50 = percentile(base_all, 50)
    print(summary("baseline subprocess start", base_all))
    print(summary("zone start, driver (goal p50 < 100 ms)", starts)
          + f"  ratio p50 {percentile(starts, 50) / b50:.1f}x")
    print(summary("zone start, manager with audit + timeline, monitoring off, no agent", bare)
          + f"  ratio p50 {percentile(bare, 50) / b50:.1f}x")
    print(summary("zone start, manager, monitoring off, agent keeping the schedule", managed)
          + f"  ratio p50 {percentile(managed, 50) / b50:.1f}x, +"
          f"{percentile(managed, 50) - percentile(bare, 50):.2f}ms p50 for the agent")
    print(summary("zone start, manager, agent beside the zone watching (default)", watched)
          + f"  ratio p50 {percentile(watched, 50) / b50:.1f}x")
    print(summary("zone terminate + cleanup", ends))
    hv, plain = cli_runs(args.cli_n)
    print(summary("whole `hvtsm run -- true` (Python start-up included)", hv)
          + f"  vs plain `true` p50 {percentile(plain, 50):.2f}ms")


if __name__ == "__main__":
    main()
