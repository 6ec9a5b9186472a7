"""An open for writing of another process's /proc/PID/mem is an injection (issue 12), found
with real processes and real /proc: by its path, through a symlink, through the caller's
/proc/self/fd; its own memory is not another's."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.calls import O_CREAT, OpenCall
from guest_agent.judge import Action, Facts, judge
from guest_agent.procmem import foreign_mem, ns_pid
from guest_agent.profile import Profile

O_RDWR, O_WRONLY = 2, 1


@pytest.fixture
def other() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def opened(path: str, flags: int = O_RDWR) -> OpenCall:
    return OpenCall("openat", path, flags, raw=path)


def test_another_processs_memory_opened_for_writing(other: int, tmp_path: Path) -> None:
    me = os.getpid()
    assert foreign_mem(me, opened(f"/proc/{other}/mem")) == f"/proc/{other}/mem"
    assert foreign_mem(me, opened(f"/proc/{other}/task/{other}/mem", O_WRONLY))
    link = tmp_path / "innocent"
    link.symlink_to(f"/proc/{other}/mem")
    assert foreign_mem(me, opened(str(link))) == f"/proc/{other}/mem"
    with open(f"/proc/{other}/mem", "rb") as f:  # a read-only fd reopened for writing
        assert foreign_mem(me, opened(f"/proc/self/fd/{f.fileno()}")) == \
            f"/proc/{other}/mem"


def test_reading_or_its_own_memory_is_not_injection(other: int) -> None:
    me = os.getpid()
    assert foreign_mem(me, opened(f"/proc/{other}/mem", 0)) == ""  # O_RDONLY
    assert foreign_mem(me, opened("/proc/self/mem")) == ""
    assert foreign_mem(me, opened(f"/proc/{me}/mem")) == ""
    assert foreign_mem(me, opened("/tmp/mem", O_RDWR | O_CREAT)) == ""
    assert ns_pid(me) == me  # the test runs in the host's PID namespace


def test_the_judge_calls_it_injection() -> None:
    call = opened("/proc/42/mem")
    verdict = judge(call, Profile(), Facts(foreign_mem="/proc/42/mem"))
    assert verdict is not None and verdict.category == "injection"
    assert verdict.action is Action.ANOMALY
    assert "another process's memory" in verdict.detail
    assert judge(call, Profile(), Facts()) is None
