"""From an analysis to a zone: the runtime, the command line, the lifespan scale, and the
programs the code is expected to run."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from hvtsm.analysis import Report
from hvtsm.errors import InvokeError
from hvtsm.policy import Policy
from hvtsm.policy.segments import SegmentChoice, choose

#: analysis language -> runtime (the warm pool's key)
RUNTIMES = {"python": "python3", "shell": "sh", "elf": "native"}
#: runtime -> interpreter (None: the code is the program)
INTERPRETERS: dict[str, str | None] = {"python3": "/usr/bin/python3", "sh": "/bin/sh",
                                       "native": None}
#: shell words that run the command after them
_PREFIXES = frozenset({"exec", "eval", "command", "builtin", "nohup", "env", "nice", "setsid",
                       "sudo", "doas", "xargs", "stdbuf"})
#: capabilities whose shell evidence starts with the program the script runs
_COMMAND_CAPS = frozenset({"network", "exec", "file-write", "privileged", "ptrace",
                           "input-parsing"})


def runtime_for(report: Report, asked: str | None = None) -> str:
    if asked is not None:
        if asked not in INTERPRETERS:
            raise InvokeError(f"unknown runtime {asked!r}",
                              hint="use one of " + ", ".join(sorted(INTERPRETERS)))
        return asked
    try:
        return RUNTIMES[report.language]
    except KeyError:
        raise InvokeError(f"no runtime for {report.language} code",
                          hint="give one with --runtime") from None


def command(runtime: str, path: str, args: Sequence[str], *,
            python: str | None = None) -> list[str]:
    """The workload's argv: the runtime's interpreter (if any) on the code file."""
    interpreter = INTERPRETERS[runtime]
    if runtime == "python3" and python is not None:
        interpreter = python
    return ([interpreter] if interpreter else []) + [path, *args]


def segment_choice(policy: Policy, report: Report) -> SegmentChoice:
    """The policy and scale for the code's segments (hvtsm/policy/segments.py: the
    strictest selector matching any segment by its capabilities decides)."""
    return choose(policy, [(None, s.capabilities) for s in report.segments])


def lifespan_scale(policy: Policy, report: Report) -> float:
    return segment_choice(policy, report).scale


def exec_targets(report: Report) -> tuple[str, ...]:
    """Programs the analysis saw the code run, by name (a shell script's commands the
    analysis judged); empty where the analysis cannot name them (Python calls, ELF
    imports). Meant for the policy's expected execs."""
    if report.language != "shell":
        return ()
    names: set[str] = set()
    for segment in report.segments:
        for reason in segment.reasons:
            if reason.capability not in _COMMAND_CAPS:
                continue
            words = reason.detail.split()
            while words and (words[0] in _PREFIXES or words[0].startswith("-")):
                words = words[1:]  # `exec prog`, `nohup prog`: the program is further on
            if not words or words[0].startswith((">", "&>", "$")) or "=" in words[0]:
                continue
            names.add(posixpath.basename(words[0]))
    return tuple(sorted(names))
