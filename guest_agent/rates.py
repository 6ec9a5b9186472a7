"""Counting events over time: the one window both the agent and the host use for rates,
budgets and "at most so many reports a second".

A `RateWindow` counts what was added over the last `span` seconds. *Sliding* (the default)
forgets each addition `span` seconds after it was made: the right view of a rate ("files
created in the last second"). *Fixed* windows restart as a whole once `span` seconds have
passed since the first addition of the current one: the right view of a budget that is
spent and then refilled ("5,000 lines a second, the rest of this second is discarded").

Stdlib only (the agent imports it); times are whatever clock the caller passes
(time.monotonic() everywhere in hvtsm), so tests drive it without sleeping.
"""

from __future__ import annotations

import collections

__all__ = ["RateWindow"]


class RateWindow:
    """See the module docstring. `limit` (0: none) is what `over` and `admit` compare
    with."""

    __slots__ = ("_entries", "_start", "_total", "fixed", "limit", "span")

    def __init__(self, span: float = 1.0, limit: float = 0, *, fixed: bool = False) -> None:
        if span <= 0:
            raise ValueError("a rate window needs a positive span")
        self.span = span
        self.limit = limit
        self.fixed = fixed
        self._entries: collections.deque[tuple[float, float]] = collections.deque()
        self._total = 0.0
        #: start of the current fixed window (None: none began yet)
        self._start: float | None = None

    def _expire(self, now: float) -> None:
        if self.fixed:
            if self._start is not None and now - self._start >= self.span:
                self._start = None
                self._entries.clear()
                self._total = 0.0
            return
        entries = self._entries
        while entries and now - entries[0][0] > self.span:
            self._total -= entries.popleft()[1]
        if not entries:
            self._total = 0.0  # no float drift left behind by many additions

    def add(self, now: float, n: float = 1) -> float:
        """Count `n` at `now`; the count within the window afterwards."""
        self._expire(now)
        if self.fixed:
            if self._start is None:
                self._start = now
            self._total += n
            return self._total
        entries = self._entries
        if entries and entries[-1][0] == now:
            entries[-1] = (now, entries[-1][1] + n)
        else:
            entries.append((now, n))
        self._total += n
        return self._total

    def count(self, now: float) -> float:
        """What was counted within the window ending at `now`."""
        self._expire(now)
        return self._total

    def over(self, now: float) -> bool:
        """The count passed the limit (never, with no limit)."""
        return bool(self.limit) and self.count(now) > self.limit

    def admit(self, now: float, n: float = 1) -> bool:
        """Count `n` only if the window can take it without passing the limit; whether it
        did. With no limit everything is admitted."""
        if self.limit and self.count(now) + n > self.limit:
            return False
        self.add(now, n)
        return True

    def started(self, now: float) -> float | None:
        """When the current fixed window began (None: no window runs at `now`)."""
        self._expire(now)
        return self._start

    def reset(self) -> None:
        self._entries.clear()
        self._total = 0.0
        self._start = None
