"""Monitoring overhead: the same syscall-heavy workloads in cgroup zones with and without
the agent watching, alternated in one run (median of the ratios of paired runs).

Workloads: `dd bs=64` (reads and writes, as Falco users measure: about 2.2x there) and
bench/syscall_heavy.py (small reads/writes, stats, opens, a new file now and then). Each
prints its own elapsed time, so zone start-up is left out. A plain process outside any
zone is printed for reference.

Run as root: python3 bench/monitor_overhead.py [--pairs 7]     Goal: under 1.5x.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import cgroup_driver, progress, summary, temp_store

from hvtsm.lifecycle import Manager
from hvtsm.policy import parse_policy

HERE = Path(__file__).resolve().parent
POLICY = (HERE.parent / "policies" / "default.toml").read_text()
OFF = POLICY.replace("monitor = true", "monitor = false")
DD = ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=64", "count=300000"]


def elapsed_of(output: str) -> float:
    if m := re.search(r"ELAPSED ([0-9.]+)", output):
        return float(m.group(1))
    if m := re.search(r"copied, ([0-9.]+) s", output):  # dd's summary
        return float(m.group(1))
    raise RuntimeError(f"no elapsed time in {output[-300:]!r}")


def in_zone(manager: Manager, text: str, argv: list[str]) -> float:
    from hvtsm.zones.base import WorkloadIO

    policy = parse_policy(text.encode(), source="bench.toml")
    with tempfile.TemporaryFile() as out:
        run = manager.launch(policy, argv, io=WorkloadIO(stdout=out.fileno(),
                                                         stderr=out.fileno()),
                             user="nobody", policy_toml=text)
        if not run.ended.wait(300):
            raise RuntimeError("workload did not finish")
        out.seek(0)
        output = out.read().decode(errors="replace")
    if run.exit_status != 0:
        raise RuntimeError(f"workload failed ({run.exit_status}): {output[-300:]!r}")
    return elapsed_of(output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hvtsm-ovh-", dir="/var/tmp"))
    script = work / "syscall_heavy.py"
    shutil.copy(HERE / "syscall_heavy.py", script)
    script.chmod(0o644)
    work.chmod(0o755)
    workloads = {"dd bs=64 (600k read/write)": DD,
                 "reads/writes/stats/opens": ["/usr/bin/python3", str(script), "20000"]}
    store = temp_store()
    manager = Manager(store, cgroup_driver())
    manager.start()
    try:
        for name, argv in workloads.items():
            plain = []
            for _ in range(3):
                done = subprocess.run(argv, capture_output=True, text=True, check=True)
                plain.append(elapsed_of(done.stdout + done.stderr))
            on, off, ratios = [], [], []
            for i in range(args.pairs):
                progress(f"{name}: pair {i + 1}/{args.pairs}")
                t_off = in_zone(manager, OFF, argv)
                t_on = in_zone(manager, POLICY, argv)
                off.append(t_off * 1000)
                on.append(t_on * 1000)
                ratios.append(t_on / t_off)
            progress("")
            print(f"{name}:")
            print("  " + summary("plain process", [t * 1000 for t in plain]))
            print("  " + summary("zone, monitoring off", off))
            print("  " + summary("zone, monitoring on ", on))
            print(f"  overhead (on/off, median of {args.pairs} pairs): "
                  f"{statistics.median(ratios):.3f}x  (goal < 1.5x)")
    finally:
        manager.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
