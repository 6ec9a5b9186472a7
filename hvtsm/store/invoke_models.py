"""Tables of `hvtsm invoke` and the warm pool: stored program code, pooled guests and
their audit trail. Registered with the others when `hvtsm.store.database` imports this.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import Column, LargeBinary
from sqlmodel import Field, SQLModel


class StoredCode(SQLModel, table=True):
    """Program code by content: the id is the sha256 of the bytes, so storing the same
    code twice gives the same id and a code id always means the same bytes."""

    __tablename__ = "code"
    id: str = Field(primary_key=True, max_length=64)
    #: file name it was stored under (the guest sees the code under this name)
    name: str
    #: what the analysis read it as: python, shell, elf
    language: str
    size: int
    stored_at: float
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class GuestState(StrEnum):
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    #: destroyed (or found gone); never serves again
    RETIRED = "retired"


class WarmGuest(SQLModel, table=True):
    """A pre-booted guest of the warm pool. Claiming one is an atomic
    UPDATE ... WHERE state = 'idle', so processes sharing the store never hand one guest
    to two requests."""

    __tablename__ = "warm_guest"
    id: str = Field(primary_key=True, max_length=32)
    runtime: str = Field(index=True)
    trust: str = Field(index=True)
    state: str = Field(index=True)
    #: requests served so far
    uses: int = 0
    booted_at: float
    #: guest memory (bytes): requests asking for more boot cold
    memory: int
    domain: str = ""
    channel: str = ""
    #: JSON of the driver's state for the guest (what `bind` needs)
    driver_state: str = "{}"
    #: JSON of the Restrictions the guest was booted with: a zone's restrictions beyond
    #: these are tightenings that cannot be undone
    baseline: str = "{}"
    #: "pid:start" of the process using the guest or holding its agent link (the channel
    #: serves one client at a time); None: nobody
    holder: str | None = None
    #: the zone it serves now, or served last
    zone_id: str | None = None
    claimed_at: float | None = None
    #: why it must never serve again
    tainted: str | None = None
    retired_at: float | None = None


class GuestEvent(SQLModel, table=True):
    """Append-only: booted, claimed (by a zone), released, tainted, retired, destroyed."""

    __tablename__ = "guest_event"
    id: int | None = Field(default=None, primary_key=True)
    guest_id: str = Field(index=True)
    ts: float
    kind: str
    zone_id: str | None = Field(default=None, index=True)
    detail: str = ""
