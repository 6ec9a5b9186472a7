"""Phase lag when no controller runs: the zone's agent (its deputy) applies the phase,
against the controller's own lag, in the same run.

  controller   N cgroup zones, their controller alive: the lag of phases 1 and 2 as the
               controller recorded it (applied - scheduled)
  deputy       N cgroup zones whose controller is SIGKILLed (a real process, killed with
               its zones running) before their first phase; their agents apply phases 1 and
               2 and the terminate; a controller that resumes afterwards records each at the
               agent's time: the lag is the agent's (its grace, DEPUTY_GRACE_S, included)

Both sets of zones run the same policy (memory lowered, then the network cut, then the
end), unwatched (monitoring off), so what is measured is the schedule and not the agent's
watching.

Run as root: python3 bench/deputy_lag.py [--n 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from common import cgroup_driver, percentile, progress, summary, temp_store
from sqlmodel import select

from hvtsm.lifecycle import Manager
from hvtsm.lifecycle.deputy import DEPUTY_GRACE_S
from hvtsm.policy import parse_policy
from hvtsm.store import Store
from hvtsm.store.models import PhaseApplied
from hvtsm.zones.base import WorkloadIO

BY_AGENT = "applied by the zone's agent"


def policy_text(first_s: float) -> str:
    return f"""
name = "deputy-bench"
[[phase]]
at = "0s"
network = "full"
memory = "256MiB"
[[phase]]
at = "{int(first_s * 1000)}ms"
memory = "128MiB"
[[phase]]
at = "{int(first_s * 1000) + 1000}ms"
network = "loopback"
[[phase]]
at = "{int(first_s * 1000) + 2000}ms"
action = "terminate"
[anomaly]
monitor = false
"""


def launch(manager: Manager, n: int, text: str) -> list[str]:
    policy = parse_policy(text.encode(), source="deputy-bench.toml")
    # the workloads must not hold the pipes of whoever runs the dying controller
    quiet = os.open(os.devnull, os.O_RDWR)
    ids = []
    for i in range(n):
        progress(f"launching {i + 1}/{n}")
        ids.append(manager.launch(policy, ["sleep", "600"], user="nobody", policy_toml=text,
                                  io=WorkloadIO(quiet, quiet, quiet)).zone_id)
    progress("")
    return ids


def lags(store: Store, ids: list[str]) -> tuple[list[float], list[float]]:
    """(lags of phases 1-2 applied by the zones' agents, those applied by a controller)."""
    agent, controller = [], []
    with store.session() as session:
        for row in session.exec(select(PhaseApplied).where(PhaseApplied.phase_index > 0)):
            if row.zone_id in ids and row.phase_index in (1, 2):
                (agent if BY_AGENT in row.note else controller).append(row.lag_ms)
    return agent, controller


def alive_controller(n: int) -> list[float]:
    store = temp_store()
    manager = Manager(store, cgroup_driver())
    manager.start()
    ids = launch(manager, n, policy_text(max(3.0, 0.3 * n)))
    for zone_id in ids:
        manager.wait(zone_id, 60)
    manager.shutdown()
    agent, controller = lags(store, ids)
    if agent:
        print(f"  (with the controller alive, {len(agent)} phase(s) were the agents': it was "
              "late)")
    return controller + agent


def child(db: str, n: int) -> None:
    """The controller that dies: launches the zones, says so, and SIGKILLs itself."""
    store = Store(db)
    manager = Manager(store, cgroup_driver())
    manager.start()
    ids = launch(manager, n, policy_text(max(3.0, 0.3 * n)))
    print(" ".join(ids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def killed_controller(n: int) -> tuple[list[float], list[float], float]:
    store = temp_store()
    proc = subprocess.Popen([sys.executable, __file__, "--child", store.url, "--n", str(n)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ids = proc.stdout.readline().split()
    assert proc.wait(60) == -signal.SIGKILL and len(ids) == n, ids
    killed = time.time()
    wait = max(3.0, 0.3 * n) + 2 + 1.0  # the last zone's end falls due, and then some
    while time.time() < killed + wait:
        progress(f"no controller: {killed + wait - time.time():.0f} s to wait")
        time.sleep(0.5)
    progress("")
    resumed = Manager(store, cgroup_driver())
    resumed.start(adopt=True)
    for zone_id in ids:
        run = resumed.zones.get(zone_id)
        if run is not None:
            run.ended.wait(30)
    resumed.shutdown()
    agent, controller = lags(store, ids)
    return agent, controller, killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--child", metavar="DB")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n)
        return
    print(f"deputy grace {DEPUTY_GRACE_S * 1000:.0f} ms; {args.n} zones per part")
    alive = alive_controller(args.n)
    agent, controller, _ = killed_controller(args.n)
    print(summary("phase lag, controller alive (applied by the controller)", alive))
    if agent:
        print(summary("phase lag, controller SIGKILLed (applied by the zone's agent)", agent)
              + f"  minus the grace: p50 "
              f"{percentile(agent, 50) - DEPUTY_GRACE_S * 1000:.2f}ms")
    print(f"phases the agents applied: {len(agent)}/{len(agent) + len(controller)}"
          + (f" (the others by the resumed controller, late: p50 "
             f"{percentile(controller, 50):.0f}ms)" if controller else ""))


if __name__ == "__main__":
    main()
