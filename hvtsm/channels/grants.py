"""Whether one message may pass: the grant between two names of a group, the sender's phase,
the message's size, and the grant's rate (a token bucket per direction). Pure logic, no
locks: the broker calls it under its own lock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hvtsm.policy.model import ChannelGrant


@dataclass(frozen=True)
class Decision:
    grant: ChannelGrant | None
    #: why the message is refused (None: it may pass)
    refusal: str | None


def grant_between(grants: Sequence[ChannelGrant], sender: str,
                  receiver: str) -> ChannelGrant | None:
    for grant in grants:
        if grant.allows(sender, receiver):
            return grant
    return None


def decide(grants: Sequence[ChannelGrant], *, sender: str, receiver: str, phase: int,
           size: int) -> Decision:
    """The grant's verdict on a message of `size` bytes from `sender` (whose phase in force
    is `phase`; -1 before any) to `receiver`. Rate and the receiver's state are the
    broker's to check."""
    if sender == receiver:
        return Decision(None, "a zone cannot send to itself")
    grant = grant_between(grants, sender, receiver)
    if grant is None:
        return Decision(None, f"no channel from {sender} to {receiver} is granted")
    if grant.phases is not None and phase not in grant.phases:
        now = f"phase {phase}" if phase >= 0 else "no phase yet"
        return Decision(grant, f"the channel {sender} -> {receiver} is closed in {now} of "
                               f"{sender} (open in phases "
                               f"{', '.join(map(str, grant.phases))})")
    if size > grant.max_message:
        return Decision(grant, f"{size} bytes exceed the channel's max_message of "
                               f"{grant.max_message} bytes")
    return Decision(grant, None)


class TokenBucket:
    """`rate` tokens a second, holding at most `burst` (at least one): a sender may send a
    second's worth at once, then keeps to the rate."""

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate if burst is None else burst)
        self.tokens = self.capacity
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
