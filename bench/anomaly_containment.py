"""Anomaly to containment: from the offending system call to the process killed (inside the
zone, by its agent) and to the zone frozen (by the host's reaction).

Each run starts a corpus program under the default policy with `reaction = "freeze"`; the
program prints the monotonic time just before its act (`ACT name t`), the agent's
evidence carries the monotonic time of the kill (same clock: the host's for a cgroup zone,
the guest's for a guest), and the freeze reaction's audit time says when the host had
frozen the zone (same clock as the act only for cgroup zones; for guests the host's own
share, anomaly received -> frozen, is printed instead).

Two paths: ptrace (a deny-listed call: seccomp user notification) and a credential read
(a sensitive file: fanotify).

Run as root: python3 bench/anomaly_containment.py [--backend cgroup|libvirt] [--runs 20]
Goals: cgroup zones p99 < 50 ms, guest zones under TCG p99 < 300 ms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import percentile, progress, summary, temp_store

from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager
from hvtsm.policy import parse_policy
from hvtsm.store.audit import zone_trail
from hvtsm.zones.base import Backend, WorkloadIO
from hvtsm.zones.factory import driver_factory
from tests.integration.monitor_corpus import (
    DEFAULT_POLICY,
    PYTHON,
    corpus_dir,
    decoy_key,
)

PROGRAMS = {"ptrace (seccomp)": ("ptrace_attach.py", []),
            "credential read (fanotify)": ("cred_read.py", ["/home/hvtsm-decoy/.ssh/id_ed25519"])}


def freeze_policy() -> tuple[str, object]:
    text = DEFAULT_POLICY.read_text()
    text = text.replace('reaction = "accelerate"', 'reaction = "freeze"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("on = "))
    return text, parse_policy(text.encode(), source="bench-freeze.toml")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["cgroup", "libvirt"], default="cgroup")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    backend = Backend(args.backend)
    store = temp_store()
    manager = Manager(store, driver_factory(backend, probe_host()))
    manager.start()
    text, policy = freeze_policy()
    offset = time.time() - time.monotonic()
    kills: dict[str, list[float]] = {k: [] for k in PROGRAMS}
    frozen: dict[str, list[float]] = {k: [] for k in PROGRAMS}
    host_share: dict[str, list[float]] = {k: [] for k in PROGRAMS}
    try:
        with corpus_dir() as corpus, decoy_key():
            for name, (program, extra) in PROGRAMS.items():
                for i in range(args.runs):
                    progress(f"{name} {i + 1}/{args.runs}")
                    out = Path(corpus.parent / f"out-{i}")
                    with open(out, "w+b") as f:
                        run = manager.launch(policy, [PYTHON, str(corpus / program), *extra],
                                             io=WorkloadIO(stdout=f.fileno(), stderr=f.fileno()),
                                             user="nobody", policy_toml=text)
                        deadline = time.monotonic() + 60
                        while time.monotonic() < deadline and not run.ended.is_set():
                            manager.settle(1)
                            with store.session() as session:
                                trail = zone_trail(session, zone_id=run.zone_id)
                            if any(e.kind == "reaction" for e in trail):
                                break
                            time.sleep(0.05)
                        manager.terminate(run.zone_id, reason="bench run done")
                        run.ended.wait(30)
                        f.seek(0)
                        output = f.read().decode(errors="replace")
                    act = next((float(line.split()[2]) for line in output.splitlines()
                                if line.startswith("ACT ")), None)
                    anomaly = next((e for e in trail if e.kind == "anomaly"), None)
                    reaction = next((e for e in trail if e.kind == "reaction"
                                     and e.data["action"] == "freeze"), None)
                    if act is None or anomaly is None:
                        print(f"\n{name} run {i}: no act or no anomaly: {output[-200:]!r}")
                        continue
                    contained = anomaly.data["evidence"].get("contained_mono")
                    if isinstance(contained, int | float):
                        kills[name].append((contained - act) * 1000)
                    if reaction is not None:
                        host_share[name].append((reaction.ts - anomaly.ts) * 1000)
                        if backend is Backend.CGROUP:
                            frozen[name].append((reaction.ts - (act + offset)) * 1000)
    finally:
        progress("")
        manager.shutdown()
    print(f"anomaly to containment, {args.backend} zones, {args.runs} runs per path")
    for name in PROGRAMS:
        if kills[name]:
            print(summary(f"  {name}: act -> process killed in the zone", kills[name]))
        if frozen[name]:
            print(summary(f"  {name}: act -> zone frozen by the host", frozen[name]))
        if host_share[name]:
            print(summary(f"  {name}: anomaly audited -> zone frozen (host share)",
                          host_share[name]))
    worst = max((percentile(v, 99) for v in kills.values() if v), default=float("nan"))
    goal = 50 if backend is Backend.CGROUP else 300
    print(f"goal: p99 < {goal} ms; worst kill p99 {worst:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
