"""What an analysis finds: segments of a program, their capabilities, and why."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

#: the capability names; policies' [[segment]] match.capability refers to them
CAPABILITIES = (
    "network", "exec", "file-write", "native", "dynamic-code", "input-parsing", "ptrace",
    "privileged",
)

SegmentKind = Literal["function", "module", "script", "binary"]
Risk = Literal["low", "medium", "high"]


def exec_globs(programs: Iterable[str]) -> tuple[str, ...]:
    """Programs as exec globs: a path stays itself, a bare name (found on PATH) matches that
    name in any directory."""
    return tuple(sorted({p if p.startswith("/") else f"*/{p}" for p in programs}))


@dataclass(frozen=True)
class Reason:
    """One piece of evidence for a capability: where it is and what it is."""

    capability: str
    file: str
    line: int
    detail: str
    #: programs this call or command runs, when the code names them literally
    programs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"capability": self.capability, "file": self.file,
                               "line": self.line, "detail": self.detail}
        if self.programs:
            out["programs"] = list(self.programs)
        return out


@dataclass(frozen=True)
class Segment:
    name: str
    kind: SegmentKind
    file: str
    line: int
    capabilities: frozenset[str]
    risk: Risk
    reasons: tuple[Reason, ...]
    #: programs the segment runs (named literally in the code): a transient zone's trigger
    #: is an exec of anything else
    programs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "file": self.file, "line": self.line,
                # sorted so that the JSON is stable from run to run
                "capabilities": sorted(self.capabilities), "risk": self.risk,
                "reasons": [r.to_dict() for r in self.reasons],
                "programs": list(self.programs)}


@dataclass(frozen=True)
class Report:
    path: str
    language: str
    segments: tuple[Segment, ...]
    #: the local modules a Python program imports (paths relative to its directory), whose
    #: segments follow the program's own
    local_files: tuple[str, ...] = ()

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(name)

    def programs(self) -> tuple[str, ...]:
        return tuple(sorted({p for s in self.segments for p in s.programs}))

    def exec_globs(self) -> tuple[str, ...]:
        return exec_globs(self.programs())

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "language": self.language,
                "segments": [s.to_dict() for s in self.segments],
                "local_files": list(self.local_files)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
