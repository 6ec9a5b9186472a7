"""The link's problem reports, limited per kind per second and summed up afterwards, and
the failures of the handlers it calls, logged sparingly.

A flood of bad lines must not become a flood of anomaly rows: each kind is reported at most
`per_s` times within a fixed one-second window (`guest_agent.rates.RateWindow`) that opens
at its first problem; the rest are counted, and once the window is over one report sums
them up (with the last one's detail). Every problem is counted in `counts` all the same.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from guest_agent.rates import RateWindow
from hvtsm.monitor.link.checks import clip
from hvtsm.monitor.link.handlers import Handlers

log = logging.getLogger(__name__)


def summary(kind: str, suppressed: int, last: str) -> str | None:
    """The report of `suppressed` problems of `kind` not reported one by one (None: none)."""
    if not suppressed:
        return None
    return (f"{suppressed} more {kind} problem(s) within one second, counted but not "
            f"reported one by one (the last: {last})")


@dataclass
class _KindReports:
    """One kind's reports in its current window."""

    window: RateWindow = field(default_factory=lambda: RateWindow(1.0, fixed=True))
    suppressed: int = 0
    last: str = ""

    def take_summary(self, kind: str) -> str | None:
        text = summary(kind, self.suppressed, self.last)
        self.suppressed = 0
        return text


class FailureLog:
    """Logs a handler's exception with its traceback for the 1st, 2nd, 4th, 8th... time
    only: a handler that fails on every message must not flood the log."""

    def __init__(self, zone_id: str | None) -> None:
        self.zone_id = zone_id
        self._failures = collections.Counter[str]()

    def failed(self, what: str) -> None:
        """Call while handling the exception of `what`."""
        self._failures[what] += 1
        n = self._failures[what]
        if n & (n - 1) == 0:
            log.exception("zone %s agent link: %s failed (%d time(s) so far)",
                          self.zone_id, what, n)


class ProblemLog:
    """Thread-safe: the reader and the workloads' output report problems."""

    def __init__(self, zone_id: str | None, handlers: Handlers, per_s: int,
                 failures: FailureLog) -> None:
        self.zone_id = zone_id
        self.per_s = per_s
        self._handlers = handlers
        self._failures = failures
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._kinds: dict[str, _KindReports] = {}

    @property
    def counts(self) -> dict[str, int]:
        """kind -> problems found so far, those not reported one by one included."""
        with self._lock:
            return dict(self._counts)

    def problem(self, kind: str, detail: str) -> None:
        """Count a problem and report it, unless `per_s` of its kind were reported in this
        second already: then it is reported in a sum when the second is over."""
        detail = clip(detail)
        now = time.monotonic()
        due = None
        with self._lock:
            self._counts[kind] += 1
            reports = self._kinds.setdefault(kind, _KindReports())
            if reports.window.started(now) is None:  # the last second is over: a new one
                due = reports.take_summary(kind)
                reports.window.add(now, 0)
            report = reports.window.count(now) < self.per_s
            if report:
                reports.window.add(now)
            else:
                reports.suppressed += 1
                reports.last = detail
        if due:
            self._report(kind, due)
        if report:
            self._report(kind, detail)

    def flush(self, now: float) -> None:
        """Report the sums of seconds that are over (math.inf: of all, at the end)."""
        due: list[tuple[str, str]] = []
        with self._lock:
            for kind, reports in self._kinds.items():
                if reports.suppressed and reports.window.started(now) is None:
                    text = reports.take_summary(kind)
                    assert text is not None
                    due.append((kind, text))
        for kind, text in due:
            self._report(kind, text)

    def _report(self, kind: str, detail: str) -> None:
        log.warning("zone %s agent link: %s: %s", self.zone_id, kind, detail)
        handler = self._handlers.on_problem
        if handler is None:
            return
        try:
            handler(kind, detail)
        except Exception:
            self._failures.failed(f"the on_problem handler ({kind})")
