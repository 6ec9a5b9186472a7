"""The guest agent's parts in-process: outbox, writer (hello per connection, seq numbering,
nothing written while the host is away), port handling (a pty stands in for a virtio
port), probes, and that the package stays python 3.9 code."""

from __future__ import annotations

import base64
import os
import pty
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from guest_agent import agent as agent_mod
from guest_agent import probes
from guest_agent.agent import Agent
from guest_agent.outbox import NORMAL, URGENT, Outbox
from guest_agent.port import DevicePort, Disconnected, Port, PortUnavailable, Stopped, find_vport
from guest_agent.protocol import HOST_TYPES, Decoder, ProtocolError, decode, encode
from guest_agent.workload import build_env

REPO = Path(__file__).resolve().parents[2]


# --- outbox -------------------------------------------------------------------------------


def test_outbox_urgent_first_order_kept() -> None:
    box = Outbox()
    box.put({"type": "output", "n": 1}, NORMAL)
    box.put({"type": "exit", "n": 2}, NORMAL)
    box.put({"type": "probe_result", "n": 3}, URGENT)
    got = [box.get(0)[1]["n"] for _ in range(3)]  # type: ignore[index]
    assert got == [3, 1, 2]
    assert box.get(0) is None


def test_outbox_coalesces_heartbeats_but_not_ping_answers() -> None:
    box = Outbox()
    for _ in range(5):
        box.put({"type": "heartbeat"})
    box.put({"type": "heartbeat", "id": "k1"})
    assert len(box) == 2
    box.get(0)
    box.put({"type": "heartbeat"})
    assert len(box) == 2


def test_outbox_full_discards_and_counts_a_gap() -> None:
    box = Outbox(max_items=3)
    assert all(box.put({"type": "error", "n": i}) for i in range(3))
    assert not box.put({"type": "error", "n": 3})
    assert box.dropped == 1 and box.gap == 1


def test_outbox_output_backpressure() -> None:
    box = Outbox(output_limit=100)
    stop = threading.Event()
    assert box.put_output({"type": "output"}, 100, stop)
    done = threading.Event()

    def more() -> None:
        box.put_output({"type": "output"}, 10, stop)
        done.set()

    threading.Thread(target=more, daemon=True).start()
    assert not done.wait(0.3)  # the pump waits: its workload blocks on a full pipe
    assert box.get(0) is not None
    assert done.wait(2)
    assert box.output_bytes == 10


# --- writer and heartbeats against a port whose host comes and goes -----------------------


class FakePort(Port):
    def __init__(self) -> None:
        super().__init__("fake port")
        self.written: list[tuple[int, bytes]] = []

    def host(self, present: bool) -> None:
        if present:
            self._set_connected()
        else:
            self.lost(self.generation)

    def open(self, wait: float) -> None:
        """Always there: the test plays the host with `host()`."""

    def wait_connected(self, stop: threading.Event) -> int:
        generation = None
        while generation is None and not stop.is_set():
            generation = self.wait_generation(stop, 0.1)
        return generation or 0

    def read(self, generation: int, timeout: float) -> bytes:
        time.sleep(timeout)  # the host side of these tests never speaks
        return b""

    def write(self, data: bytes, generation: int, stop: threading.Event) -> None:
        with self._lock:
            if not self.connected or generation != self.generation:
                raise Disconnected()
            self.written.append((generation, data))

    def messages(self) -> list[dict[str, Any]]:
        out = []
        for _, data in self.written:
            out += Decoder().feed(data)
        assert not any(isinstance(m, ProtocolError) for m in out)
        return out


def _until(pred: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def fake_agent() -> Any:
    port = FakePort()
    agent = Agent(port, heartbeat=0.05)
    agent._spawn_thread(agent.writer.run, "writer")
    agent._spawn_thread(agent._heartbeats, "heartbeat")
    yield agent, port
    agent.stop.set()
    for t in agent.threads:
        t.join(2)


def test_nothing_is_written_while_the_host_is_away(fake_agent: Any) -> None:
    agent, port = fake_agent
    agent.send({"type": "started", "id": "w1", "pid": 5})
    time.sleep(0.3)
    assert port.written == []
    assert len(agent.outbox) == 1  # no heartbeats pile up while nobody listens

    port.host(True)
    _until(lambda: len(port.messages()) >= 2)
    first_gen, first = port.written[0]
    assert first.startswith(b"\n{")  # a blank line first: ends a torn line on the host
    msgs = port.messages()
    assert [m["type"] for m in msgs[:2]] == ["hello", "started"]
    assert [m["seq"] for m in msgs[:2]] == [0, 1]
    _until(lambda: any(m["type"] == "heartbeat" for m in port.messages()))

    port.host(False)
    time.sleep(0.1)
    count = len(port.written)
    agent.send({"type": "exit", "id": "w1", "status": 0}, NORMAL)
    time.sleep(0.3)
    assert len(port.written) == count

    port.host(True)  # the host reconnects: hello again, then what waited
    _until(lambda: any(m["type"] == "exit" for m in port.messages()))
    msgs = port.messages()
    again = [i for i, m in enumerate(msgs) if m["type"] == "hello"]
    assert len(again) == 2 and msgs[again[1] + 1]["type"] == "exit"
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(len(seqs)))  # nothing lost, nothing repeated
    assert port.written[-1][0] == first_gen + 1


