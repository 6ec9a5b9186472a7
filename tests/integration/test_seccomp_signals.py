"""A watched call the agent has received waits for its answer through non-fatal signals.

A supervisor of our own (the real filter, the real listener, kernel notifications) answers
each file-creating open only after the workload got a SIGUSR1 whose handler has no
SA_RESTART (Python installs its handlers so): the open must succeed once answered, as it
would unwatched, instead of failing with EINTR. A SIGKILL still ends the wait at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_agent import seccomp
from guest_agent.profile import Profile
from guest_agent.syscalls import number

pytestmark = pytest.mark.integration

PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
OPENS = {number("open"), number("openat"), number("creat"), number("openat2")}

if seccomp.available() is not None:
    pytest.skip(f"needs seccomp user notification ({seccomp.available()})",
                allow_module_level=True)
if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (5, 19):
    pytest.skip("the kernel has no SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
                allow_module_level=True)

#: raw libc open (ctypes does not retry on EINTR as Python's own open would)
WORKLOAD = """import ctypes, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *_: os.write(2, b"signal\\n"))
libc = ctypes.CDLL(None, use_errno=True)
print("ready", flush=True)
sys.stdin.readline()
fd = libc.open(sys.argv[1].encode(), os.O_CREAT | os.O_WRONLY, 0o644)
print(fd, ctypes.get_errno(), flush=True)
"""


class SlowSupervisor:
    """Receives the listener from the watched child (its first exec waits for an answer,
    so this runs before Popen returns) and lets every call through; a file-creating open
    only `delay` s after it arrived, once `on_open` (which signals the caller) has run."""

    def __init__(self, on_open: Callable[[int], None], delay: float) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.on_open = on_open
        self.delay = delay
        self.answered: list[bool] = []
        self.listener: seccomp.Listener | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        _msg, fds, _flags, _addr = socket.recv_fds(self.ours, 4096, 1)
        self.listener = seccomp.Listener(fds[0])
        while self.listener.fd >= 0:
            notif = self.listener.recv()
            if notif is None:
                continue
            if notif.nr in OPENS:
                self.on_open(notif.pid)
                time.sleep(self.delay)
            self.answered.append(self.listener.respond(notif.id, allow=True))

    def start(self, target: Path) -> subprocess.Popen[str]:
        """The workload under the filter, installed by the agent's installer."""
        installer = seccomp.Installer(Profile())
        header = json.dumps({"id": "w"}).encode()
        fd = self.theirs.fileno()
        return subprocess.Popen(
            [PY, "-c", WORKLOAD, str(target)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": os.environ["PATH"]},
            preexec_fn=lambda: installer.install_and_hand_over(fd, header))

    def close(self) -> None:
        # the serving thread may sit in a blocking receive: it is a daemon
        self.ours.close()
        self.theirs.close()


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "ready\n"
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_a_received_open_survives_a_signal(tmp_path: Path) -> None:
    target = tmp_path / "created.txt"
    signalled = threading.Event()

    def on_open(pid: int) -> None:
        os.kill(pid, signal.SIGUSR1)
        signalled.set()

    supervisor = SlowSupervisor(on_open, delay=0.5)
    try:
        proc = supervisor.start(target)
        go(proc)
        out, err = proc.communicate(timeout=20)
    finally:
        supervisor.close()
    assert signalled.is_set()
    fd, err_no = (int(x) for x in out.split())
    # unwatched semantics: the open succeeded (no EINTR), and the handler ran afterwards
    assert fd >= 0 and err_no == 0, (out, err)
    assert target.exists() and err == "signal\n"
    assert supervisor.answered[-1] is True  # the caller still waited for this answer


def test_a_fatal_signal_still_ends_the_wait(tmp_path: Path) -> None:
    supervisor = SlowSupervisor(lambda pid: os.kill(pid, signal.SIGKILL), delay=0.5)
    try:
        proc = supervisor.start(tmp_path / "never.txt")
        go(proc)
        t0 = time.monotonic()
        status = proc.wait(timeout=20)
        waited = time.monotonic() - t0
    finally:
        supervisor.close()
    assert status == -signal.SIGKILL
    assert waited < 0.5  # not held until the supervisor's answer
    assert not (tmp_path / "never.txt").exists()
