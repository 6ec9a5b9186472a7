"""Phase lag: scheduled time -> restriction observed in force from inside the zone.

Part 1: one zone at a time, a probe in the zone polling every 0.5 ms (goal p99 < 20 ms).
Part 2: 200 concurrent zones of 5 phases each (goal p99 < 50 ms): the controller-side lag
of every transition from the audit store, and the in-zone observed lag from probes in a
sample of the zones (a probe in every zone would eat the 2 CPUs it is meant to measure).

Run as root: python3 bench/phase_lag.py [--zones 200] [--runs 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

from common import cgroup_driver, percentile, progress, rss_mib, summary, temp_store
from sqlmodel import select

from hvtsm.lifecycle import Manager, ZoneRun
from hvtsm.policy import parse_policy
from hvtsm.store.models import PhaseApplied
from hvtsm.zones.base import WorkloadIO

PROBE = str(Path(__file__).with_name("probe.py"))


def policy_text(step_ms: int) -> str:
    s = step_ms
    return f"""
name = "bench"
[[phase]]
at = "0s"
network = "full"
memory = "512MiB"
pids = 256
[[phase]]
at = "{s}ms"
memory = "256MiB"
[[phase]]
at = "{2 * s}ms"
network = "loopback"
pids = 128
[[phase]]
at = "{3 * s}ms"
memory = "128MiB"
cpu_quota = 50
[[phase]]
at = "{4 * s}ms"
action = "terminate"
"""


#: which probe field shows each phase in force, and the value it shows
EXPECT = {1: ("memory", str(256 * 1024**2)), 2: ("net", "no"), 3: ("memory", str(128 * 1024**2))}


def observed_lags(run: ZoneRun, lines: list[str]) -> list[float]:
    """Per phase 1-3: first time the probe saw the new value, minus the scheduled time."""
    lags = []
    for index, (field, value) in EXPECT.items():
        due = run.started_at + run.policy.phases[index].at_ms / 1000
        seen = [float(t) for t, f, v in (ln.split() for ln in lines if ln.count(" ") == 2)
                if f == field and v == value]
        later = [t for t in seen if t >= due - 0.5]
        if later:
            lags.append((later[0] - due) * 1000)
    return lags


def collect(run: ZoneRun, sink: list[str]) -> threading.Thread:
    assert run.workload is not None and run.workload.stdout is not None
    pipe = run.workload.stdout

    def read() -> None:
        for raw in iter(pipe.readline, b""):
            sink.append(raw.decode().strip())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def one_zone(runs: int) -> list[float]:
    store = temp_store()
    manager = Manager(store, cgroup_driver())
    manager.start()
    text = policy_text(700)
    policy = parse_policy(text.encode(), source="bench.toml")
    lags: list[float] = []
    for i in range(runs):
        progress(f"one zone: run {i + 1}/{runs}")
        run = manager.launch(policy, [sys.executable, PROBE, "0.0005", "10"],
                             io=WorkloadIO(stdout=subprocess.PIPE), user="root",
                             policy_toml=text)
        lines: list[str] = []
        reader = collect(run, lines)
        run.ended.wait(30)
        reader.join(5)
        lags.extend(observed_lags(run, lines))
    progress("")
    manager.shutdown()
    return lags


def many_zones(count: int, sampled: int) -> tuple[list[float], list[float], float, float]:
    store = temp_store()
    manager = Manager(store, cgroup_driver())
    manager.start()
    # start all zones first; the timeline's first step waits until every zone runs
    step = max(4000, count * 40)
    text = policy_text(step)
    policy = parse_policy(text.encode(), source="bench.toml")
    runs: list[ZoneRun] = []
    probes: dict[str, list[str]] = {}
    readers = []
    every = max(1, count // max(1, sampled))
    for i in range(count):
        progress(f"{count} zones: starting {i + 1}/{count}")
        if i % every == 0 and len(probes) < sampled:
            run = manager.launch(policy, [sys.executable, PROBE, "0.002", str(5 * step / 1000)],
                                 io=WorkloadIO(stdout=subprocess.PIPE), user="root",
                                 policy_toml=text)
            probes[run.zone_id] = []
            readers.append(collect(run, probes[run.zone_id]))
        else:
            run = manager.launch(policy, ["sleep", "3600"], user="root", policy_toml=text)
        runs.append(run)
    rss_running = rss_mib()
    for i, run in enumerate(runs):
        progress(f"{count} zones: waiting for the timelines ({i}/{count} ended)")
        run.ended.wait(5 * step / 1000 + 60)
    progress("")
    for reader in readers:
        reader.join(5)
    rss_end = rss_mib()
    manager.shutdown()
    with store.session() as session:
        rows = session.exec(select(PhaseApplied).where(PhaseApplied.phase_index > 0)).all()
    applied = [p.lag_ms for p in rows]
    for index in sorted({p.phase_index for p in rows}):
        print(summary(f"  controller-side, phase {index}",
                      [p.lag_ms for p in rows if p.phase_index == index]))
    observed: list[float] = []
    by_id = {r.zone_id: r for r in runs}
    for zone_id, lines in probes.items():
        observed.extend(observed_lags(by_id[zone_id], lines))
    return applied, observed, rss_running, rss_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--zones", type=int, default=200)
    parser.add_argument("--sampled", type=int, default=10)
    args = parser.parse_args()
    lags = one_zone(args.runs)
    print(summary("one zone, observed in zone (goal p99 < 20 ms)", lags))
    applied, observed, rss_running, rss_end = many_zones(args.zones, args.sampled)
    print(summary(f"{args.zones} zones x 5 phases, controller-side (audit)", applied))
    print(summary(f"{args.zones} zones x 5 phases, observed in {args.sampled} sampled zones "
                  "(goal p99 < 50 ms)", observed))
    print(f"controller RSS with {args.zones} zones running: {rss_running:.1f} MiB "
          f"(goal < 300 MiB); after they ended: {rss_end:.1f} MiB")
    print(f"p99 check: one zone {percentile(lags, 99):.2f} ms, {args.zones} zones "
          f"{percentile(observed, 99):.2f} ms")


if __name__ == "__main__":
    main()
