"""What a cgroup zone sees of the host: built in the zone's first process, in its own mount
namespace, before its first instruction.

* `/proc` of the zone's own PID namespace: its processes alone (not the host's, not other
  zones', not the controller's command line).
* `/sys` of the zone's own network namespace: its own interfaces in /sys/class/net; under
  /sys/fs/cgroup its own cgroups only (a cgroup namespace rooted at the zone's cgroup), so
  it reads its limits and nothing of other zones' names.
* Scratch of its own: `/tmp`, `/var/tmp`, `/dev/shm` as tmpfs (mode 1777, nosuid, nodev),
  each at most the zone's memory limit and counted in it (tmpfs pages are charged to the
  memory cgroup of whoever writes them); `/run` as a tmpfs of its own too (with
  `/run/lock`), so no socket or file of the host's or another zone's under /run is in
  sight; a fresh `/dev/mqueue` (the zone has its own IPC namespace). All of it goes with
  the zone.
* hvtsm's own directories (the store, program snapshots, the invoke spool) replaced by
  empty ones: nothing of hvtsm is in sight, however their modes are set.
* With an identity of its own (`host_readonly`), everything else is read-only: a fresh uid
  owns nothing on the host, so the directories a stranger may write to are the only places
  it could leave files or sockets for another zone, and those are now its own tmpfs.
* Read-only binds, at their own paths, of what the zone must see and no other zone may:
  its program snapshot, the files its command line names in a hidden place, its working
  directory when that is hidden.
* The identity's own line in /etc/passwd and /etc/group (copies in the zone's /run), so
  `whoami`, `id` and getpwuid() answer as for any user.
* Each existing file its sensitive_paths name covered by the zone's tripwire (tripwire.py):
  the real file is out of reach, and an open of what stands there is the agent's to
  decide before any byte is read.

Runs in a forked child of a multithreaded controller: plain os calls and mount(2), no
imports, no locks, no threads (as mounts.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guest_agent import mountflags
from guest_agent.mountinfo import MountEntry
from hvtsm.zones.cgroup import libc, mounts

#: the directories every user may write to, which a zone gets a tmpfs of its own on
SCRATCH_DIRS = (b"/tmp", b"/var/tmp", b"/dev/shm")
#: hvtsm's directories, replaced by empty ones in a zone's view
HIDDEN_DIRS = (b"/var/lib/hvtsm", b"/var/spool/hvtsm")
#: a zone's /run, before the binds it gets: small, root's
RUN_SIZE = 8 * 1024 * 1024
#: a zone's scratch when its policy names no memory limit
DEFAULT_SCRATCH = 256 * 1024 * 1024
#: where the view keeps its generated files (inside the zone's own /run)
_OWN = b"/run/.hvtsm-zone"

_QUIET = mountflags.MS_NOSUID | mountflags.MS_NODEV
_LOCKED = _QUIET | mountflags.MS_NOEXEC | mountflags.MS_RDONLY


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup hierarchy the zone is in, mounted again inside its cgroup namespace."""

    target: bytes
    fstype: bytes
    #: the hierarchy's super options (its controllers, `name=`): a v1 hierarchy is named by
    #: exactly the controllers it was made with
    data: bytes | None


@dataclass(frozen=True)
class Account:
    """The zone identity's passwd and group lines."""

    name: str
    uid: int
    gid: int
    home: str

    def passwd_line(self) -> bytes:
        return f"{self.name}:x:{self.uid}:{self.gid}:hvtsm zone:{self.home}:" \
               "/usr/sbin/nologin\n".encode()

    def group_line(self) -> bytes:
        return f"{self.name}:x:{self.gid}:\n".encode()


@dataclass(frozen=True)
class ViewSpec:
    """How the zone sees the host's files, worked out before the fork."""

    #: bytes each scratch tmpfs may hold
    scratch_size: int = DEFAULT_SCRATCH
    #: everything but the zone's own scratch read-only (a zone of its own identity)
    host_readonly: bool = False
    #: the zone's filesystem is read-only from its start (its policy says `ro`): scratch too
    readonly: bool = False
    #: host paths made visible read-only at their own paths
    binds: tuple[bytes, ...] = ()
    #: host paths under /run the zone still needs, bound back read-only (the resolver's
    #: directory when /etc/resolv.conf points into /run)
    keep_run: tuple[bytes, ...] = ()
    cgroups: tuple[CgroupMount, ...] = ()
    account: Account | None = None
    #: where the workload starts (entered after the view is built: a directory the view
    #: hides must not stay reachable as the working directory)
    workdir: bytes = b"/"
    #: the zone's tripwire file, and the host files it is bound over (tripwire.py)
    tripwire: bytes | None = None
    covered: tuple[bytes, ...] = ()


