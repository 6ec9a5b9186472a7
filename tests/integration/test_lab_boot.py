"""Boot the lab guest for real: lab image -> lab template (TCG) -> qemu:///system.

The first test boots with a small test agent (a `guest_agent` package written here, put on
the guest's PYTHONPATH through `hvtsm.agent=`): it proves the whole path of init.sh (modules,
9p + overlay root, eth0 from `hvtsm.ip`, switch_root, stage 2 as PID 1 starting the agent,
restarting it, reaping orphans) and the virtio-serial channel from guest to host. The second
boots the project's real guest_agent, when there is one, and waits for its first bytes on
the channel. Both print their boot times (domain create -> "stage-2 started" mark on the
console -> first bytes from the agent). The last boots without the host root: init must say
so on the console and power the guest off, which ends the domain.

Needs root and a reachable qemu:///system; otherwise skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvtsm.image.lab import LabImage, build_lab_image, kernel_cmdline
from hvtsm.zones.libvirt.templates import DomainParams, render, to_xml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GUEST_PYTHON = "/usr/bin/python3"
BOOT_TIMEOUT = 60.0
GUEST_IP, GUEST_GW = "10.214.255.250/30", "10.214.255.249"

# The test agent: stdlib only, run by the guest's stage 2 as `python3 -m guest_agent`.
# Each run writes a few lines to the agent port, leaves an orphan behind (which only PID 1
# can reap) and exits 0, so stage 2 restarts it.
TEST_AGENT = r'''
import fcntl, glob, os, socket, struct, sys, time

def port():
    for name in glob.glob("/sys/class/virtio-ports/*/name"):
        with open(name) as f:
            if f.read().strip() == "org.hvtsm.agent.0":
                return "/dev/" + name.split("/")[-2]
    raise SystemExit("hvtsm-test-agent: no org.hvtsm.agent.0 port")

def zombies():
    count = 0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    count += 1
        except OSError:
            pass
    return count

def eth0():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    req = struct.pack("256s", b"eth0")
    try:
        addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])
        mask = fcntl.ioctl(s.fileno(), 0x891B, req)[20:24]
    except OSError:
        return "-"
    return "%s/%d" % (addr, bin(int.from_bytes(mask, "big")).count("1"))

if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.3)
        os._exit(0)
    os._exit(0)
os.wait()
fd = os.open(port(), os.O_WRONLY)
with open("/proc/uptime") as f:
    up = f.read().split()[0]
line = "hvtsm-test-agent pid=%d ppid=%d eth0=%s zombies=%d uptime=%s\n" % (
    os.getpid(), os.getppid(), eth0(), zombies(), up)
print(line.strip(), flush=True)
for _ in range(6):
    os.write(fd, line.encode())
    time.sleep(0.25)
'''


def _libvirt():
    if os.geteuid() != 0:
        pytest.skip("boots a guest under qemu:///system: needs root")
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirt is not reachable at qemu:///system: {exc}")
    return libvirt, conn


class Guest:
    """One transient lab domain, its console log and its agent channel."""

    def __init__(self, conn, image: LabImage, workdir: Path, agent_dir: Path) -> None:
        self.conn = conn
        self.workdir = workdir
        tag = uuid.uuid4().hex[:6]
        self.params = DomainParams(
            name=f"hvtsm-test-boot-{tag}", uuid=str(uuid.uuid4()), accel="qemu",
            emulator=None, vcpus=1, memory_kib=393216, max_memory_kib=393216,
            kernel=str(image.kernel), initrd=str(image.initrd),
            cmdline=kernel_cmdline(python=GUEST_PYTHON, agent_path=str(agent_dir),
                                   ip=GUEST_IP, gateway=GUEST_GW),
            host_root="/", channel_path=str(workdir / f"{tag}.sock"),
            console_log=str(workdir / f"{tag}.console.log"), tap=f"hvtsm-tb{tag}",
            mac="52:54:00:" + ":".join(tag[i:i + 2] for i in (0, 2, 4)))
        self.dom = None
        self.started = 0.0
        self.sock: socket.socket | None = None
        self.received = b""

    def create(self, edit=None) -> None:
        domain = render("lab", self.params)
        if edit is not None:
            edit(domain)
        xml = to_xml(domain)
        self.started = time.monotonic()
        self.dom = self.conn.createXML(xml, 0)

    def active(self) -> bool:
        """A transient domain is gone (not found) once it stopped."""
        try:
            return bool(self.dom.isActive())
        except Exception:
            return False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def console(self) -> str:
        try:
            return Path(self.params.console_log).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        return f"console of {self.params.name}:\n{self.console()[-3000:]}"

    def connect(self) -> None:
        """Connect to the channel socket (libvirt makes it before createXML returns)."""
        deadline = time.monotonic() + 10
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.params.channel_path)
                sock.settimeout(0.05)
                self.sock = sock
                return
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def pump(self) -> None:
        assert self.sock is not None
        with contextlib.suppress(TimeoutError):
            data = self.sock.recv(65536)
            if data == b"":
                time.sleep(0.05)  # QEMU closed the socket: the guest is gone
            self.received += data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.dom is not None:
            with contextlib.suppress(Exception):
                self.dom.destroy()
            with contextlib.suppress(Exception):
                if self.dom.isPersistent():
                    self.dom.undefine()


@pytest.fixture(scope="module")
def lab_image() -> LabImage:
    _libvirt()
    return build_lab_image()


@pytest.fixture
def guests(lab_image) -> Iterator:
    _libvirt_mod, conn = _libvirt()
    # QEMU reads the test agent through 9p as the libvirt-qemu user: a world-readable
    # directory (pytest's tmp_path sits under a 0700 directory)
    workdir = Path(tempfile.mkdtemp(prefix="hvtsm-labboot-", dir="/var/tmp"))
    workdir.chmod(0o755)
    made: list[Guest] = []

    def boot(agent_dir: Path, edit=None) -> Guest:
        guest = Guest(conn, lab_image, workdir, agent_dir)
        made.append(guest)
        guest.create(edit)
        guest.connect()
        return guest

    try:
        yield boot, workdir
    finally:
        for guest in made:
            guest.close()
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(guest: Guest, done, what: str, timeout: float = BOOT_TIMEOUT) -> float:
    """Pump the channel until done() holds; return the seconds since create."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s\n{guest.diagnostics()}")
        if not guest.active():
            pytest.fail(f"the guest stopped before {what}\n{guest.diagnostics()}")
        guest.pump()
    return guest.elapsed()


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def test_lab_guest_boots_runs_restarts_and_reaps(guests, capsys):
    boot, workdir = guests
    agent_dir = workdir / "agent"
    (agent_dir / "guest_agent").mkdir(parents=True)
    (agent_dir / "guest_agent" / "__init__.py").write_text("")
    (agent_dir / "guest_agent" / "__main__.py").write_text(TEST_AGENT)
    for path in (agent_dir, agent_dir / "guest_agent"):
        path.chmod(0o755)

    guest = boot(agent_dir)
    stage2 = _wait(guest, lambda: "hvtsm-init: stage-2 started" in guest.console(),
                   "'stage-2 started' on the console")
    first = _wait(guest, lambda: b"hvtsm-test-agent" in guest.received,
                  "line from the test agent on the channel")
    # stage 2 restarts the agent after it exits: a second pid arrives on the channel
    pids = lambda: set(re.findall(rb"pid=(\d+) ppid", guest.received))  # noqa: E731
    _wait(guest, lambda: len(pids()) >= 2 and guest.received.endswith(b"\n"),
          "line from a restarted agent")

    console = guest.console()
    for mark in ("stage-1 started", "modules loaded", "root mounted",
                 f"network eth0 {GUEST_IP} via {GUEST_GW}", "switching root",
                 "starting agent #1", "agent #1 exited with status 0", "starting agent #2"):
        assert f"hvtsm-init: {mark}" in console, guest.diagnostics()
    assert "FATAL" not in console and "warning: insmod" not in console, guest.diagnostics()
    lines = [line for line in guest.received.decode().splitlines() if line]
    fields = [dict(w.split("=", 1) for w in line.split()[1:]) for line in lines]
    assert {f["ppid"] for f in fields} == {"1"}, lines  # the agent is PID 1's child
    assert {f["eth0"] for f in fields} == {GUEST_IP}, lines
    last_pid = max(int(p) for p in pids())
    later = [f for f in fields if int(f["pid"]) == last_pid]
    assert later[0]["zombies"] == "0", lines  # the first run's orphan was reaped by PID 1
    _report(capsys, f"lab boot (TCG, test agent): create -> stage-2 started {stage2:.2f} s, "
            f"-> agent's first bytes on the channel {first:.2f} s")


