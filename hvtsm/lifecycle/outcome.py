"""How a zone ended, as a value: who ended it, the workload's status, and whether the zone
was hostile. Pure: the lifecycle decides, this module only describes (the shape of
hvtsm/pool/rules.py).

An anomaly always counts against the zone, even one that arrives after its end (a
containment reported a moment after the workload exited): `with_anomaly` folds it into an
outcome already recorded, so the result says hostile and the CLI's status is not the
workload's clean 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from hvtsm.store.models import ZoneState


class EndCause(StrEnum):
    """Who ended a zone."""

    #: the workload exited on its own
    WORKLOAD = "workload"
    #: the zone's agent killed the workload's first process as the policy's containment
    CONTAINMENT = "containment"
    #: the host's reaction to an anomaly
    REACTION = "reaction"
    #: the policy's lifespan (its terminate phase)
    POLICY = "policy"
    #: an operator (the terminate verb, Ctrl-C, an invoke timeout)
    OPERATOR = "operator"
    #: a transient zone whose parent ended
    PARENT = "parent"
    #: hvtsm could not enforce the policy (a phase could not be applied, a reaction
    #: failed) and ended the zone rather than let it run looser
    FAIL_CLOSED = "fail-closed"

    def says(self) -> str:
        """The end line's words for it."""
        return _SAYS[self]

    @property
    def terminated(self) -> bool:
        """The zone was ended under a running workload (not its own exit)."""
        return self is not EndCause.WORKLOAD


_SAYS = {
    EndCause.WORKLOAD: "workload exited",
    EndCause.CONTAINMENT: "ended by the agent's containment",
    EndCause.REACTION: "ended by a reaction",
    EndCause.POLICY: "ended by its policy",
    EndCause.OPERATOR: "ended by an operator",
    EndCause.PARENT: "ended with its parent zone",
    EndCause.FAIL_CLOSED: "ended to fail closed",
}


@dataclass(frozen=True)
class Outcome:
    cause: EndCause
    #: what happened, in the audit's words ("policy demo: lifespan ended (phase 4)")
    reason: str
    #: the workload's exit status (negative: the signal), None when unknown
    status: int | None
    #: anomalies recorded against the zone, those after its end included
    anomalies: int = 0

    @property
    def hostile(self) -> bool:
        return self.anomalies > 0 or self.cause in (EndCause.CONTAINMENT, EndCause.REACTION)

    @property
    def state(self) -> ZoneState:
        return ZoneState.TERMINATED if self.cause.terminated else ZoneState.EXITED

    def describe(self) -> str:
        """The end line: '<who>: <reason>; exit status N[; hostile: K anomalies]'."""
        head = self.cause.says()
        text = self.reason if self.reason.startswith(head) else f"{head}: {self.reason}"
        text += f"; exit status {self.status}"
        if self.hostile:
            text += f"; hostile: {self.anomalies} anomal{'y' if self.anomalies == 1 else 'ies'}"
        return text

    def with_anomaly(self, *, contained_root: bool = False) -> Outcome:
        """This outcome once one more anomaly of the zone was recorded after its end;
        `contained_root`: that anomaly says the agent killed the workload's first process
        (its exit was the containment's, not the workload's own)."""
        cause = self.cause
        if contained_root and cause is EndCause.WORKLOAD:
            cause = EndCause.CONTAINMENT
        return replace(self, cause=cause, anomalies=self.anomalies + 1)


def kills_root(evidence: Mapping[str, Any], root_pid: int | None) -> bool:
    """Whether an anomaly's evidence says the agent killed the workload's first process."""
    if root_pid is None or root_pid <= 0:
        return False
    return evidence.get("contained") == "killed" and evidence.get("pid") == root_pid


def exit_outcome(status: int | None, *, contained: str | None, anomalies: int) -> Outcome:
    """The outcome of a workload that ended while nothing was ending its zone: its own exit,
    or the agent's containment when an anomaly said it killed the first process."""
    if contained is not None:
        return Outcome(EndCause.CONTAINMENT, contained, status, anomalies)
    reason = "workload exited" if status is not None else "workload ended"
    return Outcome(EndCause.WORKLOAD, reason, status, anomalies)
