"""Guest administration the host asks for by typed request (``admin`` messages, answered by
``admin_result``), instead of shell programs started through the agent whose exit codes
it would have to decode. Each op takes the request's typed fields and returns its result
fields, or raises AdminError naming what went wrong (ok false, with that text).

* ``scrub`` {uid, gid, scratch, shared[], private[]}, between two zones of one pooled
  guest: SIGKILL every process whose real uid is `uid`, round after round until none is
  left (at most MAX_ROUNDS, a pause between: a process forked meanwhile is caught by the
  next); on the guest's first scrub (its record of the uid's known entries, KNOWN under
  the run directory, is missing) mount a private tmpfs (mode 1777, nosuid, nodev) on each
  `private` directory that is not a mount point of its own yet (a lab guest's /tmp and
  /var/tmp are the host's, over 9p) and record the uid's top-level entries already in the
  `shared` directories as known; then delete, recursively, the uid's own top-level
  entries of the `shared` directories that are not known, and fail if one survives;
  finally make `scratch` fresh (removed, made again 0700 and owned by uid:gid), and remove
  the System V IPC objects the uid owns or made (guest_agent/sysvipc.py). Result: killed,
  deleted, rounds, seconds, ipc_removed.
* ``link_down`` {iface}: the interface down (SIOCGIFFLAGS / SIOCSIFFLAGS). Result: iface,
  was_up.
* ``remount_ro`` {path}: the mount at `path` read-only: its superblock (MS_REMOUNT |
  MS_RDONLY, keeping the mount's nosuid/nodev/noexec/atime flags), or, when the file
  system refuses that, the mount point alone (MS_BIND). Result: path, was_ro, how.
* ``nproc`` {pid, limit}: RLIMIT_NPROC of that process, soft and hard, lowered to `limit`
  and never raised (a lower one stays). Result: pid, limit, previous [soft, hard] (-1:
  unlimited).

Stdlib only (ctypes for mount(2)). `System` holds the roots and calls the ops use, so tests
give them a fake /proc and run directory and record the kills and mounts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import shutil
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from guest_agent import mountinfo, sysvipc
from guest_agent.mountflags import (
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_REMOUNT,
)

#: kill rounds a scrub makes at most before the survivors fail it
MAX_ROUNDS = 40
ROUND_PAUSE = 0.05
#: the uid's entries of the shared directories present before the guest served anything
KNOWN = "hvtsm-scrub-known-{uid}"

#: statvfs f_flag bits -> the mount flags a remount must repeat to keep them
KEPT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
              (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
              (os.ST_RELATIME, MS_RELATIME))

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
#: struct ifreq with ifr_flags: the name, the flags, the rest of the union
IFREQ = "16sH22x"


class AdminError(Exception):
    """An op that failed; the text says what, and what survived."""


_libc: ctypes.CDLL | None = None


def _mount(source: str, target: str, fstype: str | None, flags: int,
           data: str | None) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p]
        _libc.mount.restype = ctypes.c_int
    if _libc.mount(os.fsencode(source), os.fsencode(target),
                   os.fsencode(fstype) if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def mount_tmpfs(target: str) -> None:
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def remount(target: str, flags: int) -> None:
    _mount("none", target, None, flags, None)


def real_uid(proc: str, pid: int) -> int | None:
    """The real uid of `pid` (/proc/<pid>/status), None when it is gone."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def kill_if_uid(pid: int, uid: int) -> bool:
    """SIGKILL `pid` through a pidfd if its real uid is still `uid` (a pid reused by
    another user's process between the listing and the kill is left alone)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if real_uid("/proc", pid) != uid:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class System:
    """The roots the ops read and the calls they make; tests give fakes."""

    proc: str = "/proc"
    run: str = "/run"
    kill: Callable[[int, int], bool] = kill_if_uid
    mount_tmpfs: Callable[[str], None] = mount_tmpfs
    remount: Callable[[str, int], None] = remount
    sleep: Callable[[float], None] = time.sleep
    remove_ipc: Callable[[sysvipc.IpcObject], None] = sysvipc.remove


# --- scrub ----------------------------------------------------------------------------------


def processes_of(uid: int, proc: str = "/proc") -> list[int]:
    """The processes whose real uid is `uid` (as pgrep -U lists them), never this one."""
    me = os.getpid()
    out = []
    for entry in os.listdir(proc):
        if entry.isdigit() and int(entry) != me and real_uid(proc, int(entry)) == uid:
            out.append(int(entry))
    return sorted(out)


def _program(proc: str, pid: int) -> str:
    try:
        with open(f"{proc}/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def kill_user(uid: int, system: System) -> tuple[int, int]:
    """(processes killed, rounds) once no process of `uid` is left; AdminError naming the
    survivors after MAX_ROUNDS rounds."""
    killed: set[int] = set()
    rounds = 0
    while True:
        left = processes_of(uid, system.proc)
        if not left:
            return len(killed), rounds
        if rounds >= MAX_ROUNDS:
            named = ", ".join(f"{pid} ({_program(system.proc, pid)})" for pid in left[:10])
            raise AdminError(f"{len(left)} process(es) of uid {uid} survived {rounds} rounds "
                             f"of SIGKILL: pid {named}")
        rounds += 1
        for pid in left:
            if system.kill(pid, uid):
                killed.add(pid)
        system.sleep(ROUND_PAUSE)


def entries_of(uid: int, dirs: list[str]) -> list[str]:
    """The top-level entries of `dirs` that `uid` owns (not following symlinks), as
    ``find DIRS -mindepth 1 -maxdepth 1 -user UID`` lists them; a missing dir has none."""
    out = []
    for d in dirs:
        try:
            with os.scandir(d) as it:
                for entry in it:
                    with contextlib.suppress(OSError):
                        if entry.stat(follow_symlinks=False).st_uid == uid:
                            out.append(os.path.join(d, entry.name))
        except OSError:
            continue
    return out


def is_mount_point(path: str, proc: str = "/proc") -> bool:
    """Whether `path` is a mount point of its own (/proc/self/mountinfo; by device when
    that cannot be read)."""
    real = os.path.realpath(path)
    try:
        with open(f"{proc}/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and os.fsdecode(mountinfo.unescape(
                        os.fsencode(fields[4]))) == real:
                    return True
        return False
    except OSError:
        pass
    try:
        here, parent = os.stat(real), os.stat(os.path.join(real, ".."))
    except OSError:
        return False
    return here.st_dev != parent.st_dev or here.st_ino == parent.st_ino


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _write_known(path: str, entries: list[str]) -> None:
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        f.write("".join(e + "\n" for e in entries))
    os.replace(temp, path)


def _absolute(what: str, path: Any) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise AdminError(f"{what} must be an absolute path, not {path!r}")
    norm = os.path.normpath(path)
    if norm == "/" or norm != path.rstrip("/"):
        raise AdminError(f"{what} {path!r} must name a directory below / plainly")
    return norm


def scrub(msg: dict[str, Any], system: System) -> dict[str, Any]:
    began = time.monotonic()
    uid, gid = msg["uid"], msg["gid"]
    if uid == 0:
        raise AdminError("refusing to scrub uid 0: that would kill the agent and the guest")
    scratch = _absolute("scratch", msg["scratch"])
    shared = [_absolute("shared", d) for d in msg["shared"]]
    private = [_absolute("private", d) for d in msg["private"]]
    killed, rounds = kill_user(uid, system)
    known_file = os.path.join(system.run, KNOWN.format(uid=uid))
    if not os.path.exists(known_file):
        for d in private:
            if not is_mount_point(d, system.proc):
                try:
                    system.mount_tmpfs(d)
                except OSError as e:
                    raise AdminError(f"could not mount a private tmpfs on {d}: {e}") from None
        try:
            _write_known(known_file, entries_of(uid, shared))
        except OSError as e:
            raise AdminError(f"could not record the known files of uid {uid} in "
                             f"{known_file}: {e}") from None
    try:
        with open(known_file) as f:
            known = set(f.read().splitlines())
    except OSError as e:
        raise AdminError(f"could not read the known files of uid {uid}: {e}") from None
    made = [p for p in entries_of(uid, shared) if p not in known]
    for path in made:
        _remove(path)
    if made:
        left = [p for p in entries_of(uid, shared) if p not in known]
        if left:
            raise AdminError(f"{len(left)} file(s) of uid {uid} could not be deleted: "
                             + ", ".join(left[:10]))
    try:
        if os.path.lexists(scratch):
            _remove(scratch)
        os.makedirs(os.path.dirname(scratch), exist_ok=True)
        os.mkdir(scratch, 0o700)
        os.chmod(scratch, 0o700)
        os.chown(scratch, uid, gid)
    except OSError as e:
        raise AdminError(f"could not make a fresh scratch directory {scratch}: {e}") from None
    ipc = sysvipc.objects_of(uid, system.proc)
    try:
        for obj in ipc:
            system.remove_ipc(obj)
    except OSError as e:
        raise AdminError(f"could not remove the System V IPC objects of uid {uid}: {e}") \
            from None
    return {"killed": killed, "deleted": len(made), "rounds": rounds,
            "seconds": round(time.monotonic() - began, 3), "ipc_removed": len(ipc)}


# --- link, mount, limit ---------------------------------------------------------------------


def link_down(msg: dict[str, Any], system: System) -> dict[str, Any]:
    name = msg["iface"]
    raw = os.fsencode(name)
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw:
        raise AdminError(f"{name!r} is not an interface name")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            got = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, struct.pack(IFREQ, raw, 0))
            flags = struct.unpack(IFREQ, got)[1]
            if flags & IFF_UP:
                fcntl.ioctl(s.fileno(), SIOCSIFFLAGS,
                            struct.pack(IFREQ, raw, flags & ~IFF_UP & 0xFFFF))
        except OSError as e:
            raise AdminError(f"cannot set {name} down: {e.strerror or e}") from None
    return {"iface": name, "was_up": bool(flags & IFF_UP)}


def remount_ro(msg: dict[str, Any], system: System) -> dict[str, Any]:
    path = msg["path"]
    try:
        st = os.statvfs(path)
    except OSError as e:
        raise AdminError(f"cannot remount {path}: {e.strerror or e}") from None
    was_ro = bool(st.f_flag & os.ST_RDONLY)
    kept = 0
    for bit, flag in KEPT_FLAGS:
        if st.f_flag & bit:
            kept |= flag
    try:
        system.remount(path, MS_REMOUNT | MS_RDONLY | kept)
        how = "superblock"
    except OSError as first:
        if first.errno not in (errno.EINVAL, errno.EPERM, errno.EACCES, errno.EBUSY,
                               errno.ENOTSUP):
            raise AdminError(f"cannot remount {path} read-only: {first.strerror}") from None
        try:
            system.remount(path, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
            how = "bind"
        except OSError as e:
            raise AdminError(f"cannot remount {path} read-only: {first.strerror} (and as "
                             f"a bind mount: {e.strerror})") from None
    return {"path": path, "was_ro": was_ro, "how": how}


def _limit(value: int) -> int:
    return -1 if value == resource.RLIM_INFINITY else value


def lowered(current: int, limit: int) -> int:
    """A resource limit brought down to `limit`, never raised: one already lower (set by
    the phase before a controller died, or by the process itself) stays."""
    return limit if current == resource.RLIM_INFINITY or current > limit else current


def nproc(msg: dict[str, Any], system: System) -> dict[str, Any]:
    pid, limit = msg["pid"], msg["limit"]
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NPROC)
        resource.prlimit(pid, resource.RLIMIT_NPROC, (lowered(soft, limit),
                                                      lowered(hard, limit)))
    except (OSError, ValueError) as e:
        raise AdminError(f"cannot set RLIMIT_NPROC {limit} on pid {pid}: {e}") from None
    return {"pid": pid, "limit": limit, "previous": [_limit(soft), _limit(hard)]}


Op = Callable[[dict[str, Any], System], dict[str, Any]]
OPS: dict[str, Op] = {"scrub": scrub, "link_down": link_down, "remount_ro": remount_ro,
                      "nproc": nproc}


def perform(msg: dict[str, Any], system: System | None = None) -> dict[str, Any]:
    """Carry out a validated ``admin`` message: its result fields; AdminError when it
    failed."""
    op = OPS.get(msg.get("op", ""))
    if op is None:
        raise AdminError(f"unknown admin op {msg.get('op')!r}")
    return op(msg, system or System())


__all__ = ["KNOWN", "MAX_ROUNDS", "OPS", "AdminError", "System", "entries_of", "is_mount_point",
           "kill_user", "perform", "processes_of"]
