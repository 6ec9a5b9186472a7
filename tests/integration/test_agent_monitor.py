"""The syscall monitor against real processes: a Monitor in this process, each workload
started the way the agent starts one (fork, install the seccomp filter, exec), one test per
anomaly category, benign programs that must stay quiet, and the agent end to end over a
unix socket. Act-to-containment times are printed (pytest -s shows them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent import fanotify, seccomp
from guest_agent.monitor import Monitor
from guest_agent.profile import Profile
from guest_agent.protocol import ANOMALY_CATEGORIES, ANOMALY_FIELDS
from tests.unit.agent_peer import running_agent

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

if os.geteuid() != 0 or seccomp.available() is not None:
    pytest.skip(f"needs root and seccomp user notification ({seccomp.available()})",
                allow_module_level=True)


class Events:
    """What the monitor emitted, waitable."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict]] = []
        self.cond = threading.Condition()

    def __call__(self, kind: str, wid: str, data: dict) -> bool:
        with self.cond:
            self.items.append((kind, wid, data))
            self.cond.notify_all()
        return True

    def anomalies(self, wid: str) -> list[dict]:
        with self.cond:
            return [d for k, w, d in self.items if k == "anomaly" and w == wid]

    def wait(self, wid: str, category: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for k, w, d in self.items:
                    if k == "anomaly" and w == wid and d["category"] == category:
                        return d
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {category} anomaly for {wid}; got "
                                         f"{[d['category'] for d in self.anomalies(wid)]}")
                self.cond.wait(left)


@pytest.fixture
def mon() -> Iterator[tuple[Monitor, Events]]:
    events = Events()
    monitor = Monitor(events, permission_events=True)
    monitor.start()
    yield monitor, events
    monitor.close()


_counter = [0]


