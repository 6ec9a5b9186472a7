"""Workloads the agent starts: each in its own session and process group, stdin from
/dev/null, stdout and stderr streamed to the host as ``output`` messages, its exit reported
once the output has been drained."""

from __future__ import annotations

import codecs
import contextlib
import os
import pwd
import shutil
import subprocess
import threading
import time
from typing import Any, Callable

from guest_agent.protocol import OUTPUT_CHUNK_BYTES, Message, output_messages

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: after the process ended, how long its output pipes may stay quiet before ``exit`` is
#: sent anyway (a background child can hold them open for ever)
DRAIN_QUIET = 2.0


class StartError(Exception):
    """The workload could not be started; the text says why."""


def base_env(name: str | None = None, home: str | None = None) -> dict[str, str]:
    """The small clean environment every workload starts from, in a guest and beside a
    cgroup zone alike: nothing of the starter's own (init's, the controller's)."""
    out = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": home or "/", "TERM": "dumb"}
    if name is not None:
        out.update(USER=name, LOGNAME=name)
    return out


def build_env(env: dict[str, str] | None, user: pwd.struct_passwd | None) -> dict[
        str, str]:
    """The clean environment, then the host's `env` on top."""
    out = base_env(None, None) if user is None else base_env(user.pw_name, user.pw_dir)
    out.update(env or {})
    return out


def default_cwd(cwd: str | None, entry: pwd.struct_passwd | None) -> str:
    """Where a workload starts: `cwd`, else its user's home if there is one, else /."""
    if cwd:
        return cwd
    if entry is not None and entry.pw_dir and os.path.isdir(entry.pw_dir):
        return entry.pw_dir
    return "/"


def lookup_user(user: Any) -> pwd.struct_passwd:
    try:
        if isinstance(user, int):
            return pwd.getpwuid(user)
        return pwd.getpwnam(str(user))
    except KeyError:
        raise StartError(f"no such user in the guest: {user}") from None


#: start message's stdout/stderr value -> subprocess target
_TARGETS = {"stream": subprocess.PIPE, "discard": subprocess.DEVNULL, "stdout": subprocess.STDOUT}


#: the agent's own nice value (it must outrun a spinning workload); workloads get 0
AGENT_NICE = -10


def _child_setup(preexec_fn: Callable[[], None] | None) -> Callable[[], None]:
    def setup() -> None:
        # raising the nice value needs no privilege, so this works after the user switch
        os.setpriority(os.PRIO_PROCESS, 0, 0)
        if preexec_fn is not None:
            preexec_fn()

    return setup


def spawn(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
          user: Any = None, stdout: str = "stream", stderr: str = "stream",
          preexec_fn: Callable[[], None] | None = None,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start `argv`. `preexec_fn` runs in the child after the user switch, just before the
    exec (the monitor's seccomp install): then the program is looked up in PATH here so
    the child makes exactly one exec, the one the monitor lets through as the first.
    `pass_fds` stay open in the child (a standby's request socket)."""
    entry = lookup_user(user) if user is not None else None
    kwargs: dict[str, Any] = {}
    if entry is not None:
        kwargs.update(user=entry.pw_uid, group=entry.pw_gid,
                      extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid))
    full_env = build_env(env, entry)
    kwargs["preexec_fn"] = _child_setup(preexec_fn)
    if preexec_fn is not None and "/" not in argv[0]:
        found = shutil.which(argv[0], path=full_env.get("PATH", DEFAULT_PATH))
        if found is None:
            raise StartError(f"cannot start {argv[0]}: not found in PATH")
        kwargs["executable"] = found
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=_TARGETS[stdout], stderr=_TARGETS[stderr],
            cwd=default_cwd(cwd, entry),
            env=full_env, start_new_session=True, close_fds=True, pass_fds=pass_fds,
            **kwargs)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise StartError(f"cannot start {argv[0]}: {e}") from None


class Workload:
    """One started program; its three threads report to `send` (never blocking the
    agent's reader): output through `send_output`, which may block (backpressure)."""

    def __init__(self, workload_id: str, popen: subprocess.Popen[bytes],
                 send: Callable[[Message], bool],
                 send_output: Callable[[Message, int], bool],
                 on_end: Callable[[Workload, bool], None]) -> None:
        self.id = workload_id
        self.popen = popen
        self.pid = popen.pid
        self._send = send
        self._send_output = send_output
        self._on_end = on_end
        self._progress = time.monotonic()
        self._busy = 0
        self._lock = threading.Lock()
        self.status: int | None = None
        self._readers: list[threading.Thread] = []

    def begin(self) -> None:
        for stream, pipe in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            if pipe is None:  # discarded, or joined to stdout
                continue
            t = threading.Thread(target=self._pump, args=(stream, pipe),
                                 name=f"out-{self.id}-{stream}", daemon=True)
            t.start()
            self._readers.append(t)
        threading.Thread(target=self._wait, name="wait-" + self.id, daemon=True).start()

    def _pump(self, stream: str, pipe: Any) -> None:
        try:
            self._pump_fd(stream, pipe.fileno())
        finally:
            pipe.close()

    def _pump_fd(self, stream: str, fd: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = os.read(fd, OUTPUT_CHUNK_BYTES)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            text = decoder.decode(data, final=not data)
            if text:
                with self._lock:
                    self._busy += 1
                try:
                    for msg in output_messages(self.id, stream, text):
                        self._send_output(msg, len(data))
                finally:
                    with self._lock:
                        self._busy -= 1
                        self._progress = time.monotonic()
            if not data:
                break

    def _wait(self) -> None:
        status = self.popen.wait()
        while any(t.is_alive() for t in self._readers):
            for t in self._readers:
                t.join(0.05)
            with self._lock:
                quiet = not self._busy and time.monotonic() - self._progress > DRAIN_QUIET
            if quiet:
                break
        self.status = status
        self._on_end(self, self._send({"type": "exit", "id": self.id, "status": status}))

    def signal(self, sig: int) -> None:
        """`sig` to the whole process group; ProcessLookupError when nothing is left."""
        if self.status is not None:
            raise ProcessLookupError(f"workload {self.id} has exited")
        os.killpg(self.pid, sig)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.pid, 9)
