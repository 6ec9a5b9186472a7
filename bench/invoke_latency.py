"""Invoke latency, cold (a guest booted for the request) against warm (a guest from the
pool, its runtime already started and watched: a standby, guest_agent/standby.py), in
process, for a trivial Python program and a trivial shell script. A second warm pass runs
with the pool's standbys off (each warm start is a normal watched start) for comparison.

Latency is request in -> result ready (output drained, exit status and anomalies read from
the store); the guest's release afterwards (scrub, back to idle) is printed on its own.
The warm runs also print where the time goes: prepare (store + analyze the code, load the
policy), claim (a pool guest), start (zone row, bind, the agent starting the watched
workload), run (the program itself, to its exit and the zone's end).
With --no-monitor a second warm pass runs under a policy without the agent's watch, to
show what monitoring costs per request.

Run as root with libvirtd up: python3 bench/invoke_latency.py [--cold 3] [--warm 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import percentile, progress, summary, temp_store

from hvtsm.host import probe_host
from hvtsm.invoke import Invoker, InvokeRequest, InvokeResult
from hvtsm.lifecycle import Manager
from hvtsm.pool.rules import PoolKey
from hvtsm.pool.warm import WarmPool
from hvtsm.zones.base import Backend
from hvtsm.zones.factory import driver_factory

PROGRAMS = {"python3": (b"print('ok')\n", "trivial.py"),
            "sh": (b"#!/bin/sh\necho ok\n", "trivial.sh")}
NO_MONITOR = """name = "bench-no-monitor"
[[phase]]
at = "0s"
network = "full"
cpu_shares = 1024
memory = "1GiB"
[[phase]]
at = "10m"
action = "terminate"
[anomaly]
monitor = false
"""


def run(invoker: Invoker, runtime: str, *, warm: bool, n: int, label: str,
        policy: str | None = None) -> tuple[list[InvokeResult], list[float]]:
    code, name = PROGRAMS[runtime]
    results, releases = [], []
    for i in range(n):
        progress(f"{label}: {i + 1}/{n}")
        t0 = time.monotonic()
        result = invoker.invoke(InvokeRequest(code=code, name=name, warm=warm, policy=policy))
        total = (time.monotonic() - t0) * 1000
        if result.stdout != b"ok\n" or result.exit_status != 0 or result.warm != warm:
            sys.exit(f"\n{label}: unexpected result {result.to_json()}")
        results.append(result)
        releases.append(total - result.latency_ms)
    progress("")
    return results, releases


def report(label: str, results: list[InvokeResult], releases: list[float]) -> None:
    print(summary(f"{label} latency", [r.latency_ms for r in results]))
    steps = {"prepare": [], "claim": [], "start": [], "run": []}  # type: dict[str, list[float]]
    for r in results:
        t = r.timings_ms
        steps["prepare"].append(t["prepare"])
        steps["claim"].append(t["claim"] - t["prepare"])
        steps["start"].append(t["started"] - t["claim"])
        steps["run"].append(t["ended"] - t["started"])
    print("    p50 by step: " + ", ".join(f"{k} {percentile(v, 50):.0f} ms"
                                         for k, v in steps.items()))
    print(summary(f"    {label} release (scrub, back to the pool)", releases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=3, help="cold runs per program")
    parser.add_argument("--warm", type=int, default=20, help="warm runs per program")
    parser.add_argument("--no-standby-runs", type=int, default=None,
                        help="warm runs per program with standbys off (default: --warm)")
    parser.add_argument("--no-monitor", action="store_true",
                        help="also a warm pass under a policy without monitoring")
    args = parser.parse_args()
    store = temp_store()
    manager = Manager(store, driver_factory(Backend.LIBVIRT, probe_host()), actor="bench")
    driver: Any = manager.driver
    manager.start()
    # one guest per runtime serves every warm run (the 20-use retirement would cut in)
    pool = WarmPool(store, driver, idle=manager.events, max_uses=1_000_000)
    invoker = Invoker(manager, pool=pool)
    try:
        print(f"accelerator: {driver.accel.accel} ({driver.accel.reason})")  # type: ignore[attr-defined]
        boots = [threading.Thread(target=pool.fill, args=(PoolKey(r, "untrusted"), 1))
                 for r in PROGRAMS]
        t0 = time.monotonic()
        for t in boots:
            t.start()
        for t in boots:
            t.join()
        print(f"pool: {len(PROGRAMS)} guests booted in parallel in "
              f"{time.monotonic() - t0:.1f} s")
        for runtime in PROGRAMS:
            warm, warm_rel = run(invoker, runtime, warm=True, n=args.warm,
                                 label=f"warm {runtime}")
            report(f"warm {runtime} (standby)", warm, warm_rel)
            used = sum(1 for r in warm if r.from_standby)
            print(f"    served by a standby: {used} of {len(warm)}")
            plain_n = args.warm if args.no_standby_runs is None else args.no_standby_runs
            if plain_n:
                pool.standby = False
                cold_start, cold_rel = run(invoker, runtime, warm=True, n=plain_n,
                                           label=f"warm {runtime} no standby")
                pool.standby = True
                report(f"warm {runtime}, no standby", cold_start, cold_rel)
                # the guest's next release prepares a standby again
            if args.no_monitor:
                with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
                    f.write(NO_MONITOR)
                plain, plain_rel = run(invoker, runtime, warm=True, n=args.warm,
                                       label=f"warm {runtime} no monitor", policy=f.name)
                report(f"warm {runtime}, no monitoring", plain, plain_rel)
                Path(f.name).unlink()
        for runtime in PROGRAMS:
            if args.cold:
                cold, cold_rel = run(invoker, runtime, warm=False, n=args.cold,
                                     label=f"cold {runtime}")
                report(f"cold {runtime}", cold, cold_rel)
    finally:
        pool.close(drain=True)
        manager.shutdown()
        store.dispose()


if __name__ == "__main__":
    main()
