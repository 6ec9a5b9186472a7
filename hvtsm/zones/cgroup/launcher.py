"""Starting a program inside a zone, reaching into a running zone's mount namespace, and
binding the zone's channel socket inside its network namespace.

Both fork a child that changes itself in a subprocess `preexec_fn` (cgroups, namespaces,
mounts, user) before exec: setns(CLONE_NEWNS) and unshare(CLONE_NEWNS) refuse to work in
the multithreaded controller, and a forked child is single-threaded. The child reports
which step failed through a pipe, since subprocess only says "Exception occurred in
preexec_fn".
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from guest_agent.endpoint import bind_listener
from guest_agent.workload import base_env
from hvtsm.errors import ZoneError
from hvtsm.zones.base import WorkloadIO
from hvtsm.zones.cgroup import libc, mounts
from hvtsm.zones.cgroup import view as view_mod
from hvtsm.zones.cgroup.cgroupfs import ZoneCgroup
from hvtsm.zones.command import run
from hvtsm.zones.identity import Identity


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, name: str, zone_id: str) -> UserInfo:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ZoneError(f"no such user: {name}", zone_id=zone_id) from None
        return cls(name, entry.pw_uid, entry.pw_gid,
                   tuple(os.getgrouplist(name, entry.pw_gid)), entry.pw_dir)

    @classmethod
    def of(cls, identity: Identity) -> UserInfo:
        """A zone's own identity: no groups but its own, its home its private /tmp."""
        return cls(identity.name, identity.uid, identity.gid, (identity.gid,), "/tmp")


@dataclass(frozen=True)
class Watch:
    """How the workload comes under the zone agent's watch: the child installs the seccomp
    filter last, just before exec, and sends the listener with `header` on `sock_fd`."""

    installer: Any  # guest_agent.seccomp.Installer (prepared before the fork)
    sock_fd: int
    header: bytes


@dataclass(frozen=True)
class Entry:
    """Everything a child needs to enter a zone, worked out before the fork."""

    zone_id: str
    procs_files: tuple[str, ...]
    netns_path: str
    readonly: bool
    user: UserInfo | None
    watch: Watch | None = None
    #: the zone's own view of the host (PID, IPC namespaces, /proc, /sys, scratch); None:
    #: the host's view (a transient zone's launch never takes this path)
    view: view_mod.ViewSpec | None = None


class _ChildReport:
    """A non-blocking pipe a forked child writes its failure (or result) into."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def say(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self.write_fd, text.encode(errors="replace")[:4000])

    def text(self) -> str:
        """What the child said; it exec'd or exited by now, so there is no waiting."""
        with contextlib.suppress(OSError):
            os.close(self.write_fd)
        self.write_fd = -1
        try:
            return os.read(self.read_fd, 4096).decode(errors="replace")
        except BlockingIOError:
            return ""

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _enter_zone(entry: Entry, netns_fd: int, report: _ChildReport) -> Callable[[], None]:
    def enter() -> None:
        step = "joining the zone's cgroups"
        try:
            for path in entry.procs_files:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # 0: the writing process itself
                finally:
                    os.close(fd)
            if entry.view is not None:
                # after joining: the namespace's root is the zone's own cgroup
                step = "making the zone's cgroup namespace"
                libc.unshare(libc.CLONE_NEWCGROUP)
            step = "entering the zone's network namespace"
            libc.setns(netns_fd, libc.CLONE_NEWNET)
            step = "making the zone's private mount namespace"
            mounts.enter_private_mount_ns()
            if entry.view is not None:
                step = "making the zone's IPC namespace"
                libc.unshare(libc.CLONE_NEWIPC)
                step = "making the zone's view (/proc, /sys, scratch, /run)"
                view_mod.build(entry.view)
            elif entry.readonly:
                step = "making the zone's filesystem read-only"
                mounts.make_view_readonly()
            step = "setting no_new_privs"
            libc.set_no_new_privs()
            if entry.user is not None:
                step = f"switching to user {entry.user.name}"
                os.setgroups(list(entry.user.groups))
                os.setgid(entry.user.gid)
                os.setuid(entry.user.uid)
            if entry.watch is not None:
                step = "handing the workload to the zone's agent (seccomp)"
                entry.watch.installer.install_and_hand_over(entry.watch.sock_fd,
                                                            entry.watch.header)
        except Exception as exc:
            report.say(f"{step}: {getattr(exc, 'strerror', None) or exc}")
            raise
    return enter


class ZoneWorkload:
    """A workload this controller started (wraps its Popen). Its end is known here first
    (it is our child); `barrier` then waits until the zone's agent has delivered what it
    said before, so the cause of an end is never behind the end itself."""

    start_note: str | None = None

    def __init__(self, popen: subprocess.Popen[bytes],
                 barrier: Callable[[], None] | None = None) -> None:
        self.popen = popen
        self._barrier = barrier
        self._flushed = threading.Event()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._barrier is not None and not self._flushed.is_set():
            self._barrier()
            self._flushed.set()
        return status

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.popen.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        return self.popen.stdout

    @property
    def stderr(self) -> IO[bytes] | None:
        return self.popen.stderr


class AdoptedWorkload:
    """A workload a previous controller started: not our child, so its exit status is
    unknown; it counts as ended (status 0) once its zone holds no process."""

    POLL_INTERVAL = 0.05
    start_note: str | None = None

    def __init__(self, cgroup: ZoneCgroup, pid: int) -> None:
        self.cgroup = cgroup
        self._pid = pid

    @property
    def pid(self) -> int:
        return self._pid

    def poll(self) -> int | None:
        return None if self.cgroup.pids() else 0

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(self.POLL_INTERVAL)
        return status

    @property
    def stdout(self) -> Any:
        return None

    @property
    def stderr(self) -> Any:
        return None


def spawn(entry: Entry, argv: Sequence[str], io: WorkloadIO, *,
          env: Mapping[str, str] | None, cwd: str | None,
          barrier: Callable[[], None] | None = None) -> ZoneWorkload:
    """Start `argv` in the zone; returns once exec succeeded. The program is looked up in
    the workload's PATH here, so the zone's first exec is the program itself (a search
    by the child would try each PATH directory: execs of files that do not exist)."""
    try:
        netns_fd = os.open(entry.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ZoneError(f"the zone's network namespace is gone: {exc.strerror}",
                        zone_id=entry.zone_id) from exc
    report = _ChildReport()
    # never the controller's own environment: the operator's shell holds secrets
    child_env = base_env() if entry.user is None else base_env(entry.user.name,
                                                                  entry.user.home)
    child_env.update(env or {})
    executable = _resolve(argv[0], child_env, entry.zone_id, entry.user)

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv), executable=executable, stdin=io.stdin, stdout=io.stdout,
            stderr=io.stderr, env=child_env, cwd=None if entry.view is not None else cwd,
            preexec_fn=_enter_zone(entry, netns_fd, report),
            # its own session: the controller's terminal signals and hangups stay with the
            # controller, which ends the zone itself (and a zone outlives a dead controller)
            start_new_session=True,
        )

    try:
        proc = _in_new_pid_namespace(popen) if entry.view is not None else popen()
    except subprocess.SubprocessError as exc:
        raise ZoneError(f"cannot start {argv[0]!r} in the zone: "
                        f"{report.text() or exc}", zone_id=entry.zone_id) from exc
    except OSError as exc:
        raise ZoneError(f"cannot execute {argv[0]!r}: {exc.strerror or exc}",
                        zone_id=entry.zone_id) from exc
    finally:
        os.close(netns_fd)
        report.close()
    return ZoneWorkload(proc, barrier)


