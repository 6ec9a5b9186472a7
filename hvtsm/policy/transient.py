"""What a zone's transient zones are, decided when the zone is launched: the policy they
get, the programs that are foreseen (and so split nothing off), and the `transient` field
of the agent's monitoring profile.

* **Which programs are expected**: the workload's own program (as given and resolved), the
  policy's `[transient] expect_exec`, and what the caller passes (the programs
  `hvtsm analyze` found).
* **The transient policy**: `[transient] policy` when set, else `policies/transient.toml`
  (short and tight). Not the parent's own policy scaled: that one was written for the code
  the analysis saw, usually with the network open at first, which is exactly what an
  unforeseen path should not get. Its lifespan is scaled by parent scale x lifespan_scale.

The run-time steps (splitting, following the parent) are hvtsm/lifecycle/transient.py's.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from hvtsm.errors import PolicyError
from hvtsm.policy.catalog import load_referenced, resolve
from hvtsm.policy.model import Policy

#: the shipped transient policy (policies/transient.toml), used when [transient] names none
DEFAULT_TRANSIENT_POLICY = "transient"


def transient_policy(policy: Policy) -> Policy | None:
    """The policy a zone's transient zones get (None: the policy has them off). Loaded at
    launch so a bad reference fails the launch, not the first split."""
    rules = policy.transient
    if not rules.enabled:
        return None
    if rules.policy is not None:
        return load_referenced(rules.policy, beside=policy.source, field="transient.policy")
    path = resolve(DEFAULT_TRANSIENT_POLICY)
    if not path.exists():
        raise PolicyError(f"[transient] names no policy and the default {path} is missing",
                          file=policy.source, field="transient.policy",
                          hint="set [transient] policy, or reinstall hvtsm's policies")
    return load_referenced(str(path), beside=policy.source, field="transient.policy")


def expected_programs(policy: Policy, argv: Sequence[str],
                      extra: Sequence[str] = ()) -> list[str]:
    """The workload's own program as given and resolved, the policy's expect_exec and
    `extra` (the analysis's), in that order, without repeats."""
    out = [argv[0]] if argv[0].startswith("/") else []
    found = shutil.which(argv[0])
    if found:
        out += [os.path.abspath(found), os.path.realpath(found)]
    out += list(policy.transient.expect_exec) + list(extra)
    return list(dict.fromkeys(p for p in out if p))


def monitor_transient(policy: Policy, argv: Sequence[str],
                      extra: Sequence[str] = ()) -> dict[str, Any] | None:
    """The monitoring profile's `transient` field for a zone of `policy` (None: off)."""
    rules = policy.transient
    if not rules.enabled or not rules.triggers:
        return None
    return {"triggers": list(rules.triggers),
            "expect_exec": expected_programs(policy, argv, extra)}
