"""The agent beside a cgroup zone: the same `guest_agent` program a guest runs, started on
the host as root in the host's namespaces and outside the zone's cgroups (the zone's
limits, freezer and kill never reach it), one per zone.

It talks to the controller over a unix socket it connects to (`/run/hvtsm/agents/<name>.sock`,
which the controller listens on), so a controller started after a crash can listen there
again and the agent reconnects: monitoring survives the controller, and so does the zone's
schedule, which the agent keeps meanwhile (its deputy: guest_agent/deputy.py). Python and
the agent's imports take ~140 ms here, so a driver keeps one agent started ahead (a spare)
and gives it to the next zone; `<zone>.agent` records which agent (name, pid) watches which zone.
The zone's launcher hands it each workload's seccomp listener over a second, inherited
SOCK_SEQPACKET socket (`--watch-fd`); the workload's first exec waits in the kernel until
the agent answers, so nothing runs unwatched. A third (`--channel-fd`) carries the zone's
channel socket, which the controller binds inside the zone's network namespace
(`give_channel`): the agent serves the workload's channel on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guest_agent import protocol
from hvtsm.errors import ZoneError
from hvtsm.files import read_tail
from hvtsm.monitor.link import AgentLink, ChannelHandler, EventHandler, ProblemHandler

log = logging.getLogger(__name__)

AGENT_DIR = Path("/run/hvtsm/agents")
#: how long an agent keeps trying to reach a controller that went away
RECONNECT_WINDOW_S = 3600
HEARTBEAT_S = 1.0
#: how long an agent that is alive may take to connect: ~0.2 s alone, over 10 s seen with
#: fifty zones starting at once on two cores (an agent that exits fails at once)
CONNECT_TIMEOUT_S = 60.0


def socket_path(name: str) -> Path:
    return AGENT_DIR / f"{name}.sock"


def log_path(name: str) -> Path:
    return AGENT_DIR / f"{name}.log"


def record_path(zone_id: str) -> Path:
    return AGENT_DIR / f"{zone_id}.agent"


def _listen(name: str) -> socket.socket:
    AGENT_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(AGENT_DIR, 0o700)
    path = socket_path(name)
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
    def __init__(self, name: str, pid: int, server: socket.socket,
                 hand_over: socket.socket | None, proc: subprocess.Popen[bytes] | None,
                 zone_id: str | None = None,
                 channel_hand: socket.socket | None = None) -> None:
        #: what its socket and log are named after (a spare has no zone yet)
        self.name = name
        self.zone_id = zone_id
        self.pid = pid
        self._server: socket.socket | None = server
        #: the controller's end of the launcher -> agent socket (None once handed over)
        self.hand_over = hand_over
        #: the controller's end of the socket that carries the zone's channel socket
        self.channel_hand = channel_hand
        self._proc = proc
        self.link: AgentLink | None = None

    @classmethod
    def launch(cls, name: str) -> HostAgent:
        """Start an agent process; `assign` gives it a zone and `connect` takes its
        connection (its hello waits in the socket until then)."""
        try:
            server = _listen(name)
        except OSError as exc:
            raise ZoneError(f"cannot listen for a zone agent at {socket_path(name)}: "
                            f"{exc.strerror or exc}") from exc
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        chan_ours, chan_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        source = agent_source()
        argv = [sys.executable, "-s", "-m", "guest_agent",
                "--connect", f"unix:{socket_path(name)}",
                "--watch-fd", str(theirs.fileno()),
                "--channel-fd", str(chan_theirs.fileno()),
                "--wait-port", str(RECONNECT_WINDOW_S), "--heartbeat", str(HEARTBEAT_S),
                "--host-pid", str(os.getpid()), "--log-level", "warning"]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "PYTHONPATH": source, "LANG": "C.UTF-8"}
        try:
            with open(log_path(name), "ab") as log_file:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=log_file,
                                        pass_fds=[theirs.fileno(), chan_theirs.fileno()],
                                        env=env, cwd="/", start_new_session=True)
        except OSError as exc:
            server.close()
            ours.close()
            chan_ours.close()
            raise ZoneError(f"cannot start a zone agent: {exc.strerror or exc}") from exc
        finally:
            theirs.close()
            chan_theirs.close()
        return cls(name, proc.pid, server, ours, proc, channel_hand=chan_ours)

    def usable(self) -> bool:
        """A spare that is still running and not yet connected."""
        return self._server is not None and _alive(self.pid, self._proc)

    def assign(self, zone_id: str) -> None:
        self.zone_id = zone_id
        AGENT_DIR.mkdir(parents=True, exist_ok=True)
        record_path(zone_id).write_text(json.dumps({"name": self.name, "pid": self.pid}))

    @classmethod
    def reattach(cls, zone_id: str, pid: int, name: str) -> HostAgent | None:
        """After a controller restart: listen where the running agent reconnects to.
        None when that agent is gone."""
        if not _alive(pid):
            return None
        try:
            server = _listen(name)
        except OSError as exc:
            log.warning("zone %s: cannot listen for its agent again: %s", zone_id, exc)
            return None
        return cls(name, pid, server, None, None, zone_id)

    def connect(self, *, on_problem: ProblemHandler, on_event: EventHandler,
                timeout: float = CONNECT_TIMEOUT_S,
                on_channel: ChannelHandler | None = None) -> AgentLink:
        """Accept the agent's connection and wait for its hello. Waits on the listening
        socket and on the agent's pidfd at once: an agent that exits fails the zone at that
        moment, and one that is alive but slow (many starting at once on a loaded host) is
        waited for up to `timeout`."""
        assert self._server is not None
        deadline = time.monotonic() + timeout
        conn = self._accept(deadline, timeout)
        conn.settimeout(None)
        self._server.close()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.name).unlink()  # the agent stays connected; none other may
        link = AgentLink.from_socket(conn, zone_id=self.zone_id, on_problem=on_problem,
                                     on_event=on_event, on_channel=on_channel)
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

    def _accept(self, deadline: float, timeout: float) -> socket.socket:
        assert self._server is not None
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise self._failed(self._exit_words()) from None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._server, selectors.EVENT_READ, "socket")
                sel.register(pidfd, selectors.EVENT_READ, "exit")
                while True:
                    ready = sel.select(max(0.0, deadline - time.monotonic()))
                    if not ready:
                        raise self._failed(f"it did not connect within {timeout:g} s")
                    if any(key.data == "socket" for key, _ in ready):
                        self._server.setblocking(True)
                        conn, _ = self._server.accept()
                        return conn
                    raise self._failed(self._exit_words())
        finally:
            os.close(pidfd)

    def _exit_words(self) -> str:
        if self._proc is not None and self._proc.poll() is not None:
            return f"it exited with status {self._proc.returncode}"
        return "it exited before it connected"

    def _failed(self, why: str) -> ZoneError:
        tail = ""
        with contextlib.suppress(OSError):
            tail = read_tail(log_path(self.name), 600).decode(errors="replace").strip()
        return ZoneError(f"the zone's agent (pid {self.pid}) is not usable: {why}",
                         zone_id=self.zone_id,
                         hint=f"its log {log_path(self.name)} says: {tail}" if tail else None)

    def watch_header(self, profile: dict[str, Any], *, procs_file: str,
                     oom_file: str | None) -> bytes:
        """What the launcher sends with the workload's seccomp listener."""
        assert self.zone_id is not None
        return json.dumps({"id": self.zone_id, "profile": profile, "procs_file": procs_file,
                           "oom_file": oom_file}).encode()

    def give_channel(self, listener: socket.socket, name: str) -> None:
        """Hand the agent the zone's listening channel socket (bound in the zone's network
        namespace); the agent serves the workload's channel on it from now on."""
        if self.channel_hand is None:
            raise ZoneError("this zone's agent cannot take a channel (it was not started by "
                            "this controller)", zone_id=self.zone_id)
        header = json.dumps({"id": self.zone_id, "name": name}).encode()
        try:
            socket.send_fds(self.channel_hand, [header], [listener.fileno()])
        except OSError as exc:
            raise self._failed(f"it did not take the channel socket: "
                               f"{exc.strerror or exc}") from exc

    def handed_over(self) -> None:
        """The workload started: the launcher no longer needs our end."""
        if self.hand_over is not None:
            self.hand_over.close()
            self.hand_over = None

    def update(self, profile: dict[str, Any]) -> None:
        if self.link is not None and not self.link.closed and self.zone_id is not None:
            self.link.update_profile(self.zone_id, profile)

    def stop(self) -> None:
        """End the agent (the zone is gone). Idempotent."""
        if self.link is not None:
            # its going away is no anomaly: whoever listens to the link was told (muted)
            self.link.close()
        for sock in (self._server, self.hand_over, self.channel_hand):
            if sock is not None:
                sock.close()
        self._server = self.hand_over = self.channel_hand = None
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
        paths = [socket_path(self.name), log_path(self.name)]
        if self.zone_id is not None:
            paths.append(record_path(self.zone_id))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def agent_source() -> str:
    """The directory holding the guest_agent package (the agent's and, for the channel
    client, the workload's PYTHONPATH)."""
    return str(Path(protocol.__file__).resolve().parent.parent)


