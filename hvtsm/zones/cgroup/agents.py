"""The agents beside a cgroup driver's zones (hvtsm/monitor/host_agent.py): one per watched
zone, zone with a channel or zone with phases after its start (its deputy keeps them while
no controller runs), a spare started ahead for the next zone (Python and the agent's
imports cost ~140 ms), and each zone's link wired to the driver's `DriverEvents`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Mapping
from typing import Any

from guest_agent.profile import Profile, ProfileError
from guest_agent.protocol import CHANNEL_ADDRESS, CHANNEL_ENV, CHANNEL_NAME_ENV
from guest_agent.seccomp import Installer
from hvtsm.agent_stage import stage_agent
from hvtsm.errors import ZoneError
from hvtsm.monitor import host_agent
from hvtsm.monitor.anomalies import zone_profile
from hvtsm.monitor.events import LinkEvents, TransientSink
from hvtsm.monitor.host_agent import HostAgent
from hvtsm.monitor.link import AgentLink
from hvtsm.restrictions import Restrictions
from hvtsm.zones.base import DriverEvents
from hvtsm.zones.cgroup import launcher, netns
from hvtsm.zones.cgroup.state import CgroupZoneState

log = logging.getLogger(__name__)

#: how long the barrier after a workload's end waits for its agent
FLUSH_TIMEOUT = 2.0


class ZoneAgents:
    def __init__(self, events: DriverEvents, *, on_transient: TransientSink) -> None:
        self.events = events
        self._on_transient = on_transient
        self._agents: dict[str, HostAgent] = {}
        self._sinks: dict[str, LinkEvents] = {}
        self._spare: HostAgent | None = None
        self._spare_lock = threading.Lock()
        self._swept = False
        self._taken = 0
        #: after a controller restart: set once each zone's agent is back, or is not
        self._back: dict[str, threading.Event] = {}
        #: zones whose agent was found gone, told by `back` (once the zone is registered)
        self._gone: dict[str, str] = {}

    # -- assigning --------------------------------------------------------------------------

    def take(self, zone_id: str) -> HostAgent:
        """The spare (started ahead), else a new agent, assigned to the zone; from the
        second zone on, a new spare is started for the zone after this one."""
        with self._spare_lock:
            if not self._swept:
                host_agent.sweep_spares()
                self._swept = True
            agent, self._spare = self._spare, None
            if agent is not None and not agent.usable():
                agent.stop()
                agent = None
            if agent is None:
                agent = HostAgent.launch(_agent_name())
            # a driver's first zone starts no spare: a one-shot `hvtsm run` would start an
            # agent it never uses (fifty of them at once doubled the load of fifty runs);
            # a driver that started one zone is likely to start more
            if self._taken:
                with contextlib.suppress(ZoneError):
                    self._spare = HostAgent.launch(_agent_name())
            self._taken += 1
        agent.assign(zone_id)
        self._agents[zone_id] = agent
        return agent

    def get(self, zone_id: str) -> HostAgent | None:
        return self._agents.get(zone_id)

    def link(self, zone_id: str) -> AgentLink | None:
        """The zone's open link (None: none, or closed)."""
        agent = self._agents.get(zone_id)
        link = agent.link if agent is not None else None
        return link if link is not None and not link.closed else None

    def sink(self, zone_id: str) -> LinkEvents:
        sink = self._sinks.get(zone_id)
        if sink is None:
            sink = self._sinks[zone_id] = LinkEvents.for_zone(
                self.events, zone_id, transient=self._on_transient)
        return sink

    def _connect(self, agent: HostAgent, zone_id: str, *,
                 timeout: float = host_agent.CONNECT_TIMEOUT_S) -> None:
        sink = self.sink(zone_id)
        agent.connect(on_problem=sink.problem, on_event=sink.event, on_channel=sink.channel,
                      timeout=timeout)

    # -- starting a workload ----------------------------------------------------------------

    def watch(self, zone_id: str, state: CgroupZoneState, applied: Restrictions,
              procs_file: str, oom_file: str | None) -> launcher.Watch | None:
        """Connect to the zone's agent and prepare the hand-over of the workload to it (an
        agent that only keeps the zone's schedule is connected, and gets no workload)."""
        agent = self._agents.get(zone_id)
        if agent is None:
            return None
        if state.monitor is None:
            if state.channel is None:  # a channel's agent connects when it is handed over
                self._connect(agent, zone_id)
            return None
        self._connect(agent, zone_id)
        profile = zone_profile(state.monitor, applied)
        try:
            installer = Installer(Profile.from_dict(profile))
        except ProfileError as exc:
            raise ZoneError(f"the monitoring profile is unusable: {exc}",
                            zone_id=zone_id) from exc
        assert agent.hand_over is not None
        return launcher.Watch(installer, agent.hand_over.fileno(),
                              agent.watch_header(profile, procs_file=procs_file,
                                                 oom_file=oom_file))

    def open_channel(self, zone_id: str, name: str,
                     env: Mapping[str, str] | None) -> dict[str, str]:
        """Bind the zone's channel socket in its network namespace, hand it to the zone's
        agent, and return the workload's environment naming it."""
        agent = self._agents.get(zone_id)
        if agent is None:
            raise ZoneError("the zone has no agent to serve its channel", zone_id=zone_id)
        if agent.link is None:  # not watched: connect for the channel alone
            self._connect(agent, zone_id)
        listener = launcher.channel_listener(str(netns.netns_path(zone_id)), zone_id)
        try:
            agent.give_channel(listener, name)
        finally:
            listener.close()  # the agent holds its own copy now
        out = dict(env or {})  # on top of the clean environment (launcher.spawn)
        source = str(stage_agent())  # a copy the zone's unprivileged user can read
        out["PYTHONPATH"] = source + (":" + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
        out[CHANNEL_ENV] = "unix:@" + CHANNEL_ADDRESS
        out[CHANNEL_NAME_ENV] = name
        return out

    def handed_over(self, zone_id: str) -> None:
        agent = self._agents.get(zone_id)
        if agent is not None:
            agent.handed_over()

    # -- while it runs ----------------------------------------------------------------------

    def update(self, zone_id: str, profile: dict[str, Any]) -> None:
        agent = self._agents.get(zone_id)
        if agent is not None:
            agent.update(profile)

    def flush(self, zone_id: str) -> None:
        """A barrier: once the agent answers, everything it sent before has been handed to
        the events (the link's reader works in order). Without a link there is nothing to
        wait for: its loss was reported as an anomaly already."""
        link = self.link(zone_id)
        if link is None:
            return
        try:
            link.ping(FLUSH_TIMEOUT)
        except ZoneError as exc:
            log.info("zone %s: no barrier after the workload's end: %s", zone_id, exc)

    def transient(self, zone_id: str, op: str, **fields: Any) -> None:
        link = self.link(zone_id)
        if link is None:
            raise ZoneError("the zone's agent is not connected", zone_id=zone_id)
        link.transient(zone_id, op, **fields)

    # -- ending -----------------------------------------------------------------------------

    def stop(self, zone_id: str) -> None:
        sink = self._sinks.pop(zone_id, None)
        if sink is not None:
            sink.muted = True  # its agent going away now is no anomaly
        agent = self._agents.pop(zone_id, None)
        if agent is not None:
            agent.stop()

    def close(self) -> None:
        """The controller is done: its spare agent goes."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.stop()

    # -- after a controller restart ---------------------------------------------------------

    def reattach(self, zone_id: str, state: CgroupZoneState) -> None:
        """Take over the zone's running agent; without one, the zone is unwatched (and its
        schedule kept by nobody but this controller), which is an anomaly (fail closed)
        rather than a silent gap."""
        pid, name = state.agent_pid, state.agent_name
        if pid is None or name is None:
            return
        back = self._back[zone_id] = threading.Event()
        sink = self.sink(zone_id)
        agent = HostAgent.reattach(zone_id, pid, name)
        if agent is None:
            # told by `back`: reported now, it could reach the lifecycle before the zone
            # it belongs to is registered there, and be dropped
            self._gone[zone_id] = (f"the zone's agent (pid {pid}) is gone: its processes "
                                   "are no longer watched, nor its schedule kept")
            back.set()
            return
        self._agents[zone_id] = agent

        def connect() -> None:
            try:
                self._connect(agent, zone_id, timeout=15)
            except ZoneError as exc:
                sink.problem("disconnected", f"the zone's agent did not come back: {exc}")
            finally:
                back.set()
        threading.Thread(target=connect, name=f"agent-{zone_id}", daemon=True).start()

    def back(self, zone_id: str, timeout: float) -> AgentLink | None:
        """After `reattach` (its caller registered the zone meanwhile): the zone's link once
        its agent reconnected (its hello is in), None when it did not within `timeout` or
        has no agent; an agent found gone is reported now, as a lost link."""
        event = self._back.get(zone_id)
        if event is not None:
            event.wait(timeout)
        gone = self._gone.pop(zone_id, None)
        if gone is not None:
            self.sink(zone_id).problem("disconnected", gone)
        return self.link(zone_id)


def _agent_name() -> str:
    return f"agent-{os.getpid()}-{secrets.token_hex(4)}"
