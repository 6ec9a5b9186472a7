"""The real guest agent (a subprocess, `--connect unix:PATH`) against the real AgentLink.

In production libvirt binds the channel socket, the host connects to it as a client and
the agent reads and writes the guest's virtio port. Here the test plays the port's side:
it listens, the agent connects (`--connect unix:A`) and the accepted socket is given to
`AgentLink.from_socket`; one test puts a relay in between so `AgentLink.connect` is the
client, as with libvirt. The agent runs from a copy of guest_agent/ under the system
python (and python 3.9 when the machine has one), never from the venv.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guest_agent import __version__
from guest_agent.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, encode
from hvtsm.errors import ZoneError
from hvtsm.monitor.link import AgentLink, RemoteWorkload
from tests.unit.test_agent import python39

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
HEARTBEAT = 0.2


PYTHONS = [pytest.param(SYSTEM_PY, id="system-python")]
if python39():
    PYTHONS.append(pytest.param(python39(), id="python3.9"))


@pytest.fixture(scope="module")
def agent_dir() -> Iterator[Path]:
    """guest_agent/ copied alone, as the guest sees it (PYTHONPATH=<this dir>)."""
    d = Path(tempfile.mkdtemp(prefix="hvtsm-agent-"))
    shutil.copytree(REPO / "guest_agent", d / "guest_agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.md", "*.toml"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    link: AgentLink
    listener: socket.socket
    sock_path: str
    log: Path
    launched: float
    problems: list[tuple[str, str]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [k for k, _ in self.problems]

    def accept_again(self) -> AgentLink:
        """The agent reconnects after the link went away: take the new connection."""
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        self.link = AgentLink.from_socket(conn, zone_id="t1", on_problem=self._problem)
        return self.link

    def _problem(self, kind: str, detail: str) -> None:
        self.problems.append((kind, detail))


@contextlib.contextmanager
def run_agent(agent_dir: Path, python: str = SYSTEM_PY, *, heartbeat: float = HEARTBEAT,
              accept: bool = True) -> Iterator[Run]:
    workdir = Path(tempfile.mkdtemp(prefix="hvtsm-al-"))  # short: unix socket paths are
    sock_path = str(workdir / "a.sock")                    # limited to 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(4)
    log = workdir / "agent.log"
    launched = time.monotonic()
    with open(log, "wb") as log_f:
        proc = subprocess.Popen(
            [python, "-m", "guest_agent", "--connect", f"unix:{sock_path}",
             "--heartbeat", str(heartbeat), "--wait-port", "5"],
            env={"PYTHONPATH": str(agent_dir), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            cwd=workdir, stdout=subprocess.DEVNULL, stderr=log_f)
    run = Run(proc, None, listener, sock_path, log, launched)  # type: ignore[arg-type]
    try:
        if accept:
            run.accept_again()
        yield run
    finally:
        if run.link is not None:
            run.link.close()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        listener.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _read_all(work: RemoteWorkload) -> tuple[bytes, bytes]:
    """Both pipes to EOF at once (like Popen.communicate)."""
    out: dict[str, bytes] = {}

    def drain(name: str) -> None:
        f = getattr(work, name)
        out[name] = f.read() if f is not None else b""

    threads = [threading.Thread(target=drain, args=(n,)) for n in ("stdout", "stderr")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out["stdout"], out["stderr"]


def _alive_in_session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid` (the agent starts each workload in its
    own session, whose id is the workload's pid)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def _until(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.01)


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("python", PYTHONS)
def test_hello_start_output_exit(agent_dir: Path, python: str) -> None:
    with run_agent(agent_dir, python) as run:
        hello = run.link.wait_hello(10)
        assert hello.protocol == PROTOCOL_VERSION and hello.agent_version == __version__
        assert {"start", "signal", "probe:tcp_connect", "probe:meminfo", "probe:interfaces",
                "probe:read_file"} <= set(hello.capabilities)
        assert hello.pid == run.proc.pid and hello.heartbeat == HEARTBEAT
        assert hello.seq == 0 and hello.kernel == os.uname().release
        version = subprocess.run([python, "-c", "import platform; print(platform."
                                  "python_version())"], capture_output=True, text=True)
        assert hello.python == version.stdout.strip()

        work = run.link.start(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert work.pid > 0 and work.id
        stdout, stderr = _read_all(work)
        assert (stdout, stderr) == (b"out\n", b"err\n")
        assert work.wait(10) == 3 and work.poll() == 3
        health = run.link.health()
        assert health.malformed == 0 and health.dropped == 0 and run.problems == []


def test_signal_gives_a_negative_status(agent_dir: Path) -> None:
    with run_agent(agent_dir) as run:
        run.link.wait_hello(10)
        work = run.link.start(["sleep", "30"], stdout=None, stderr=None)
        assert work.stdout is None and work.poll() is None
        assert work.wait(0.3) is None
        run.link.signal(work.id, signal.SIGTERM)
        assert work.wait(10) == -signal.SIGTERM
        run.link.signal(work.id, signal.SIGKILL)  # exited: nothing to do, no error
        group = run.link.start(["sh", "-c", "sleep 30 & sleep 30 & wait"], stdout=None,
                               stderr=None)
        group.kill()  # the whole process group, not only the shell
        assert group.wait(10) == -signal.SIGKILL
        _until(lambda: not _alive_in_session(group.pid), 5, "the group's sleeps gone")
        with pytest.raises(ZoneError, match="no workload nope"):
            run.link.signal("nope", 15)


def test_probes(agent_dir: Path) -> None:
    with run_agent(agent_dir) as run, socket.socket() as listener:
        run.link.wait_hello(10)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ok = run.link.probe("tcp_connect", host="127.0.0.1", port=port, timeout=3)
        assert ok["ok"] and ok["connected"] and ok["errno"] is None
        listener.close()
        refused = run.link.probe("tcp_connect", {"host": "127.0.0.1", "port": port})
        assert not refused["ok"] and refused["errno"] == "ECONNREFUSED"

        mem = run.link.probe("meminfo")
        assert mem["MemTotal"] > 0 and "MemAvailable" in mem
        ifaces = {i["name"]: i for i in run.link.probe("interfaces")["interfaces"]}
        assert "127.0.0.1/8" in ifaces["lo"]["ipv4"]
        hosts = run.link.probe("read_file", path="/etc/hostname", max_bytes=3)
        assert hosts["size"] <= 3

        with pytest.raises(ZoneError, match="probe teleport failed in the guest: unknown"):
            run.link.probe("teleport")
        with pytest.raises(ZoneError, match="FileNotFoundError"):
            run.link.probe("read_file", path="/nonexistent")
        assert run.link.ping() < 1.0


def test_start_details(agent_dir: Path) -> None:
    with run_agent(agent_dir) as run:
        run.link.wait_hello(10)
        work = run.link.start(["sh", "-c", "echo $FOO; pwd; echo e >&2"], env={"FOO": "bar"},
                              cwd="/tmp", stderr=subprocess.STDOUT)
        assert work.stderr is None
        assert _read_all(work)[0] == b"bar\n/tmp\ne\n"
        if os.geteuid() == 0:
            who = run.link.start(["id", "-un"], user="nobody")
            assert _read_all(who)[0] == b"nobody\n"
        r, w = os.pipe()
        try:
            direct = run.link.start(["echo", "to an fd"], stdout=w, stderr=subprocess.DEVNULL)
            assert direct.wait(10) == 0 and direct.stdout is None
            assert os.read(r, 100) == b"to an fd\n"  # the fd is written, not closed
            os.write(w, b"still open")
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(ZoneError, match="cannot start /nonexistent") as info:
            run.link.start(["/nonexistent"])
        assert info.value.zone_id == "t1"
        before = run.link.health().bytes_received
        quiet = run.link.start(["sh", "-c", "head -c 1000000 /dev/zero; echo x >&2"],
                               stdout=None, stderr=None)
        assert quiet.wait(10) == 0
        assert run.link.health().bytes_received - before < 5000  # discarded in the guest, not sent
        dup = run.link.start(["sleep", "5"], workload_id="dup", stdout=None, stderr=None)
        with pytest.raises(ZoneError, match="already in use"):
            run.link.start(["sleep", "5"], workload_id="dup")
        dup.kill()
        assert dup.wait(5) == -signal.SIGKILL


def test_output_is_exact_and_fast(agent_dir: Path) -> None:
    size = 8_000_000
    script = ("import sys, os\n"
              f"data = bytes(range(256)) * ({size} // 256)\n"
              "sys.stdout.buffer.write(data)\n")
    with run_agent(agent_dir) as run:
        run.link.wait_hello(10)
        began = time.monotonic()
        work = run.link.start([SYSTEM_PY, "-c", script], stderr=None)
        assert work.stdout is not None
        got = work.stdout.read()
        took = time.monotonic() - began
        assert work.wait(10) == 0
        # bytes travel as UTF-8 text with replacement: ASCII survives, the rest is U+FFFD
        expected = (bytes(range(128)).decode() + "\ufffd" * 128).encode() * (size // 256)
        assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
        print(f"\noutput: {size / took / 1e6:.1f} MB/s of workload bytes over the link")
        text = run.link.start([SYSTEM_PY, "-c", "print('é' * 300000)"])
        assert _read_all(text)[0] == ("é" * 300000 + "\n").encode()


def test_malformed_requests_are_answered_and_the_agent_goes_on(agent_dir: Path) -> None:
    with run_agent(agent_dir) as run:
        run.link.wait_hello(10)
        raw = run.link._transport  # a host that misbehaves: bytes no encoder would make
        for junk in (b"this is not json\n", b'{"type": "start", "id": "w9"}\n',
                     b'{"type": "hello"}\n', b"\xff" * (MAX_MESSAGE_BYTES + 10) + b"\n"):
            raw.write(junk)
        _until(lambda: len([k for k in run.kinds() if k == "agent_error"]) == 4,
               what="four error answers")
        details = [d for _, d in run.problems]
        assert "not JSON" in details[0] and details[1].startswith("w9: ")
        assert "unknown message type 'hello'" in details[2] and "oversized" in details[3]
        assert run.link.probe("meminfo")["MemTotal"] > 0  # still serving
        assert run.proc.poll() is None


def test_bad_lines_from_the_agent_side_are_counted() -> None:
    """Feed the link by hand: oversized, malformed, seq gaps; the stream goes on."""
    ours, theirs = socket.socketpair()
    problems: list[tuple[str, str]] = []
    events: list[dict[str, object]] = []
    link = AgentLink.from_socket(theirs, zone_id="t2",
                                 on_problem=lambda k, d: problems.append((k, d)),
                                 on_event=events.append)
    try:
        hello = {"type": "hello", "seq": 0, "protocol": PROTOCOL_VERSION,
                 "agent_version": "x", "capabilities": [], "pid": 1, "kernel": "k",
                 "python": "3.9.0", "boot_ms": 1, "heartbeat": 60.0}
        ours.sendall(encode(hello))
        assert link.wait_hello(5).agent_version == "x"
        ours.sendall(b'{"type": "heartbeat", "seq": 1, "uptime": 1.0}\n')
        ours.sendall(b"z" * (MAX_MESSAGE_BYTES * 2))  # an oversized line, in pieces
        ours.sendall(b"z" * 1000 + b"\n")
        ours.sendall(b"{broken\n")
        ours.sendall(b'{"type": "heartbeat", "seq": 5, "uptime": 2.0}\n')  # 2, 3, 4 lost
        before = link.health().last_heartbeat
        ours.sendall(b'{"type": "heartbeat", "seq": 6, "uptime": 3.0}\n')
        _until(lambda: link.health().last_heartbeat != before
               and link.health().dropped == 3, what="seq 6")
        assert link.health().malformed == 2
        kinds = [k for k, _ in problems]
        assert kinds == ["oversized", "malformed", "seq_gap"], problems
        assert "3 message(s)" in problems[2][1]
        ours.sendall(b'{"type": "heartbeat", "seq": 6, "uptime": 3.0}\n')
        _until(lambda: len(problems) == 4)
        assert problems[3][0] == "seq_regress"
        ours.sendall(b'{"type": "event", "seq": 7, "kind": "syscall", "data": {"nr": 59}}\n')
        _until(lambda: events, what="the event")
        assert events[0]["data"] == {"nr": 59} and link.health().malformed == 2
        ours.close()
        _until(lambda: link.closed, what="link closed")
        assert problems[-1][0] == "disconnected" and "closed" in (link.health().lost_reason or "")
    finally:
        link.close()


def test_heartbeat_loss_is_detected(agent_dir: Path) -> None:
    with run_agent(agent_dir) as run:
        run.link.wait_hello(10)
        work = run.link.start(["sleep", "30"], stdout=None, stderr=None)
        time.sleep(3 * HEARTBEAT)
        assert run.problems == [] and run.link.health().heartbeat_ok
        run.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _until(lambda: "heartbeat_lost" in run.kinds(), 10 * HEARTBEAT, "heartbeat_lost")
        detected = time.monotonic() - stopped
        assert detected <= 3 * HEARTBEAT + 2 * HEARTBEAT, detected  # 3 periods, plus slack
        assert not run.link.health().heartbeat_ok and run.kinds() == ["heartbeat_lost"]
        run.proc.send_signal(signal.SIGCONT)
        _until(lambda: run.link.health().heartbeat_ok, 5, "heartbeats again")
        assert run.kinds() == ["heartbeat_lost"]  # reported once, no gap, no junk
        assert work.poll() is None


def test_the_agent_greets_a_new_host_and_keeps_its_workloads(agent_dir: Path) -> None:
    with run_agent(agent_dir) as run:
        first = run.link.wait_hello(10)
        work = run.link.start(["sh", "-c", "sleep 30"], stdout=None, stderr=None)
        quick = run.link.start(["sh", "-c", "sleep 0.5; exit 7"], stdout=None, stderr=None)
        run.link.close()  # the host goes away (and stays away: no socket to connect to) ...
        run.listener.close()
        os.unlink(run.sock_path)
        assert work.link_lost and work.poll() is None
        time.sleep(1.0)  # ... while `quick` exits: its exit waits in the agent
        run.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        run.listener.bind(run.sock_path)
        run.listener.listen(1)
        link = run.accept_again()
        hello = link.wait_hello(10)
        assert hello.pid == first.pid and hello.seq > first.seq  # the same agent
        # both are listed: `quick` has ended, but its exit was never sent
        assert dict(hello.workloads) == {work.id: work.pid, quick.id: quick.pid}
        assert link.attach(quick.id).wait(5) == 7  # delivered after the new hello
        again = link.attach(work.id)
        assert again.pid == work.pid
        again.kill()
        assert again.wait(10) == -signal.SIGKILL
        assert link.health().dropped == 0 and link.health().malformed == 0


def test_connect_retries_until_the_socket_exists(agent_dir: Path) -> None:
    """As with libvirt: the host connects to a socket that appears a little later."""
    with run_agent(agent_dir, accept=False) as run:
        host_path = run.sock_path + ".host"
        agent_side: list[socket.socket] = []

        def relay() -> None:
            time.sleep(0.5)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(host_path)
            server.listen(1)
            run.listener.settimeout(10)
            a, _ = run.listener.accept()
            h, _ = server.accept()
            agent_side.extend([a, h, server])
            for src, dst in ((a, h), (h, a)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

        threading.Thread(target=relay, daemon=True).start()
        began = time.monotonic()
        link = AgentLink.connect(host_path, timeout=10, zone_id="t3")
        try:
            assert time.monotonic() - began >= 0.4
            hello = link.wait_hello(10)
            assert hello.protocol == PROTOCOL_VERSION
            assert link.probe("meminfo")["MemTotal"] > 0
        finally:
            link.close()
            for s in agent_side:
                s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def test_connect_and_hello_timeouts_name_the_zone(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(ZoneError) as info:
        AgentLink.connect(str(tmp_path / "none.sock"), timeout=0.5, zone_id="z9")
    assert 0.5 <= time.monotonic() - began < 3
    assert "zone z9" in str(info.value) and "none.sock" in str(info.value)
    assert info.value.hint and "org.hvtsm.agent.0" in info.value.hint

    ours, theirs = socket.socketpair()
    link = AgentLink.from_socket(theirs, zone_id="z9")
    try:
        with pytest.raises(ZoneError, match=r"zone z9: no hello .* nothing at all was received"):
            link.wait_hello(0.3)
        ours.sendall(b'{"type": "heartbeat", "seq": 4, "uptime": 1.0}\n')
        with pytest.raises(ZoneError, match=r"1 messages, 0 malformed; last: heartbeat seq 4"):
            link.wait_hello(0.3)
        # a message before any hello: the link asks the agent for one
        ours.settimeout(2)
        assert b'"hello":true' in ours.recv(1000)
        ours.close()
        with pytest.raises(ZoneError, match="closed before the agent said hello"):
            link.wait_hello(2)
        with pytest.raises(ZoneError, match="link is closed"):
            link.probe("meminfo")
    finally:
        link.close()


def test_the_agent_over_a_character_device(agent_dir: Path) -> None:
    """--port PATH: the fd path the agent uses for a virtio port, over a pty in raw mode."""
    master, slave = pty.openpty()
    path = os.ttyname(slave)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [SYSTEM_PY, "-m", "guest_agent", "--port", path, "--heartbeat", "0.5"],
        env={"PYTHONPATH": str(agent_dir), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(slave)
    stop = threading.Event()

    def relay() -> None:  # pty master <-> socket, so AgentLink sees a socket
        import select

        ours.setblocking(False)
        while not stop.is_set():
            ready, _, _ = select.select([master, ours], [], [], 0.1)
            with contextlib.suppress(BlockingIOError, OSError):
                if master in ready:
                    ours.sendall(os.read(master, 65536))
                if ours in ready:
                    data = ours.recv(65536)
                    if not data:
                        return
                    os.write(master, data)

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    link = AgentLink.from_socket(theirs, zone_id="tty")
    try:
        hello = link.wait_hello(10)
        assert hello.port == path
        work = link.start(["sh", "-c", "echo over the tty; exit 5"])
        assert _read_all(work)[0] == b"over the tty\n" and work.wait(5) == 5
        assert link.probe("meminfo")["MemTotal"] > 0
        assert link.health().malformed == 0
    finally:
        link.close()
        stop.set()
        t.join(2)
        proc.terminate()
        proc.wait(5)
        os.close(master)
        ours.close()


def test_measurements(agent_dir: Path) -> None:
    """Prints the figures of the report: hello latency, probe round trip."""
    with run_agent(agent_dir, accept=False) as run:
        run.listener.settimeout(10)
        conn, _ = run.listener.accept()
        run.link = AgentLink.from_socket(conn, zone_id="m")
        run.link.wait_hello(10)
        hello_ms = (time.monotonic() - run.launched) * 1000
        rtts = []
        for _ in range(200):
            began = time.monotonic()
            run.link.probe("meminfo")
            rtts.append((time.monotonic() - began) * 1000)
        pings = sorted(run.link.ping() * 1000 for _ in range(200))
        rtts.sort()
        print(f"\nhello {hello_ms:.0f} ms after launch; meminfo probe median "
              f"{rtts[100]:.2f} ms (p95 {rtts[190]:.2f}); ping median {pings[100]:.2f} ms")
        assert hello_ms < 5000 and rtts[100] < 100
