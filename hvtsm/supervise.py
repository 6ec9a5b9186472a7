"""Supervised threads: a long-lived loop of the controller never dies of one exception.

Each turn of a supervised loop runs guarded: an exception is logged with its traceback,
handed to the fault sink (the lifecycle audits it as a controller fault) and the loop goes
on with its next turn. A controller whose reactions thread had ended on one bad item would
react to nothing any more: failed open. Callbacks that other libraries run for us (the
scheduler's jobs) are guarded the same way with `guard`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

#: (what failed, the exception): audit it, fail closed where it matters
FaultSink = Callable[[str, BaseException], None]
T = TypeVar("T")


class Supervisor:
    def __init__(self, on_fault: FaultSink | None = None) -> None:
        self.on_fault = on_fault
        self._threads: list[threading.Thread] = []
        self.faults = 0

    def report(self, what: str, exc: BaseException) -> None:
        """Log and hand on a fault (never raises: the fault sink's own failure is only
        logged)."""
        self.faults += 1
        log.error("%s failed: %s", what, exc, exc_info=exc)
        sink = self.on_fault
        if sink is None:
            return
        try:
            sink(what, exc)
        except Exception:
            log.exception("reporting the fault of %s failed", what)

    def guard(self, what: str, fn: Callable[[], T]) -> T | None:
        """`fn()`, or None when it raised (reported)."""
        try:
            return fn()
        except Exception as exc:
            self.report(what, exc)
            return None

    def loop(self, name: str, turn: Callable[[], bool]) -> threading.Thread:
        """Run `turn` on a daemon thread until it returns False; each turn guarded."""
        def run() -> None:
            while True:
                try:
                    if turn() is False:
                        return
                except Exception as exc:
                    self.report(f"thread {name}", exc)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def once(self, name: str, body: Callable[[], None]) -> threading.Thread:
        """Run `body` once on a daemon thread, guarded (a waiter, an unplug follower)."""
        thread = threading.Thread(target=lambda: self.guard(f"thread {name}", body),
                                  name=name, daemon=True)
        thread.start()
        return thread
