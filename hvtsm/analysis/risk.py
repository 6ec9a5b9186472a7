"""Capabilities -> one risk level, and the assembly of a segment from its reasons."""

from __future__ import annotations

from collections.abc import Iterable

from hvtsm.analysis.model import Reason, Risk, Segment, SegmentKind

#: any one of these lets the code do anything the zone allows, so it is high on its own
_HIGH_ALONE = frozenset({"exec", "native", "dynamic-code", "ptrace", "privileged"})
_MEDIUM_ALONE = frozenset({"network", "file-write", "input-parsing"})


def risk_of(capabilities: frozenset[str]) -> Risk:
    if capabilities & _HIGH_ALONE:
        return "high"
    # fetching and writing together is the shape of a dropper
    if {"network", "file-write"} <= capabilities:
        return "high"
    if capabilities & _MEDIUM_ALONE:
        return "medium"
    return "low"


def make_segment(name: str, kind: SegmentKind, file: str, line: int,
                 reasons: Iterable[Reason], programs: Iterable[str] = ()) -> Segment:
    ordered: list[Reason] = []
    seen: set[Reason] = set()
    for r in sorted(reasons, key=lambda r: (r.file, r.line, r.capability, r.detail)):
        if r not in seen:
            seen.add(r)
            ordered.append(r)
    caps = frozenset(r.capability for r in ordered)
    named = set(programs) | {p for r in ordered for p in r.programs}
    return Segment(name=name, kind=kind, file=file, line=line, capabilities=caps,
                   risk=risk_of(caps), reasons=tuple(ordered), programs=tuple(sorted(named)))
