"""Where what an agent link reports goes: anomaly events and link problems become
`AnomalyReport`s for the manager, other monitor events become audited notes. Both drivers
(the agent in a guest, the agent beside a cgroup zone) wire their links through here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from guest_agent.protocol import (
    EVENT_ANOMALY,
    EVENT_CODE_PATH,
    EVENT_MONITOR,
    EVENT_STATS,
    EVENT_TRANSIENT,
    Message,
)
from hvtsm.monitor.anomalies import AnomalyReport, from_agent_event, from_link_problem
from hvtsm.monitor.code_path import CodePath, from_event
from hvtsm.monitor.link import ChannelFault, ChannelHandler, EventHandler, ProblemHandler

log = logging.getLogger(__name__)

AnomalySink = Callable[[str, AnomalyReport], None]
NoteSink = Callable[[str, str, str], None]
#: (zone id, request): a held code path for the manager (transient zones)
CodePathSink = Callable[[str, CodePath], None]
#: (zone id, event data): the agent's answer to a `transient` message, for the driver
TransientSink = Callable[[str, dict[str, Any]], None]
#: (zone id, channel_send or channel_ack message): the broker's `on_message`
ChannelSink = Callable[[str, Message], None]


class MonitorHooks:
    """Set by the manager on a driver (`driver.anomaly`, `driver.report`); a driver's links
    call them through `handlers`. Until the manager sets them, reports are logged."""

    def __init__(self) -> None:
        self.anomaly: AnomalySink | None = None
        self.report: NoteSink | None = None
        self.code_path: CodePathSink | None = None
        #: set by the driver itself: acknowledgements of `transient` messages
        self.transient: TransientSink | None = None
        #: last `stats` event data per zone (counters the agent keeps)
        self.stats: dict[str, dict[str, Any]] = {}
        #: where a zone's channel messages go (the manager's broker)
        self.channel: ChannelSink | None = None

    def raise_anomaly(self, zone_id: str, report: AnomalyReport) -> None:
        sink = self.anomaly
        if sink is None:
            log.warning("zone %s: anomaly %s: %s", zone_id, report.category, report.detail)
            return
        sink(zone_id, report)

    def note(self, zone_id: str, kind: str, detail: str) -> None:
        sink = self.report
        if sink is None:
            log.info("zone %s: %s: %s", zone_id, kind, detail)
            return
        sink(zone_id, kind, detail)

    def handlers(self, zone_id: str) -> tuple[ProblemHandler, EventHandler]:
        def on_problem(kind: str, detail: str) -> None:
            report = from_link_problem(kind, detail)
            if report is None:
                self.note(zone_id, f"agent-{kind.replace('_', '-')}", detail)
            else:
                self.raise_anomaly(zone_id, report)

        def on_event(msg: Message) -> None:
            kind = msg.get("kind")
            data = msg.get("data")
            data = data if isinstance(data, dict) else {}
            if kind == EVENT_ANOMALY:
                self.raise_anomaly(zone_id, from_agent_event(data))
            elif kind == EVENT_MONITOR:
                mechanisms = data.get("mechanisms")
                warnings = data.get("warnings")
                text = "watching with " + (", ".join(map(str, mechanisms))
                                           if isinstance(mechanisms, list) else "?")
                if isinstance(warnings, list) and warnings:
                    text += "; " + "; ".join(str(w)[:200] for w in warnings[:8])
                self.note(zone_id, "monitor", text)
            elif kind == EVENT_STATS:
                self.stats[zone_id] = data
            elif kind == EVENT_CODE_PATH:
                self._code_path(zone_id, msg, data)
            elif kind == EVENT_TRANSIENT:
                if self.transient is not None:
                    self.transient(zone_id, data)
            else:
                self.raise_anomaly(zone_id, AnomalyReport(
                    "malformed-message", f"agent sent an event of unknown kind {str(kind)[:40]}",
                    "link", {"problem": "unknown_event"}))
        return on_problem, on_event


    def _code_path(self, zone_id: str, msg: Message, data: dict[str, Any]) -> None:
        workload = msg.get("id") if isinstance(msg.get("id"), str) else None
        request = from_event(data, workload)
        if request is None:
            self.raise_anomaly(zone_id, AnomalyReport(
                "malformed-message", "agent sent a code-path event without a usable hold, "
                "pid or trigger", "link", {"problem": "invalid_code_path"}))
            return
        sink = self.code_path
        if sink is None:
            # nobody can place it: the agent's hold times out and refuses the call
            log.warning("zone %s: code path %s with no manager to place it", zone_id,
                        request.describe())
            return
        sink(zone_id, request)

    def channel_handler(self, zone_id: str) -> ChannelHandler:
        """The `on_channel` of a zone's link: its messages to the broker (none: a fault)."""
        def on_channel(msg: Message) -> None:
            sink = self.channel
            if sink is None:
                raise ChannelFault("this controller has no channel broker")
            sink(zone_id, msg)
        return on_channel


class HookedDriver:
    """For drivers: `anomaly` and `report`, which the manager sets, live in `hooks`."""

    hooks: MonitorHooks

    @property
    def anomaly(self) -> AnomalySink | None:
        return self.hooks.anomaly

    @anomaly.setter
    def anomaly(self, sink: AnomalySink | None) -> None:
        self.hooks.anomaly = sink

    @property
    def report(self) -> NoteSink | None:
        return self.hooks.report

    @report.setter
    def report(self, sink: NoteSink | None) -> None:
        self.hooks.report = sink

    @property
    def code_path(self) -> CodePathSink | None:
        return self.hooks.code_path

    @code_path.setter
    def code_path(self, sink: CodePathSink | None) -> None:
        self.hooks.code_path = sink

    @property
    def channels(self) -> ChannelSink | None:
        return self.hooks.channel

    @channels.setter
    def channels(self, sink: ChannelSink | None) -> None:
        self.hooks.channel = sink
