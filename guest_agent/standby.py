"""Standby workloads: a runtime process the agent starts ahead of a request, watched exactly
as a workload (its user, the seccomp filter installed before its first instruction, the
profile's fanotify marks), that waits on a socket for the one request it will serve.

A warm request then pays neither the watched start (fork, filter install, first exec's
notification) nor the interpreter's own start: the agent hands the request to the
standby, which becomes the request's workload (its pipes are the workload's pipes, its
exit the workload's exit) and is never used again.

Modes (``standby.mode``): ``python`` -- the loader is the request's interpreter; it runs
the request's script with runpy as ``python3 script args...`` would. ``exec`` -- the loader
execs the request's program (``/bin/sh script args...``); the monitor takes that exec as
the workload's own first one.

Before a request goes to a standby, `misfit` says why it must not (the request then
starts normally): another user, another runtime, output not streamed, a profile whose
filter would notify calls the standby's filter does not (the filter is fixed at install),
interpreter start-up variables the loader cannot apply after the fact.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from typing import Any

from guest_agent.protocol import STANDBY_MODES

#: what the loader writes when it is ready for its request (imports done)
READY = b"ready\n"
#: how long a standby may take to become ready
READY_TIMEOUT = 60.0
#: how long the loader may take to take its request (it answers by closing its socket)
TAKE_TIMEOUT = 10.0
#: environment variables python reads at its start only: a request that sets one runs in
#: a fresh interpreter (PYTHONPATH is applied to sys.path by the loader)
_STARTUP_VARS = frozenset({
    "PYTHONHOME", "PYTHONSTARTUP", "PYTHONOPTIMIZE", "PYTHONDEBUG", "PYTHONINSPECT",
    "PYTHONUNBUFFERED", "PYTHONVERBOSE", "PYTHONCASEOK", "PYTHONDONTWRITEBYTECODE",
    "PYTHONPYCACHEPREFIX", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONNOUSERSITE",
    "PYTHONUSERBASE", "PYTHONWARNINGS", "PYTHONFAULTHANDLER", "PYTHONTRACEMALLOC",
    "PYTHONPROFILEIMPORTTIME", "PYTHONASYNCIODEBUG", "PYTHONMALLOC", "PYTHONMALLOCSTATS",
    "PYTHONLEGACYWINDOWSFSENCODING", "PYTHONUTF8", "PYTHONDEVMODE", "PYTHONSAFEPATH",
    "PYTHONWARNDEFAULTENCODING", "PYTHONNODEBUGRANGES", "PYTHONPLATLIBDIR",
    "PYTHONBREAKPOINT", "PYTHONCOERCECLOCALE", "PYTHONEXECUTABLE"})

#: run as ``python3 -c LOADER <fd>``: imports only what it needs itself (runpy's import
#: and pkgutil's, which run_path imports when first called, cost a TCG guest a few hundred
#: ms: done ahead; no json, whose re/enum imports the workload would carry and tear down),
#: says it is ready, waits for one request (a length line, then mode, cwd, argc, argv...,
#: KEY=VALUE... separated by NUL bytes, as execve itself takes them), then becomes it.
#: Its end (`leave`) is Python's own exit without the teardown of every module and object,
#: which costs a TCG guest 70-140 ms against 12-22 ms: non-daemon threads are joined,
#: atexit functions run, an exit code is what `python3 script` would return (a string is
#: printed, 120 when stdout cannot be flushed), and every open file object is flushed,
#: as its finalizer would have done.
LOADER = r"""# hvtsm standby
import os, pkgutil, runpy, sys
fd = int(sys.argv[1])
os.write(fd, b"ready\n")
def take(n):
    got = b""
    while len(got) < n:
        chunk = os.read(fd, n - len(got))
        if not chunk:
            os._exit(0)
        got += chunk
    return got
head = b""
while not head.endswith(b"\n"):
    head += take(1)
parts = [p.decode("utf-8", "surrogateescape") for p in take(int(head)).split(b"\0")]
mode, cwd, argc = parts[0], parts[1], int(parts[2])
argv = parts[3:3 + argc]
env = dict(p.split("=", 1) for p in parts[3 + argc:])
os.chdir(cwd)
os.environ.clear()
os.environ.update(env)
if mode == "exec":
    os.set_inheritable(fd, False)
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:
        os.close(fd)
        sys.stderr.write("%s: %s\n" % (argv[0], e.strerror))
        sys.stderr.flush()
        os._exit(127)