def build(spec: ViewSpec) -> None:
    """Make the caller's (private) mount namespace the zone's view. The caller is the
    zone's first process in its own PID, IPC, cgroup and network namespaces, still root."""
    keep = [(path, os.open(path, os.O_PATH | os.O_CLOEXEC)) for path in spec.keep_run
            if os.path.isdir(path)]
    sources = [(os.open(path, os.O_PATH | os.O_CLOEXEC), path) for path in spec.binds]
    # opened before the zone's own /run hides it
    wire = os.open(spec.tripwire, os.O_PATH | os.O_CLOEXEC) \
        if spec.tripwire is not None and spec.covered else None
    os.chdir(b"/")
    if spec.host_readonly:
        mounts.make_view_readonly()
    libc.mount(b"proc", b"/proc", b"proc", _QUIET | mountflags.MS_NOEXEC)
    libc.mount(b"sysfs", b"/sys", b"sysfs", _LOCKED)
    if spec.cgroups and os.path.isdir(b"/sys/fs/cgroup"):
        _cgroups(spec.cgroups)
    tmpfs_options = b"mode=1777,size=%d" % spec.scratch_size
    for path in SCRATCH_DIRS:
        if os.path.isdir(path):
            libc.mount(b"tmpfs", path, b"tmpfs", _QUIET, tmpfs_options)
    if os.path.isdir(b"/dev/mqueue"):
        with contextlib.suppress(OSError):  # a kernel without mqueue: nothing to hide
            libc.mount(b"mqueue", b"/dev/mqueue", b"mqueue", _QUIET | mountflags.MS_NOEXEC)
    for path in HIDDEN_DIRS:
        if os.path.isdir(path):
            libc.mount(b"tmpfs", path, b"tmpfs", _QUIET, b"mode=0755,size=1m")
    libc.mount(b"tmpfs", b"/run", b"tmpfs", _QUIET, b"mode=0755,size=%d" % RUN_SIZE)
    os.mkdir(b"/run/lock", 0o1777)
    os.chmod(b"/run/lock", 0o1777)
    for path, fd in keep:
        _bind(fd, path)
    for fd, path in sources:
        _bind(fd, path)
    if spec.account is not None:
        _account(spec.account)
    if wire is not None:
        _cover(wire, spec.covered)
    for path in HIDDEN_DIRS:
        if os.path.isdir(path):  # their empty tmpfs, after the binds made their way in
            _remount_readonly(path)
    if spec.readonly:
        mounts.make_view_readonly()
    os.chdir(spec.workdir)


def _cgroups(hierarchies: Sequence[CgroupMount]) -> None:
    libc.mount(b"tmpfs", b"/sys/fs/cgroup", b"tmpfs", _QUIET | mountflags.MS_NOEXEC,
               b"mode=0755,size=64k")
    for mount in hierarchies:
        _makedirs(mount.target)
    _remount_readonly(b"/sys/fs/cgroup")
    for mount in hierarchies:
        libc.mount(b"cgroup", mount.target, mount.fstype, _LOCKED, mount.data)


def _bind(fd: int, target: bytes) -> None:
    """`fd` (an O_PATH of the source, opened before it was hidden) at `target`, read-only."""
    if os.path.isdir(b"/proc/self/fd/%d" % fd):
        _makedirs(target)
    else:
        _makedirs(os.path.dirname(target))
        with contextlib.suppress(FileExistsError):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o444))
    libc.mount(b"/proc/self/fd/%d" % fd, target, None, mountflags.MS_BIND)
    _remount_readonly(target)
    os.close(fd)


def _cover(wire: int, paths: Sequence[bytes]) -> None:
    """The tripwire (`wire`, an O_PATH) bound over each of `paths`, read-only; a path gone
    since the controller looked is skipped, any other failure fails the start (the zone
    must not run with a sensitive file in reach)."""
    source = b"/proc/self/fd/%d" % wire
    for path in paths:
        try:
            libc.mount(source, path, None, mountflags.MS_BIND)
        except FileNotFoundError:
            continue
        _remount_readonly(path)
    os.close(wire)


