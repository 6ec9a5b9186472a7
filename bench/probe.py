"""Runs inside a zone: polls what the zone itself sees and prints each change with its time.

Lines: "<epoch> <field> <value>" for net (any route), memory, pids and quota.
"""

from __future__ import annotations

import sys
import time


def cgroup_paths() -> dict[str, str]:
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def files() -> dict[str, str]:
    paths = cgroup_paths()
    if "memory" in paths:  # cgroup v1
        return {
            "memory": f"/sys/fs/cgroup/memory{paths['memory']}/memory.limit_in_bytes",
            "pids": f"/sys/fs/cgroup/pids{paths['pids']}/pids.max",
            "quota": f"/sys/fs/cgroup/cpu{paths.get('cpu', paths.get('cpu,cpuacct', ''))}"
                     "/cpu.cfs_quota_us",
        }
    base = f"/sys/fs/cgroup{paths['']}"
    return {"memory": f"{base}/memory.max", "pids": f"{base}/pids.max",
            "quota": f"{base}/cpu.max"}


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return f"error:{exc.errno}"


def has_route() -> str:
    """Whether the zone can still route anywhere but loopback: what a connect needs.
    /proc/self/net follows the reader's network namespace (/sys/class/net does not)."""
    with open("/proc/self/net/route") as f:
        return "yes" if len(f.read().splitlines()) > 1 else "no"


def main() -> None:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0005
    duration = float(sys.argv[2]) if len(sys.argv) > 2 else 60
    watched = files()
    last: dict[str, str] = {}
    end = time.time() + duration
    while time.time() < end:
        now = time.time()
        current = {name: read(path) for name, path in watched.items()}
        current["net"] = has_route()
        for name, value in current.items():
            if last.get(name) != value:
                print(f"{now:.6f} {name} {value}", flush=True)
                last[name] = value
        time.sleep(interval)


if __name__ == "__main__":
    main()
