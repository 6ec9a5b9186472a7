"""Hostile code that has read hvtsm's source, run in one zone against another: each probe
prints one JSON line {"probe", "reached", "detail"}; `reached` true is a hole.

argv: the victim workload's host pid, the victim's uid; $PROBE_STORE: the store file
(not on the command line, which would bring its directory into the zone's view)."""

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import sys

VICTIM_PID = int(sys.argv[1])
VICTIM_UID = int(sys.argv[2])
STORE = os.environ["PROBE_STORE"]
SHM_KEY = 0x48565453
PTRACE_ATTACH = 16
libc = ctypes.CDLL(None, use_errno=True)


def report(probe: str, reached: bool, detail: str = "") -> None:
    print(json.dumps({"probe": probe, "reached": reached, "detail": detail}), flush=True)


def attempt(probe: str, action) -> None:
    """`action` returning normally reached its target; an OSError did not."""
    try:
        detail = action()
    except OSError as exc:
        report(probe, False, errno.errorcode.get(exc.errno or 0, str(exc)))
    else:
        report(probe, True, str(detail)[:200])


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(64)


def others() -> list[str]:
    """Processes in sight that are not this zone's own (its own: uid this one's)."""
    seen = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}")
            except OSError:
                continue
            if st.st_uid != os.getuid():
                seen.append(entry)
    return seen


def cmdlines() -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                out.append(read(f"/proc/{entry}/cmdline").decode(errors="replace"))
    return out


def connect(address: str) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(address)
    return s.recv(64)


def ptrace() -> int:
    if libc.ptrace(PTRACE_ATTACH, VICTIM_PID, None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return 0


def shm() -> int:
    shmid = libc.shmget(SHM_KEY, 0, 0)
    if shmid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return shmid


def listing(path: str) -> list[str]:
    names = os.listdir(path)
    if not names:
        raise OSError(errno.ENOENT, "empty")
    return names


def foreign_interfaces() -> list[str]:
    names = [n for n in os.listdir("/sys/class/net") if n not in ("lo", "eth0")]
    if not names:
        raise OSError(errno.ENOENT, "only its own")
    return names


def foreign_cgroups() -> list[str]:
    """Other zones' cgroups by name, anywhere under /sys/fs/cgroup."""
    found = []
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(root, d) for d in dirs if d.startswith("z") or d == "hvtsm"]
    if not found:
        raise OSError(errno.ENOENT, "none")
    return found


def controller() -> str:
    hits = [c for c in cmdlines() if "hvtsm" in c or STORE in c]
    if not hits:
        raise OSError(errno.ENOENT, "not in sight")
    return hits[0]


def foreign_processes() -> list[str]:
    seen = others()
    if not seen:
        raise OSError(errno.ENOENT, "only its own")
    return seen


def same_uid() -> int:
    if os.getuid() != VICTIM_UID:
        raise OSError(errno.EPERM, f"uid {os.getuid()} vs {VICTIM_UID}")
    return os.getuid()


def world_writable_places() -> list[str]:
    """Directories outside its scratch anyone may write to, where a file could be left for
    another zone: each one it managed to write in."""
    written = []
    skip = ("/proc", "/sys", "/dev", "/tmp", "/var/tmp", "/run")
    for top in ("/", "/var", "/var/lib", "/var/spool", "/var/cache", "/srv", "/opt",
                "/home", "/etc", "/usr/local"):
        try:
            entries = [os.path.join(top, n) for n in os.listdir(top)]
        except OSError:
            continue
        for path in [top, *entries]:
            if path.startswith(skip) or not os.path.isdir(path) or os.path.islink(path):
                continue
            if os.stat(path).st_mode & 0o002:
                probe = os.path.join(path, f".hvtsm-probe-{os.getpid()}")
                try:
                    open(probe, "w").close()
                except OSError:
                    continue
                os.unlink(probe)
                written.append(path)
    if not written:
        raise OSError(errno.EROFS, "none writable")
    return written


def inherited_descriptors() -> list[str]:
    """Descriptors it did not open itself (beyond stdin, stdout, stderr)."""
    mine = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2 or fd == mine:
                continue
            try:
                found.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                continue
    finally:
        os.close(mine)
    if not found:
        raise OSError(errno.ENOENT, "none")
    return found


attempt("see another zone's processes", foreign_processes)
attempt("hold a descriptor of the controller's", inherited_descriptors)
attempt("see the controller's command line", controller)
attempt("signal the other zone's workload", lambda: os.kill(VICTIM_PID, 0))
attempt("kill the other zone's workload", lambda: os.kill(VICTIM_PID, signal.SIGKILL))
attempt("ptrace the other zone's workload", ptrace)
attempt("read the other zone's memory", lambda: read(f"/proc/{VICTIM_PID}/mem"))
attempt("read the other zone's environment", lambda: read(f"/proc/{VICTIM_PID}/environ"))
attempt("share the other zone's identity", same_uid)
for path in ("/tmp/secret", "/var/tmp/secret", "/dev/shm/secret"):
    attempt(f"read the other zone's {path}", lambda path=path: read(path))
attempt("connect to the other zone's unix socket in /tmp",
        lambda: connect("/tmp/victim.sock"))
attempt("connect to the other zone's abstract socket",
        lambda: connect("\0hvtsm-victim"))
attempt("attach the other zone's SysV shared memory", shm)
attempt("read the store", lambda: read(STORE))
attempt("read the default store", lambda: read("/var/lib/hvtsm/hvtsm.db"))
attempt("list program snapshots", lambda: listing("/var/lib/hvtsm/programs"))
attempt("list hvtsm's runtime directory", lambda: listing("/run/hvtsm"))
attempt("list the invoke spool", lambda: listing("/var/spool/hvtsm/invoke"))
attempt("see the host's network interfaces", foreign_interfaces)
attempt("see other zones' cgroups", foreign_cgroups)
attempt("write outside its scratch", lambda: open("/var/hvtsm-probe", "w").close())
attempt("leave a file in a world-writable place", world_writable_places)
print(json.dumps({"done": True}), flush=True)
