"""An exec's target looked up as its caller sees it (guest_agent/inroot.py), and the
monitor's handling of a PATH search (guest_agent/notifications.py) without seccomp: the
"notifications" are built here and point into this process's own memory, which the
monitor reads through /proc/<pid>/mem as it reads a blocked caller's."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from guest_agent import inroot, seccomp
from guest_agent.containment import Containment
from guest_agent.holds import Holds
from guest_agent.notifications import Notifications
from guest_agent.profile import Profile
from guest_agent.reports import Reporter
from guest_agent.syscalls import X86_64
from guest_agent.watch import Watch

AUDIT_ARCH_X86_64 = 0xC000003E


# --- the lookup ---------------------------------------------------------------------------


def test_lookup_in_this_process(tmp_path: Path) -> None:
    me = os.getpid()
    found = inroot.lookup(me, "/usr/bin/env")
    assert found is not None and found.error == 0
    assert found.real == os.path.realpath("/usr/bin/env")
    missing = inroot.lookup(me, str(tmp_path / "no" / "ls"))
    assert missing is not None and missing.error == errno.ENOENT and missing.missing
    (tmp_path / "file").write_text("")
    assert inroot.lookup(me, str(tmp_path / "file" / "ls")).error == errno.ENOTDIR  # type: ignore[union-attr]
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert inroot.lookup(me, str(tmp_path / "loop")).error == errno.ELOOP  # type: ignore[union-attr]
    assert inroot.lookup(me, "/" + "x" * 300).error == errno.ENAMETOOLONG  # type: ignore[union-attr]
    assert inroot.lookup(me, "").error == errno.ENOENT  # type: ignore[union-attr]


def test_relative_lookup_is_from_the_callers_cwd(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("")
    child = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        assert inroot.lookup(child.pid, "bin/tool").error == 0  # type: ignore[union-attr]
        assert inroot.lookup(child.pid, "tool").error == errno.ENOENT  # type: ignore[union-attr]
    finally:
        child.kill()
        child.wait()
    assert inroot.lookup(child.pid, "/usr/bin/env") is None  # gone: nothing to tell


def test_lookup_without_openat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inroot._openat2, "usable", False)
    me = os.getpid()
    assert inroot.lookup(me, "/usr/bin/env").error == 0  # type: ignore[union-attr]
    assert inroot.lookup(me, str(tmp_path / "no" / "ls")).error == errno.ENOENT  # type: ignore[union-attr]
    (tmp_path / "f").write_text("")
    assert inroot.lookup(me, str(tmp_path / "f" / "x")).error == errno.ENOTDIR  # type: ignore[union-attr]


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_lookup_in_the_callers_root(tmp_path: Path) -> None:
    """A caller in another root: its /bin/tool is there, the agent's /usr/bin/env is not,
    and an absolute symlink resolves inside its root."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("")
    (tmp_path / "bin" / "link").symlink_to("/bin/tool")
    code = "import os, sys, time; os.chroot(sys.argv[1]); print('in', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"in\n"
        found = inroot.lookup(child.pid, "/bin/link")
        assert found is not None and found.error == 0 and found.real == "/bin/tool"
        assert inroot.lookup(child.pid, "/usr/bin/env").error == errno.ENOENT  # type: ignore[union-attr]
        assert inroot.lookup(child.pid, "/../../bin/tool").error == 0  # type: ignore[union-attr]
    finally:
        child.kill()
        child.wait()


# --- the monitor's side, on notifications built here ----------------------------------------


class Listener:
    fd = 1 << 20

    def __init__(self) -> None:
        self.answers: list[tuple[int, bool, int]] = []

    def valid(self, _notif_id: int) -> bool:
        return True

    def respond(self, notif_id: int, *, allow: bool, error: int = errno.EPERM) -> bool:
        self.answers.append((notif_id, allow, 0 if allow else error))
        return True

    def close(self) -> None:
        pass


