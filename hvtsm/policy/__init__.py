"""Policies: when a zone's restrictions tighten and how anomalies are answered."""

from hvtsm.policy.loader import load_policy, parse_policy
from hvtsm.policy.model import (
    AnomalyRules,
    ChannelGrant,
    Phase,
    Policy,
    Reaction,
    SegmentSelector,
    TransientRules,
)

__all__ = [
    "AnomalyRules", "ChannelGrant", "Phase", "Policy", "Reaction", "SegmentSelector",
    "TransientRules", "load_policy", "parse_policy",
]
