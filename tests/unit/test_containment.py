"""Containment order (guest_agent/containment.py) against real processes: a kill is reported
first, so the host has the reason before it can see the exit; then the process is killed,
then the held call answered. deny answers first."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from guest_agent import proccount
from guest_agent.containment import Containment
from guest_agent.judge import anomaly
from guest_agent.profile import Profile
from guest_agent.reports import Reporter
from guest_agent.watch import Watch


def alive(pid: int) -> bool:
    proc = proccount.read_proc(pid)
    if proc is None:
        return False
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")


class Log:
    """The order things happened in, and whether the victim was alive at each."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.steps: list[tuple[str, bool]] = []
        self.events: list[dict[str, Any]] = []

    def emit(self, kind: str, _wid: str, data: dict[str, Any]) -> bool:
        self.steps.append((kind, alive(self.pid)))
        self.events.append(data)
        return True

    def answer(self, allow: bool, killed: bool) -> None:
        self.steps.append((f"answer allow={allow} killed={killed}", alive(self.pid)))


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "30"])
    yield child
    child.kill()
    child.wait()


def rig(victim: subprocess.Popen[bytes], contain: str) -> tuple[Containment, Watch, Log]:
    log = Log(victim.pid)
    watch = Watch("w1", Profile(contain=contain), None, frozenset())
    return Containment(Reporter(log.emit)), watch, log


def test_kill_reports_then_kills_then_answers(victim: subprocess.Popen[bytes]) -> None:
    containment, watch, log = rig(victim, "kill")
    verdict = anomaly("denied-syscall", "ptrace is in deny_syscalls", "ptrace", {})
    before = time.monotonic()
    containment.call(watch, verdict, victim.pid, time.time(), before, log.answer)
    assert log.steps[0] == ("anomaly", True)  # reported while the process still runs
    assert [s for s, _ in log.steps] == ["anomaly", "answer allow=False killed=True"]
    assert victim.wait(5) == -signal.SIGKILL
    (data,) = log.events
    assert data["contained"] == "killed" and data["program"].endswith("sleep")
    assert before <= data["contained_mono"] <= time.monotonic()


def test_sampled_kill_reports_first(victim: subprocess.Popen[bytes]) -> None:
    containment, watch, log = rig(victim, "kill")
    verdict = anomaly("memory-spike", "grew", None, {}, rate=True)
    containment.call(watch, verdict, victim.pid, time.time(), time.monotonic(), None)
    assert log.steps == [("anomaly", True)]
    assert victim.wait(5) == -signal.SIGKILL


def test_deny_answers_then_reports(victim: subprocess.Popen[bytes]) -> None:
    containment, watch, log = rig(victim, "deny")
    verdict = anomaly("connect-out", "out", "connect", {})
    containment.call(watch, verdict, victim.pid, time.time(), time.monotonic(), log.answer)
    assert [s for s, _ in log.steps] == ["answer allow=False killed=False", "anomaly"]
    assert log.events[0]["contained"] == "denied" and victim.poll() is None


def test_fork_limit_reports_before_ending_the_forker(victim: subprocess.Popen[bytes]) -> None:
    containment, watch, log = rig(victim, "kill")
    me = proccount.read_proc(os.getpid())
    child = proccount.read_proc(victim.pid)
    assert me is not None and child is not None
    procs = {victim.pid: child}
    containment.processes(watch, "2 processes alive (limit 1)", [child], procs,
                          {"processes": 2, "limit": 1}, lambda: procs)
    assert log.steps == [("anomaly", True)]
    assert victim.wait(5) == -signal.SIGKILL
    data = log.events[0]
    assert data["category"] == "fork-rate" and data["contained"] == "killed"
    assert data["args"]["killed"] == 1 and data["contained_mono"] is not None


class Group:
    def __init__(self, log: Log) -> None:
        self.log = log

    def respond(self, event: Any, allow: bool) -> None:
        self.log.steps.append((f"respond allow={allow}", alive(self.log.pid)))
        event.fd = -1


class Event:
    def __init__(self, pid: int, permission: bool) -> None:
        self.pid, self.fd, self.permission = pid, 5, permission


@pytest.mark.parametrize("permission", [True, False])
def test_sensitive_open_kill_reports_first(victim: subprocess.Popen[bytes],
                                           permission: bool) -> None:
    containment, watch, log = rig(victim, "kill")
    verdict = anomaly("sensitive-path", "read of /x matches /x", None, {"path": "/x"})
    allowed = containment.open(watch, Group(log), Event(victim.pid, permission),  # type: ignore[arg-type]
                               verdict, time.time(), time.monotonic())
    assert not allowed
    assert log.steps[0] == ("anomaly", True)
    assert log.steps[1][0] == "respond allow=False"
    assert victim.wait(5) == -signal.SIGKILL