class Notif:
    """An execve of `path` by this process, its strings in buffers of our own."""

    def __init__(self, notif_id: int, path: str, argv: list[str]) -> None:
        self._keep: list[Any] = [ctypes.create_string_buffer(os.fsencode(path))]
        strings = [ctypes.create_string_buffer(os.fsencode(a)) for a in argv]
        self._keep += strings
        vector = (ctypes.c_uint64 * (len(argv) + 1))(*[ctypes.addressof(s) for s in strings],
                                                     0)
        self._keep.append(vector)
        self.id, self.pid, self.nr, self.arch = notif_id, os.getpid(), X86_64["execve"], \
            AUDIT_ARCH_X86_64
        self.args = [ctypes.addressof(self._keep[0]), ctypes.addressof(vector), 0, 0, 0, 0]


def execve(notif_id: int, path: str, *argv: str) -> seccomp.Notification:
    return cast(seccomp.Notification, Notif(notif_id, path, list(argv)))


def handle(notifications: Notifications, watch: Watch, notif: seccomp.Notification) -> None:
    assert watch.listener is not None
    notifications.handle(watch, watch.listener, notif)


Events = list[tuple[str, dict[str, Any]]]
Rig = tuple[Notifications, Watch, Listener, Events]


@pytest.fixture
def rig() -> Iterator[Rig]:
    events: Events = []

    def emit(kind: str, _wid: str, data: dict[str, Any]) -> bool:
        events.append((kind, data))
        return True

    reporter = Reporter(emit)
    listener = Listener()
    profile = Profile.from_dict({"deny_exec": ["/tmp/**", "/home/**"],
                                 "transient": {"triggers": ["exec"], "expect_exec": []}})
    watch = Watch("w1", profile, cast(seccomp.Listener, listener), frozenset())
    holds = Holds(reporter, lambda: [watch], lambda wid: watch)
    yield Notifications(reporter, Containment(reporter), holds, lambda w: None), watch, \
        listener, events


def test_a_path_search_fails_the_missing_and_starts_the_real(
        rig: Rig, tmp_path: Path) -> None:
    notifications, watch, listener, events = rig
    missing = [str(tmp_path / "venv" / "bin" / "ls"), "/home/hvtsm-nobody-xyz/.local/bin/ls"]
    for i, path in enumerate(missing):
        handle(notifications, watch, execve(i, path, "ls"))
    assert listener.answers == [(0, False, errno.ENOENT), (1, False, errno.ENOENT)]
    assert not watch.first_exec_done and watch.holds == {} and events == []
    # the real program: the workload's own, allowed (not held, not an anomaly)
    handle(notifications, watch, execve(2, "/usr/bin/env", "env"))
    assert listener.answers[-1] == (2, True, 0)
    assert watch.first_exec_done and watch.root_pid == os.getpid()
    assert events == [] and watch.holds == {}
    # a later search of a child: the missing ones fail again, quietly; the real one is a
    # code path the host must place
    handle(notifications, watch, execve(3, missing[0], "ls"))
    assert listener.answers[-1] == (3, False, errno.ENOENT) and events == []
    began = time.monotonic()
    handle(notifications, watch, execve(4, "/usr/bin/env", "env"))
    assert time.monotonic() - began < 1
    assert [kind for kind, _ in events] == ["code-path"] and len(watch.holds) == 1
    assert listener.answers[-1][0] == 3  # the real one waits for the host
    assert watch.lost == 0 and watch.errors == 0


def test_an_existing_denied_target_is_contained(
        rig: Rig, tmp_path: Path) -> None:
    notifications, watch, listener, events = rig
    watch.first_exec(os.getpid())
    watch.profile = Profile(deny_exec=(f"{tmp_path}/**",), contain="deny")
    tool = tmp_path / "tool"
    tool.write_text("")
    handle(notifications, watch, execve(7, str(tool), "tool"))
    assert listener.answers == [(7, False, errno.EPERM)]
    (kind, data), = events
    assert kind == "anomaly" and data["category"] == "unexpected-exec"
    assert data["contained"] == "denied" and data["args"]["path"] == str(tool)
