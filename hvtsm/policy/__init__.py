"""Policies: when a zone's restrictions tighten and how anomalies are answered."""

from hvtsm.policy.loader import load_policy, parse_policy
from hvtsm.policy.model import AnomalyRules, Phase, Policy, Reaction, SegmentSelector

__all__ = [
    "AnomalyRules", "Phase", "Policy", "Reaction", "SegmentSelector", "load_policy",
    "parse_policy",
]
