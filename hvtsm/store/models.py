"""Table models. Timestamps are UNIX epoch seconds (float) so lags are plain subtractions.

`Zone` and `Controller` rows carry current state; every other table is append-only.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Column, LargeBinary
from sqlmodel import Field, SQLModel


class ZoneState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    FROZEN = "frozen"
    #: ended by the policy, a reaction or an operator
    TERMINATED = "terminated"
    #: the workload ended on its own
    EXITED = "exited"
    #: could not be made or started; nothing of it remains
    FAILED = "failed"
    #: its controller died and `hvtsm cleanup` removed what was left
    CLEANED = "cleaned"

    @property
    def live(self) -> bool:
        return self in (ZoneState.CREATING, ZoneState.RUNNING, ZoneState.FROZEN)


class Controller(SQLModel, table=True):
    """One controller process; its phase jobs live in their own APScheduler table."""

    id: str = Field(primary_key=True, max_length=32)
    host: str
    pid: int
    #: /proc/<pid>/stat start time, so a reused pid is not mistaken for a live controller
    pid_start: int
    started_at: float
    jobs_table: str


class Zone(SQLModel, table=True):
    #: autoincrement; drivers derive per-zone addresses from it
    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(index=True, unique=True, max_length=32)
    backend: str
    state: str = Field(index=True)
    policy_name: str
    policy_digest: str
    policy_source: str
    #: the exact policy text, so an adopting controller follows the same timeline
    policy_toml: str
    lifespan_scale: float = 1.0
    command: str  # JSON list
    user: str | None = None
    controller_id: str | None = Field(default=None, index=True)
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    exit_status: int | None = None
    end_reason: str | None = None
    #: who ended it (hvtsm.lifecycle.outcome.EndCause); None while it runs
    ended_by: str | None = None
    #: anomalies were recorded against it, or the agent's containment ended it
    hostile: bool | None = None
    #: index of the last phase in force (-1: none yet)
    phase_index: int = -1
    applied: str = "{}"  # JSON of Restrictions
    driver_state: str = "{}"  # JSON of ZoneHandle.state
    #: JSON {phase_index: due epoch} of transitions not yet applied
    pending: str = "{}"
    #: the zone's name among its group (a pipeline segment's name): channel grants name it
    name: str | None = None
    #: zones made together (one pipeline or invocation) share it; channels stay within it
    group_id: str | None = Field(default=None, index=True)
    #: the zone a transient zone was split from
    parent_id: str | None = Field(default=None, index=True)
    #: "zone", "segment" (of a pipeline) or "transient"
    kind: str = "zone"


class ZoneEvent(SQLModel, table=True):
    """Lifecycle: created, started, frozen, thawed, exited, terminated, error, adopted ..."""

    __tablename__ = "zone_event"
    id: int | None = Field(default=None, primary_key=True)
    zone_id: str = Field(index=True)
    ts: float
    kind: str
    detail: str = ""


class PhaseApplied(SQLModel, table=True):
    __tablename__ = "phase_applied"
    id: int | None = Field(default=None, primary_key=True)
    zone_id: str = Field(index=True)
    phase_index: int
    scheduled_at: float
    applied_at: float
    lag_ms: float
    #: applied after the controller had been away (or otherwise far behind schedule)
    late: bool = False
    changes: str = "{}"  # JSON field -> printable value
    note: str = ""


class UnattendedSpan(SQLModel, table=True):
    """A stretch of a zone's life with no controller (its controller died, or its link was
    lost): from when the zone's agent lost its controller to when one took the zone over
    again, and the phases the agent applied meanwhile (its deputy: guest_agent/deputy.py)."""

    __tablename__ = "unattended_span"
    id: int | None = Field(default=None, primary_key=True)
    zone_id: str = Field(index=True)
    #: epoch s the agent lost its controller (None: the agent did not say)
    since: float | None = None
    #: epoch s a controller took the zone over
    until: float
    #: the controller that had gone
    controller_id: str | None = None
    #: JSON list of {phase, due, applied, lag_ms, ok, terminate, froze}
    phases: str = "[]"
    note: str = ""


class Anomaly(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    zone_id: str = Field(index=True)
    ts: float
    kind: str
    detail: str = ""
    source: str = ""
    #: JSON: what the monitor saw (pid, program, syscall, decoded arguments, containment)
    evidence: str = "{}"


class Reaction(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    zone_id: str = Field(index=True)
    ts: float
    action: str
    reason: str = ""
    anomaly_id: int | None = None


class OperatorAction(SQLModel, table=True):
    __tablename__ = "operator_action"
    id: int | None = Field(default=None, primary_key=True)
    zone_id: str | None = Field(default=None, index=True)
    ts: float
    actor: str
    action: str
    args: str = "{}"
    reason: str = ""


class ChannelMessage(SQLModel, table=True):
    """One message between zones, or one refusal, as the broker judged it (hvtsm.channels).
    `content` holds the bytes only when the grant asks for it (audit_content)."""

    __tablename__ = "channel_message"
    id: int | None = Field(default=None, primary_key=True)
    ts: float
    group_id: str | None = Field(default=None, index=True)
    #: the sender's message id (unique per sending agent)
    message_id: str
    sender_zone: str = Field(index=True)
    sender_name: str
    #: None when no zone of that name was registered in the group
    receiver_zone: str | None = Field(default=None, index=True)
    receiver_name: str
    size: int
    #: sha256 (hex) of the bytes; None when they never all arrived
    digest: str | None = None
    #: "delivered", "held" (the receiver has not started; delivered later), "refused",
    #: "dropped" (delivered to the receiver's agent, which ended before its workload took it)
    verdict: str
    reason: str = ""
    #: the sender's phase index in force when it sent
    sender_phase: int = -1
    content: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
