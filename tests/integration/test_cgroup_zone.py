"""The cgroup driver against the real kernel: every limit checked from inside the zone."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hvtsm.errors import ZoneError
from hvtsm.host import HostCapabilities, probe_host
from hvtsm.restrictions import EgressRule, FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones.base import ZONE_USER, Workload, WorkloadIO, ZoneHandle, ZoneSpec
from hvtsm.zones.cgroup.cgroupfs import CgroupV2, read_file, write_file
from hvtsm.zones.cgroup.driver import CgroupDriver
from hvtsm.zones.cgroup.mounts import ref_path
from hvtsm.zones.cgroup.netns import SYS_NET, netns_path
from hvtsm.zones.logged import LoggedEvents

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

#: a Python that user nobody can run (a pyenv under /root is out of its reach)
PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

#: answers one command per stdin line: "connect HOST PORT", "write PATH", "cat PATH"
AGENT = r"""
import errno, socket, sys
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if cmd == "connect":
            socket.create_connection((args[0], int(args[1])), timeout=2).close()
        elif cmd == "write":
            with open(args[0], "w") as f:
                f.write("x")
        elif cmd == "cat":
            print(open(args[0]).read().replace("\n", "|"), flush=True)
            continue
        print("ok", flush=True)
    except OSError as e:
        print("fail", errno.errorcode.get(e.errno, type(e).__name__), flush=True)
"""


@pytest.fixture(scope="module")
def caps() -> HostCapabilities:
    caps = probe_host()
    if caps.cgroup_version is None:
        pytest.skip("no cgroup hierarchy on this host")
    return caps


@pytest.fixture(scope="module")
def driver(caps: HostCapabilities) -> CgroupDriver:
    return CgroupDriver(LoggedEvents(), caps)


class Agent:
    """The AGENT script running in a zone, asked one question at a time."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload

    def ask(self, line: str, timeout: float = 10) -> str:
        stdin = self.workload.stdin  # type: ignore[attr-defined]
        stdin.write(f"{line}\n".encode())
        stdin.flush()
        return read_line(self.workload, timeout)


def read_line(workload: Workload, timeout: float = 10) -> str:
    ready, _, _ = select.select([workload.stdout], [], [], timeout)
    assert ready, "no answer from the zone"
    return workload.stdout.readline().decode().strip()


@dataclass
class Zones:
    """Makes zones for one test and ends every one of them, whatever the test did."""

    driver: CgroupDriver
    handles: list[ZoneHandle] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)
    _next: int = field(default_factory=lambda: random.randrange(4000, 15000))

    def create(self, initial: Restrictions | None = None, *, user: str | None = ZONE_USER,
               net_index: int | None = None) -> ZoneHandle:
        zone_id = f"zt{os.urandom(4).hex()}"
        index = self.take_index() if net_index is None else net_index
        handle = self.driver.create(ZoneSpec(zone_id, index, user=user, cwd="/"),
                                    initial or Restrictions())
        self.handles.append(handle)
        return handle

    def take_index(self) -> int:
        self._next += 1
        return self._next

    def start(self, handle: ZoneHandle, argv: list[str], *, stdin: bool = False,
              stdout: bool = True) -> Workload:
        io = WorkloadIO(stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL)
        workload = self.driver.start(handle, argv, io)
        self.workloads.append(workload)
        return workload

    def agent(self, handle: ZoneHandle) -> Agent:
        return Agent(self.start(handle, [PY, "-c", AGENT], stdin=True))

    def cleanup(self) -> None:
        errors = []
        for handle in self.handles:
            try:
                self.driver.terminate(handle)
            except ZoneError as exc:
                errors.append(str(exc))
        for workload in self.workloads:
            for pipe in (getattr(workload, "stdin", None), workload.stdout):
                if pipe:
                    pipe.close()
            workload.wait(5)
        assert not errors, errors


@pytest.fixture
def zones(driver: CgroupDriver) -> Iterator[Zones]:
    made = Zones(driver)
    try:
        yield made
    finally:
        made.cleanup()


