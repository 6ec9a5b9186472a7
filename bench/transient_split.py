"""Transient zone split latency on cgroup zones: how long an unforeseen exec waits before
its process runs in a transient zone of its own.

The workload (python3, watched by its agent) times, inside the zone, fork + exec + exit of
an expected program (/usr/bin/true: no split) and of an unforeseen one (/usr/bin/sleep 0:
held by the agent, reported, a transient zone made by the controller with its audit rows
and child cgroups, the process moved, the exec released). The difference is what a split
costs the workload. The controller's own share (code-path event handled -> call released)
is the `placed_ms` of each transient zone's start notice (driver.split: child cgroups made,
limits set, the process moved, the release sent; the audit rows come before it).

Run as root: python3 bench/transient_split.py [--n 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from common import cgroup_driver, summary, temp_store

from hvtsm.lifecycle import Manager, Notice
from hvtsm.lifecycle.notices import Started
from hvtsm.policy import load_policy
from hvtsm.zones.base import WorkloadIO

PARENT = """
name = "bench-parent"
[[phase]]
at = "0s"
memory = "512MiB"
[[phase]]
at = "10m"
action = "terminate"
[anomaly]
max_forks_per_s = 0
max_processes = 0
[transient]
enabled = true
policy = "child.toml"
lifespan_scale = 1
max_zones = {most}
"""
CHILD = """
name = "bench-child"
[[phase]]
at = "0s"
network = "none"
memory = "64MiB"
[[phase]]
at = "5m"
action = "terminate"
"""
WORKLOAD = """
import json, subprocess, sys, time
for _ in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/true"], check=True)
    t1 = time.perf_counter()
    subprocess.run(["/usr/bin/sleep", "0"], check=True)
    t2 = time.perf_counter()
    print(json.dumps({"expected": (t1 - t0) * 1000, "split": (t2 - t1) * 1000}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="splits to time (at most 250)")
    args = parser.parse_args()
    n = max(1, min(args.n, 250))
    tmp = Path(tempfile.mkdtemp(prefix="hvtsm-bench-transient-"))
    (tmp / "child.toml").write_text(CHILD)
    (tmp / "parent.toml").write_text(PARENT.format(most=n))
    placed: list[float] = []

    def listen(notice: Notice) -> None:
        if isinstance(notice, Started) and notice.placed_ms is not None:
            placed.append(notice.placed_ms)

    store = temp_store()
    manager = Manager(store, cgroup_driver(), listener=listen)
    manager.start()
    try:
        run = manager.launch(load_policy(tmp / "parent.toml"),
                             ["/usr/bin/python3", "-c", WORKLOAD, str(n)], user="nobody",
                             io=WorkloadIO(stdout=subprocess.PIPE), expect_exec=["/usr/bin/true"])
        assert run.workload is not None and run.workload.stdout is not None
        rows = [json.loads(line) for line in run.workload.stdout]
        run.ended.wait(60)
        manager.settle()
    finally:
        manager.shutdown()
        store.dispose()
    if len(rows) != n:
        raise SystemExit(f"the workload timed {len(rows)} of {n} rounds (exit "
                         f"{run.exit_status}, {run.end_reason})")
    print(summary("exec of an expected program (no split)", [r["expected"] for r in rows]))
    print(summary("exec of an unforeseen program (split)  ", [r["split"] for r in rows]))
    print(summary("split cost seen by the workload        ",
                  [r["split"] - r["expected"] for r in rows]))
    print(summary("driver.split: cgroup made, pid moved   ", placed))


if __name__ == "__main__":
    main()
