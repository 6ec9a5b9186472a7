"""What drivers report, in order: the lifecycle's `DriverEvents`.

Anomalies, held code paths, workload ends and what a zone's deputy applied on its own go
into one queue that one supervised thread works through in arrival order. One order for
all of them is what makes the lifecycle's guarantees hold by construction: a driver's
`Workload.wait` returns only after everything its agent said about the workload was handed
over here, so an anomaly that explains an end (the agent's containment) is reacted to
before that end is recorded, as is a deputy's terminate (it is told before its kill); a
transient zone split off on a code path exists before any anomaly of its processes is
looked at. A reaction may have to stop the very agent link that reported it, which is why
none runs on a link's reader thread.

Notes are audited at once on the caller's thread; channel pieces go straight to the broker
(which judges each message at its first piece, on the link's reader thread); problems of a
pooled guest that serves no zone go to whoever subscribed (its pool).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from guest_agent.protocol import Message
from hvtsm.lifecycle.zonerun import ZoneRun
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.deputy import DeputyReport
from hvtsm.supervise import Supervisor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnomalyItem:
    zone_id: str
    report: AnomalyReport


@dataclass(frozen=True)
class CodePathItem:
    zone_id: str
    request: CodePath


@dataclass(frozen=True)
class ExitItem:
    run: ZoneRun
    status: int | None


@dataclass(frozen=True)
class DeputyItem:
    zone_id: str
    report: DeputyReport


Item = AnomalyItem | CodePathItem | ExitItem | DeputyItem


@dataclass(frozen=True)
class Handlers:
    """Who works each kind of item off (the lifecycle's parts), and what happens when one
    of them fails (`failed`: fail closed for the item's zone)."""

    anomaly: Callable[[str, AnomalyReport], object]
    code_path: Callable[[str, CodePath], None]
    exited: Callable[[ZoneRun, int | None], None]
    failed: Callable[[Item, BaseException], None]
    #: phases a zone's deputy applied on its own (the controller was late)
    deputy: Callable[[str, DeputyReport], None]


NoteSink = Callable[[str, str, str], None]
ChannelSink = Callable[[str, Message], None]
IdleSink = Callable[[str, str, str], None]


class Inbox:
    """See the module docstring. Implements `hvtsm.zones.base.DriverEvents`."""

    def __init__(self, supervisor: Supervisor, *, notes: NoteSink,
                 channel: ChannelSink) -> None:
        self._supervisor = supervisor
        self._notes = notes
        self._channel = channel
        self._queue: queue.Queue[Item | None] = queue.Queue()
        self._handlers: Handlers | None = None
        self._idle: list[IdleSink] = []
        self._unfinished = 0
        self._settled = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- DriverEvents --------------------------------------------------------------------

    def anomaly(self, zone_id: str, report: AnomalyReport) -> None:
        self._put(AnomalyItem(zone_id, report))

    def code_path(self, zone_id: str, request: CodePath) -> None:
        self._put(CodePathItem(zone_id, request))

    def note(self, zone_id: str, kind: str, detail: str) -> None:
        try:
            self._notes(zone_id, kind, detail)
        except Exception:  # a store hiccup must not break the driver's thread
            log.exception("zone %s: auditing note %s failed", zone_id, kind)

    def channel(self, zone_id: str, message: Message) -> None:
        self._channel(zone_id, message)

    def deputy(self, zone_id: str, report: DeputyReport) -> None:
        self._put(DeputyItem(zone_id, report))

    def idle(self, guest: str, kind: str, detail: str) -> None:
        if not self._idle:
            log.warning("guest %s (no zone): %s: %s", guest, kind, detail)
        for sink in list(self._idle):
            try:
                sink(guest, kind, detail)
            except Exception:
                log.exception("guest %s: the idle handler failed", guest)

    # -- the lifecycle's side ------------------------------------------------------------

    def subscribe_idle(self, sink: IdleSink) -> None:
        self._idle.append(sink)

    def exited(self, run: ZoneRun, status: int | None) -> None:
        """A zone's workload ended (its waiter): recorded after everything before it."""
        self._put(ExitItem(run, status))

    def start(self, handlers: Handlers) -> None:
        self._handlers = handlers
        self._thread = self._supervisor.loop("reactions", self._turn)

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until every item queued so far has been worked off; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while self._unfinished:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._settled.wait(left)
        return True

    # -- internals -----------------------------------------------------------------------

    def _put(self, item: Item) -> None:
        with self._settled:
            self._unfinished += 1
        self._queue.put(item)

    def _turn(self) -> bool:
        item = self._queue.get()
        if item is None:
            return False
        try:
            self._work(item)
        finally:
            with self._settled:
                self._unfinished -= 1
                self._settled.notify_all()
        return True

    def _work(self, item: Item) -> None:
        handlers = self._handlers
        assert handlers is not None
        try:
            if isinstance(item, AnomalyItem):
                handlers.anomaly(item.zone_id, item.report)
            elif isinstance(item, CodePathItem):
                handlers.code_path(item.zone_id, item.request)
            elif isinstance(item, DeputyItem):
                handlers.deputy(item.zone_id, item.report)
            else:
                handlers.exited(item.run, item.status)
        except Exception as exc:
            self._supervisor.report(f"reactions: {type(item).__name__}", exc)
            handlers.failed(item, exc)