def test_discarded_messages_leave_a_seq_gap(fake_agent: Any) -> None:
    agent, port = fake_agent
    agent.outbox.max_items = 2
    for i in range(5):
        agent.send({"type": "error", "message": str(i)})
    port.host(True)
    _until(lambda: len([m for m in port.messages() if m["type"] == "error"]) == 2)
    msgs = [m for m in port.messages() if m["type"] != "heartbeat"]
    # hello, (3 lost: the gap shows in the first message after the hello), error 0, error 1
    assert [m["seq"] for m in msgs] == [0, 4, 5]
    assert agent.outbox.dropped == 3


def test_a_too_large_result_becomes_a_failed_probe(fake_agent: Any) -> None:
    agent, port = fake_agent
    port.host(True)
    agent.send({"type": "probe_result", "id": "p1", "ok": True,
                "result": {"data": "\x00" * 60000}})
    _until(lambda: any(m["type"] == "probe_result" for m in port.messages()))
    (res,) = [m for m in port.messages() if m["type"] == "probe_result"]
    assert res["ok"] is False and "oversized" not in res["error"] and "limit" in res["error"]


def test_bad_requests_get_error_answers() -> None:
    agent = Agent(FakePort())
    for item in Decoder(HOST_TYPES).feed(b'garbage\n{"type": "start", "id": "w1"}\n'):
        agent.dispatch(item)
    agent.dispatch({"type": "signal", "id": "nope", "signal": 15})
    agent.dispatch({"type": "probe", "id": "p1", "kind": "teleport"})
    agent.dispatch({"type": "start", "id": "w2", "argv": ["/nonexistent/program"]})
    out = [agent.outbox.get(0)[1] for _ in range(5)]  # type: ignore[index]
    assert out[0]["kind"] == "malformed" and "id" not in out[0]
    assert out[1]["id"] == "w1" and "argv" in out[1]["message"]
    assert out[2] == {"type": "error", "id": "nope", "message": "no running workload nope"}
    assert out[3]["type"] == "probe_result" and not out[3]["ok"]
    assert "teleport" in out[3]["error"]
    assert out[4]["id"] == "w2" and "cannot start" in out[4]["message"]
    agent.dispatch({"type": "start", "id": "w3", "argv": ["true"], "user": "no-such-user-x"})
    assert "no such user" in agent.outbox.get(0)[1]["message"]  # type: ignore[index]


def test_hello_answers_a_hello_ping() -> None:
    agent = Agent(FakePort(), heartbeat=2.5)
    agent.dispatch({"type": "ping", "id": "h1", "hello": True})
    agent.dispatch({"type": "ping", "id": "k1"})
    hello = agent.outbox.get(0)[1]  # type: ignore[index]
    beat = agent.outbox.get(0)[1]  # type: ignore[index]
    assert hello["type"] == "hello" and hello["id"] == "h1" and hello["heartbeat"] == 2.5
    assert decode(encode(dict(hello, seq=0))) == dict(hello, seq=0)
    assert beat["type"] == "heartbeat" and beat["id"] == "k1"


# --- ports --------------------------------------------------------------------------------


def test_find_vport_by_name(tmp_path: Path) -> None:
    sys_root, dev = tmp_path / "sys", tmp_path / "dev"
    for port, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport0p2",
                                                                  "org.hvtsm.agent.0")):
        (sys_root / port).mkdir(parents=True)
        (sys_root / port / "name").write_text(name + "\n")
    dev.mkdir()
    assert find_vport("org.hvtsm.agent.0", str(sys_root), str(dev)) is None  # no node yet
    (dev / "vport0p2").touch()
    assert find_vport("org.hvtsm.agent.0", str(sys_root), str(dev)) == str(dev / "vport0p2")
    assert find_vport("org.other", str(sys_root), str(dev)) is None


