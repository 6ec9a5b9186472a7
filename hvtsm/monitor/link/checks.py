"""Which of an agent's values to believe, as pure functions.

A valid-looking message can still carry a value that cannot be true (json reads 1e400 as
inf, an int may have 4300 digits): the link checks pids, seqs, statuses, event times and
heartbeat periods here before it trusts them, and cuts whatever text the agent chose to a
size fit for a log line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hvtsm.monitor.link.limits import (
    MAX_DETAIL,
    MAX_EPOCH,
    MAX_HEARTBEAT,
    MAX_PID,
    MAX_SEQ,
    MAX_STATUS,
    MIN_HEARTBEAT,
    MIN_STATUS,
)


def short(value: Any, limit: int = 40) -> str:
    """A value the agent chose, cut to a size fit for a message (ints can have 4300 digits)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip(text: str, limit: int = MAX_DETAIL) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def pid_ok(pid: Any) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= MAX_PID


def seq_ok(seq: int) -> bool:
    return seq <= MAX_SEQ


def status_ok(status: int) -> bool:
    return MIN_STATUS <= status <= MAX_STATUS


def epoch_ok(when: Any) -> bool:
    """A time datetime can take: json reads 1e400 as inf, and a float beyond year 9999 makes
    fromtimestamp raise in whoever reads the event."""
    try:
        return bool(0 <= when <= MAX_EPOCH)
    except TypeError:
        return False


def heartbeat_period(claim: Any) -> tuple[float | None, str | None]:
    """The heartbeat period to believe for what a hello claims, and what was wrong with the
    claim (None if nothing). A number is not enough: 1e400 arrives as inf, and an absurd
    period would either disable the watchdog or make it fire at once."""
    if claim is None or claim == 0:
        return None, None  # it did not say: the watchdog assumes MAX_HEARTBEAT
    try:
        period = float(claim)
    except (TypeError, ValueError, OverflowError):  # an int beyond float range
        period = math.inf
    if not math.isfinite(period) or period > MAX_HEARTBEAT:
        return MAX_HEARTBEAT, (f"hello claims a heartbeat period of {short(claim)} s: "
                               f"{MAX_HEARTBEAT:g} s assumed")
    if period < MIN_HEARTBEAT:
        return MIN_HEARTBEAT, (f"hello claims a heartbeat period of {short(claim)} s: "
                               f"{MIN_HEARTBEAT:g} s assumed")
    return period, None


def plain(value: Any) -> Any:
    """`value` with every Mapping made a dict and every tuple a list, recursively: profiles
    are often built from frozen policy objects (mapping proxies, tuples) that json cannot
    encode as they are. Anything else json cannot encode is left for `encode` to refuse."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