path = argv[1]
sys.argv = argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(path))
sys.path[1:1] = [p for p in env.get("PYTHONPATH", "").split(":") if p]
os.close(fd)
del take, head, parts, mode, cwd, argc, argv, env, fd
def leave(code):
    import _io, atexit, gc
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    atexit._run_exitfuncs()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(str(code) + "\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = 120
    for obj in gc.get_objects():
        if isinstance(obj, _io._IOBase) and obj is not sys.stdout and obj is not sys.stderr:
            try:
                if not obj.closed:
                    obj.flush()
            except Exception:
                pass
    os._exit(code & 0xFF)
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as e:
    leave(e.code)
except BaseException as e:
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != path:
        tb = tb.tb_next
    if tb is not None:
        e.with_traceback(tb)
    sys.excepthook(type(e), e, e.__traceback__)
    leave(1)
leave(0)
"""


class StandbyError(Exception):
    """The standby could not be prepared or could not take its request."""


class Standby:
    """One prepared runtime process; `sock` is the agent's end of its request socket."""

    def __init__(self, standby_id: str, mode: str, program: str, uid: int,
                 popen: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.id = standby_id
        self.mode = mode
        #: what a request's argv[0] must be (python mode: the loader's interpreter)
        self.program = program
        self.uid = uid
        self.popen = popen
        self.pid = popen.pid
        self.sock = sock
        self.prepared = time.time()
        self.ready = threading.Event()
        self.used = False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the loader said ready; StandbyError when it died or took too long."""
        self.sock.settimeout(timeout)
        buf = b""
        try:
            while not buf.endswith(b"\n") and len(buf) < 64:
                chunk = self.sock.recv(64)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise StandbyError(f"standby {self.id} (pid {self.pid}) not ready: {e}") from None
        if buf != READY:
            status = self.popen.poll()
            raise StandbyError(f"standby {self.id} (pid {self.pid}) did not become ready "
                               f"(exit status {status}, said {buf[:40]!r})")
        self.ready.set()

    def misfit(self, argv: list[str], uid: int, stdout: str, stderr: str,
               env: dict[str, str] | None, covered: bool) -> str | None:
        """Why this request must not go to the standby, or None."""
        if self.used:
            return "the standby already served a request"
        if not self.ready.is_set():
            return "the standby is not ready yet"
        status = self.popen.poll()
        if status is not None:
            return f"the standby exited (status {status})"
        if uid != self.uid:
            return f"the request runs as uid {uid}, the standby as uid {self.uid}"
        if not _same_program(argv[0], self.program):
            return f"the request runs {argv[0]}, the standby is for {self.program}"
        if self.mode == "python":
            if len(argv) < 2 or argv[1].startswith("-"):
                return "the request passes options to the interpreter"
            startup = sorted(set(env or {}) & _STARTUP_VARS)
            if startup:
                return "the request sets interpreter start-up variables " + ", ".join(startup)
        if any("\0" in a for a in argv) or any("\0" in k or "=" in k or "\0" in v
                                                 for k, v in (env or {}).items()):
            return "the request's argv or environment holds NUL bytes or bad names"
        if stdout != "stream" or stderr != "stream":
            return "the request does not stream both outputs"
        if not covered:
            return ("the request's profile needs system calls the standby's filter does "
                    "not notify")
        return None

    def hand_over(self, argv: list[str], env: dict[str, str], cwd: str,
                  timeout: float = TAKE_TIMEOUT) -> None:
        """Send the request; return once the loader took it (its socket closed: python
        mode just before the script runs, exec mode at the exec). StandbyError if not."""
        self.used = True
        fields = [self.mode, cwd, str(len(argv)), *argv,
                  *(f"{k}={v}" for k, v in env.items())]
        payload = b"\0".join(f.encode("utf-8", "surrogateescape") for f in fields)
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(str(len(payload)).encode() + b"\n" + payload)
            while self.sock.recv(64):
                pass
        except OSError as e:
            raise StandbyError(f"standby {self.id} (pid {self.pid}) did not take the "
                               f"request: {e}") from None
        finally:
            self.sock.close()

    def discard(self) -> None:
        """Kill an unused standby (its whole process group) and reap it."""
        self.used = True
        with contextlib.suppress(OSError):
            os.killpg(self.pid, 9)
        self.sock.close()
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        threading.Thread(target=self.popen.wait, name=f"reap-{self.id}", daemon=True).start()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "prepared": round(self.prepared, 3),
                "mode": self.mode}


def request_socket() -> tuple[socket.socket, socket.socket]:
    """(agent end, standby end): the standby end is inherited by the loader."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.set_inheritable(False)
    theirs.set_inheritable(True)
    return mine, theirs


def _same_program(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.realpath(a) == os.path.realpath(b) and os.path.isabs(a)
    except (OSError, ValueError):
        return False


__all__ = ["LOADER", "STANDBY_MODES", "Standby", "StandbyError", "request_socket"]
