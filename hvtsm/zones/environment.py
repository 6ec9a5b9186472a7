"""A zone's environment: a small clean one (`guest_agent.workload.base_env`: PATH, LANG,
HOME, TERM, the user's names) and on top only what the operator names, `--env NAME=VALUE`
and `--pass-env NAME`. Nothing of the controller's own environment passes by default: an
operator's shell holds secrets (cloud keys, tokens, the store's URL in HVTSM_DB) that a
workload must never read. The audit records the names, never the values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hvtsm.errors import HvtsmError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: at most this many variables, names this long, values this long (the kernel's own limit
#: for one string, MAX_ARG_STRLEN, is 128 KiB), this much in all
MAX_VARS = 256
MAX_NAME = 255
MAX_VALUE = 128 * 1024 - 1024
MAX_TOTAL = 1024 * 1024


class EnvError(HvtsmError):
    """An `--env`/`--pass-env` the zone cannot be given; the text names the option."""


@dataclass(frozen=True)
class ZoneEnv:
    """What a zone's workload gets on top of the clean environment."""

    values: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.values))

    def audit_note(self) -> str | None:
        """The start's note: names only (a value may be a secret)."""
        if not self.values:
            return None
        return f"environment {', '.join(self.names())} (values not recorded)"


def _check_name(name: str, option: str) -> str:
    if len(name) > MAX_NAME:
        raise EnvError(f"{option} {name[:40]}...: a name of {len(name)} characters "
                       f"(at most {MAX_NAME})")
    if not _NAME.match(name):
        raise EnvError(f"{option} {name!r}: not a variable name (letters, digits and _, "
                       "not starting with a digit)")
    return name


def from_options(assignments: Sequence[str], passed: Sequence[str],
                 source: Mapping[str, str]) -> ZoneEnv:
    """`--env NAME=VALUE` (each), then `--pass-env NAME` (each, its value from `source`,
    the operator's environment); a later one of the same name wins. A name `source` lacks
    is an error, never a silent omission: the operator meant to give it."""
    if len(assignments) + len(passed) > MAX_VARS:
        raise EnvError(f"{len(assignments) + len(passed)} variables given with --env and "
                       f"--pass-env (at most {MAX_VARS})")
    values: dict[str, str] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep:
            raise EnvError(f"--env {item[:60]!r}: expected NAME=VALUE")
        values[_check_name(name, "--env")] = value
    for name in passed:
        _check_name(name, "--pass-env")
        if name not in source:
            raise EnvError(f"--pass-env {name}: not set in this environment")
        values[name] = source[name]
    total = 0
    for name, value in values.items():
        if "\0" in value:
            raise EnvError(f"{name}: a value with a NUL character cannot be passed")
        if len(value) > MAX_VALUE:
            raise EnvError(f"{name}: a value of {len(value)} characters (at most {MAX_VALUE})")
        total += len(name) + len(value) + 2
    if total > MAX_TOTAL:
        raise EnvError(f"the environment given is {total} bytes (at most {MAX_TOTAL})")
    return ZoneEnv(values)