#: where a zone may write: its own scratch (everything else it sees is read-only)
SCRATCH = Path("/tmp")


class Listener:
    """TCP listeners on one address, accepting and closing connections."""

    def __init__(self, address: str, count: int) -> None:
        self.sockets = []
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # the zone's host-side address may not exist yet
            s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
            s.bind((address, 0))
            s.listen(16)
            s.settimeout(0.1)
            self.sockets.append(s)
        self.ports = [s.getsockname()[1] for s in self.sockets]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select(self.sockets, [], [], 0.1)
            for s in ready:
                with contextlib.suppress(OSError):
                    s.accept()[0].close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.sockets:
            s.close()


def host_ip(handle: ZoneHandle) -> str:
    return str(ipaddress.IPv4Interface(handle.state.host_addr).ip)


def zone_gone(handle: ZoneHandle) -> None:
    zone_id = handle.zone_id
    for d in handle.state.cgroups:
        assert not os.path.exists(d), d
    assert not netns_path(zone_id).exists()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"hvtsm-{zone_id}" not in netns
    assert not (SYS_NET / handle.state.host_if).exists()
    assert not ref_path(zone_id).exists()


# -- network ------------------------------------------------------------------------------

def test_network_full_then_loopback_then_none(zones: Zones) -> None:
    handle = zones.create()
    listener = Listener(host_ip(handle), 1)
    try:
        agent = zones.agent(handle)
        assert agent.ask(f"connect {host_ip(handle)} {listener.ports[0]}") == "ok"
        assert agent.ask("connect 127.0.0.1 1") == "fail ECONNREFUSED"  # loopback works

        report = zones.driver.apply(handle, handle.applied.merged(network=NetworkMode.LOOPBACK))
        assert report.changed == {"network": "loopback"}
        assert agent.ask(f"connect {host_ip(handle)} {listener.ports[0]}").startswith("fail")
        assert agent.ask("connect 127.0.0.1 1") == "fail ECONNREFUSED"
        assert not (SYS_NET / handle.state.host_if).exists()

        zones.driver.apply(handle, handle.applied.merged(network=NetworkMode.NONE))
        assert agent.ask("connect 127.0.0.1 1") == "fail ENETUNREACH"
        assert agent.ask(f"connect {host_ip(handle)} {listener.ports[0]}").startswith("fail")
    finally:
        listener.close()


def test_egress_allow_list_live(zones: Zones) -> None:
    handle = zones.create()
    ip = host_ip(handle)
    listener = Listener(ip, 2)
    allowed, other = listener.ports
    try:
        agent = zones.agent(handle)
        assert agent.ask(f"connect {ip} {other}") == "ok"
        rule = EgressRule(ipaddress.ip_network(f"{ip}/32"), allowed, allowed)
        zones.driver.apply(handle, handle.applied.merged(egress=(rule,)))
        assert agent.ask(f"connect {ip} {allowed}") == "ok"
        assert agent.ask(f"connect {ip} {other}") == "fail ECONNREFUSED"  # rejected
        assert agent.ask("connect 127.0.0.1 1") == "fail ECONNREFUSED"
    finally:
        listener.close()


def test_egress_allow_list_from_the_start(zones: Zones) -> None:
    index = zones.take_index()
    ip = str(zones.driver.zone_net("zprobe", index).host_addr.ip)
    listener = Listener(ip, 2)
    allowed, other = listener.ports
    try:
        handle = zones.create(Restrictions(egress=(EgressRule.parse(f"{ip}:{allowed}"),)),
                              net_index=index)
        agent = zones.agent(handle)
        assert agent.ask(f"connect {ip} {allowed}") == "ok"
        assert agent.ask(f"connect {ip} {other}") == "fail ECONNREFUSED"  # rejected
    finally:
        listener.close()


NAT_TWICE = """
import ipaddress, sys
from hvtsm.zones.cgroup.nft import ensure_nat
pool = ipaddress.IPv4Network("10.213.0.0/16")
print(ensure_nat(pool, nft=sys.argv[1]), ensure_nat(pool, nft=sys.argv[1]))
"""


