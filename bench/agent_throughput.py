"""Agent event throughput per core, and what it drops at that rate.

A cgroup zone whose agent only reports (contain = "none", no rate limits) runs a loop that
makes one monitored event after another for a few seconds:
  seccomp   opens with O_CREAT: each is a user notification the caller waits on, so the
            loop's rate is the agent's rate and nothing can be dropped (lost is counted:
            answers that came too late)
  fanotify  opens of a sensitive file: notifications the caller does not wait for, so the
            kernel queue can overflow; overflows are counted as lost
Events per core = events the agent handled / CPU seconds the agent used (from /proc).

Run as root: python3 bench/agent_throughput.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import cgroup_driver, progress, temp_store

from hvtsm.lifecycle import Manager
from hvtsm.policy import parse_policy
from hvtsm.zones.base import WorkloadIO

POLICY = """
name = "throughput"
[[phase]]
at = "0s"
pids = 4096
[anomaly]
sensitive_paths = ["{decoy}"]
contain = "none"
reaction = "accelerate"
factor = 2
"""

LOOP = """
import os, sys, time
path, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
flags = os.O_WRONLY | os.O_CREAT if mode == "create" else os.O_RDONLY
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(100):
        os.close(os.open(path, flags, 0o600))
    n += 100
print("OPS", n, flush=True)
time.sleep(7)  # alive until the agent's next stats report covers the whole loop
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hvtsm-tput-", dir="/var/tmp"))
    work.chmod(0o777)
    (work / "loop.py").write_text(LOOP)
    decoy = work / "secret"
    decoy.write_text("s")
    decoy.chmod(0o644)
    text = POLICY.format(decoy=decoy)
    policy = parse_policy(text.encode(), source="throughput.toml")
    store = temp_store()
    manager = Manager(store, cgroup_driver())
    driver: Any = manager.driver
    manager.start()
    try:
        for name, target, mode in (("seccomp", work / "created", "create"),
                                   ("fanotify", decoy, "read")):
            progress(f"{name}: running {args.seconds:g} s")
            with tempfile.TemporaryFile() as out:
                run = manager.launch(policy, ["/usr/bin/python3", str(work / "loop.py"),
                                              str(target), mode, str(args.seconds)],
                                     io=WorkloadIO(stdout=out.fileno(), stderr=out.fileno()),
                                     user="nobody", policy_toml=text)
                agent_pid = run.handle.state.agent_pid
                cpu0 = cpu_seconds(agent_pid)
                time.sleep(args.seconds + 6.5)
                cpu = cpu_seconds(agent_pid) - cpu0
                stats = dict(driver.agents.sink(run.zone_id).stats)
                run.ended.wait(30)
                out.seek(0)
                output = out.read().decode(errors="replace")
            progress("")
            ops = int(m.group(1)) if (m := re.search(r"OPS (\d+)", output)) else 0
            handled = stats.get("notifications" if name == "seccomp" else "file_events", 0)
            print(f"{name}: workload made {ops} events in {args.seconds:g} s "
                  f"({ops / args.seconds:,.0f}/s); agent stats: {stats}")
            print(f"  agent CPU {cpu:.2f} s -> {handled / cpu if cpu else float('nan'):,.0f} "
                  f"events per agent core-second; lost {stats.get('lost', 0)}, "
                  f"dropped {stats.get('dropped', 0)}")
    finally:
        manager.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