def watched(monitor: Monitor, profile: Profile, code: str | list[str], **kw: Any
            ) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `code` (python source, or an argv) under watch: returns (watch id, Popen)."""
    _counter[0] += 1
    wid = f"w{_counter[0]}"
    installer = seccomp.Installer(profile)
    header = json.dumps({"id": wid, "profile": profile.to_dict()}).encode()
    fd = monitor.child_socket.fileno()
    argv = [PY, "-c", textwrap.dedent(code)] if isinstance(code, str) else code
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,
                            preexec_fn=lambda: installer.install_and_hand_over(fd, header),
                            **kw)
    return wid, proc


def finish(proc: subprocess.Popen[bytes], timeout: float = 20) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    return (proc.returncode, (out or b"").decode(errors="replace"),
            (err or b"").decode(errors="replace"))


def check_shape(anomaly: dict) -> None:
    assert tuple(anomaly) == ANOMALY_FIELDS
    assert anomaly["category"] in ANOMALY_CATEGORIES
    assert json.loads(json.dumps(anomaly)) == anomaly


def report(what: str, anomaly: dict, act: float | None = None) -> None:
    """Print the act-to-containment time (from the workload's own clock reading when it
    gave one: CLOCK_MONOTONIC is system-wide)."""
    if anomaly["contained_mono"] is None:
        print(f"\n[latency] {what}: not contained ({anomaly['contained']})")
        return
    seen = (anomaly["contained_mono"] - anomaly["act_mono"]) * 1000
    text = f"\n[latency] {what}: notified->contained {seen:.2f} ms"
    if act is not None:
        text += f", act->contained {(anomaly['contained_mono'] - act) * 1000:.2f} ms"
    print(text)


def session_pids(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
            fields = data[data.rindex(b")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != b"Z":
                out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


# --- one test per category ------------------------------------------------------------


def test_new_file_rate_killed(mon: tuple[Monitor, Events], tmp_path: Path) -> None:
    monitor, events = mon
    wid, proc = watched(monitor, Profile(max_new_files_per_s=20), f"""
        for i in range(500):
            open("{tmp_path}/f%d" % i, "w").close()
        print("done")
    """)
    status, out, _ = finish(proc)
    anomaly = events.wait(wid, "new-file-rate")
    check_shape(anomaly)
    assert status == -9 and "done" not in out
    assert anomaly["contained"] == "killed" and anomaly["syscall"] == "openat"
    assert anomaly["args"]["path"].startswith(str(tmp_path))
    assert len(list(tmp_path.iterdir())) <= 25  # stopped at the rate, not after 500
    report("new-file-rate", anomaly)


def test_unexpected_exec_killed_before_it_runs(mon: tuple[Monitor, Events],
                                               tmp_path: Path) -> None:
    monitor, events = mon
    tool = tmp_path / "copied-touch"
    shutil.copy("/usr/bin/touch", tool)
    marker = tmp_path / "marker"
    wid, proc = watched(monitor, Profile(allow_exec=("/usr/**", "/bin/**")), f"""
        import os, sys, time
        sys.stdout.write("%r\\n" % time.monotonic()); sys.stdout.flush()
        os.execv("{tool}", ["touch", "{marker}"])
    """)
    status, out, _ = finish(proc)
    anomaly = events.wait(wid, "unexpected-exec")
    check_shape(anomaly)
    assert status == -9 and not marker.exists()  # the copied program never ran
    assert anomaly["contained"] == "killed"
    assert anomaly["args"] == {"path": str(tool), "argv": ["touch", str(marker)]}
    assert "not in allow_exec" in anomaly["detail"]
    assert anomaly["program"].startswith("/usr/bin/python3")
    report("unexpected-exec (kill)", anomaly, float(out.split()[0]))


def test_ptrace_denied(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    wid, proc = watched(monitor, Profile(deny_syscalls=("ptrace", "bpf"), contain="deny"), """
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        t = time.monotonic()
        rc = libc.ptrace(16, os.getppid(), 0, 0)  # PTRACE_ATTACH to the parent
        print(rc, ctypes.get_errno(), repr(t))
    """)
    status, out, _ = finish(proc)
    anomaly = events.wait(wid, "denied-syscall")
    check_shape(anomaly)
    rc, err, act = out.split()
    assert status == 0 and (rc, err) == ("-1", "1")  # EPERM, and the process lives on
    assert anomaly["syscall"] == "ptrace" and anomaly["contained"] == "denied"
    assert anomaly["args"] == {"request": "ATTACH", "target": os.getpid()}
    report("denied-syscall (deny)", anomaly, float(act))


def test_connect_out_denied_in_fresh_netns(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    code = textwrap.dedent("""
        import socket, time
        s = socket.socket()
        s.settimeout(2)
        t = time.monotonic()
        try:
            s.connect(("10.255.255.1", 9))
            print("connected")
        except OSError as e:
            print("errno", e.errno, repr(t))
    """)
    # unshare -n: even if the verdict were wrong no packet could leave this machine
    wid, proc = watched(monitor, Profile(network="none", contain="deny"),
                        ["unshare", "-n", PY, "-c", code])
    status, out, err = finish(proc)
    anomaly = events.wait(wid, "connect-out")
    check_shape(anomaly)
    assert status == 0, err
    assert out.split()[:2] == ["errno", "1"]  # EPERM from the monitor, not ENETUNREACH
    assert anomaly["args"] == {"family": "inet", "address": "10.255.255.1", "port": 9}
    assert anomaly["contained"] == "denied" and "network is none" in anomaly["detail"]
    report("connect-out (deny)", anomaly, float(out.split()[2]))


def test_fork_bomb_stopped(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    # a tree bomb bounded at 2**8 processes even if nothing stopped it
    wid, proc = watched(monitor, Profile(max_forks_per_s=50), """
        import os, time
        for _ in range(8):
            try:
                os.fork()
            except OSError:
                pass
        time.sleep(3)
    """)
    time.sleep(1.5)
    alive = session_pids(proc.pid)
    anomaly = events.wait(wid, "fork-rate")
    check_shape(anomaly)
    finish(proc)
    # forks are counted by sampling, not notified: no syscall to name
    assert anomaly["contained"] == "killed" and anomaly["syscall"] is None
    assert anomaly["args"]["killed"] >= 1
    assert len(alive) < 128, f"{len(alive)} bomb processes alive"
    report("fork-rate (kill)", anomaly)
    print(f"[fork bomb] {len(alive)} of at most 256 processes alive after 1.5 s")


def test_fork_never_fails_because_it_is_watched(mon: tuple[Monitor, Events]) -> None:
    """A SIGCHLD handler without SA_RESTART (as dash has) while children end: an unwatched
    fork never fails with EINTR, so a watched one must not either."""
    monitor, _events = mon
    _wid, proc = watched(monitor, Profile(max_forks_per_s=100000, max_processes=1000), """
        import os, signal
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.siginterrupt(signal.SIGCHLD, True)
        failed = 0
        for i in range(300):
            try:
                pid = os.fork()
            except InterruptedError:
                failed += 1
                continue
            if pid == 0:
                os._exit(0)
            if i % 3 == 0:
                continue  # let children end while the next fork is under way
            while True:
                try:
                    os.waitpid(-1, 0)
                    break
                except InterruptedError:
                    continue
                except ChildProcessError:
                    break
        print("eintr", failed)
    """)
    status, out, err = finish(proc)
    assert status == 0, err
    assert out.split() == ["eintr", "0"]


@pytest.mark.skipif(fanotify.available(True) is not None, reason="no fanotify here")
def test_sensitive_read_via_fanotify(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    secret_dir = Path(tempfile.mkdtemp(prefix="hvtsm-sens-"))
    try:
        key = secret_dir / "id.key"
        key.write_text("SECRET-CONTENT\n")
        profile = Profile(sensitive_paths=(f"{secret_dir}/*.key",))
        wid, proc = watched(monitor, profile, f"""
            import time
            time.sleep(0.3)
            print(repr(time.monotonic()), flush=True)
            print(open("{key}").read())
        """)
        time.sleep(0.1)
        assert key.read_text() == "SECRET-CONTENT\n"  # outsiders' opens pass (and don't hang)
        status, out, _ = finish(proc)
        anomaly = events.wait(wid, "sensitive-path")
        check_shape(anomaly)
        assert status == -9 and "SECRET" not in out
        assert anomaly["contained"] == "killed" and anomaly["args"] == {"path": str(key)}
        assert f"read of {key} matches {secret_dir}/*.key" == anomaly["detail"]
        report("sensitive-path read (fanotify, kill)", anomaly, float(out.split()[0]))

        # deny: the open fails, the process lives on
        wid, proc = watched(monitor, Profile(sensitive_paths=profile.sensitive_paths,
                                             contain="deny"), f"""
            try:
                open("{key}").read()
            except OSError as e:
                print("errno", e.errno)
        """)
        status, out, _ = finish(proc)
        assert status == 0 and out.split() == ["errno", "1"]
        assert events.wait(wid, "sensitive-path")["contained"] == "denied"
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)


def test_memory_spike_killed(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    wid, proc = watched(monitor, Profile(memory_spike_mib_per_s=200), """
        import time
        time.sleep(0.6)
        print(repr(time.monotonic()), flush=True)
        block = b"x" * (400 << 20)
        time.sleep(5)
        print("survived")
    """)
    status, out, _ = finish(proc)
    anomaly = events.wait(wid, "memory-spike")
    check_shape(anomaly)
    assert status == -9 and "survived" not in out
    assert anomaly["contained"] == "killed" and anomaly["pid"] == proc.pid
    report("memory-spike (kill, sampled)", anomaly, float(out.split()[0]))


def test_syscall_rate_killed(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    wid, proc = watched(monitor, Profile(max_syscalls_per_s=20000), """
        import os, time
        fd = os.open("/dev/null", os.O_WRONLY)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            os.write(fd, b"x")
        print("survived")
    """)
    status, out, _ = finish(proc)
    anomaly = events.wait(wid, "syscall-rate")
    check_shape(anomaly)
    assert status == -9 and "survived" not in out
    report("syscall-rate (kill, sampled)", anomaly)


def test_reverse_shell_killed(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    wid, proc = watched(monitor, Profile(), """
        import os, socket
        a, b = socket.socketpair()
        os.dup2(a.fileno(), 0)
        os.dup2(a.fileno(), 1)
        os.execv("/bin/sh", ["sh", "-c", "echo shell-ran >&2"])
    """)
    status, _, err = finish(proc)
    anomaly = events.wait(wid, "reverse-shell")
    check_shape(anomaly)
    assert status == -9 and "shell-ran" not in err
    assert anomaly["contained"] == "killed" and anomaly["args"]["path"] == "/bin/sh"
    assert "socket on stdin" in anomaly["detail"]
    report("reverse-shell (kill)", anomaly)


def test_benign_programs_stay_quiet(mon: tuple[Monitor, Events], tmp_path: Path) -> None:
    monitor, events = mon
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    profile = Profile(deny_syscalls=("ptrace", "bpf", "kexec_load", "init_module"),
                      sensitive_paths=("/etc/shadow", "/root/.ssh/**"),
                      deny_exec=("/tmp/**",), network="none", max_forks_per_s=50,
                      max_new_files_per_s=50, memory_spike_mib_per_s=500,
                      max_syscalls_per_s=200000)
    wid, proc = watched(monitor, profile, f"""
        import hashlib, os, socket, subprocess, tempfile, threading
        h = hashlib.sha256()
        for i in range(20000):
            h.update(str(i).encode())
        for i in range(10):
            with tempfile.NamedTemporaryFile(dir="{tmp_path}", delete=False) as f:
                f.write(b"data")
        for _ in range(3):
            subprocess.run(["/bin/true"], check=True)
        subprocess.run(["/bin/sh", "-c", "ls / > /dev/null"], check=True)
        t = threading.Thread(target=lambda: None); t.start(); t.join()
        s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
        s.close()
        print("ok", h.hexdigest()[:8])
    """)
    status, out, err = finish(proc)
    time.sleep(0.5)  # a sample or two after the end
    server.close()
    assert status == 0 and out.startswith("ok"), err
    assert events.anomalies(wid) == []
    assert monitor.stats()["lost"] == 0


def test_profile_update_tightens(mon: tuple[Monitor, Events]) -> None:
    monitor, events = mon
    wid, proc = watched(monitor, Profile(contain="deny"), """
        import socket, time
        def attempt():
            s = socket.socket(); s.settimeout(0.2)
            try:
                s.connect(("127.0.0.2", 1))
            except OSError as e:
                return e.errno
        first = attempt()
        time.sleep(1.0)  # the test tightens the profile meanwhile
        s = socket.socket(socket.AF_INET6); s.settimeout(0.2)
        try:
            s.connect(("2001:db8::1", 9))
        except OSError as e:
            print(first, e.errno)
    """)
    time.sleep(0.5)
    monitor.update(wid, Profile(contain="deny", network="loopback"))
    status, out, _ = finish(proc)
    anomaly = events.wait(wid, "connect-out")
    assert anomaly["args"]["family"] == "inet6" and anomaly["contained"] == "denied"
    # 127.0.0.2 is loopback: refused by nobody listening (ECONNREFUSED), not by the monitor
    assert status == 0 and out.split() == ["111", "1"]
    with pytest.raises(KeyError):
        monitor.update("nobody", Profile())


@pytest.mark.skipif(fanotify.available(False) is not None, reason="no fanotify here")
def test_host_mode_attached_socket_and_procs_file(tmp_path: Path) -> None:
    """Host mode: the launcher hands (header, listener) over an attached socket, membership
    comes from a procs file, and fanotify only reports: the read happens, then the reader
    is killed."""
    events = Events()
    monitor = Monitor(events, permission_events=False)
    launcher_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monitor.attach_socket(agent_end)
    monitor.start()
    try:
        secret = tmp_path / "token.key"
        secret.write_text("T")
        procs = tmp_path / "cgroup.procs"
        procs.write_text("")
        profile = Profile(sensitive_paths=(f"{tmp_path}/*.key",))
        header = json.dumps({"id": "zone1", "profile": profile.to_dict(),
                             "procs_file": str(procs)}).encode()
        installer = seccomp.Installer(profile)
        fd = launcher_end.fileno()
        proc = subprocess.Popen(
            [PY, "-c", f"import time; time.sleep(0.5); open('{secret}').read(); "
                       "time.sleep(3); print('survived')"],
            stdout=subprocess.PIPE, start_new_session=True,
            preexec_fn=lambda: installer.install_and_hand_over(fd, header))
        procs.write_text(f"{proc.pid}\n")
        assert secret.read_text() == "T"  # not a member: not reported
        status, out, _ = finish(proc)
        anomaly = events.wait("zone1", "sensitive-path")
        assert status == -9 and "survived" not in out
        assert anomaly["contained"] == "killed" and anomaly["pid"] == proc.pid
        assert len(events.anomalies("zone1")) == 1
        kinds = [k for k, w, _ in events.items if w == "zone1"]
        assert kinds[0] == "monitor"
        deadline = time.monotonic() + 5
        while monitor.stats()["watching"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert monitor.stats()["watching"] == 0  # the tree is gone: the watch ended
        report("sensitive-path read (host mode, kill after the fact)", anomaly)
    finally:
        monitor.close()
        launcher_end.close()


# --- a PATH search: execs that cannot succeed ------------------------------------------


def missing_dirs() -> tuple[str, str]:
    """A /tmp/... and a /home/... directory that do not exist."""
    tag = f"hvtsm-missing-{os.getpid()}-{_counter[0]}"
    dirs = (f"/tmp/{tag}/venv/bin", f"/home/{tag}/.local/bin")
    assert not any(os.path.exists(d) for d in dirs)
    return dirs


def test_path_search_through_missing_denied_dirs_runs(mon: tuple[Monitor, Events]) -> None:
    """subprocess.run(["ls"]) tries execve in each PATH directory: the attempts in the
    missing /tmp and /home directories never run anything, so deny_exec on those is no
    reason to kill, and ls (found in /usr/bin) runs."""
    monitor, events = mon
    tmp_dir, home_dir = missing_dirs()
    wid, proc = watched(monitor, Profile(deny_exec=("/tmp/**", "/home/**")), f"""
        import os, subprocess
        os.environ["PATH"] = "{tmp_dir}:{home_dir}:/usr/bin:/bin"
        done = subprocess.run(["ls", "/"], stdout=subprocess.PIPE)
        print("ls", done.returncode, len(done.stdout) > 0)
    """)
    status, out, err = finish(proc)
    time.sleep(0.3)  # a sample after the end
    assert status == 0, err
    assert out.split() == ["ls", "0", "True"]
    assert events.anomalies(wid) == []
    assert monitor.stats()["lost"] == 0


def test_workload_found_by_path_search_is_its_own_first_exec(
        mon: tuple[Monitor, Events]) -> None:
    """A workload started by name with missing directories first in PATH: the failed
    attempts are not its first exec, so its real program is not an unforeseen code path
    (which would be held for the transient hold timeout)."""
    monitor, events = mon
    tmp_dir, home_dir = missing_dirs()
    profile = Profile.from_dict({"transient": {"triggers": ["exec", "connect"],
                                               "expect_exec": [], "hold_timeout": 5}})
    began = time.monotonic()
    wid, proc = watched(monitor, profile, ["true"],
                        env={"PATH": f"{tmp_dir}:{home_dir}:/usr/bin:/bin"})
    status, _out, err = finish(proc)
    took = time.monotonic() - began
    time.sleep(0.3)
    assert status == 0, err
    assert took < 3, f"the start took {took:.1f} s: held as a code path?"
    with events.cond:
        kinds = [k for k, w, _d in events.items if w == wid]
    assert "code-path" not in kinds and events.anomalies(wid) == []
    assert "monitor" in kinds


# --- the agent end to end -------------------------------------------------------------


def test_agent_end_to_end(tmp_path: Path) -> None:
    """The agent (system python, a copy of guest_agent/) over a unix socket: a start with a
    monitor profile, the monitor event, the anomaly with its evidence, the exit."""
    with running_agent(tmp_path, PY) as peer:
        hello = peer.until(lambda m: m["type"] == "hello")
        caps = hello["capabilities"]
        assert {"events:anomaly", "events:monitor", "events:stats",
                "monitor:seccomp"} <= set(caps)
        # a bad profile: refused, nothing started
        peer.send({"type": "start", "id": "bad", "argv": ["true"],
                   "monitor": {"contain": "maybe"}})
        err = peer.until(lambda m: m["type"] == "error" and m.get("id") == "bad")
        assert "monitor.contain: must be one of none, deny, kill" in err["message"]
        peer.send({"type": "profile", "id": "nobody", "monitor": {}})
        peer.until(lambda m: m["type"] == "error" and m.get("id") == "nobody")

        code = ("import ctypes, time; time.sleep(0.3); "
                "ctypes.CDLL(None).ptrace(0, 0, 0, 0); print('survived')")
        peer.send({"type": "start", "id": "job", "argv": ["python3", "-c", code],
                   "monitor": {"deny_syscalls": ["ptrace"], "contain": "kill"}})
        started = peer.until(lambda m: m["type"] == "started" and m["id"] == "job")
        mon_event = peer.until(lambda m: m["type"] == "event" and m["kind"] == "monitor")
        assert "seccomp-unotify" in mon_event["data"]["mechanisms"]
        peer.send({"type": "profile", "id": "job",
                   "monitor": {"deny_syscalls": ["ptrace"], "contain": "kill",
                               "network": "none"}})
        event = peer.until(lambda m: m["type"] == "event" and m["kind"] == "anomaly")
        exit_msg = peer.until(lambda m: m["type"] == "exit" and m["id"] == "job")
        data = event["data"]
        check_shape(data)
        assert event["id"] == "job" and data["category"] == "denied-syscall"
        assert data["pid"] == started["pid"] and data["syscall"] == "ptrace"
        assert data["args"] == {"request": "TRACEME", "target": 0}
        assert data["contained"] == "killed" and data["program"].startswith("/usr/bin/python")
        assert exit_msg["status"] == -9
        assert not any(m["type"] == "output" and "survived" in m["data"] for m in peer.seen)
        assert not any(m["type"] == "error" and m.get("id") == "job" for m in peer.seen)
        report("agent end to end: denied-syscall (kill)", data)