def test_nat_rules_are_added_once(caps: HostCapabilities) -> None:
    """In a scratch namespace, so the host's own firewall is never touched."""
    if caps.nft is None:
        pytest.skip("nft is not installed")
    scratch = f"scratch-nat-{os.urandom(3).hex()}"  # not hvtsm-*: no zone
    subprocess.run(["ip", "netns", "add", scratch], check=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        out = subprocess.run(["ip", "netns", "exec", scratch, sys.executable, "-c", NAT_TWICE,
                              caps.nft], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.split() == ["True", "False"]
        rules = subprocess.run(["ip", "netns", "exec", scratch, caps.nft, "list", "ruleset"],
                               capture_output=True, text=True, check=True).stdout
        assert rules.count("masquerade") == 1
        assert 'iifname "hz*" oifname "hz*" drop' in rules
    finally:
        subprocess.run(["ip", "netns", "del", scratch], check=True)


# -- memory, pids, cpu --------------------------------------------------------------------

HOG = """
chunks = []
while True:
    chunks.append(b"\\x01" * (4 << 20))
"""


def test_memory_hog_is_killed_and_small_program_lives(zones: Zones) -> None:
    limit = Restrictions(memory=64 << 20)
    hog = zones.start(zones.create(limit), [PY, "-c", HOG], stdout=False)
    small = zones.start(zones.create(limit),
                        [PY, "-c", "b = b'\\x01' * (8 << 20); print('alive', len(b))"])
    assert hog.wait(30) == -9
    assert small.wait(30) == 0
    assert small.stdout.read().decode().startswith("alive")


def test_lowering_memory_below_usage_fails_closed(zones: Zones, caps: HostCapabilities) -> None:
    handle = zones.create(Restrictions(memory=256 << 20))
    holder = zones.start(handle, [PY, "-c", "import time; b = b'\\x01' * (64 << 20); "
                                            "print('holding', flush=True); time.sleep(60)"])
    assert read_line(holder) == "holding"
    lower = handle.applied.merged(memory=16 << 20)
    if caps.cgroup_version == 1:
        with pytest.raises(ZoneError) as info:
            zones.driver.apply(handle, lower)
        assert "16MiB" in str(info.value) and "uses" in str(info.value)
    else:
        zones.driver.apply(handle, lower)  # v2 reclaims, then OOM-kills inside the zone
        assert holder.wait(10) == -9


FORKER = """
import errno, subprocess
children = []
try:
    while len(children) < 200:
        children.append(subprocess.Popen(["sleep", "30"], stdout=subprocess.DEVNULL))
    print("no limit", len(children))
except OSError as e:
    print(errno.errorcode[e.errno], len(children))
"""


def test_fork_stops_at_pids_limit(zones: Zones) -> None:
    handle = zones.create(Restrictions(pids=12))
    forker = zones.start(handle, [PY, "-c", FORKER])
    assert forker.wait(30) is not None
    code, count = forker.stdout.read().decode().split()
    assert code == "EAGAIN"
    assert int(count) < 12


def test_cpu_pinning_quota_and_shares(zones: Zones, caps: HostCapabilities) -> None:
    cpu = max(caps.cpus)
    handle = zones.create(Restrictions(cpus=frozenset({cpu}), cpu_quota=50, cpu_shares=512))
    agent = zones.agent(handle)
    status = agent.ask("cat /proc/self/status")
    assert f"Cpus_allowed_list:\t{cpu}|" in status
    zones.driver.apply(handle, handle.applied.merged(cpu_quota=25, cpu_shares=256))
    cgroup = zones.driver.cgroup(handle.zone_id)
    if caps.cgroup_version == 1:
        cpu_dir = cgroup.dir("cpu")  # type: ignore[attr-defined]
        assert read_file(cpu_dir / "cpu.cfs_quota_us") == "25000"
        assert read_file(cpu_dir / "cpu.cfs_period_us") == "100000"
        assert read_file(cpu_dir / "cpu.shares") == "256"
    else:
        assert read_file(cgroup.dirs()[0] / "cpu.max") == "25000 100000"
        assert read_file(cgroup.dirs()[0] / "cpu.weight") == "10"


# -- filesystem ---------------------------------------------------------------------------

def test_readonly_from_the_start(zones: Zones, tmp_path: Path) -> None:
    rw = zones.agent(zones.create())
    ro = zones.agent(zones.create(Restrictions(filesystem=FilesystemMode.RO)))
    assert rw.ask(f"write {SCRATCH}/a") == "ok"
    assert ro.ask(f"write {SCRATCH}/b") == "fail EROFS"
    assert ro.ask("write /dev/null") == "ok"  # device nodes stay usable
    # the rest of the host is read-only to a zone even while its own scratch is not
    assert rw.ask("write /var/hvtsm-probe") == "fail EROFS"
    (tmp_path / "host").write_text("the host's own view stays writable")


def test_readonly_live_switch(zones: Zones, tmp_path: Path) -> None:
    handle = zones.create()
    agent = zones.agent(handle)
    assert agent.ask(f"write {SCRATCH}/before") == "ok"
    report = zones.driver.apply(handle,
                                handle.applied.merged(filesystem=FilesystemMode.RO))
    assert report.changed == {"filesystem": "ro"}
    assert agent.ask(f"write {SCRATCH}/after") == "fail EROFS"
    (tmp_path / "host").write_text("nothing propagated back to the host")


WRITER = """
import errno, time
for i in range(400):
    try:
        open("{dir}/f%d" % i, "w").close()
        print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
        break
    time.sleep(0.02)
"""


def test_a_zones_processes_end_with_its_first(zones: Zones) -> None:
    """Its first process is PID 1 of the zone's PID namespace: when it ends, the kernel
    ends every process left behind in it (no background writer outlives the workload)."""
    handle = zones.create()
    script = WRITER.format(dir=SCRATCH)
    first = zones.start(handle, ["sh", "-c", f'{PY} -c "$0" & sleep 0.5; exit 0', script])
    assert read_line(first) == "ok"  # the background writer got going
    assert first.wait(5) == 0
    cgroup = zones.driver.cgroup(handle.zone_id)
    deadline = time.monotonic() + 5
    while cgroup.pids():
        assert time.monotonic() < deadline, cgroup.pids()
        time.sleep(0.02)


# -- freezing -----------------------------------------------------------------------------

def test_freeze_stops_progress_and_thaw_resumes(zones: Zones) -> None:
    inside = SCRATCH / "counter"
    handle = zones.create()
    workload = zones.start(handle, [PY, "-c", f"""
import os, time
i = 0
while True:
    i += 1
    with open("{inside}.tmp", "w") as f:
        f.write(str(i))
    os.replace("{inside}.tmp", "{inside}")  # a freeze never catches it half written
    time.sleep(0.005)
"""], stdout=False)
    # the zone's scratch, seen from the host through its workload's root
    counter = Path(f"/proc/{workload.pid}/root") / inside.relative_to("/")

    def count() -> int:
        for _ in range(50):
            text = counter.read_text() if counter.exists() else ""
            if text:
                return int(text)
            time.sleep(0.01)
        raise AssertionError("the counter never appeared")

    first = count()
    time.sleep(0.1)
    assert count() > first
    zones.driver.freeze(handle)
    assert zones.driver.stats(handle).frozen
    frozen_at = count()
    time.sleep(0.3)
    assert count() == frozen_at
    zones.driver.thaw(handle)
    time.sleep(0.2)
    assert count() > frozen_at
    assert not zones.driver.stats(handle).frozen


# -- ending, adopting, cleaning up --------------------------------------------------------

def test_terminate_leaves_nothing(zones: Zones) -> None:
    handle = zones.create()
    workload = zones.start(handle, ["sh", "-c", "sleep 60 & sleep 60"], stdout=False)
    stats = zones.driver.stats(handle)
    assert stats.procs >= 1 and stats.memory_bytes is not None
    assert ref_path(handle.zone_id).exists()
    zones.driver.terminate(handle)
    assert workload.wait(5) == -9
    zone_gone(handle)
    zones.driver.terminate(handle)  # again: nothing left, nothing raised
    assert handle.zone_id not in zones.driver.leftovers()


def test_leftovers_and_remove_clean_a_forgotten_zone(zones: Zones,
                                                     caps: HostCapabilities) -> None:
    handle = zones.create()
    workload = zones.start(handle, ["sleep", "60"], stdout=False)
    fresh = CgroupDriver(LoggedEvents(), caps)  # a controller that never knew the zone
    assert handle.zone_id in fresh.leftovers()
    removed = fresh.remove(handle.zone_id)
    text = "\n".join(removed)
    assert "cgroup" in text and "netns" in text and "veth" in text and "process" in text
    assert workload.wait(5) == -9
    zone_gone(handle)
    assert handle.zone_id not in fresh.leftovers()
    assert fresh.remove(handle.zone_id) == []


def test_missing_executable(zones: Zones) -> None:
    handle = zones.create()
    with pytest.raises(ZoneError, match="no-such-program-hvtsm"):
        zones.driver.start(handle, ["/nonexistent/no-such-program-hvtsm"], WorkloadIO())
    zones.driver.terminate(handle)
    zone_gone(handle)


def test_failure_inside_the_child_is_explained(zones: Zones) -> None:
    handle = zones.create()
    pids_dir = Path(handle.state.cgroups[-1])
    os.rmdir(pids_dir)  # the child can no longer join this hierarchy
    with pytest.raises(ZoneError, match=r"joining the zone's cgroups: .*No such file"):
        zones.driver.start(handle, ["true"], WorkloadIO())
    zones.driver.terminate(handle)
    zone_gone(handle)


def test_adopt_after_controller_restart(zones: Zones, caps: HostCapabilities) -> None:
    handle = zones.create(Restrictions(pids=50))
    workload = zones.start(handle, ["sleep", "60"], stdout=False)
    state = json.loads(json.dumps(handle.state.to_json()))  # as the store keeps it
    fresh = CgroupDriver(LoggedEvents(), caps)
    adopted, running = fresh.adopt(handle.zone_id, state, handle.applied)
    assert running is not None and running.pid == workload.pid
    assert running.poll() is None and running.wait(0.1) is None
    assert fresh.stats(adopted).procs == 1
    fresh.terminate(adopted)
    assert running.wait(5) == 0
    assert workload.wait(5) == -9
    _, nothing = fresh.adopt(handle.zone_id, state, handle.applied)
    assert nothing is None


# -- cgroup v2 on the real kernel ---------------------------------------------------------

def _v2_root(caps: HostCapabilities) -> Path | None:
    if caps.cgroup_version == 2 and caps.cgroup_root:
        return Path(caps.cgroup_root)
    unified = Path("/sys/fs/cgroup/unified")
    return unified if (unified / "cgroup.controllers").exists() else None


def test_v2_freeze_and_kill(caps: HostCapabilities) -> None:
    """v2's core files (freeze, kill, procs) work on any cgroup2 mount, even the empty
    one a v1 host keeps at /sys/fs/cgroup/unified."""
    root = _v2_root(caps)
    if root is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    controllers = read_file(root / "cgroup.controllers").split()
    cgroup = CgroupV2(root, controllers, f"zt{os.urandom(4).hex()}")
    cgroup.create()
    procs = str(cgroup.procs_files()[0])
    try:
        child = subprocess.Popen(["sleep", "60"],
                                 preexec_fn=lambda: write_file(Path(procs), "0"))
        assert cgroup.pids() == {child.pid}
        cgroup.freeze()
        assert cgroup.frozen()
        cgroup.thaw()
        assert not cgroup.frozen()
        cgroup.kill()
        assert child.wait(5) == -9
    finally:
        cgroup.kill()
        cgroup.remove()
        with contextlib.suppress(OSError):
            (root / "hvtsm").rmdir()  # only when no other zone uses it
    assert not cgroup.exists()