def _remount_readonly(target: bytes) -> None:
    libc.mount(None, target, None, mountflags.MS_BIND | mountflags.MS_REMOUNT
               | mountflags.MS_RDONLY | _QUIET)


def _account(account: Account) -> None:
    """/etc/passwd and /etc/group with the identity's line added, bound over the host's."""
    os.mkdir(_OWN, 0o755)
    for name, line in ((b"passwd", account.passwd_line()), (b"group", account.group_line())):
        source = b"/etc/" + name
        if not os.path.isfile(source):
            continue
        copy = _OWN + b"/" + name
        data = mounts.read_bytes(source)
        if data and not data.endswith(b"\n"):
            data += b"\n"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data + line)
        finally:
            os.close(fd)
        libc.mount(copy, source, None, mountflags.MS_BIND)
        _remount_readonly(source)


def _makedirs(path: bytes) -> None:
    os.makedirs(path, 0o755, exist_ok=True)


# -- worked out by the controller, before the fork -------------------------------------------


def keep_run_paths() -> tuple[bytes, ...]:
    """The host's /run paths a zone's name resolution needs: where /etc/resolv.conf points
    when that is under /run."""
    try:
        real = os.path.realpath("/etc/resolv.conf")
    except OSError:
        return ()
    if real.startswith("/run/") and os.path.exists(real):
        return (os.fsencode(os.path.dirname(real)),)
    return ()


def hidden(path: str) -> bool:
    """Whether the zone's view hides the host's `path` (it lies in a place replaced by the
    zone's own)."""
    raw = os.fsencode(os.path.normpath(path))
    return any(raw == root or raw.startswith(root + b"/")
               for root in (*SCRATCH_DIRS, *HIDDEN_DIRS, b"/run"))


def _is_root(path: str) -> bool:
    raw = os.fsencode(path)
    return raw in (*SCRATCH_DIRS, *HIDDEN_DIRS, b"/run")


def named_binds(argv: Sequence[str], cwd: str, *, units: Sequence[Path] = ()) -> tuple[bytes, ...]:
    """What the operator named that the view would hide: the working directory and each
    absolute path on the command line that exists in a hidden place; a file brings the
    directory it is in (the modules a script imports beside it), unless that is a hidden
    place's root (then the file alone: /tmp/x.py shows no other file of /tmp). A path
    inside one of `units` (a program snapshot, an invoke request's directory) brings the
    whole unit and nothing beside it."""
    out: list[bytes] = []
    candidates = [cwd, *(arg for arg in argv if arg.startswith("/"))]
    for candidate in candidates:
        path = os.path.normpath(candidate)
        if not hidden(path) or _is_root(path) or not os.path.lexists(path):
            continue  # a hidden root itself (a working directory of /tmp) is the zone's own
        within = False
        for unit in units:
            with contextlib.suppress(ValueError):
                rel = Path(path).relative_to(unit)
                path = str(unit / rel.parts[0]) if rel.parts else str(unit)
                within = True
                break
        if not within and not os.path.isdir(path) and not _is_root(os.path.dirname(path)):
            # a script comes with its directory: what it imports or reads beside it
            path = os.path.dirname(path)
        raw = os.fsencode(os.path.realpath(path)) if os.path.islink(path) else \
            os.fsencode(path)
        if raw not in out and hidden(os.fsdecode(raw)) and not _is_root(os.fsdecode(raw)):
            out.append(raw)
    # a path inside another one bound comes with it
    return tuple(p for p in out if not any(p.startswith(q + b"/") for q in out))


def cgroup_mounts(zone_dirs: Sequence[str], entries: Sequence[MountEntry] | None = None
                  ) -> tuple[CgroupMount, ...]:
    """The host's cgroup hierarchies holding one of the zone's cgroup directories, to mount
    again inside the zone's cgroup namespace."""
    out: list[CgroupMount] = []
    for entry in mounts.read_mountinfo() if entries is None else entries:
        if entry.fstype not in ("cgroup", "cgroup2"):
            continue
        if not any(os.fsencode(d).startswith(entry.point + b"/") for d in zone_dirs):
            continue
        options = [o for o in entry.super_options if o not in ("rw", "ro")]
        out.append(CgroupMount(entry.point, entry.fstype.encode(),
                               ",".join(options).encode() or None))
    return tuple(out)
