"""The agent beside a cgroup zone: the same `guest_agent` program a guest runs, started on
the host as root in the host's namespaces and outside the zone's cgroups (the zone's
limits, freezer and kill never reach it), one per zone.

It talks to the controller over a unix socket it connects to (`/run/hvtsm/agents/<zone>.sock`,
which the controller listens on), so a controller started after a crash can listen there
again and the agent reconnects: monitoring survives the controller. The zone's launcher
hands it each workload's seccomp listener over a second, inherited SOCK_SEQPACKET socket
(`--watch-fd`); the workload's first exec waits in the kernel until the agent answers, so
nothing runs unwatched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guest_agent import protocol
from hvtsm.errors import ZoneError
from hvtsm.monitor.link import AgentLink, EventHandler, ProblemHandler

log = logging.getLogger(__name__)

AGENT_DIR = Path("/run/hvtsm/agents")
#: how long an agent keeps trying to reach a controller that went away
RECONNECT_WINDOW_S = 3600
HEARTBEAT_S = 1.0


def socket_path(zone_id: str) -> Path:
    return AGENT_DIR / f"{zone_id}.sock"


def log_path(zone_id: str) -> Path:
    return AGENT_DIR / f"{zone_id}.log"


def _listen(zone_id: str) -> socket.socket:
    AGENT_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(AGENT_DIR, 0o700)
    path = socket_path(zone_id)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(1)
    except OSError:
        server.close()
        raise
    return server


class HostAgent:
    def __init__(self, zone_id: str, pid: int, server: socket.socket,
                 hand_over: socket.socket | None, proc: subprocess.Popen[bytes] | None) -> None:
        self.zone_id = zone_id
        self.pid = pid
        self._server: socket.socket | None = server
        #: the controller's end of the launcher -> agent socket (None once handed over)
        self.hand_over = hand_over
        self._proc = proc
        self.link: AgentLink | None = None

    @classmethod
    def launch(cls, zone_id: str) -> HostAgent:
        """Start the agent process; `connect` later waits for it (its start-up overlaps
        the zone's own set-up)."""
        try:
            server = _listen(zone_id)
        except OSError as exc:
            raise ZoneError(f"cannot listen for the zone's agent at {socket_path(zone_id)}: "
                            f"{exc.strerror or exc}", zone_id=zone_id) from exc
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        source = str(Path(protocol.__file__).resolve().parent.parent)
        argv = [sys.executable, "-s", "-m", "guest_agent",
                "--connect", f"unix:{socket_path(zone_id)}",
                "--watch-fd", str(theirs.fileno()),
                "--wait-port", str(RECONNECT_WINDOW_S), "--heartbeat", str(HEARTBEAT_S),
                "--log-level", "warning"]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "PYTHONPATH": source, "LANG": "C.UTF-8"}
        try:
            with open(log_path(zone_id), "ab") as log_file:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=log_file, pass_fds=[theirs.fileno()], env=env,
                                        cwd="/", start_new_session=True)
        except OSError as exc:
            server.close()
            ours.close()
            raise ZoneError(f"cannot start the zone's agent: {exc.strerror or exc}",
                            zone_id=zone_id) from exc
        finally:
            theirs.close()
        return cls(zone_id, proc.pid, server, ours, proc)

    @classmethod
    def reattach(cls, zone_id: str, pid: int) -> HostAgent | None:
        """After a controller restart: listen where the running agent reconnects to.
        None when that agent is gone."""
        if not _alive(pid):
            return None
        try:
            server = _listen(zone_id)
        except OSError as exc:
            log.warning("zone %s: cannot listen for its agent again: %s", zone_id, exc)
            return None
        return cls(zone_id, pid, server, None, None)

    def connect(self, *, on_problem: ProblemHandler, on_event: EventHandler,
                timeout: float = 10.0) -> AgentLink:
        """Accept the agent's connection and wait for its hello."""
        assert self._server is not None
        deadline = time.monotonic() + timeout
        self._server.settimeout(0.05)
        conn = None
        while conn is None:
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                if self._proc is not None and self._proc.poll() is not None:
                    raise self._failed(
                        f"it exited with status {self._proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise self._failed(f"it did not connect within {timeout:g} s") from None
        conn.settimeout(None)
        self._server.close()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.zone_id).unlink()  # the agent stays connected; none other may
        link = AgentLink.from_socket(conn, zone_id=self.zone_id, on_problem=on_problem,
                                     on_event=on_event)
        try:
            hello = link.wait_hello(max(0.1, deadline - time.monotonic()))
        except ZoneError:
            link.close()
            raise
        if "monitor:seccomp" not in hello.capabilities:
            link.close()
            raise self._failed("it cannot use seccomp user notification on this host "
                               "(kernel without CONFIG_SECCOMP_FILTER, or not x86_64)")
        self.link = link
        return link

    def _failed(self, why: str) -> ZoneError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = log_path(self.zone_id).read_text(errors="replace")[-600:].strip()
        return ZoneError(f"the zone's agent (pid {self.pid}) is not usable: {why}",
                         zone_id=self.zone_id,
                         hint=f"its log {log_path(self.zone_id)} says: {tail}" if tail else None)

    def watch_header(self, profile: dict[str, Any], *, procs_file: str,
                     oom_file: str | None) -> bytes:
        """What the launcher sends with the workload's seccomp listener."""
        return json.dumps({"id": self.zone_id, "profile": profile, "procs_file": procs_file,
                           "oom_file": oom_file}).encode()

    def handed_over(self) -> None:
        """The workload started: the launcher no longer needs our end."""
        if self.hand_over is not None:
            self.hand_over.close()
            self.hand_over = None

    def update(self, profile: dict[str, Any]) -> None:
        if self.link is not None and not self.link.closed:
            self.link.update_profile(self.zone_id, profile)

    def stop(self) -> None:
        """End the agent (the zone is gone). Idempotent."""
        if self.link is not None:
            self.link.on_problem = None  # its going away now is no anomaly
            self.link.close()
        for sock in (self._server, self.hand_over):
            if sock is not None:
                sock.close()
        self._server = self.hand_over = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2
        while _alive(self.pid, self._proc) and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(1)
        for path in (socket_path(self.zone_id), log_path(self.zone_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _alive(pid: int, proc: subprocess.Popen[bytes] | None = None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"guest_agent" in f.read()
    except OSError:
        return False


def stop_orphan(zone_id: str, pid: Any) -> list[str]:
    """`hvtsm cleanup`: end a zone's agent left behind by a dead controller."""
    removed = []
    if isinstance(pid, int) and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        removed.append(f"agent pid {pid} killed")
    for path in (socket_path(zone_id), log_path(zone_id)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed
