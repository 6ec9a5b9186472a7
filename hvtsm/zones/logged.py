"""`DriverEvents` for drivers used outside a lifecycle (`hvtsm cleanup`, image builds): what
they report is logged, and nothing is reacted to."""

from __future__ import annotations

import logging
from collections.abc import Callable

from guest_agent.protocol import Message
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.deputy import DeputyReport
from hvtsm.monitor.link import ChannelFault

log = logging.getLogger(__name__)


class LoggedEvents:
    def __init__(self) -> None:
        self._idle: list[Callable[[str, str, str], None]] = []

    def subscribe_idle(self, sink: Callable[[str, str, str], None]) -> None:
        """A pool of guests booted outside a lifecycle still hears of their problems."""
        self._idle.append(sink)

    def anomaly(self, zone_id: str, report: AnomalyReport) -> None:
        log.warning("zone %s: anomaly %s: %s", zone_id, report.category, report.detail)

    def note(self, zone_id: str, kind: str, detail: str) -> None:
        log.info("zone %s: %s: %s", zone_id, kind, detail)

    def code_path(self, zone_id: str, request: CodePath) -> None:
        # nobody can place it: the agent's hold times out and refuses the call
        log.warning("zone %s: code path %s with no lifecycle to place it", zone_id,
                    request.describe())

    def channel(self, zone_id: str, message: Message) -> None:
        raise ChannelFault("no broker outside a lifecycle")

    def deputy(self, zone_id: str, report: DeputyReport) -> None:
        for record in report.records:
            log.warning("zone %s: its agent applied phase %d: %s", zone_id, record.phase,
                        record.describe())

    def idle(self, guest: str, kind: str, detail: str) -> None:
        if not self._idle:
            log.warning("guest %s (no zone): %s: %s", guest, kind, detail)
        for sink in list(self._idle):
            sink(guest, kind, detail)