def test_a_port_that_never_appears_is_bounded(tmp_path: Path) -> None:
    port = DevicePort(name="org.hvtsm.agent.0", sys_root=str(tmp_path), dev_root=str(tmp_path))
    began = time.monotonic()
    with pytest.raises(PortUnavailable, match=r"no virtio port named org\.hvtsm\.agent\.0"):
        port.open(0.3)
    assert 0.3 <= time.monotonic() - began < 2


def test_device_port_over_a_pty() -> None:
    """A pty slave behaves like a virtio port for what the agent relies on: data both
    ways, and HUP (no reconnect) once the other side is gone."""
    master, slave = pty.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    port = DevicePort(path)
    port.open(1)
    stop = threading.Event()
    try:
        gen = port.wait_connected(stop)
        port.write(b'{"x": 1}\n' * 3, gen, stop)
        got = b""
        while got.count(b"\n") < 3:
            got += os.read(master, 1024)
        assert got == b'{"x": 1}\n' * 3  # raw mode: no \r added, nothing echoed
        os.write(master, b"hello\n")
        assert port.read(gen, 1) == b"hello\n"
        assert port.read(gen, 0.05) == b""
        os.close(master)
        master = -1
        with pytest.raises(Disconnected):
            for _ in range(20):
                port.read(gen, 0.1)
        assert not port.connected
        threading.Timer(0.3, stop.set).start()
        with pytest.raises(Stopped):  # HUP stays: the agent waits for a host, it does not spin
            port.wait_connected(stop)
    finally:
        if master >= 0:
            os.close(master)
        port.close()


# --- probes -------------------------------------------------------------------------------


def test_tcp_connect_ok_and_refused() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        ok = probes.tcp_connect({"host": "127.0.0.1", "port": port})
    assert ok["ok"] is ok["connected"] is True and ok["errno"] is None
    refused = probes.tcp_connect({"host": "127.0.0.1", "port": port, "timeout": 1})
    assert refused["ok"] is False and refused["errno"] == "ECONNREFUSED"
    assert refused["elapsed_ms"] < 1000
    with pytest.raises(probes.ProbeError):
        probes.tcp_connect({"host": "127.0.0.1", "port": 0})
    with pytest.raises(probes.ProbeError):
        probes.tcp_connect({"host": "127.0.0.1", "port": "80"})


def test_meminfo(tmp_path: Path) -> None:
    real = probes.meminfo({})
    assert real["MemTotal"] > real["MemFree"] > 0 and "MemAvailable" in real
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:  2048 kB\nMemFree: 1024 kB\nHugePages_Total: 0\nbogus\n")
    assert probes.meminfo({}, str(fake)) == {"MemTotal": 2048, "MemFree": 1024,
                                             "HugePages_Total": 0}