def _alive(pid: int, proc: subprocess.Popen[bytes] | None = None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"guest_agent" in f.read()
    except OSError:
        return False


def recorded(zone_id: str) -> tuple[str, int] | None:
    """(name, pid) of the agent watching `zone_id`, from its record."""
    try:
        data = json.loads(record_path(zone_id).read_text())
        return str(data["name"]), int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_zones() -> set[str]:
    return {p.stem for p in AGENT_DIR.glob("*.agent")}


def stop_orphan(zone_id: str) -> list[str]:
    """`hvtsm cleanup`: end a zone's agent left behind by a dead controller."""
    removed = []
    found = recorded(zone_id)
    paths = [record_path(zone_id)]
    if found is not None:
        name, pid = found
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            removed.append(f"agent pid {pid} killed")
        paths += [socket_path(name), log_path(name)]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed


def would_stop_orphan(zone_id: str) -> list[str]:
    """What `stop_orphan` would do now (nothing is changed)."""
    found = recorded(zone_id)
    if found is not None and _alive(found[1]):
        return [f"agent pid {found[1]} killed"]
    return []


def sweep_spares() -> list[str]:
    """Files of spare agents whose controller died (the spare itself exits when its host
    goes: it had nothing to watch). Agents given to zones are kept: their records name them."""
    if not AGENT_DIR.is_dir():
        return []
    assigned = {found[0] for z in recorded_zones() if (found := recorded(z)) is not None}
    removed = []
    for path in [*AGENT_DIR.glob("agent-*.sock"), *AGENT_DIR.glob("agent-*.log")]:
        parts = path.stem.split("-")
        if path.stem in assigned or len(parts) != 3 or not parts[1].isdigit():
            continue
        if not os.path.exists(f"/proc/{parts[1]}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(str(path))
    return removed