def _in_new_pid_namespace(start: Callable[[], subprocess.Popen[bytes]]
                          ) -> subprocess.Popen[bytes]:
    """`start()` on a thread of its own that first unshares its PID namespace: the child it
    forks is PID 1 of a new namespace (unshare(CLONE_NEWPID) sets the namespace of the
    calling thread's children only, so no other fork of the controller lands there, and a
    multithreaded process may do it). The zone's processes then see only each other."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            libc.unshare(libc.CLONE_NEWPID)
            result["popen"] = start()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name="zone-start")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    popen: subprocess.Popen[bytes] = result["popen"]
    return popen


def _resolve(program: str, env: Mapping[str, str], zone_id: str,
             user: UserInfo | None) -> str:
    """`program` as a path: as given when it names one, else the first file of that name
    in the PATH of `env` that the workload's user may run, as execvp would take it (the
    zone sees the host's files, so the host's lookup is the zone's)."""
    if "/" in program:
        return program
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if user is None:
            if shutil.which(candidate) is not None:
                return candidate
        elif _runnable_by(candidate, user):
            return candidate
    raise ZoneError(f"cannot execute {program!r}: not found in PATH"
                    + (f" for user {user.name}" if user else ""), zone_id=zone_id)


def _runnable_by(path: str, user: UserInfo) -> bool:
    """Whether `user` could exec `path`: every directory on the way (as written and as
    resolved) searchable by it, the file a regular one with an exec bit for it. Mode bits
    only: ACLs and capabilities are not read."""
    groups = {user.gid, *user.groups}

    def allows(st: os.stat_result, bit: int) -> bool:
        if st.st_uid == user.uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in groups:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode) or not allows(st, 1):
            return False
        for route in (os.path.abspath(path), real):
            parent = os.path.dirname(route)
            while True:
                if not allows(os.stat(parent), 1):
                    return False
                if parent == "/":
                    break
                parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


def channel_listener(netns_path: str, zone_id: str) -> socket.socket:
    """The zone's channel socket, bound at the abstract CHANNEL_ADDRESS inside the zone's
    network namespace: abstract names belong to a namespace, so only the zone's processes
    can connect (not other zones, not the host). Made by a short-lived thread that enters
    the namespace, since a thread's network namespace is its own (setns(CLONE_NEWNET) moves
    only the caller) and the controller's other threads stay where they are."""
    result: dict[str, Any] = {}

    def bind() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc.setns(fd, libc.CLONE_NEWNET)
            finally:
                os.close(fd)
            result["sock"] = bind_listener()
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=bind, name=f"channel-bind-{zone_id}")
    thread.start()
    thread.join()
    if "sock" not in result:
        exc = result.get("error")
        raise ZoneError(f"cannot bind the zone's channel socket in {netns_path}: "
                        f"{getattr(exc, 'strerror', None) or exc}", zone_id=zone_id)
    sock: socket.socket = result["sock"]
    return sock


def _remount_in(ns_fd: int, report: _ChildReport) -> Callable[[], None]:
    def enter() -> None:
        step = "entering the zone's mount namespace"
        try:
            # the zone's /proc is its own PID namespace's, where this helper has no entry
            proc_dir = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            libc.setns(ns_fd, libc.CLONE_NEWNS)
            step = "remounting read-only"
            report.say(f"ok {mounts.make_view_readonly(proc_dir=proc_dir)}")
        except Exception as exc:
            report.say(f"{step}: {getattr(exc, 'strerror', None) or exc}")
            raise
    return enter


def remount_readonly_live(ns_file: str, zone_id: str) -> int:
    """Make every mount of the mount namespace at `ns_file` (a /proc/<pid>/ns/mnt or a
    reference bind mount) read-only, from a child that joins it; returns the mounts
    remounted."""
    try:
        ns_fd = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ZoneError(f"cannot open the zone's mount namespace {ns_file}: {exc.strerror}",
                        zone_id=zone_id) from exc
    report = _ChildReport()
    try:
        run([shutil.which("true") or "/bin/true"], zone_id=zone_id,
            preexec_fn=_remount_in(ns_fd, report))
        said = report.text()
    except subprocess.SubprocessError as exc:
        raise ZoneError(f"cannot make the filesystem read-only: {report.text() or exc}",
                        zone_id=zone_id) from exc
    finally:
        os.close(ns_fd)
        report.close()
    return int(said.split()[1]) if said.startswith("ok ") else 0