@pytest.mark.parametrize("use_ip", [True, False])
def test_interfaces_lists_loopback(use_ip: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not use_ip:
        monkeypatch.setattr(probes, "_ip_json", lambda: None)
    elif shutil.which("ip") is None:
        pytest.skip("no ip(8) here")
    result = probes.interfaces({})
    assert result["source"] == ("ip" if use_ip else "ioctl")
    lo = {i["name"]: i for i in result["interfaces"]}["lo"]
    assert "127.0.0.1/8" in lo["ipv4"] and lo["mtu"] and lo["operstate"]


def test_read_file_is_bounded(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc\xff" * 10)
    small = probes.read_file({"path": str(f), "max_bytes": 6})
    assert small == {"data": "abc\ufffdab", "size": 6, "truncated": True, "encoding": "text"}
    whole = probes.read_file({"path": str(f), "encoding": "base64"})
    assert base64.b64decode(whole["data"]) == b"abc\xff" * 10 and not whole["truncated"]
    with pytest.raises(probes.ProbeError):
        probes.read_file({"path": str(f), "max_bytes": 10**9})
    with pytest.raises(FileNotFoundError):
        probes.read_file({"path": str(tmp_path / "missing")})


def test_workload_environment_is_clean() -> None:
    env = build_env({"FOO": "1", "PATH": "/x"}, None)
    assert env["FOO"] == "1" and env["PATH"] == "/x" and "HOME" in env
    assert "PYTEST_CURRENT_TEST" not in build_env(None, None)


# --- python 3.9 ---------------------------------------------------------------------------


def python39() -> str | None:
    """A real python3.9 (not a pyenv shim), if this machine has one."""
    pyenv = Path.home() / ".pyenv" / "versions"
    for d in sorted(pyenv.glob("3.9*")) if pyenv.is_dir() else []:
        if (d / "bin" / "python3").exists():
            return str(d / "bin" / "python3")
    found = shutil.which("python3.9")
    return found if found and "shims" not in found else None


def test_ruff_sees_python39_code() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    done = subprocess.run([ruff, "check", "--target-version", "py39", "guest_agent"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_agent_imports_and_works_on_python39() -> None:
    py = python39()
    if py is None:
        pytest.skip("no python3.9 on this machine")
    code = ("import guest_agent.agent as a, guest_agent.protocol as p, guest_agent.probes as q;"
            "d = p.Decoder(p.HOST_TYPES);"
            "assert d.feed(b'{\"type\": \"ping\"}\\n') == [{'type': 'ping'}];"
            "assert q.meminfo({})['MemTotal'] > 0;"
            "a.parse_args(['--connect', 'unix:/x']);"
            "print('ok')")
    done = subprocess.run([py, "-c", code], env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_agent_module_needs_only_the_stdlib() -> None:
    """Import the agent in a clean interpreter and check nothing outside the stdlib and
    guest_agent got loaded."""
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import guest_agent.agent, guest_agent.port, guest_agent.probes\n"
            "bad = [n for n in set(sys.modules) - before if not n.startswith('guest_agent')\n"
            "       and 'site-packages' in (getattr(sys.modules[n], '__file__', '') or '')]\n"
            "print(bad)\n")
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO)},
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_agent_help_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "guest_agent", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--connect" in done.stdout
    assert agent_mod.CAPABILITIES[0] == "start"


@pytest.mark.skipif(os.geteuid() != 0, reason="a negative nice needs root")
def test_workload_does_not_inherit_the_agents_priority() -> None:
    """The agent runs at AGENT_NICE so a spinning workload cannot starve it; the workload
    itself must run at the ordinary 0."""
    code = ("import os; from guest_agent.workload import AGENT_NICE, spawn; "
            "os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE); "
            "p = spawn(['sh', '-c', 'cut -d\" \" -f19 /proc/self/stat'], stdout='stream'); "
            "print(os.getpriority(os.PRIO_PROCESS, 0), p.stdout.read().decode().strip())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stdout.split() == ["-10", "0"]


# --- admin requests -----------------------------------------------------------------------


def test_admin_requests_are_answered_with_admin_results() -> None:
    agent = Agent(FakePort())
    hello = agent.hello()
    assert {"admin", "admin:scrub", "admin:link_down", "admin:remount_ro",
            "admin:nproc"} <= set(hello["capabilities"])
    for item in Decoder(HOST_TYPES).feed(
            b'{"type": "admin", "id": "a1", "op": "nproc", "pid": 1}\n'):
        agent.dispatch(item)  # invalid: answered at once, naming the missing field
    err = agent.outbox.get(0)[1]  # type: ignore[index]
    assert err["type"] == "error" and err["id"] == "a1" and "limit" in err["message"]
    child = subprocess.Popen(["sleep", "30"])
    try:
        agent.dispatch({"type": "admin", "id": "a2", "op": "nproc", "pid": child.pid,
                        "limit": 4096})
        deadline = time.monotonic() + 10
        item = None
        while item is None and time.monotonic() < deadline:
            item = agent.outbox.get(1)
        assert item is not None, "no admin_result"
        reply = item[1]
    finally:
        child.kill()
        child.wait()
        agent.admin.close()
    assert reply["type"] == "admin_result" and reply["id"] == "a2" and reply["ok"]
    assert reply["op"] == "nproc" and reply["limit"] == 4096


# --- the deputy through the agent's own dispatch ------------------------------------------------


def test_the_agents_deputy_keeps_a_schedule_and_hands_its_log_over(tmp_path: Path) -> None:
    agent = Agent(FakePort())
    limit = tmp_path / "pids.max"
    limit.write_text("max")
    agent.dispatch({"type": "deputy", "id": "z1", "in_force": 0, "grace": 0.3,
                    "sent": time.time(), "phases": [{"index": 1, "due": time.time() - 1,
                                                    "steps": [{"op": "lower",
                                                               "path": str(limit),
                                                               "value": 64}]}]})
    agent.dispatch({"type": "deputy", "id": "z2", "phases": [{"index": 1, "due": 1.0,
                                                             "steps": [{"op": "rm"}]}]})
    refused = agent.outbox.get(0)[1]  # type: ignore[index]
    assert refused["type"] == "error" and refused["id"] == "z2" and "rm" in refused["message"]
    agent.deputies.deputy.step()
    assert limit.read_text() == "64"
    report = agent.hello()["deputy"]
    assert [r["phase"] for r in report["records"]] == [1] and report["records"][0]["alone"]
    assert decode(encode(dict(agent.hello(), seq=0)))["deputy"] == report
    agent.dispatch({"type": "deputy_ack", "id": "z1", "seq": report["records"][0]["seq"]})
    assert agent.hello()["deputy"]["records"] == []
