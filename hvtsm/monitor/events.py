"""What an agent link reports, in the lifecycle's terms: anomaly events and link problems
become `AnomalyReport`s, other monitor events audited notes, held code paths typed requests,
channel lines the broker's. Both drivers (the agent in a guest, the agent beside a cgroup
zone) hand their links one `LinkEvents` each.

A pooled guest's link reports for whichever zone the guest serves at the moment; while it
serves none, everything but routine events goes to `DriverEvents.idle` (its pool taints it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from guest_agent.protocol import (
    EVENT_ANOMALY,
    EVENT_CODE_PATH,
    EVENT_DEPUTY,
    EVENT_MONITOR,
    EVENT_STATS,
    EVENT_TRANSIENT,
    Message,
)
from hvtsm.monitor.anomalies import AnomalyReport, from_agent_event, from_link_problem
from hvtsm.monitor.code_path import from_event
from hvtsm.monitor.deputy import DeputyRecord, DeputyReport
from hvtsm.monitor.link import ChannelFault
from hvtsm.zones.base import DriverEvents

log = logging.getLogger(__name__)

#: (zone id, event data): the agent's answer to a `transient` message, for the driver
TransientSink = Callable[[str, dict[str, Any]], None]


class LinkEvents:
    """One link's `on_problem`, `on_event` and `on_channel`, for the zone `zone()` names
    (None: a pooled guest `guest` serving no zone)."""

    def __init__(self, events: DriverEvents, zone: Callable[[], str | None], *,
                 guest: str | None = None, transient: TransientSink | None = None) -> None:
        self.events = events
        self._zone = zone
        self.guest = guest
        self._transient = transient
        #: the agent's counters of the last `stats` event
        self.stats: dict[str, Any] = {}
        #: a link whose going away is expected (its zone is being removed) reports nothing
        self.muted = False

    @classmethod
    def for_zone(cls, events: DriverEvents, zone_id: str, *,
                 transient: TransientSink | None = None) -> LinkEvents:
        return cls(events, lambda: zone_id, transient=transient)

    def problem(self, kind: str, detail: str) -> None:
        if self.muted:
            return
        zone = self._zone()
        if zone is None:
            self._idle(kind, detail)
            return
        report = from_link_problem(kind, detail)
        if report is None:
            self.events.note(zone, f"agent-{kind.replace('_', '-')}", detail)
        else:
            self.events.anomaly(zone, report)

    def event(self, msg: Message) -> None:
        kind = msg.get("kind")
        data = msg.get("data")
        data = data if isinstance(data, dict) else {}
        zone = self._zone()
        if zone is None:
            # its pool judges what is routine (stats, monitor notes) and what taints it
            what = data.get("category")
            self._idle("event", str(kind)[:40] + (f" {str(what)[:40]}" if what else ""))
            return
        if kind == EVENT_ANOMALY:
            self.events.anomaly(zone, from_agent_event(data))
        elif kind == EVENT_MONITOR:
            self.events.note(zone, "monitor", _monitor_text(data))
        elif kind == EVENT_STATS:
            self.stats = data
        elif kind == EVENT_CODE_PATH:
            self._code_path(zone, msg, data)
        elif kind == EVENT_TRANSIENT:
            if self._transient is not None:
                self._transient(zone, data)
        elif kind == EVENT_DEPUTY:
            record = DeputyRecord.parse(data)
            if record is None or record.zone != zone:
                self.events.anomaly(zone, AnomalyReport(
                    "malformed-message", "agent sent a deputy record that cannot be true",
                    "link", {"problem": "invalid_deputy_record"}))
                return
            self.events.deputy(zone, DeputyReport((record,)))
        else:
            self.events.anomaly(zone, AnomalyReport(
                "malformed-message", f"agent sent an event of unknown kind {str(kind)[:40]}",
                "link", {"problem": "unknown_event"}))

    def channel(self, msg: Message) -> None:
        zone = self._zone()
        if zone is None:
            raise ChannelFault("a channel message from a guest that serves no zone")
        self.events.channel(zone, msg)

    def _code_path(self, zone: str, msg: Message, data: dict[str, Any]) -> None:
        workload = msg.get("id") if isinstance(msg.get("id"), str) else None
        request = from_event(data, workload)
        if request is None:
            self.events.anomaly(zone, AnomalyReport(
                "malformed-message", "agent sent a code-path event without a usable hold, "
                "pid or trigger", "link", {"problem": "invalid_code_path"}))
            return
        self.events.code_path(zone, request)

    def _idle(self, kind: str, detail: str) -> None:
        self.events.idle(self.guest or "?", kind, detail)


def _monitor_text(data: dict[str, Any]) -> str:
    mechanisms = data.get("mechanisms")
    warnings = data.get("warnings")
    text = "watching with " + (", ".join(map(str, mechanisms))
                               if isinstance(mechanisms, list) else "?")
    if isinstance(warnings, list) and warnings:
        text += "; " + "; ".join(str(w)[:200] for w in warnings[:8])
    return text
