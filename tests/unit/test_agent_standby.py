"""Standby workloads, agent side, against real processes: the agent (a copy of
guest_agent/, system python) over a unix socket prepares a standby as the unprivileged
user under its seccomp watch; a request then runs in that very process (same pid) with
its argv, cwd, environment and exit status; the watch goes on under the request's id; and
each fallback (filter not covering the request's profile, another user, another runtime,
a standby used twice) starts the request normally and kills the unused standby."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent import seccomp
from tests.unit.agent_peer import AgentPeer, running_agent

REPO = Path(__file__).resolve().parents[2]
PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
PROFILE = {"deny_syscalls": ["ptrace"], "contain": "kill"}

if os.geteuid() != 0 or seccomp.available() is not None:
    pytest.skip(f"needs root and seccomp user notification ({seccomp.available()})",
                allow_module_level=True)


class Peer(AgentPeer):
    """The host's end of one agent, with the standby requests."""

    def prepare(self, sid: str, *, mode: str = "python", program: str | None = None,
                monitor: dict | None = None) -> dict:
        msg = {"type": "standby", "id": sid, "mode": mode, "python": PY, "user": "nobody",
               "monitor": monitor or PROFILE}
        if program is not None:
            msg["program"] = program
        self.send(msg)
        return self.until(lambda m: m.get("id") == sid and m["type"] in ("standby_ready",
                                                                            "error"))

    def run(self, wid: str, argv: list[str], **fields: Any) -> tuple[dict, dict, str, str]:
        msg = {"type": "start", "id": wid, "argv": argv, "user": "nobody",
               "monitor": PROFILE, **fields}
        self.send(msg)
        started = self.until(lambda m: m.get("id") == wid and m["type"] in ("started",
                                                                              "error"))
        assert started["type"] == "started", started
        exit_msg = self.until(lambda m: m["type"] == "exit" and m["id"] == wid)
        out = "".join(m["data"] for m in self.seen if m["type"] == "output"
                      and m["id"] == wid and m["stream"] == "stdout")
        err = "".join(m["data"] for m in self.seen if m["type"] == "output"
                      and m["id"] == wid and m["stream"] == "stderr")
        return started, exit_msg, out, err


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    with running_agent(tmp_path, PY, Peer) as p:
        hello = p.until(lambda m: m["type"] == "hello")
        assert "standby" in hello["capabilities"]
        yield p


