"""What a deputy's steps (deputy_steps.py) touch the kernel through: cgroup files, network
namespaces (a short-lived thread joins one), rtnetlink, a helper child for a mount
namespace (nsremount.py), signals; and the zone's lock. Tests give a fake `System`.

Stdlib only, python >= 3.9.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from guest_agent import admin

T = TypeVar("T")

#: setns(2) namespace types
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
#: how long a freeze or a kill may take to be complete
SETTLE_S = 5.0
#: rtnetlink (linux/rtnetlink.h, linux/if_addr.h)
RTM_DELADDR = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
IFA_ADDRESS = 1
IFA_LOCAL = 2
#: a loopback's addresses, removed with it down so a connect fails at once (ENETUNREACH)
#: instead of waiting out its timeout
LOOPBACK_ADDRESSES = ((socket.AF_INET, "127.0.0.1", 8), (socket.AF_INET6, "::1", 128))


class StepError(Exception):
    """A step that cannot be used (from_dict) or could not be carried out (run); `errno`
    is the kernel's answer when it refused a write."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class Outcome:
    """What one step did: `changed` False when its effect was in force already."""

    changed: bool
    detail: str


# --- what touches the kernel ----------------------------------------------------------------


def _libc() -> Any:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    return lib


class System:
    """The kernel calls the steps make; tests give a fake one."""

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read().strip()

    def write(self, path: str, value: str) -> None:
        """One write(2), as cgroup files want it."""
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def nested(self, procs: str) -> list[str]:
        """The cgroup.procs files of the cgroups below the one of `procs`."""
        top, name = os.path.split(procs)
        out = []
        for where, dirs, _files in os.walk(top):
            if where != top:
                out.append(os.path.join(where, name))
            dirs.sort()
        return out

    def in_netns(self, netns: str | None, fn: Callable[[], T]) -> T:
        """`fn()` in the network namespace at `netns` (None: the agent's own). A network
        namespace belongs to a thread, so a short-lived thread joins it and nothing else
        of the agent moves."""
        if netns is None:
            return fn()
        box: dict[str, Any] = {}

        def inside() -> None:
            try:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                box["error"] = e
                return
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    box["error"] = OSError(err, os.strerror(err), netns)
                    return
            finally:
                os.close(fd)
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        worker = threading.Thread(target=inside, name="deputy-netns", daemon=True)
        worker.start()
        worker.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def link_down(self, ifname: str) -> bool | None:
        """`ifname` down; True if it was up, None when there is no such interface."""
        try:
            return bool(admin.link_down({"iface": ifname}, admin.System())["was_up"])
        except admin.AdminError as e:
            if "No such device" in str(e):
                return None
            raise StepError(str(e)) from None

    def interfaces(self) -> list[str]:
        return [name for _, name in socket.if_nameindex()]

    def drop_address(self, family: int, address: str, prefix: int, ifname: str) -> bool:
        """Remove one address of `ifname` (rtnetlink RTM_DELADDR); False when it had none
        such."""
        index = socket.if_nametoindex(ifname)
        raw = socket.inet_pton(family, address)
        attr_type = IFA_LOCAL if family == socket.AF_INET else IFA_ADDRESS
        attr = struct.pack("=HH", 4 + len(raw), attr_type) + raw
        body = struct.pack("=BBBBI", family, prefix, 0, 0, index) + attr
        header = struct.pack("=IHHII", 16 + len(body), RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK,
                             1, 0)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
            s.bind((0, 0))
            s.send(header + body)
            answer = s.recv(4096)
        if len(answer) < 20 or struct.unpack("=H", answer[4:6])[0] != NLMSG_ERROR:
            raise StepError(f"rtnetlink gave no answer about {address} on {ifname}")
        code = -struct.unpack("=i", answer[16:20])[0]
        if code in (0,):
            return True
        if code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
            return False
        raise StepError(f"cannot remove {address} from {ifname}: {os.strerror(code)}")

    def remount_namespace(self, ns_file: str) -> int:
        """Every mount of the mount namespace at `ns_file` read-only, by a helper child
        that joins it (a multithreaded process cannot: setns(CLONE_NEWNS) wants the
        caller alone in its fs context); returns the mounts remounted."""
        source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {"PYTHONPATH": source, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "LANG": "C.UTF-8"}
        try:
            done = subprocess.run([sys.executable, "-S", "-m", "guest_agent.nsremount",
                                   ns_file], capture_output=True, text=True, env=env,
                                  stdin=subprocess.DEVNULL, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise StepError(f"cannot start the remount helper: {e}") from None
        if done.returncode != 0:
            raise StepError("remounting read-only failed: " +
                            (done.stderr.strip() or f"status {done.returncode}")[-300:])
        try:
            return int(done.stdout.split()[-1])
        except (ValueError, IndexError):
            raise StepError(f"the remount helper said {done.stdout[:80]!r}") from None

    def mount_namespace(self, pid: int) -> tuple[int, str] | None:
        """(inode, path) of `pid`'s mount namespace; None when it is gone."""
        path = f"/proc/{pid}/ns/mnt"
        try:
            return os.stat(path).st_ino, path
        except OSError:
            return None

    def namespace_at(self, path: str) -> int | None:
        """The inode of the namespace at `path` (a pinned reference), None when gone."""
        try:
            return os.stat(path).st_ino
        except OSError:
            return None

    def own_mount_namespace(self) -> int:
        return os.stat("/proc/self/ns/mnt").st_ino

    def remount_root(self) -> str:
        """The agent's own "/" read-only (a guest: the workload's root is the agent's)."""
        try:
            result = admin.remount_ro({"path": "/"}, admin.System())
        except admin.AdminError as e:
            raise StepError(str(e)) from None
        return "already read-only" if result["was_ro"] else f"remounted ({result['how']})"

    def kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def wait_until(self, check: Callable[[], bool], timeout: float) -> bool:
        """A freeze or a kill completes in microseconds to milliseconds: short growing
        pauses, bounded (the kernel gives no event to wait on for a v1 freezer)."""
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while not check():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return True


#: (what the deputy knows of the workloads it may freeze or kill: its processes)
WorkloadPids = Callable[[str], "list[int]"]


@dataclass(frozen=True)
class Context:
    """What a step acts through: the kernel, and (in a guest) the agent's workloads."""

    system: System
    workload_pids: WorkloadPids = lambda _wid: []


@contextlib.contextmanager
def zone_lock(path: str) -> Iterator[None]:
    """The zone's lock (flock on a file only root reaches: one the zone could open, it
    could hold): the controller's and the deputy's writes of one zone's limits never
    interleave, so each read-compare-write of a `LowerLimit` holds. Made by whichever
    writer comes first; one that cannot be made guards nothing, and the write goes on
    (a tightening is never held back for want of its lock)."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
