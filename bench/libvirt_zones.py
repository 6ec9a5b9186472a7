"""Libvirt zones: cold start against plain QEMU, tightening latencies, guests per host.

1. Zone start to agent hello, cold, against booting the same kernel and initramfs with
   plain qemu-system-x86_64 (same accelerator, memory, 9p root, virtio-serial port, no
   NIC for either) in the same run. Goal: hvtsm adds under 10 %.
2. Each tightening's latency from its scheduled time to the effect seen inside the guest
   (a watcher in the guest prints each change; the host stamps the line on arrival, so
   the figures include the agent's relay): link down (goal p99 < 100 ms), NIC unplug
   complete (audit), balloon seen by the guest, terminate (domain gone).
3. Guests per host: cold starts of k lab zones at once until the mean start time doubles.

Run as root: python3 bench/libvirt_zones.py [--runs 5] [--max-guests 8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import percentile, progress, summary, temp_store

from hvtsm.host import probe_host
from hvtsm.image.lab import build_lab_image, kernel_cmdline
from hvtsm.lifecycle import Manager
from hvtsm.monitor.link import AgentLink
from hvtsm.policy import parse_policy
from hvtsm.restrictions import NetworkMode, Restrictions
from hvtsm.store.audit import zone_trail
from hvtsm.zones.base import Backend, WorkloadIO, ZoneSpec
from hvtsm.zones.factory import driver_factory
from hvtsm.zones.libvirt.driver import LibvirtDriver, LibvirtOptions, domain_name
from hvtsm.zones.logged import LoggedEvents

MEMORY = 512 * 1024 * 1024


def driver() -> LibvirtDriver:
    """A driver outside any lifecycle (cold starts, guests per host)."""
    made = driver_factory(Backend.LIBVIRT, probe_host(), libvirt=LibvirtOptions())(
        LoggedEvents())
    assert isinstance(made, LibvirtDriver)
    return made


def hvtsm_cold_start(drv: LibvirtDriver, index: int) -> float:
    zone_id = f"zbench{index:03d}"
    t0 = time.monotonic()
    handle = drv.create(ZoneSpec(zone_id=zone_id, net_index=900 + index, user="root"),
                        Restrictions(network=NetworkMode.LOOPBACK, memory=MEMORY))
    took = time.monotonic() - t0
    drv.terminate(handle)
    return took


def plain_qemu_cold_start(drv: LibvirtDriver) -> float:
    image = build_lab_image()
    accel = "kvm" if drv.accel.accel.domain_type == "kvm" else "tcg"
    agent_dir = drv.guest_agent_dir()  # the same agent files the zones use
    tmp = Path(tempfile.mkdtemp(prefix="hvtsm-qemu-"))
    sock = tmp / "agent.sock"
    cmdline = kernel_cmdline(python=drv.guest_python(), agent_path=str(agent_dir), ip=None,
                             gateway=None)
    argv = [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-accel", accel,
            "-m", str(MEMORY // (1024 * 1024)), "-smp", "1", "-display", "none",
            "-nodefaults", "-no-user-config", "-kernel", str(image.kernel), "-initrd",
            str(image.initrd), "-append", cmdline, "-serial", f"file:{tmp / 'console.log'}",
            "-fsdev", "local,id=root,path=/,security_model=passthrough,readonly=on,"
            "multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
            # port 0 of a virtio-serial bus is the console's: libvirt uses 1 as well
            "-device", "virtserialport,chardev=agent,nr=1,name=org.hvtsm.agent.0",
            "-device", "virtio-balloon-pci",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-pci,rng=rng0"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        link = AgentLink.connect(str(sock), timeout=120)
        link.wait_hello(120)
        took = time.monotonic() - t0
        link.close()
        return took
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


WATCHER = r"""
import sys, time
def read(p):
    try:
        return open(p).read().strip()
    except OSError:
        return 'gone'
def memtotal():
    for line in open('/proc/meminfo'):
        if line.startswith('MemTotal:'):
            return line.split()[1]
last = {}
while True:
    now = {'link': read('/sys/class/net/eth0/carrier'), 'mem': memtotal()}
    for k, v in now.items():
        if last.get(k) != v:
            print(k, v, flush=True)
            last[k] = v
    time.sleep(0.001)
