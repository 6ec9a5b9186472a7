"""Exit statuses of `hvtsm`, in one place (also listed in the README)."""

from __future__ import annotations

from hvtsm.lifecycle.outcome import EndCause, Outcome

EXIT_OK = 0
#: `policy validate` found an invalid policy; `cleanup` could not remove something
EXIT_INVALID = 1
EXIT_USAGE = 2
#: an operator ended the zone (the terminate verb, an invoke timeout)
EXIT_OPERATOR = 121
#: the zone's agent killed the workload as the policy's containment
EXIT_CONTAINED = 122
#: the zone was hostile: an anomaly was recorded and reacted to (a reaction ended it, or
#: the workload ended after anomalies)
EXIT_HOSTILE = 123
#: the zone's policy ended it: its lifespan was over (like timeout(1))
EXIT_TERMINATED = 124
#: hvtsm itself failed (bad input, host not usable, store not reachable), or ended the
#: zone to fail closed because it could not enforce the policy
EXIT_HVTSM_ERROR = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


def from_status(status: int | None) -> int:
    """Shell convention for a workload's exit status: 128+N when killed by signal N."""
    if status is None:
        return EXIT_OK
    return 128 - status if status < 0 else status


def from_outcome(outcome: Outcome | None) -> int:
    """Who ended the zone, as the exit status: the agent's containment first, then
    hostility, then the policy, an operator or hvtsm; a clean zone exits as its workload."""
    if outcome is None:
        return EXIT_HVTSM_ERROR
    cause = outcome.cause
    if cause is EndCause.CONTAINMENT:
        return EXIT_CONTAINED
    if outcome.hostile:
        return EXIT_HOSTILE
    if cause is EndCause.FAIL_CLOSED:
        return EXIT_HVTSM_ERROR
    if cause is EndCause.OPERATOR:
        return EXIT_OPERATOR
    if cause in (EndCause.POLICY, EndCause.PARENT):
        return EXIT_TERMINATED
    return from_status(outcome.status)
