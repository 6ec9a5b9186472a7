"""Zone start with a zone's own identity, PID, IPC and cgroup namespaces and private
scratch (/tmp, /var/tmp, /dev/shm, /run as its own tmpfs, hvtsm's directories hidden,
everything else read-only), against the start before them (the shared user `nobody`,
the host's PID namespace and scratch), in the same run, alternating.

Each sample is create + start of a cgroup zone until the workload's exec succeeded (the
moment subprocess.Popen returns), then its end and removal timed apart. The earlier
start is had by handing the launcher an entry without a view (and skipping the check
that reads the view's effect back), which is exactly the launcher's path before the view
existed.

Run as root: python3 bench/zone_isolation.py [--n 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from common import bare_driver, percentile, progress, summary

from hvtsm.policy import load_policy
from hvtsm.zones.base import ZONE_USER, WorkloadIO, ZoneSpec
from hvtsm.zones.cgroup import confine, launcher

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["/bin/true"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="starts of each kind")
    args = parser.parse_args()
    driver = bare_driver()
    policy = load_policy(REPO / "policies" / "default.toml")
    spawn, verify = launcher.spawn, confine.verify

    def spawn_without_view(entry: launcher.Entry, *args: Any, **kwargs: Any) -> Any:
        return spawn(dataclasses.replace(entry, view=None), *args, **kwargs)

    def unverified(*_args: Any) -> None:
        return None

    starts: dict[str, list[float]] = {"before": [], "isolated": []}
    ends: dict[str, list[float]] = {"before": [], "isolated": []}
    for i in range(args.n * 2):
        kind = "isolated" if i % 2 else "before"
        progress(f"{kind} {i // 2 + 1}/{args.n}")
        before = kind == "before"
        launcher.spawn = spawn_without_view if before else spawn
        confine.verify = unverified if before else verify  # type: ignore[assignment]
        user = ZONE_USER if kind == "isolated" else "nobody"
        t0 = time.perf_counter()
        handle = driver.create(ZoneSpec(zone_id=f"zi{i:07x}", net_index=61000 + i, user=user,
                                        cwd="/"), policy.initial())
        workload = driver.start(handle, COMMAND, WorkloadIO())
        starts[kind].append((time.perf_counter() - t0) * 1000)
        workload.wait()
        t1 = time.perf_counter()
        driver.terminate(handle)
        ends[kind].append((time.perf_counter() - t1) * 1000)
    launcher.spawn, confine.verify = spawn, verify
    progress("")
    for kind in ("before", "isolated"):
        print(summary(f"start  {kind:9}", starts[kind]))
        print(summary(f"end    {kind:9}", ends[kind]))
    for p in (50, 99):
        ratio = percentile(starts["isolated"], p) / percentile(starts["before"], p)
        print(f"start ratio p{p} isolated/before: {ratio:.2f}x (goal < 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