@pytest.fixture
def code_dir() -> Iterator[Path]:
    # the workload's user (nobody) must read the scripts and work in the directory
    d = Path(tempfile.mkdtemp(prefix="standby-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def script(d: Path, name: str, text: str) -> str:
    path = d / name
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def status_of(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if status_of(pid)["State"].startswith("Z"):
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_python_standby_is_watched_before_and_serves_the_request(peer: Peer,
                                                                  code_dir: Path) -> None:
    ready = peer.prepare("sb1")
    assert ready["type"] == "standby_ready", ready
    pid = ready["pid"]
    # waiting: the unprivileged user, filtered (mode 2), the loader, the watch begun
    status = status_of(pid)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert status["Uid"].split()[0] == str(nobody) and status["Seccomp"] == "2"
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"-c"
    peer.until(lambda m: m["type"] == "event" and m["kind"] == "monitor" and m["id"] == "sb1")
    path = script(code_dir, "job.py", (
        "import os, sys\n"
        "print(__name__, sys.argv, os.getcwd(), os.environ.get('X'), os.getuid(),\n"
        "      os.path.dirname(__file__) == sys.path[0], 'json' in dir())\n"
        "sys.exit(3)\n"))
    started, exit_msg, out, err = peer.run("job", [PY, path, "a b", "c"], env={"X": "y"},
                                           standby="sb1",
                                           cwd=str(code_dir))
    assert started["pid"] == pid and started["standby"]["used"] is True
    assert started["standby"]["id"] == "sb1" and started["standby"]["pid"] == pid
    assert out == (f"__main__ ['{path}', 'a b', 'c'] {code_dir} y {nobody} True False\n"), err
    assert exit_msg["status"] == 3


def test_the_watch_goes_on_under_the_request_id(peer: Peer, code_dir: Path) -> None:
    assert peer.prepare("sb2")["type"] == "standby_ready"
    path = script(code_dir, "ptrace.py", "import ctypes\nprint('before', flush=True)\n"
                                         "ctypes.CDLL(None).ptrace(0, 0, 0, 0)\n"
                                         "print('SURVIVED')\n")
    started, exit_msg, out, _err = peer.run("bad", [PY, path], standby="sb2")
    assert started["standby"]["used"] is True
    anomaly = peer.until(lambda m: m["type"] == "event" and m["kind"] == "anomaly")
    assert anomaly["id"] == "bad" and anomaly["data"]["category"] == "denied-syscall"
    assert anomaly["data"]["pid"] == started["pid"]
    assert out == "before\n" and exit_msg["status"] == -9


def test_an_exception_ends_like_python(peer: Peer, code_dir: Path) -> None:
    assert peer.prepare("sb3")["type"] == "standby_ready"
    path = script(code_dir, "boom.py", "def f():\n    return 1 / 0\nf()\n")
    started, exit_msg, _out, err = peer.run("boom", [PY, path], standby="sb3")
    assert started["standby"]["used"] is True and exit_msg["status"] == 1
    assert err.startswith("Traceback") and "ZeroDivisionError" in err and path in err
    assert "runpy" not in err and "<string>" not in err, err


def test_the_end_is_pythons_without_the_teardown(peer: Peer, code_dir: Path) -> None:
    """The loader leaves through os._exit (the teardown costs a TCG guest 70-140 ms), yet
    ends as python would: non-daemon threads joined, atexit run, open files flushed, a
    string exit code printed with status 1."""
    assert peer.prepare("sb9")["type"] == "standby_ready"
    out_dir = code_dir / "out"
    out_dir.mkdir(mode=0o777)
    out_dir.chmod(0o777)
    path = script(code_dir, "sloppy.py", (
        "import atexit, sys, threading, time\n"
        f"d = {str(out_dir)!r}\n"
        "kept = open(d + '/unclosed.txt', 'w')\n"
        "kept.write('never closed')\n"
        "raw = open(d + '/binary.bin', 'wb')\n"
        "raw.write(b'\\x00' * 10)\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    open(d + '/thread.txt', 'w').write('joined')\n"
        "threading.Thread(target=late).start()\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "print('buffered', end='')\n"
        "sys.exit('bye')\n"))
    started, exit_msg, out, err = peer.run("sloppy", [PY, path], standby="sb9")
    assert started["standby"]["used"] is True
    assert exit_msg["status"] == 1 and err == "bye\n", err
    assert out == "bufferedatexit ran\n"
    assert (out_dir / "unclosed.txt").read_text() == "never closed"
    assert (out_dir / "binary.bin").read_bytes() == b"\x00" * 10
    assert (out_dir / "thread.txt").read_text() == "joined"


@pytest.mark.parametrize(("code", "status"), [("None", 0), ("7", 7), ("-1", 255)])
def test_exit_codes_are_pythons(peer: Peer, code_dir: Path, code: str, status: int) -> None:
    assert peer.prepare("sb10")["type"] == "standby_ready"
    path = script(code_dir, "code.py", f"import sys\nprint('x')\nsys.exit({code})\n")
    started, exit_msg, out, _err = peer.run("code", [PY, path], standby="sb10")
    assert started["standby"]["used"] is True
    assert (exit_msg["status"], out) == (status, "x\n")
    plain = subprocess.run([PY, path], capture_output=True)
    assert plain.returncode == status


def test_exec_standby_runs_sh_as_its_own_program(peer: Peer, code_dir: Path) -> None:
    # allow_exec lets python3 (the standby) and sh (the request's program) run and nothing
    # else: the exec of sh is not judged as a second program, the script's `true` is
    monitor = {"deny_syscalls": ["ptrace"], "contain": "none",
               "allow_exec": ["**/python3*", "/usr/bin/sh", "/bin/sh", "/usr/bin/dash"]}
    ready = peer.prepare("sb4", mode="exec", program="/bin/sh", monitor=monitor)
    assert ready["type"] == "standby_ready", ready
    path = script(code_dir, "job.sh", 'echo "sh $0 $1 $X $(pwd)"\n/bin/true\nexit 4\n')
    started, exit_msg, out, _err = peer.run("sh", ["/bin/sh", path, "one"], standby="sb4",
                                            env={"X": "y"}, cwd=str(code_dir),
                                            monitor=monitor)
    assert started["pid"] == ready["pid"] and started["standby"]["used"] is True
    assert out == f"sh {path} one y {code_dir}\n" and exit_msg["status"] == 4
    peer.until(lambda m: m["type"] == "event" and m["kind"] == "anomaly")
    peer.send({"type": "ping", "id": "later"})  # whatever else the agent had queued
    peer.until(lambda m: m["type"] == "heartbeat" and m.get("id") == "later")
    anomalies = [m for m in peer.seen if m["type"] == "event" and m["kind"] == "anomaly"]
    assert [(a["id"], a["data"]["category"], a["data"]["args"]["path"])
            for a in anomalies] == [("sh", "unexpected-exec", "/bin/true")], anomalies


@pytest.mark.parametrize("case", ["filter", "user", "runtime", "twice"])
def test_fallbacks_start_normally_and_kill_the_standby(peer: Peer, code_dir: Path,
                                                       case: str) -> None:
    ready = peer.prepare("sb5")
    assert ready["type"] == "standby_ready"
    path = script(code_dir, "fb.py", "import os\nprint('ran', os.getuid())\n")
    fields: dict[str, Any] = {"standby": "sb5"}
    argv = [PY, path]
    expect = {"filter": "filter does not notify", "user": "uid 0", "runtime": "standby is for",
              "twice": "no standby sb5"}[case]
    if case == "filter":
        fields["monitor"] = {"deny_syscalls": ["ptrace", "chroot"], "contain": "kill"}
    elif case == "user":
        fields["user"] = 0
    elif case == "runtime":
        argv = ["/bin/sh", "-c", "echo ran $(id -u)"]
    elif case == "twice":
        first = peer.run("first", argv, **fields)[0]
        assert first["standby"]["used"] is True
    started, exit_msg, out, _err = peer.run("fb", argv, **fields)
    note = started["standby"]
    assert note["used"] is False and expect in note["reason"], note
    assert started["pid"] != ready["pid"] and exit_msg["status"] == 0
    assert out.startswith("ran ")
    assert gone(ready["pid"])


def test_a_new_standby_replaces_the_old(peer: Peer) -> None:
    first = peer.prepare("sb6")
    second = peer.prepare("sb7")
    assert first["type"] == second["type"] == "standby_ready"
    assert first["pid"] != second["pid"] and gone(first["pid"])
    assert status_of(second["pid"])["State"][0] in "SR"


def test_a_normal_start_beside_an_unused_standby(peer: Peer, code_dir: Path) -> None:
    """Both watched with sensitive paths (fanotify permission marks): the normal start
    must not wait on the standby's marks (the agent drops the standby it will not use)."""
    monitor = {"deny_syscalls": ["ptrace"], "contain": "kill",
               "sensitive_paths": ["/etc/shadow", "/root/**", "/home/**"]}
    ready = peer.prepare("sb8", monitor=monitor)
    assert ready["type"] == "standby_ready"
    path = script(code_dir, "plain.py", "print('plain')\n")
    started, exit_msg, out, _err = peer.run("plain", [PY, path], monitor=monitor)
    assert "standby" not in started and out == "plain\n" and exit_msg["status"] == 0
    assert gone(ready["pid"])
