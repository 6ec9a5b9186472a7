"""An agent's ``code-path`` event (guest_agent.protocol CODE_PATH_FIELDS) as a typed request:
a process started a code path the analysis did not foresee, and its call is held until the
host places the process subtree in a transient zone or refuses.

The agent is hostile until proven otherwise: a request with no usable hold number or pid
is refused outright (None: the caller reports it as a malformed message), and every text
field is bounded before it reaches the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from guest_agent.protocol import CODE_PATH_TRIGGERS
from hvtsm.monitor.anomalies import MAX_TEXT

MAX_PID = 4 * 1024 * 1024
MAX_ARGV = 16


@dataclass(frozen=True)
class CodePath:
    """One held code path of zone `zone_id`'s agent."""

    #: the agent's number for the held call (the answer names it)
    hold: int
    pid: int
    trigger: str  # "exec" | "connect"
    program: str
    argv: tuple[str, ...] = ()
    address: str | None = None
    port: int | None = None
    ppid: int | None = None
    #: the agent's workload id the held call belongs to (the `id` of the event)
    workload: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """"exec of /bin/sleep" / "connect of pid 42 to 192.0.2.1:80", for the audit."""
        if self.trigger == "exec":
            return f"exec of {self.program}"
        return f"connect of pid {self.pid} ({self.program}) to {self.address}:{self.port}"

    def command(self) -> list[str]:
        """What to store as the transient zone's command."""
        return list(self.argv) or [self.program]


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else ""
    return text[:limit]


def _int(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return None


def from_event(data: Mapping[str, Any], workload: str | None = None) -> CodePath | None:
    """The request in an event's data, or None when it cannot be acted on."""
    hold = _int(data.get("hold"), 0, 2**63 - 1)
    pid = _int(data.get("pid"), 1, MAX_PID)
    trigger = data.get("trigger")
    if hold is None or pid is None or trigger not in CODE_PATH_TRIGGERS:
        return None
    argv = data.get("argv")
    argv_t = tuple(_text(a, 256) for a in argv[:MAX_ARGV] if isinstance(a, str)) \
        if isinstance(argv, list) else ()
    address = data.get("address")
    return CodePath(hold=hold, pid=pid, trigger=str(trigger),
                    program=_text(data.get("program")) or "?", argv=argv_t,
                    address=_text(address, 64) if isinstance(address, str) else None,
                    port=_int(data.get("port"), 0, 65535), ppid=_int(data.get("ppid"), 0,
                                                                       MAX_PID),
                    workload=workload,
                    data={"pid": pid, "trigger": trigger, "program": _text(data.get("program")),
                          "argv": list(argv_t)})