"""

POLICY = """
name = "bench"
[[phase]]
at = "0s"
network = "full"
memory = "512MiB"
[[phase]]
at = "3s"
memory = "256MiB"
[[phase]]
at = "8s"
network = "loopback"
[[phase]]
at = "12s"
action = "terminate"
"""


def tightenings(runs: int) -> dict[str, list[float]]:
    store = temp_store()
    manager = Manager(store, driver_factory(Backend.LIBVIRT, probe_host(),
                                            libvirt=LibvirtOptions()))
    drv: Any = manager.driver
    manager.start()
    policy = parse_policy(POLICY.encode(), source="bench.toml")
    out: dict[str, list[float]] = {"link down": [], "unplug complete": [], "balloon seen": [],
                                   "terminate": []}
    for i in range(runs):
        progress(f"tightenings: guest {i + 1}/{runs}")
        run = manager.launch(policy, ["python3", "-c", WATCHER], policy_toml=POLICY,
                             user="root", io=WorkloadIO(stdout=subprocess.PIPE))
        lines: list[tuple[float, str, str]] = []
        assert run.workload is not None and run.workload.stdout is not None
        pipe = run.workload.stdout

        def read(pipe=pipe, lines=lines) -> None:
            for raw in iter(pipe.readline, b""):
                key, _, value = raw.decode().strip().partition(" ")
                lines.append((time.time(), key, value))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        name = domain_name(run.zone_id)
        run.ended.wait(60)
        gone_at = time.time()
        reader.join(2)
        due = {p.index: run.started_at + p.at_ms / 1000 for p in policy.phases}
        link = [t for t, k, v in lines if k == "link" and v != "1" and t >= due[2] - 0.5]
        mem = [t for t, k, v in lines if k == "mem" and int(v) <= 262144 and t >= due[1] - 0.5]
        if link:
            out["link down"].append((link[0] - due[2]) * 1000)
        if mem:
            out["balloon seen"].append((mem[0] - due[1]) * 1000)
        with store.session() as session:
            for entry in zone_trail(session, zone_id=run.zone_id):
                if entry.kind == "nic-unplugged":
                    out["unplug complete"].append((entry.ts - due[2]) * 1000)
                if entry.kind == "phase" and entry.data.get("phase") == 3:
                    out["terminate"].append(entry.data["lag_ms"])
        with contextlib.suppress(Exception):
            drv.connection.get().lookupByName(name)
            print(f"warning: {name} still exists {gone_at}", file=sys.stderr)
    progress("")
    manager.shutdown()
    return out


def guests_per_host(max_guests: int, single: float) -> list[tuple[int, float]]:
    drv = driver()
    rows = []
    for k in [n for n in (1, 2, 3, 4, 6, 8, 12, 16) if n <= max_guests]:
        progress(f"guests per host: {k} at once")
        times: list[float] = []

        def one(index: int, times: list[float] = times) -> None:
            times.append(hvtsm_cold_start(drv, index))

        threads = [threading.Thread(target=one, args=(100 * k + i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mean = sum(times) / len(times)
        rows.append((k, mean))
        if mean >= 2 * single:
            break
    progress("")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-guests", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    drv = driver()
    print(f"accelerator: {drv.accel.accel} ({drv.accel.reason})")
    hv, plain = [], []
    for i in range(args.runs):
        progress(f"cold start {i + 1}/{args.runs}")
        plain.append(plain_qemu_cold_start(drv))
        hv.append(hvtsm_cold_start(drv, i))
    progress("")
    p50_hv, p50_plain = percentile(hv, 50), percentile(plain, 50)
    print(summary("zone start to agent hello, hvtsm", [t * 1000 for t in hv]))
    print(summary("same kernel+initramfs, plain qemu-system-x86_64", [t * 1000 for t in plain]))
    print(f"hvtsm overhead at p50: {(p50_hv / p50_plain - 1) * 100:+.1f} % (goal < 10 %)")
    for name, values in tightenings(args.runs).items():
        if values:
            print(summary(f"{name}, scheduled -> seen", values))
        else:
            print(f"{name}: no samples")
    rows = guests_per_host(args.max_guests, p50_hv)
    for k, mean in rows:
        print(f"{k} guest(s) started at once: mean start {mean:.1f} s "
              f"({mean / p50_hv:.2f}x a single start)")


if __name__ == "__main__":
    main()
