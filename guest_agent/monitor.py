"""The syscall monitor: receives each watched workload's seccomp listener, answers its
notifications, watches its sensitive files with fanotify and samples its processes; what
breaks the workload's profile becomes an ``anomaly`` event (protocol.ANOMALY_FIELDS) and
is contained as the profile says.

Threads:
* ``monitor-poll``: one poll loop over the watch sockets (a header and a listener fd come
  in on them), every listener and every fanotify group. It never blocks in an ioctl: it
  receives only after POLLIN, and every notification it receives it answers, whatever
  happens while judging it (an internal error CONTINUEs the call and is counted).
* ``monitor-sample``: every sample interval reads the watched processes' RSS and read/write
  syscall counts from /proc, OOM kills, and sends ``stats`` every STATS_PERIOD seconds. It
  also does the process accounting (proccount.py): process creation is never notified (a
  notified fork can fail with EINTR, see there), so ``max_processes`` is judged on the
  processes alive at each sample and ``max_forks_per_s`` on the processes new since the
  previous one, or, in a guest with one workload, on the kernel's count of created tasks.

Transient zones (the profile's ``transient``): an exec of a program the host did not
foresee, or the first connect off the host of a process, is *held*: the caller stays blocked
in the kernel while a ``code-path`` event goes to the host, and the poll loop goes on
answering everything else. The host's ``transient`` message (op split or deny) releases it;
with no answer within hold_timeout the call fails with EPERM and a ``transient-timeout``
anomaly is sent (fail closed: an unforeseen path never runs unplaced). In a guest the agent
makes the transient zone's cgroup and moves the caller into it before letting the call
proceed (tcgroup.py); beside a cgroup zone the host has placed it already. Processes of a
transient zone do not split again; their anomalies carry the zone's id (``zone``), and a
connect off the host while the zone's network is not ``full`` is a connect-out anomaly.

Membership: with a ``procs_file`` (host mode: the zone's cgroup.procs, plus those of the
transient zones' child cgroups beside it) those files say which processes are the zone's.
Without it (guest mode) a process is a watch's when it notified on that watch's listener, or
descends from one that did, and has a seccomp filter.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from guest_agent import fanotify, proccount, seccomp, tcgroup
from guest_agent.profile import Profile, ProfileError, _is_local, first_match, normalize
from guest_agent.protocol import (
    EVENT_ANOMALY,
    EVENT_CODE_PATH,
    EVENT_MONITOR,
    EVENT_STATS,
    EVENT_TRANSIENT,
)
from guest_agent.syscalls import X32_SYSCALL_BIT, X86_64, numbers
from guest_agent.syscalls import name as syscall_name

log = logging.getLogger("guest_agent")

Emit = Callable[[str, str, dict], None]

STATS_PERIOD = 5.0
#: seconds over which memory growth is judged
MEMORY_WINDOW = 1.0
#: a rate anomaly (and events-dropped) is emitted at most once per this many seconds
RATE_EMIT_PERIOD = 1.0
#: other anomalies of one watch beyond this many per second are counted as dropped
MAX_ANOMALIES_PER_S = 50
MAX_STRING = 4096
MAX_ARGV = 16
MAX_HEADER = 64 * 1024
#: ended watches kept for stats() and late profile updates
KEEP_ENDED = 64
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
O_ACCMODE = 0o3
O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10

NR = X86_64
EXECS = frozenset(NR[n] for n in ("execve", "execveat"))
OPENS = frozenset(NR[n] for n in ("open", "openat", "creat", "openat2"))

PTRACE_REQUESTS = {0: "TRACEME", 1: "PEEKTEXT", 2: "PEEKDATA", 3: "PEEKUSER", 4: "POKETEXT",
                   5: "POKEDATA", 6: "POKEUSER", 7: "CONT", 8: "KILL", 9: "SINGLESTEP",
                   12: "GETREGS", 13: "SETREGS", 16: "ATTACH", 17: "DETACH", 24: "SYSCALL",
                   0x4200: "SETOPTIONS", 0x4206: "SEIZE", 0x4207: "INTERRUPT"}


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


class ProcReadError(Exception):
    """A /proc read of a live caller failed: the event is lost."""


class Mem:
    """Reads a blocked caller's memory through /proc/<pid>/mem."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1

    def read(self, addr: int, size: int) -> bytes:
        """Up to `size` bytes at `addr`, stopping early at an unreadable page."""
        if self._fd < 0:
            try:
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ProcReadError(f"open /proc/{self.pid}/mem: {e}") from None
        out = b""
        while len(out) < size:
            here = addr + len(out)
            chunk = min(size - len(out), PAGE - here % PAGE)
            try:
                data = os.pread(self._fd, chunk, here)
            except OSError:
                data = b""
            out += data
            if len(data) < chunk:
                break
        return out

    def string(self, addr: int, limit: int = MAX_STRING) -> str:
        if not addr:
            return ""
        out = b""
        while len(out) < limit:
            here = addr + len(out)
            chunk = min(limit - len(out), PAGE - here % PAGE)
            data = self.read(here, chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                return os.fsdecode(out + data[:nul])
            out += data
            if len(data) < chunk:
                if not out:
                    raise ProcReadError(f"cannot read pid {self.pid} memory at {addr:#x}")
                break
        return os.fsdecode(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def program_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""


def resolve(pid: int, dirfd: int, path: str) -> str:
    """`path` as the caller meant it: relative to its cwd (AT_FDCWD) or to `dirfd`."""
    if path.startswith("/"):
        return normalize(path)
    try:
        base = os.readlink(f"/proc/{pid}/cwd" if dirfd == AT_FDCWD
                           else f"/proc/{pid}/fd/{dirfd}")
    except OSError:
        base = "?"
    return normalize(os.path.join(base, path) if path else base)


def fd_target(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def ppid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def seccomp_filtered(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp_filters:"):
                    return int(line.split()[1]) >= 1
                if line.startswith("Seccomp:"):
                    mode = int(line.split()[1])
                    if mode != 2:
                        return False
    except (OSError, ValueError, IndexError):
        return False
    return True


def read_counter(path: str, key: str) -> int | None:
    """The value of line `key N` in `path` (memory.events, memory.oom_control, vmstat)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Finding:
    category: str
    detail: str
    syscall: str | None
    args: dict
    #: rate anomalies are emitted at most once per RATE_EMIT_PERIOD, contained every time
    rate: bool = False
    #: not an anomaly: an unforeseen code path ("exec" | "connect") whose call is held
    hold: str | None = None


@dataclass
class Hold:
    """A call held until the host places its process in a transient zone (or refuses)."""

    id: int
    notif_id: int
    pid: int
    trigger: str
    program: str
    syscall: str | None
    args: dict
    act_time: float
    act_mono: float
    deadline: float


@dataclass
class Transient:
    """A transient zone split from a watch: its cgroup when the agent manages it (guest),
    and the network it may use (judged at connect: it shares its parent's network)."""

    cgroup: str | None
    network: str = "full"


@dataclass
class Watch:
    id: str
    profile: Profile
    listener: seccomp.Listener | None
    installed: frozenset[int]
    procs_file: str | None = None
    oom_file: str | None = None
    group: fanotify.Group | None = None
    first_exec_done: bool = False
    known: set[int] = field(default_factory=set)
    ended: bool = False
    notifications: int = 0
    file_events: int = 0
    lost: int = 0
    dropped: int = 0
    errors: int = 0
    #: process creations over the last second (proccount.BirthWindow)
    births: proccount.BirthWindow = field(default_factory=proccount.BirthWindow)
    #: the processes of the last sample
    procs: dict[int, proccount.Proc] = field(default_factory=dict)
    #: the kernel's created-tasks count at the last sample (guest, one workload)
    tasks_base: int | None = None
    new_files: collections.deque = field(default_factory=collections.deque)
    last_emit: dict[str, float] = field(default_factory=dict)
    emitted_window: collections.deque = field(default_factory=collections.deque)
    rss: dict[int, int] = field(default_factory=dict)
    #: (time, per-process RSS) over the last MEMORY_WINDOW seconds
    rss_history: collections.deque = field(default_factory=collections.deque)
    io: dict[int, int] = field(default_factory=dict)
    sampled_at: float = 0.0
    oom_base: int | None = None
    lost_reported: int = 0
    last_stats: float = 0.0
    next_sample: float = 0.0
    recent_sensitive: dict[tuple[int, str], float] = field(default_factory=dict)
    #: the workload's first process (its own exec is never a code path)
    root_pid: int = 0
    holds: dict[int, Hold] = field(default_factory=dict)
    transients: dict[str, Transient] = field(default_factory=dict)


class Monitor:
    """See the module docstring. `emit(kind, workload id, data)` sends an ``event``; it may
    return False when the event could not be queued (counted as dropped)."""

    def __init__(self, emit: Emit, *, permission_events: bool,
                 system_counter: bool = False) -> None:
        self.emit = emit
        self.permission_events = permission_events
        #: the system's created-tasks counter is the workloads' own (a guest): with one
        #: watch, it counts the children that live shorter than a sample interval too
        self.system_counter = system_counter
        self.watch_socket, self.child_socket = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # the child end is inherited by each workload's first process across fork only
        self.child_socket.set_inheritable(False)
        self._sockets: list[socket.socket] = [self.watch_socket]
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}
        self._ended: collections.deque[Watch] = collections.deque(maxlen=KEEP_ENDED)
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._poller = select.poll()
        self.internal_errors = 0
        self._next_hold = 1
        #: sensitive-path marks reused by the next workload while their directories stay
        #: unchanged (a warm guest's start would spend most of its time walking them)
        self._expanded = fanotify.ExpandCache()

    # --- public ---------------------------------------------------------------------------

    def attach_socket(self, sock: socket.socket) -> None:
        """Host mode: an inherited seqpacket socket that also brings (header, listener fd)."""
        self._ops.append(lambda: self._add_socket(sock))
        self._wake()

    def start(self) -> None:
        for target, name in ((self._poll_loop, "monitor-poll"),
                             (self._sample_loop, "monitor-sample")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def update(self, workload_id: str, profile: Profile) -> None:
        """Replace a watch's profile; KeyError if no watch has this id."""
        with self._lock:
            watch = self._watches.get(workload_id)
            if watch is None:
                watch = next((w for w in self._ended if w.id == workload_id), None)
        if watch is None:
            raise KeyError(f"no watched workload {workload_id}")
        old = watch.profile
        watch.profile = profile
        if watch.ended:
            return
        warnings = []
        missing = [n for n in profile.deny_syscalls if NR[n] not in watch.installed]
        if missing:
            warnings.append("deny_syscalls {} cannot be watched: the filter installed at "
                            "start does not notify them".format(", ".join(missing)))
        if profile.sensitive_paths != old.sensitive_paths:
            self._ops.append(lambda: self._remark(watch, warnings))
            self._wake()
        elif warnings:
            self._send(EVENT_MONITOR, watch, {"mechanisms": self._mechanisms(watch),
                                              "warnings": warnings})

    def installed(self, workload_id: str) -> frozenset[int] | None:
        """The syscall numbers a running watch's filter notifies (None: no such watch)."""
        with self._lock:
            watch = self._watches.get(workload_id)
        return None if watch is None or watch.ended else watch.installed

    def rename(self, old: str, new: str, *, reexec: bool = False) -> None:
        """A standby's watch becomes its request's workload's (events then carry `new`).
        `reexec`: the standby's next exec is the workload's own program (exec mode), not
        a code path. KeyError if no running watch has id `old`."""
        with self._lock:
            watch = self._watches.get(old)
            if watch is None or watch.ended:
                raise KeyError(f"no watched standby {old}")
            del self._watches[old]
            watch.id = new
            if reexec:
                watch.first_exec_done = False
            self._watches[new] = watch

    def drop(self, workload_id: str) -> None:
        """End a watch whose process is being killed (an unused standby) on the poll loop's
        next turn, before any watch that begins after this call: its fanotify marks must
        not hold another workload's opens."""
        def end() -> None:
            with self._lock:
                watch = self._watches.get(workload_id)
            if watch is not None:
                self._end(watch, quiet=True)

        self._ops.append(end)
        self._wake()

    def transient(self, msg: dict) -> None:
        """A host ``transient`` message: carried out on the poll loop, which owns the
        held calls; the answer goes out as a ``transient`` event."""
        self._ops.append(lambda: self._on_transient(msg))
        self._wake()

    def stats(self) -> dict:
        with self._lock:
            watches = list(self._watches.values()) + list(self._ended)
            watching = sum(1 for w in self._watches.values() if not w.ended)
        return {"notifications": sum(w.notifications for w in watches),
                "file_events": sum(w.file_events for w in watches),
                "lost": sum(w.lost for w in watches),
                "dropped": sum(w.dropped for w in watches),
                "watching": watching}

    def close(self) -> None:
        self._closed.set()
        self._wake()
        for t in self._threads:
            t.join(3)
        with self._lock:
            watches = list(self._watches.values())
        for w in watches:
            self._end(w, quiet=True)
        for s in [*self._sockets, self.child_socket]:
            with contextlib.suppress(OSError):
                s.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- poll loop --------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _register(self, fd: int, handler: Callable[[int], None]) -> None:
        self._handlers[fd] = handler
        self._poller.register(fd, select.POLLIN)

    def _unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(fd)

    def _add_socket(self, sock: socket.socket) -> None:
        if sock not in self._sockets:
            self._sockets.append(sock)
        self._register(sock.fileno(), lambda ev, s=sock: self._on_socket(s, ev))

    def _poll_loop(self) -> None:
        self._register(self._wake_r, self._on_wake)
        self._register(self.watch_socket.fileno(),
                       lambda ev: self._on_socket(self.watch_socket, ev))
        while not self._closed.is_set():
            while self._ops:
                op = self._ops.popleft()
                try:
                    op()
                except Exception:
                    log.exception("monitor operation failed")
                    self.internal_errors += 1
            try:
                ready = self._poller.poll(self._poll_timeout())
            except InterruptedError:
                continue
            for fd, ev in ready:
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(ev)
                except Exception:
                    log.exception("monitor handler failed")
                    self.internal_errors += 1
            try:
                self._expire_holds()
            except Exception:
                log.exception("expiring held calls failed")
                self.internal_errors += 1

    def _poll_timeout(self) -> int:
        """ms until the nearest held call's deadline, at most a second."""
        with self._lock:
            deadlines = [h.deadline for w in self._watches.values() for h in w.holds.values()]
        if not deadlines:
            return 1000
        return max(0, min(1000, int((min(deadlines) - time.monotonic()) * 1000) + 1))

    def _on_wake(self, _ev: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)

    def _on_socket(self, sock: socket.socket, ev: int) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_HEADER, 4,
                                                      socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("watch socket: %s", e)
            msg, fds = b"", []
        if not msg and not fds:
            if ev & (select.POLLHUP | select.POLLERR) or sock is not self.watch_socket:
                self._unregister(sock.fileno())
            return
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            log.warning("watch header without a listener fd: %r", msg[:200])
            return
        try:
            header = json.loads(msg.decode("utf-8"))
            wid = header["id"]
            if not isinstance(wid, str) or not wid:
                raise ValueError("id must be a non-empty string")
            profile = Profile.from_dict(header.get("profile") or {})
        except (ValueError, KeyError, TypeError, ProfileError) as e:
            # without its listener the tree's notified calls fail (ENOSYS): fail closed
            log.warning("bad watch header (%s): %r", e, msg[:200])
            os.close(fds[0])
            return
        try:
            self._begin(wid, profile, fds[0], header.get("procs_file"), header.get("oom_file"))
        except Exception:
            # a watch that cannot begin must not leave the tree waiting for ever: closing
            # the listener fails its notified calls (ENOSYS), its first exec included
            log.exception("cannot watch %s", wid)
            self.internal_errors += 1
            with contextlib.suppress(OSError):
                os.close(fds[0])

    # --- watches ------------------------------------------------------------------------

    def _begin(self, wid: str, profile: Profile, listener_fd: int, procs_file: Any,
               oom_file: Any) -> None:
        watch = Watch(wid, profile, seccomp.Listener(listener_fd),
                      seccomp.notified_numbers(profile),
                      procs_file if isinstance(procs_file, str) else None,
                      oom_file if isinstance(oom_file, str) else None)
        watch.sampled_at = watch.last_stats = time.monotonic()
        if watch.oom_file:
            watch.oom_base = read_counter(watch.oom_file, "oom_kill")
        elif watch.procs_file is None:
            watch.oom_base = read_counter("/proc/vmstat", "oom_kill")
        warnings: list[str] = []
        self._make_group(watch, warnings)
        with self._lock:
            old = self._watches.get(wid)
            if old is not None and not old.ended:
                warnings.append(f"a watch with id {wid} was still active; replaced")
            self._watches[wid] = watch
        self._register(listener_fd, lambda ev, w=watch: self._on_listener(w, ev))
        log.info("watching %s (%s)", wid, ", ".join(self._mechanisms(watch)))
        self._send(EVENT_MONITOR, watch, {"mechanisms": self._mechanisms(watch),
                                          "warnings": warnings})

    def _mechanisms(self, watch: Watch) -> list[str]:
        out = ["seccomp-unotify"]
        if watch.group is not None:
            out.append("fanotify")
        out.append("proc-sampling")
        return out

    def _make_group(self, watch: Watch, warnings: list[str]) -> None:
        if not watch.profile.sensitive_paths:
            return
        marks, notes = self._expanded.expand(watch.profile.sensitive_paths)
        warnings.extend(notes)
        if not marks:
            warnings.append("sensitive paths: nothing to mark yet (no match on disk)")
            return
        try:
            group = fanotify.Group(permission=self.permission_events)
        except OSError as e:
            warnings.append(f"fanotify unavailable ({e}): sensitive reads are not watched")
            return
        failed = 0
        for path, is_dir in marks:
            try:
                group.mark(path, is_dir)
            except OSError:
                failed += 1
        if failed:
            warnings.append(f"sensitive paths: {failed} of {len(marks)} marks failed")
        watch.group = group
        self._register(group.fd, lambda ev, w=watch, g=group: self._on_fanotify(w, g, ev))

    def _remark(self, watch: Watch, warnings: list[str]) -> None:
        old = watch.group
        watch.group = None
        if old is not None:
            self._unregister(old.fd)
            old.close()
        self._make_group(watch, warnings)
        self._send(EVENT_MONITOR, watch, {"mechanisms": self._mechanisms(watch),
                                          "warnings": warnings})

    def _end(self, watch: Watch, quiet: bool = False) -> None:
        if watch.ended:
            return
        watch.ended = True
        if watch.listener is not None:
            self._unregister(watch.listener.fd)
            watch.listener.close()
        if watch.group is not None:
            self._unregister(watch.group.fd)
            watch.group.close()
        with self._lock:
            if self._watches.get(watch.id) is watch:
                del self._watches[watch.id]
            self._ended.append(watch)
        if not quiet:
            log.info("watch %s ended", watch.id)
            self._send_stats(watch)

    # --- seccomp notifications ----------------------------------------------------------

    def _on_listener(self, watch: Watch, ev: int) -> None:
        listener = watch.listener
        if listener is None or listener.fd < 0:
            return
        if not ev & select.POLLIN:
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                self._end(watch)  # every process of the tree is gone
            return
        try:
            notif = listener.recv()
        except OSError as e:
            log.warning("watch %s: %s", watch.id, e)
            watch.lost += 1
            if e.errno in (errno.EBADF, errno.EINVAL):
                self._end(watch)
            return
        if notif is None:
            return
        act_mono = time.monotonic()
        act_time = time.time()
        watch.notifications += 1
        watch.known.add(notif.pid)
        finding: Finding | None = None
        gone = False
        mem = Mem(notif.pid)
        try:
            finding = self._judge(watch, notif, mem)
            # the caller is gone: what we read may not be its call's, and none can answer
            gone = not listener.valid(notif.id)
        except ProcReadError as e:
            gone = not listener.valid(notif.id)
            if not gone:
                watch.lost += 1
                log.debug("watch %s: %s", watch.id, e)
            finding = None
        except Exception:
            log.exception("judging a notification of %s", watch.id)
            watch.errors += 1
            watch.lost += 1  # a call let through unjudged is an event lost
            self.internal_errors += 1
            finding = None
        finally:
            mem.close()
            if finding is None and not gone:
                self._answer(watch, notif.id, allow=True, killed=False)
        if gone or finding is None:
            return
        if finding.hold is not None:
            self._hold(watch, notif, finding, act_time, act_mono)
            return
        answered = []

        def answer(allow: bool, killed: bool) -> None:
            answered.append(allow)
            self._answer(watch, notif.id, allow=allow, killed=killed)

        try:
            self._contain(watch, finding, notif.pid, act_time, act_mono, answer)
        except Exception:
            log.exception("containing in %s", watch.id)
            watch.errors += 1
            self.internal_errors += 1
        finally:
            if not answered:  # never leave the caller blocked
                self._answer(watch, notif.id, allow=True, killed=False)

    def _answer(self, watch: Watch, notif_id: int, *, allow: bool, killed: bool) -> None:
        listener = watch.listener
        if listener is None or listener.fd < 0:
            return
        try:
            if not listener.respond(notif_id, allow=allow) and not killed:
                watch.lost += 1  # answered too late: the caller had gone
        except OSError as e:
            log.warning("watch %s: %s", watch.id, e)
            watch.lost += 1

    # --- transient zones: held code paths --------------------------------------------

    def _hold(self, watch: Watch, n: seccomp.Notification, finding: Finding,
              act_time: float, act_mono: float) -> None:
        """Keep the caller blocked and ask the host where its subtree goes."""
        profile = watch.profile.transient
        timeout = profile.hold_timeout if profile is not None else 0.0
        args = finding.args
        trigger = finding.hold or "exec"
        program = args.get("path") if trigger == "exec" else program_of(n.pid)
        hold = Hold(self._next_hold, n.id, n.pid, trigger, str(program or ""),
                    finding.syscall, args, act_time, act_mono, act_mono + timeout)
        self._next_hold += 1
        watch.holds[hold.id] = hold
        data = {"hold": hold.id, "pid": n.pid, "ppid": ppid_of(n.pid), "trigger": trigger,
                "program": hold.program}
        if trigger == "exec":
            data["argv"] = args.get("argv", [])
        else:
            data.update(family=args.get("family"), address=args.get("address"),
                        port=args.get("port"))
        try:
            sent = self.emit(EVENT_CODE_PATH, watch.id, data)
        except Exception:
            log.exception("emitting a code-path event")
            sent = False
        if sent is False:
            # the host will never hear of it: refuse now rather than wait for nothing
            watch.dropped += 1
            hold.deadline = act_mono

    def _expire_holds(self) -> None:
        now = time.monotonic()
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            for hold in [h for h in watch.holds.values() if h.deadline <= now]:
                del watch.holds[hold.id]
                self._answer(watch, hold.notif_id, allow=False, killed=False)
                waited = now - hold.act_mono
                what = f"exec of {hold.program}" if hold.trigger == "exec" else \
                    f"connect of pid {hold.pid}"
                finding = Finding("transient-timeout",
                                  f"the host did not place the {what} in a transient zone "
                                  f"within {waited:.1f} s: the call was refused",
                                  hold.syscall, hold.args)
                self._anomaly(watch, finding, hold.pid, program_of(hold.pid), "denied",
                              hold.act_time, hold.act_mono, time.monotonic())

    def _on_transient(self, msg: dict) -> None:
        op, wid, zone = msg.get("op"), msg.get("id"), msg.get("zone")
        reply: dict[str, Any] = {"op": op, "zone": zone, "hold": msg.get("hold"), "ok": True}
        with self._lock:
            watch = self._watches.get(wid) if isinstance(wid, str) else None
        try:
            if watch is None:
                raise tcgroup.CgroupError(f"no watched workload {wid}")
            if op in ("split", "deny"):
                self._release(watch, msg, reply)
            else:
                self._zone_op(watch, op, zone, msg, reply)
        except (tcgroup.CgroupError, OSError) as e:
            reply.update(ok=False, error=str(e))
        if watch is not None:
            self._send(EVENT_TRANSIENT, watch, reply)
        elif isinstance(wid, str):
            with contextlib.suppress(Exception):
                self.emit(EVENT_TRANSIENT, wid, reply)

    def _release(self, watch: Watch, msg: dict, reply: dict) -> None:
        hold = watch.holds.pop(msg.get("hold"), None)  # type: ignore[arg-type]
        if hold is None:
            raise tcgroup.CgroupError(f"no held call {msg.get('hold')} (it timed out, or its "
                                      "process ended)")
        reply.update(pid=hold.pid, held_ms=round((time.monotonic() - hold.act_mono) * 1000, 3))
        zone = msg.get("zone")
        if msg["op"] == "deny" or not isinstance(zone, str):
            self._answer(watch, hold.notif_id, allow=False, killed=False)
            if msg["op"] != "deny":
                raise tcgroup.CgroupError("split without a zone: the call was refused")
            return
        path = None
        try:
            if msg.get("cgroup"):
                path = tcgroup.create(str(msg["cgroup"]), msg.get("limits") or {})
                tcgroup.move(path, hold.pid)
        except (tcgroup.CgroupError, OSError):
            # fail closed: a subtree that could not be placed does not run
            self._answer(watch, hold.notif_id, allow=False, killed=False)
            if path is not None:
                with contextlib.suppress(tcgroup.CgroupError, OSError):
                    tcgroup.kill(path)
            raise
        watch.transients[zone] = Transient(path, str(msg.get("network") or "full"))
        self._answer(watch, hold.notif_id, allow=True, killed=False)
        if path is not None:
            reply["cgroup"] = path

    def _zone_op(self, watch: Watch, op: Any, zone: Any, msg: dict, reply: dict) -> None:
        transient = watch.transients.get(zone) if isinstance(zone, str) else None
        if transient is None:
            raise tcgroup.CgroupError(f"no transient zone {zone} in {watch.id}")
        path = transient.cgroup
        if op == "update":
            if msg.get("network"):
                transient.network = str(msg["network"])
            if path is not None:
                reply["set"] = tcgroup.set_limits(path, msg.get("limits") or {})
        elif path is None:
            raise tcgroup.CgroupError(f"the agent does not manage transient zone {zone}'s "
                                      "cgroup (the host does)")
        elif op == "kill":
            reply["procs"] = tcgroup.kill(path)
            del watch.transients[zone]
        elif op in ("freeze", "thaw"):
            tcgroup.freeze(path, op == "freeze")
        elif op == "stats":
            reply.update(tcgroup.stats(path))

    def _check_transients(self, watch: Watch) -> None:
        """Guest: a transient cgroup whose processes are all gone ends its zone."""
        for zone, transient in list(watch.transients.items()):
            if transient.cgroup is None:
                continue
            populated = tcgroup.populated(transient.cgroup)
            if populated:
                continue
            watch.transients.pop(zone, None)
            if populated is False:
                with contextlib.suppress(tcgroup.CgroupError, OSError):
                    tcgroup.kill(transient.cgroup)
                self._send(EVENT_TRANSIENT, watch, {"op": "ended", "zone": zone, "ok": True})

    def _transient_of(self, watch: Watch, pid: int) -> str | None:
        """The transient zone `pid` is in, from its cgroup path, or None."""
        if not watch.transients:
            return None
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            parts = line.split(":", 2)[-1].split("/")
            for zone in watch.transients:
                if zone in parts:
                    return zone
        return None

    def _contain(self, watch: Watch, finding: Finding, pid: int, act_time: float,
                 act_mono: float, answer: Callable[[bool, bool], None] | None) -> None:
        """Apply profile.contain to `pid` (answering its held call through `answer`, when
        there is one) and emit the anomaly."""
        contain = watch.profile.contain
        # read before the kill: a reaped process has no /proc entry to name them by
        program = program_of(pid) if pid else ""
        zone = self._transient_of(watch, pid) if pid else None
        contained_mono: float | None = None
        if contain == "kill" and pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            if answer is not None:
                answer(False, True)
            contained, contained_mono = "killed", time.monotonic()
        elif contain == "deny" and answer is not None:
            answer(False, False)
            contained, contained_mono = "denied", time.monotonic()
        else:
            if answer is not None:
                answer(True, False)
            contained = "none"
        self._anomaly(watch, finding, pid, program, contained, act_time, act_mono,
                      contained_mono, zone)

    def _anomaly(self, watch: Watch, finding: Finding, pid: int | None, program: str,
                 contained: str, act_time: float, act_mono: float,
                 contained_mono: float | None, zone: str | None = None) -> None:
        """`zone`: the transient zone of `pid` when the caller read it before containment
        (otherwise it is read here, while the process may still be there)."""
        now = time.monotonic()
        if finding.rate:
            last = watch.last_emit.get(finding.category)
            if last is not None and now - last < RATE_EMIT_PERIOD:
                return
            watch.last_emit[finding.category] = now
        else:
            window = watch.emitted_window
            while window and now - window[0] > 1.0:
                window.popleft()
            if len(window) >= MAX_ANOMALIES_PER_S:
                watch.dropped += 1
                return
            window.append(now)
        data = {"category": finding.category, "detail": finding.detail, "pid": pid,
                "program": program, "syscall": finding.syscall, "args": finding.args,
                "contained": contained, "act_time": act_time, "act_mono": act_mono,
                "contained_mono": contained_mono}
        if zone is None and pid:
            zone = self._transient_of(watch, pid)
        if zone is not None:
            data["zone"] = zone  # the host reacts in the transient zone, not its parent
        log.warning("anomaly in %s: %s: %s (%s)", watch.id, finding.category, finding.detail,
                    contained)
        self._send(EVENT_ANOMALY, watch, data)

    def _send(self, kind: str, watch: Watch, data: dict) -> None:
        try:
            ok = self.emit(kind, watch.id, data)
        except Exception:
            log.exception("emitting a %s event", kind)
            ok = False
        if ok is False:
            watch.dropped += 1

    def _send_stats(self, watch: Watch) -> None:
        self._send(EVENT_STATS, watch, {"notifications": watch.notifications,
                                        "file_events": watch.file_events, "lost": watch.lost,
                                        "dropped": watch.dropped})

    # --- judging one notified call ------------------------------------------------------

    def _judge(self, watch: Watch, n: seccomp.Notification, mem: Mem) -> Finding | None:
        profile = watch.profile
        if n.arch != seccomp.AUDIT_ARCH_X86_64 or n.nr & X32_SYSCALL_BIT:
            abi = "x32" if n.arch == seccomp.AUDIT_ARCH_X86_64 else f"arch {n.arch:#x}"
            return Finding("foreign-abi", f"syscall {n.nr & 0xFFFF} through the {abi} ABI",
                           None, {"raw": [hex(a) for a in n.args]})
        name = syscall_name(n.nr)
        if n.nr in EXECS:
            return self._judge_exec(watch, n, mem)
        if name in profile.deny_syscalls:
            return Finding("denied-syscall", f"{name} is in deny_syscalls", name,
                           self._decode_args(name, n, mem))
        if n.nr == NR["connect"]:
            return self._judge_connect(watch, n, mem)
        if n.nr in OPENS:
            return self._judge_open(watch, n, mem)
        return None

    def _decode_args(self, name: str, n: seccomp.Notification, mem: Mem) -> dict:
        if name == "ptrace":
            req = n.args[0] & 0xFFFFFFFF
            return {"request": PTRACE_REQUESTS.get(req, req), "target": _s32(n.args[1])}
        with contextlib.suppress(ProcReadError):
            if n.nr in OPENS:
                return self._open_args(n, mem)[0]
            if n.nr == NR["connect"]:
                return self._sockaddr(n, mem)
        return {"raw": [hex(a) for a in n.args]}

    def _exec_args(self, n: seccomp.Notification, mem: Mem) -> dict:
        if n.nr == NR["execve"]:
            dirfd, path_ptr, argv_ptr, flags = AT_FDCWD, n.args[0], n.args[1], 0
        else:
            dirfd, path_ptr, argv_ptr, flags = _s32(n.args[0]), n.args[1], n.args[2], \
                n.args[4]
        raw = mem.string(path_ptr)
        if not raw and flags & AT_EMPTY_PATH:
            path = fd_target(n.pid, dirfd)
        else:
            path = resolve(n.pid, dirfd, raw)
        argv: list[str] = []
        if argv_ptr:
            ptrs = mem.read(argv_ptr, 8 * MAX_ARGV)
            for (p,) in struct.iter_unpack("<Q", ptrs[:len(ptrs) // 8 * 8]):
                if not p:
                    break
                argv.append(mem.string(p, 1024))
        return {"path": path, "argv": argv}

    def _judge_exec(self, watch: Watch, n: seccomp.Notification, mem: Mem) -> Finding | None:
        if not watch.first_exec_done:
            # the workload's own program: always allowed (the agent chose it)
            watch.first_exec_done = True
            watch.root_pid = n.pid
            return None
        name = syscall_name(n.nr)
        args = self._exec_args(n, mem)
        path = args["path"]
        profile = watch.profile
        if name in profile.deny_syscalls:
            return Finding("denied-syscall", f"{name} is in deny_syscalls", name, args)
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):
            real = path
        if first_match(profile.shells, path) or first_match(profile.shells, real):
            for fd in (0, 1):
                target = fd_target(n.pid, fd)
                if target.startswith("socket:"):
                    where = "stdin" if fd == 0 else "stdout"
                    return Finding("reverse-shell",
                                   f"exec of shell {path} with a socket on {where} ({target})",
                                   name, args)
        verdict = profile.exec_verdict(path)
        if real != path:
            by_real = profile.exec_verdict(real)
            if verdict is None and by_real is not None and first_match(profile.deny_exec, real):
                verdict = by_real
            elif verdict is not None and by_real is None \
                    and not first_match(profile.deny_exec, path):
                verdict = None
        if verdict is not None:
            return Finding("unexpected-exec", verdict, name, args)
        transient = profile.transient
        if transient is not None and transient.on("exec") \
                and not transient.expected(path, real) \
                and self._transient_of(watch, n.pid) is None:
            return Finding("code-path", f"exec of {path}, which was not foreseen", name, args,
                           hold="exec")
        return None

    def _sockaddr(self, n: seccomp.Notification, mem: Mem) -> dict:
        length = min(n.args[2] & 0xFFFFFFFF, 128)
        if not n.args[1] or length < 2:
            return {"family": "none"}
        raw = mem.read(n.args[1], length)
        if len(raw) < 2:
            raise ProcReadError(f"cannot read sockaddr of pid {n.pid}")
        family = struct.unpack_from("<H", raw)[0]
        if family == AF_INET and len(raw) >= 8:
            port = struct.unpack_from(">H", raw, 2)[0]
            return {"family": "inet", "address": socket.inet_ntop(socket.AF_INET, raw[4:8]),
                    "port": port}
        if family == AF_INET6 and len(raw) >= 24:
            port = struct.unpack_from(">H", raw, 2)[0]
            return {"family": "inet6",
                    "address": socket.inet_ntop(socket.AF_INET6, raw[8:24]), "port": port}
        if family == AF_UNIX:
            sun = raw[2:]
            if sun[:1] == b"\0":
                return {"family": "unix", "path": "@" + os.fsdecode(sun[1:].rstrip(b"\0"))}
            path = os.fsdecode(sun.split(b"\0", 1)[0])
            return {"family": "unix", "path": resolve(n.pid, AT_FDCWD, path) if path else ""}
        return {"family": str(family)}

    def _judge_connect(self, watch: Watch, n: seccomp.Notification,
                       mem: Mem) -> Finding | None:
        args = self._sockaddr(n, mem)
        family = args["family"]
        if family == "unix":
            verdict = watch.profile.connect_verdict("unix", args["path"], 0)
        elif family in ("inet", "inet6"):
            verdict = watch.profile.connect_verdict(family, args["address"], args["port"])
        else:
            return None  # netlink, AF_UNSPEC (disconnect), ...: not a destination
        if verdict is not None:
            return Finding("connect-out", verdict, "connect", args)
        if family == "unix" or self._local(args["address"]):
            return None
        zone = self._transient_of(watch, n.pid)
        if zone is not None:
            network = watch.transients[zone].network
            if network != "full":
                return Finding("connect-out", f"connect to {args['address']}:{args['port']} "
                               f"while transient zone {zone}'s network is {network}",
                               "connect", args)
            return None
        transient = watch.profile.transient
        if transient is not None and transient.on("connect") and n.pid != watch.root_pid:
            return Finding("code-path", f"first connect of pid {n.pid}, to "
                           f"{args['address']}:{args['port']}", "connect", args,
                           hold="connect")
        return None

    @staticmethod
    def _local(address: str) -> bool:
        try:
            return _is_local(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return False

    def _open_args(self, n: seccomp.Notification, mem: Mem) -> tuple[dict, int]:
        name = syscall_name(n.nr)
        if name == "open":
            dirfd, path_ptr, flags = AT_FDCWD, n.args[0], n.args[1]
        elif name == "creat":
            dirfd, path_ptr, flags = AT_FDCWD, n.args[0], O_CREAT | 0o1 | 0o1000
        elif name == "openat":
            dirfd, path_ptr, flags = _s32(n.args[0]), n.args[1], n.args[2]
        else:  # openat2: flags in struct open_how
            dirfd, path_ptr = _s32(n.args[0]), n.args[1]
            how = mem.read(n.args[2], 8)
            flags = struct.unpack("<Q", how)[0] if len(how) == 8 else 0
        flags &= 0xFFFFFFFF
        path = resolve(n.pid, dirfd, mem.string(path_ptr))
        return {"path": path, "flags": flags}, flags

    def _judge_open(self, watch: Watch, n: seccomp.Notification, mem: Mem) -> Finding | None:
        name = syscall_name(n.nr)
        args, flags = self._open_args(n, mem)
        path = args["path"]
        profile = watch.profile
        glob = profile.path_sensitive(path)
        if glob is not None:
            what = "write" if flags & (O_ACCMODE | O_CREAT | O_TMPFILE_BIT) else "read"
            watch.recent_sensitive[(n.pid, path)] = time.monotonic()
            return Finding("sensitive-path", f"{what} of {path} matches {glob}", name, args)
        creating = flags & O_TMPFILE_BIT or (flags & O_CREAT and not os.path.lexists(path))
        if not creating:
            return None
        now = time.monotonic()
        new_files = watch.new_files
        new_files.append(now)
        while new_files and now - new_files[0] > 1.0:
            new_files.popleft()
        limit = profile.max_new_files_per_s
        if limit and len(new_files) > limit:
            return Finding("new-file-rate", f"{len(new_files)} files created in the last second "
                           f"(limit {limit:g})", name, args,
                           rate=True)
        return None

    # --- fanotify -----------------------------------------------------------------------

    def _on_fanotify(self, watch: Watch, group: fanotify.Group, _ev: int) -> None:
        for event in group.events():
            allow = True
            try:
                if event.overflow:
                    watch.lost += 1
                    continue
                if not self._is_member(watch, event.pid):
                    continue
                watch.file_events += 1
                glob = watch.profile.path_sensitive(event.path) if event.path else None
                if glob is None:
                    continue
                seen = watch.recent_sensitive.pop((event.pid, event.path), None)
                if seen is not None and time.monotonic() - seen < 1.0:
                    continue  # the seccomp side already reported this open
                act_mono, act_time = time.monotonic(), time.time()
                finding = Finding("sensitive-path", f"read of {event.path} matches {glob}",
                                  None, {"path": event.path})
                allow = self._contain_open(watch, group, event, finding, act_time, act_mono)
            except Exception:
                log.exception("handling a fanotify event of %s", watch.id)
                self.internal_errors += 1
                watch.errors += 1
            finally:
                if event.fd >= 0:
                    group.respond(event, allow)

    def _contain_open(self, watch: Watch, group: fanotify.Group, event: fanotify.Event,
                      finding: Finding, act_time: float, act_mono: float) -> bool:
        contain = watch.profile.contain
        program = program_of(event.pid)
        zone = self._transient_of(watch, event.pid)  # before the kill, as in _contain
        contained_mono: float | None = None
        contained = "none"
        allow = True
        if contain == "kill":
            with contextlib.suppress(OSError):
                os.kill(event.pid, signal.SIGKILL)
            allow = False
            contained = "killed"
        elif contain == "deny" and event.permission:
            allow = False
            contained = "denied"
        if contained != "none":
            group.respond(event, allow)
            contained_mono = time.monotonic()
        self._anomaly(watch, finding, event.pid, program, contained, act_time, act_mono,
                      contained_mono, zone)
        return allow

    # --- membership and sampling --------------------------------------------------------

    def _is_member(self, watch: Watch, pid: int) -> bool:
        if watch.procs_file is not None:
            return pid in self._procs(watch)
        if pid in watch.known:
            return True
        chain = []
        p = pid
        for _ in range(64):
            p = ppid_of(p)
            if p <= 1:
                return False
            if p in watch.known:
                break
            chain.append(p)
        else:
            return False
        if not seccomp_filtered(pid):
            return False
        watch.known.add(pid)
        watch.known.update(chain)
        return True

    def _procs(self, watch: Watch) -> set[int]:
        try:
            with open(watch.procs_file or "") as f:
                pids = {int(x) for x in f.read().split()}
        except (OSError, ValueError):
            watch.lost += 1
            return set()
        if watch.transients:
            # the transient zones' child cgroups beside the zone's own procs file
            base = os.path.dirname(watch.procs_file or "")
            name = os.path.basename(watch.procs_file or "")
            for zone in list(watch.transients):
                with contextlib.suppress(OSError, ValueError), \
                        open(os.path.join(base, zone, name)) as f:
                    pids.update(int(x) for x in f.read().split())
        return pids

    def _members(self, watch: Watch) -> set[int]:
        if watch.procs_file is not None:
            return self._procs(watch)
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                parents[int(entry)] = ppid_of(int(entry))
        known = watch.known
        members: set[int] = set()
        for pid in parents:
            chain = []
            p = pid
            for _ in range(64):
                if p in known or p in members:
                    members.update(chain)
                    members.add(p)
                    break
                chain.append(p)
                p = parents.get(p, 0)
                if p <= 1:
                    break
        members = {p for p in members if p in parents and seccomp_filtered(p)}
        watch.known = members | {p for p in known if p in parents}
        return members

    def _sample_loop(self) -> None:
        while not self._closed.wait(self._interval()):
            with self._lock:
                watches = [w for w in self._watches.values() if not w.ended]
            now = time.monotonic()
            for watch in watches:
                if now < watch.next_sample:
                    continue
                watch.next_sample = now + watch.profile.sample_interval * 0.9
                try:
                    self._sample(watch)
                except Exception:
                    log.exception("sampling %s", watch.id)
                    self.internal_errors += 1

    def _interval(self) -> float:
        with self._lock:
            intervals = [w.profile.sample_interval for w in self._watches.values()]
        return min(intervals) if intervals else 0.2

    def _sample(self, watch: Watch) -> None:
        profile = watch.profile
        members = self._members(watch)
        now = time.monotonic()
        dt = max(now - watch.sampled_at, 1e-3)
        rss: dict[int, int] = {}
        io: dict[int, int] = {}
        procs: dict[int, proccount.Proc] = {}
        for pid in members:
            proc = proccount.read_proc(pid)
            if proc is None:
                continue  # ended between the listing and now
            procs[pid] = proc
            rss[pid] = proc.rss_pages * PAGE
            try:
                with open(f"/proc/{pid}/io") as f:
                    counts = dict(line.split(":", 1) for line in f if ":" in line)
                io[pid] = int(counts.get("syscr", 0)) + int(counts.get("syscw", 0))
            except PermissionError:
                watch.lost += 1
            except (OSError, ValueError):
                continue
        watch.rss_history.append((now, rss))
        while now - watch.rss_history[0][0] > MEMORY_WINDOW:
            watch.rss_history.popleft()
        if watch.rss or watch.io:
            self._check_rates(watch, profile, rss, io, dt)
        self._check_processes(watch, procs, now)
        watch.rss, watch.io, watch.sampled_at = rss, io, now
        self._check_oom(watch)
        self._check_drops(watch, now)
        if watch.transients:
            self._ops.append(lambda: self._check_transients(watch))
            self._wake()
        if now - watch.last_stats >= STATS_PERIOD:
            watch.last_stats = now
            self._send_stats(watch)

    def _check_rates(self, watch: Watch, profile: Profile, rss: dict[int, int],
                     io: dict[int, int], dt: float) -> None:
        # a process seen for the first time starts from its current figures: its start-up
        # is not growth (a child exec'ing python is not a memory spike)
        # growth over the window, not one sample: a single large allocation is no spike,
        # growth that goes on is (and a slow CPU still gets there)
        then, old = watch.rss_history[0]
        now = watch.rss_history[-1][0]
        if profile.memory_spike_mib_per_s and now - then >= MEMORY_WINDOW / 2:
            growth = {p: rss[p] - old[p] for p in rss if p in old}
            rate = sum(growth.values()) / (now - then) / MIB
            if rate > profile.memory_spike_mib_per_s and growth:
                top = max(growth, key=lambda p: growth[p])
                self._rate_anomaly(watch, "memory-spike",
                                   f"resident memory grew {rate:.0f} MiB/s (limit "
                                   f"{profile.memory_spike_mib_per_s:g}); pid {top} grew "
                                   f"{growth[top] / MIB:.0f} MiB", top,
                                   {"rss_mib": round(rss[top] / MIB, 1),
                                    "rate_mib_per_s": round(rate, 1)})
        if profile.max_syscalls_per_s:
            calls = {p: io[p] - watch.io[p] for p in io if p in watch.io}
            rate = sum(calls.values()) / dt
            if rate > profile.max_syscalls_per_s and calls:
                top = max(calls, key=lambda p: calls[p])
                self._rate_anomaly(watch, "syscall-rate",
                                   f"{rate:.0f} read/write syscalls per second (limit "
                                   f"{profile.max_syscalls_per_s:g})", top,
                                   {"rate_per_s": round(rate)})

    # --- process accounting (instead of notified forks: see proccount.py) ------------

    def _proc_table(self, watch: Watch) -> dict[int, proccount.Proc]:
        table = {}
        for pid in self._members(watch):
            proc = proccount.read_proc(pid)
            if proc is not None:
                table[pid] = proc
        return table

    def _births(self, watch: Watch, fresh: list[proccount.Proc]) -> tuple[int, str]:
        """How many processes the tree created since the last sample, and how that was
        counted. New pids miss a child that lived shorter than a sample interval; in a
        guest with one workload the kernel's count of created tasks does not (it counts
        threads as well, so it is used only when it says more than the pids do)."""
        born = sum(1 for p in fresh if p.pid != watch.root_pid)
        if not self.system_counter or watch.procs_file is not None:
            return born, "new pids"
        total = proccount.tasks_created()
        base, watch.tasks_base = watch.tasks_base, total
        with self._lock:
            alone = sum(1 for w in self._watches.values() if not w.ended) == 1
        if total is None or base is None or not alone or total - base <= born:
            return born, "new pids"
        return total - base, "tasks created"

    def _check_processes(self, watch: Watch, procs: dict[int, proccount.Proc],
                         now: float) -> None:
        profile = watch.profile
        fresh = proccount.new_since(watch.procs, procs)
        watch.procs = procs
        born, counted = self._births(watch, fresh)
        rate = watch.births.add(now, born)
        most = profile.max_processes
        if most and len(procs) > most:
            excess = proccount.newest(procs, int(len(procs) - most), keep=watch.root_pid)
            self._contain_procs(watch, f"{len(procs)} processes alive (limit {most:g})",
                                excess, procs, {"processes": len(procs), "limit": most})
            return
        limit = profile.max_forks_per_s
        if limit and rate > limit:
            offenders = [p for p in fresh if p.pid != watch.root_pid]
            over = int(min(len(offenders), rate - limit))
            self._contain_procs(watch, f"{rate} process creations in the last second "
                                f"(limit {limit:g}, counted by {counted})",
                                offenders[len(offenders) - over:], procs,
                                {"forks_per_s": rate, "limit": limit, "counted_by": counted},
                                created=offenders)

    def _contain_procs(self, watch: Watch, detail: str, excess: list[proccount.Proc],
                       procs: dict[int, proccount.Proc], args: dict,
                       created: list[proccount.Proc] | None = None) -> None:
        """Contain a process limit passed: `excess` are the processes beyond it (newest),
        `created` the ones whose creation counts (default: `excess`). kill: the process
        that created most of them (a fork loop) and its whole subtree; deny: only the
        excess, as if their creation had failed, and their parent goes on; none: report.
        The anomaly names the creator, or when no creator is a member any more the
        newest excess process."""
        act_mono, act_time = time.monotonic(), time.time()
        contain = watch.profile.contain
        forker = proccount.forker_of(created if created is not None else excess, procs)
        shown = forker or (excess[-1] if excess else None)
        pid = shown.pid if shown is not None else None
        program = program_of(pid) if pid else ""  # before it is killed
        zone = self._transient_of(watch, pid) if pid else None
        victims: list[proccount.Proc] = []
        root = None
        if contain == "kill" and forker is not None:
            victims, root = proccount.subtree(forker.pid, procs), forker.pid
        elif contain in ("kill", "deny"):
            victims = excess
        finding = Finding("fork-rate", detail, None, dict(args, killed=len(victims)),
                          rate=True)
        if any(v.pid == watch.root_pid for v in victims):
            # the workload itself goes: its exit must not reach the host before the reason
            # for it, or the zone ends before the host could react
            self._anomaly(watch, finding, pid, program, "killed", act_time, act_mono, None,
                          zone)
            proccount.end(victims, lambda: self._proc_table(watch), root)
            return
        killed = proccount.end(victims, (lambda: self._proc_table(watch)) if root else None,
                               root)
        contained_mono = time.monotonic() if killed else None
        finding = Finding("fork-rate", detail, None, dict(args, killed=len(killed)), rate=True)
        self._anomaly(watch, finding, pid, program, "killed" if killed else "none", act_time,
                      act_mono, contained_mono, zone)

    def _rate_anomaly(self, watch: Watch, category: str, detail: str, pid: int,
                      args: dict) -> None:
        last = watch.last_emit.get(category)
        if last is not None and time.monotonic() - last < RATE_EMIT_PERIOD:
            return
        act_mono, act_time = time.monotonic(), time.time()
        self._contain(watch, Finding(category, detail, None, args, rate=True), pid, act_time,
                      act_mono, None)

    def _check_oom(self, watch: Watch) -> None:
        if watch.oom_file:
            count = read_counter(watch.oom_file, "oom_kill")
        elif watch.procs_file is None:
            count = read_counter("/proc/vmstat", "oom_kill")
        else:
            return
        if count is None:
            return
        if watch.oom_base is not None and count > watch.oom_base:
            act_mono, act_time = time.monotonic(), time.time()
            killed = count - watch.oom_base
            self._anomaly(watch, Finding("oom-kill", f"{killed} process(es) killed by the OOM "
                                         "killer", None, {"oom_kills": killed}),
                          None, "", "none", act_time, act_mono, None)
        watch.oom_base = count

    def _check_drops(self, watch: Watch, now: float) -> None:
        if watch.lost <= watch.lost_reported or not watch.profile.drops_are_anomalies:
            return
        last = watch.last_emit.get("events-dropped")
        if last is not None and now - last < RATE_EMIT_PERIOD:
            return
        new = watch.lost - watch.lost_reported
        watch.lost_reported = watch.lost
        finding = Finding("events-dropped",
                          f"{new} monitoring events lost ({watch.lost} in total)", None,
                          {"lost": watch.lost}, rate=True)
        self._anomaly(watch, finding, None, "", "none", time.time(), now, None)


# the table must know every syscall the filter treats specially
numbers(seccomp.ALWAYS)

__all__ = ["Emit", "Monitor", "ProcReadError"]
