"""What counts as an anomaly on the host side: agent events turned into typed reports with
their evidence, and agent-link problems (fail closed: a link we can no longer trust is an
anomaly too). Everything an agent sends is hostile until checked: fields are coerced,
bounded and never trusted to have the right type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from guest_agent.protocol import ANOMALY_CATEGORIES
from hvtsm.policy.model import AnomalyRules
from hvtsm.restrictions import NetworkMode, Restrictions

#: link problem kind (hvtsm.monitor.link) -> anomaly category; kinds mapped to None are
#: audited as notes, not anomalies
LINK_PROBLEMS: dict[str, str | None] = {
    "disconnected": "agent-lost",
    "agent_restart": "agent-lost",
    "heartbeat_lost": "heartbeat-lost",
    "malformed": "malformed-message",
    "oversized": "malformed-message",
    "invalid": "malformed-message",
    "unknown_type": "malformed-message",
    "flood": "message-flood",
    "seq_gap": "seq-gap",
    "seq_regress": "seq-gap",
    "events_dropped": "events-dropped",
    "agent_error": None,
    "output_dropped": None,
}

#: longest text kept from one evidence field (a guest chooses these strings)
MAX_TEXT = 512
MAX_EVIDENCE_BYTES = 8192


@dataclass(frozen=True)
class AnomalyReport:
    category: str
    detail: str
    #: where it came from: "agent" (the monitor saw the act) or "link" (the channel itself)
    source: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def evidence_json(self) -> str:
        text = json.dumps(self.evidence, sort_keys=True, default=str)
        if len(text) > MAX_EVIDENCE_BYTES:
            text = json.dumps({"truncated": text[:MAX_EVIDENCE_BYTES]})
        return text


def _text(value: Any, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _bounded(value: Any, depth: int = 0) -> Any:
    """A JSON value cut down to a size and depth worth storing."""
    if depth > 4:
        return _text(value, 80)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value if abs(value) < 2**63 else str(value)
    if isinstance(value, list):
        return [_bounded(v, depth + 1) for v in value[:32]]
    if isinstance(value, dict):
        return {_text(k, 64): _bounded(v, depth + 1) for k, v in list(value.items())[:32]}
    return _text(value)


def from_agent_event(data: Mapping[str, Any]) -> AnomalyReport:
    """An ``anomaly`` event's data as a report. An unknown category or a missing detail is
    kept (bounded) rather than dropped: whatever the agent flags is looked at."""
    category = data.get("category")
    if not isinstance(category, str) or category not in ANOMALY_CATEGORIES:
        category_text = _text(category, 40)
        category = "unknown"
        detail = f"agent reported an anomaly of unknown category {category_text}"
    else:
        detail = _text(data.get("detail") or category)
    evidence = {k: _bounded(v) for k, v in list(data.items())[:32]
                if k not in ("category", "detail")}
    return AnomalyReport(category, detail, "agent", evidence)


def from_link_problem(kind: str, detail: str) -> AnomalyReport | None:
    category = LINK_PROBLEMS.get(kind, "malformed-message")
    if category is None:
        return None
    return AnomalyReport(category, _text(detail), "link", {"problem": kind})


def zone_profile(static: Mapping[str, Any] | AnomalyRules,
                 restrictions: Restrictions) -> dict[str, Any]:
    """The agent's profile while `restrictions` are in force: the policy's part
    (`AnomalyRules.profile()`, stored with the zone) plus the network now."""
    profile = dict(static.profile() if isinstance(static, AnomalyRules) else static)
    network = restrictions.network
    egress: list[str] = []
    if network is NetworkMode.FULL and restrictions.egress is not None:
        if restrictions.egress:
            egress = [str(rule) for rule in restrictions.egress]
        else:  # an empty allow-list lets nothing out
            network = NetworkMode.LOOPBACK
    profile["network"] = str(network)
    profile["egress"] = egress
    return profile


def agent_network(restrictions: Restrictions) -> str:
    """The network the agent judges a zone's connects against (a transient zone shares its
    parent's namespace, so only the agent can hold it to its own network mode)."""
    return str(zone_profile({}, restrictions)["network"])
