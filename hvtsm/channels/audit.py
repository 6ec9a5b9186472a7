"""Channel rows in the store: writing one per message or refusal, and reading them back for
a zone's audit trail (`hvtsm audit`), where they show in the sender's and the receiver's."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, or_, select

from hvtsm.store.models import ChannelMessage

#: bytes of kept content shown in the text trail (the JSON trail has all of it)
SHOWN_CONTENT = 60


@dataclass(frozen=True)
class ChannelRecord:
    """What one row says; the broker fills it in as the message goes."""

    ts: float
    group_id: str | None
    message_id: str
    sender_zone: str
    sender_name: str
    receiver_zone: str | None
    receiver_name: str
    size: int
    digest: str | None
    verdict: str
    reason: str = ""
    sender_phase: int = -1
    content: bytes | None = None


def record_channel_message(session: Session, record: ChannelRecord) -> None:
    session.add(ChannelMessage(**record.__dict__))


def summary(row: ChannelMessage) -> str:
    digest = f"sha256 {row.digest[:16]}" if row.digest else "no digest"
    text = (f"{row.sender_name} ({row.sender_zone}) -> {row.receiver_name}"
            f"{f' ({row.receiver_zone})' if row.receiver_zone else ''}: {row.size} bytes, "
            f"{digest}: {row.verdict}")
    if row.reason:
        text += f" ({row.reason})"
    if row.content is not None:
        shown = row.content[:SHOWN_CONTENT]
        text += f"; content {shown!r}{'...' if len(row.content) > SHOWN_CONTENT else ''}"
    return text


def data(row: ChannelMessage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id, "group": row.group_id, "message_id": row.message_id,
        "sender_zone": row.sender_zone, "sender_name": row.sender_name,
        "receiver_zone": row.receiver_zone, "receiver_name": row.receiver_name,
        "size": row.size, "digest": row.digest, "verdict": row.verdict, "reason": row.reason,
        "sender_phase": row.sender_phase,
    }
    if row.content is not None:
        out["content_base64"] = base64.b64encode(row.content).decode("ascii")
    return out


def channel_rows(session: Session, *, zone_id: str) -> list[ChannelMessage]:
    """Every channel row the zone sent or received, oldest first."""
    query = select(ChannelMessage).where(or_(
        col(ChannelMessage.sender_zone) == zone_id,
        col(ChannelMessage.receiver_zone) == zone_id)).order_by(col(ChannelMessage.id))
    return list(session.exec(query).all())
