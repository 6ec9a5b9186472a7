"""Channel speed between two zones: message latency and throughput through the broker.

Each message goes workload -> its agent (unix socket in the zone) -> the agent link -> the
host broker (grant check, reassembly, audit row) -> the receiving zone's agent link -> its
agent -> the receiving workload; `send` returns once the broker's verdict came back.

  latency     64-byte ping-pong between zones A and B: round trip / 2, and one-way (A puts
              its send time in the message, B subtracts it from its receive time: cgroup
              zones share the host clock; guests do not, so only round trip / 2 there)
  throughput  A sends 1 KiB and 256 KiB messages to B as fast as verdicts come back, for
              --seconds; B counts what it received: MiB/s and messages/s

Both zones are watched by their agents (seccomp, sampling) as in production, with a policy
that grants A <-> B generously (max_rate 1e6, max_message 256 KiB).

Run as root: python3 bench/channel_speed.py [--count 300] [--seconds 3] [--libvirt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import cgroup_driver, summary, temp_store

from hvtsm.lifecycle import Manager, ZoneRun
from hvtsm.policy import parse_policy
from hvtsm.policy.model import ChannelGrant
from hvtsm.zones.base import Backend, WorkloadIO

POLICY = """
name = "bench-channels"
[[phase]]
at = "0s"
network = "none"
[[phase]]
at = "10m"
action = "terminate"
[anomaly]
monitor = true
reaction = "accelerate"
"""
GRANTS = [ChannelGrant("a", "b", both=True, max_rate=1e6, max_message=256 * 1024)]

#: zone A: ping-pong, then throughput; prints one JSON line
PINGER = r"""
import json, sys, time
from guest_agent.channel import open_channel
count, seconds = int(sys.argv[1]), float(sys.argv[2])
ch = open_channel()
rtt = []
for i in range(count):
    t0 = time.time()
    ch.send("b", b"%020.6f" % t0 + b"x" * 44)
    sender, data = ch.recv(timeout=30)
    rtt.append((time.time() - t0) * 1000)
result = {"rtt_ms": rtt, "throughput": {}}
for size in (1024, 256 * 1024):
    data = b"y" * size
    sent = 0
    end = time.time() + seconds
    while time.time() < end:
        ch.send("b", data, timeout=60)
        sent += 1
    ch.send("b", b"done", timeout=60)
    result["throughput"][size] = sent
print(json.dumps(result), flush=True)
"""

#: zone B: answers pings (recording one-way latency), then counts the throughput phases
PONGER = r"""
import json, sys, time
from guest_agent.channel import open_channel
count = int(sys.argv[1])
ch = open_channel()
one_way = []
for i in range(count):
    sender, data = ch.recv(timeout=60)
    one_way.append((time.time() - float(data[:20])) * 1000)
    ch.send("a", data)
phases = {}
for size in (1024, 256 * 1024):
    n = 0
    first = last = None
    while True:
        sender, data = ch.recv(timeout=60)
        if data == b"done":
            break
        now = time.time()
        first = first or now
        last = now
        n += 1
    phases[size] = {"received": n, "seconds": (last - first) if n > 1 else 0.0}
print(json.dumps({"one_way_ms": one_way, "phases": phases}), flush=True)
"""


def launch(manager: Manager, policy: object, script: str, name: str, args: list[str],
           backend: Backend) -> ZoneRun:
    python = "/usr/bin/python3"
    return manager.launch(policy, [python, "-c", script, *args], name=name, group="bench",
                          policy_toml=POLICY, backend=backend,  # type: ignore[arg-type]
                          io=WorkloadIO(stdout=subprocess.PIPE, stderr=subprocess.PIPE))


def run(backend: Backend, count: int, seconds: float) -> None:
    if backend is Backend.CGROUP:
        driver = cgroup_driver()
    else:
        from common import probe_host  # type: ignore[attr-defined]

        from hvtsm.zones.factory import driver_factory
        driver = driver_factory(Backend.LIBVIRT, probe_host())
    store = temp_store()
    manager = Manager(store, driver)
    manager.start()
    try:
        policy = parse_policy(POLICY.encode(), source="bench-channels.toml")
        manager.broker.open_group("bench", ["a", "b"], GRANTS)
        b = launch(manager, policy, PONGER, "b", [str(count)], backend)
        a = launch(manager, policy, PINGER, "a", [str(count), str(seconds)], backend)
        assert a.workload is not None and b.workload is not None
        a_out, a_err = a.workload.stdout.read(), a.workload.stderr.read()
        b_out, b_err = b.workload.stdout.read(), b.workload.stderr.read()
        if not a_out or not b_out:
            sys.exit(f"a benchmark zone failed:\nA: {a_err.decode()[-2000:]}\n"
                     f"B: {b_err.decode()[-2000:]}")
        pinger, ponger = json.loads(a_out), json.loads(b_out)
        rtt = pinger["rtt_ms"][5:]  # the first few warm up imports and buckets
        print(f"[{backend}] {summary('latency, round trip / 2 (64 B)', [r / 2 for r in rtt])}")
        if backend is Backend.CGROUP:
            print(f"[{backend}] {summary('latency, one-way (64 B)', ponger['one_way_ms'][5:])}")
        for size, phase in ponger["phases"].items():
            n, secs = phase["received"], phase["seconds"]
            if n < 2 or secs <= 0:
                print(f"[{backend}] throughput {int(size) // 1024} KiB: too few messages ({n})")
                continue
            rate = (n - 1) / secs
            print(f"[{backend}] throughput {int(size) // 1024:>3} KiB messages: "
                  f"{rate:8.1f} msgs/s, {rate * int(size) / 2**20:7.2f} MiB/s "
                  f"({n} messages in {secs:.2f} s)")
        manager.wait(a.zone_id, 30)
        manager.wait(b.zone_id, 30)
    finally:
        manager.shutdown()
        store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="ping-pong round trips")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput phase")
    parser.add_argument("--libvirt", action="store_true",
                        help="also between two TCG guests (about 20 s to boot them)")
    args = parser.parse_args()
    run(Backend.CGROUP, args.count, args.seconds)
    if args.libvirt:
        run(Backend.LIBVIRT, max(20, args.count // 10), args.seconds)


if __name__ == "__main__":
    main()
