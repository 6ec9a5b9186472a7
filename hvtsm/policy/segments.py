"""The one rule that picks a segment's policy and lifespan scale from a policy's
[[segment]] selectors, used by `hvtsm run --role/--capability`, by each pipeline stage and
by `hvtsm invoke` (whose code may have several segments).

Every selector that matches any of the segments counts, and the strictest one decides (the
smallest `lifespan_scale`; among equals the first in the file): the riskiest part of a
program decides how long its zone may live, and a selector that matches is never passed
over for a looser one written before it. When the deciding selector names a policy, the
zone gets that policy instead (loaded now, so a bad reference names file and field).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hvtsm.policy.catalog import load_referenced
from hvtsm.policy.model import Policy

#: (role, capabilities) of one segment
Segment = tuple[str | None, frozenset[str]]


@dataclass(frozen=True)
class SegmentChoice:
    policy: Policy
    scale: float
    #: the deciding selector's index in `[[segment]]` (None: no selector matched)
    selector: int | None

    def describe(self, base: Policy) -> str:
        if self.selector is None:
            return f"policy {base.name}"
        return f"{base.name} segment[{self.selector}]"


def choose(policy: Policy, segments: Iterable[Segment]) -> SegmentChoice:
    wanted = list(segments)
    best: int | None = None
    for index, selector in enumerate(policy.segments):
        if not any(selector.matches(role, caps) for role, caps in wanted):
            continue
        if best is None or selector.lifespan_scale < policy.segments[best].lifespan_scale:
            best = index
    if best is None:
        return SegmentChoice(policy, 1.0, None)
    selector = policy.segments[best]
    chosen = policy if selector.policy is None else load_referenced(
        selector.policy, beside=policy.source, field=f"segment[{best}].policy")
    return SegmentChoice(chosen, selector.lifespan_scale, best)
