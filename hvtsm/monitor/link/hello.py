"""What the agent says about itself when the link comes up (and whenever it is asked)."""

from __future__ import annotations

from dataclasses import dataclass, field

from guest_agent.protocol import Message
from hvtsm.monitor.deputy import DeputyReport
from hvtsm.monitor.link.checks import heartbeat_period, pid_ok, short


@dataclass(frozen=True)
class Hello:
    """What the agent says about itself when the link comes up."""

    protocol: int
    agent_version: str
    capabilities: tuple[str, ...]
    #: the agent's pid in the guest
    pid: int
    #: guest kernel release
    kernel: str
    #: the guest's python version
    python: str
    #: guest uptime when the agent said hello, ms
    boot_ms: int
    #: the agent's heartbeat period, seconds (None: it did not say)
    heartbeat: float | None
    hostname: str | None
    port: str | None
    #: (workload id, guest pid) of workloads whose exit the agent has not sent yet
    workloads: tuple[tuple[str, int], ...]
    seq: int
    #: time.monotonic() when it arrived
    received: float
    #: what the zone's deputy applied that no controller acknowledged yet
    deputy: DeputyReport = field(default_factory=DeputyReport)

    @classmethod
    def from_message(cls, msg: Message, received: float) -> Hello:
        return cls(
            protocol=msg["protocol"], agent_version=msg["agent_version"],
            capabilities=tuple(msg["capabilities"]), pid=msg["pid"], kernel=msg["kernel"],
            python=msg["python"], boot_ms=msg["boot_ms"],
            heartbeat=heartbeat_period(msg.get("heartbeat"))[0],
            hostname=msg.get("hostname"), port=msg.get("port"),
            workloads=tuple((w["id"], w["pid"] if pid_ok(w["pid"]) else 0)
                            for w in msg.get("workloads") or ()),
            seq=msg["seq"], received=received, deputy=DeputyReport.parse(msg.get("deputy")))


def doubts(msg: Message) -> list[str]:
    """What in a hello cannot be true, one text each (the hello is still taken, with the
    values clamped: see `Hello.from_message`)."""
    found = []
    wrong = heartbeat_period(msg.get("heartbeat"))[1]
    if wrong:
        found.append(wrong)
    bad_pids = [w["id"] for w in msg.get("workloads") or () if not pid_ok(w["pid"])]
    if bad_pids:
        found.append(f"hello lists workloads with impossible pids: "
                     f"{short(', '.join(bad_pids), 200)} (pid 0 recorded)")
    return found