def test_real_guest_agent_answers_on_the_channel(guests, capsys):
    if not (REPO / "guest_agent" / "__main__.py").is_file():
        pytest.skip("no guest_agent package in this checkout yet")
    boot, workdir = guests
    # a copy in the world-readable work dir: QEMU reads it as libvirt-qemu, and a checkout
    # may sit under a directory that user cannot enter
    agent_dir = workdir / "real-agent"
    shutil.copytree(REPO / "guest_agent", agent_dir / "guest_agent",
                    ignore=shutil.ignore_patterns("__pycache__", ".ruff_cache"))
    # compiled on the host by the guest's interpreter: the guest does not compile at boot
    subprocess.run([GUEST_PYTHON, "-m", "compileall", "-q", str(agent_dir)], check=True)
    for path in (agent_dir, *agent_dir.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    guest = boot(agent_dir)
    stage2 = _wait(guest, lambda: "hvtsm-init: stage-2 started" in guest.console(),
                   "'stage-2 started' on the console")
    ready = _wait(guest, lambda: guest.received != b"", "bytes from guest_agent")
    assert "FATAL" not in guest.console(), guest.diagnostics()
    _report(capsys, f"lab boot (TCG, guest_agent): create -> stage-2 started {stage2:.2f} s, "
            f"-> agent's first bytes {ready:.2f} s")


def test_missing_host_root_is_reported_and_powers_off(guests, capsys):
    boot, workdir = guests

    def drop_filesystem(domain) -> None:
        for fs in domain.findall("./devices/filesystem"):
            fs.getparent().remove(fs)

    guest = boot(workdir, edit=drop_filesystem)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while guest.active():
        if time.monotonic() > deadline:
            pytest.fail(f"the guest did not power off\n{guest.diagnostics()}")
        time.sleep(0.1)
    console = guest.console()
    assert "hvtsm-init: FATAL: cannot mount the host root" in console, guest.diagnostics()
    assert "hvtsm-init: powering off" in console
    assert "stage-2 started" not in console
    _report(capsys, f"lab boot without host root: powered off {guest.elapsed():.2f} s "
            "after create")
