"""Where one policy's anomaly profile is weaker than another's (`hvtsm policy validate
--against REF`): a policy that claims to be stricter must detect at least as much.

Each finding names the [anomaly] field and what the reference catches that the policy
does not: a syscall it does not deny, a sensitive path or denied program it does not
cover, a rate it does not limit or limits higher, a milder containment or reaction to a
category, monitoring off.

Globs are compared on instances: each reference glob is written out as concrete paths
(every `*` and `?` as names, every `**` as none, one and two directories; a trailing
`**` as one or two) and each must
match some glob of the policy; so `"/home/"`, which matches only /home itself, does not
cover `"/home/*/.ssh/**"`, and `"/home/**"` does. An instance check can miss a glob that
covers all but some unusual path; it never reports a weakness that is not there.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from guest_agent.profile import first_match, normalize
from guest_agent.protocol import ANOMALY_CATEGORIES
from hvtsm.policy.model import Containment, Policy, Reaction

#: the [anomaly] rates where 0 is "no limit" and a higher value is looser
RATES = ("max_forks_per_s", "max_processes", "max_syscalls_per_s", "max_new_files_per_s",
         "max_deletes_per_s", "memory_spike_mib_per_s", "max_cpu_share")

_CONTAIN = [Containment.NONE, Containment.DENY, Containment.KILL]
_REACTION = list(Reaction)  # mildest first

#: what one `*`, `?` and `**` become in a glob's instances
_STAR_NAMES = ("x", "hvtsm-probe.key")
_DOUBLESTAR = ("", "d1", "d1/d2")
#: a glob not starting with '/' (an exec glob) matches at any depth
_ANY_DEPTH = "/usr/local/bin/"

#: at most this many instances of one glob are tried
MAX_INSTANCES = 64


@dataclass(frozen=True)
class Weakness:
    #: the [anomaly] field ("deny_syscalls", "on.sensitive-path", ...)
    field: str
    #: what the reference catches and the policy does not
    detail: str

    def __str__(self) -> str:
        return f"anomaly.{self.field}: {self.detail}"


def instances(glob: str) -> list[str]:
    """Concrete paths `glob` matches (see the module docstring)."""
    pieces = re.split(r"(\*\*|\*|\?)", glob if glob.startswith("/") else _ANY_DEPTH + glob)
    choices: list[tuple[str, ...]] = []
    for index, piece in enumerate(pieces):
        if piece == "**":
            # a trailing '**' is at least one more component ('/a/**' is below /a)
            last = all(not p for p in pieces[index + 1:])
            choices.append(_DOUBLESTAR[1:] if last else _DOUBLESTAR)
        elif piece == "*":
            choices.append(_STAR_NAMES)
        elif piece == "?":
            choices.append(("q",))
        else:
            choices.append((piece,))
    out = []
    for combo in itertools.islice(itertools.product(*choices), MAX_INSTANCES):
        path = normalize("".join(combo))
        if path not in out:
            out.append(path)
    return out


def uncovered(globs: tuple[str, ...], reference: tuple[str, ...]) -> list[tuple[str, str]]:
    """(reference glob, an instance of it no glob of `globs` matches), per glob not
    covered."""
    out = []
    for glob in reference:
        for path in instances(glob):
            if first_match(globs, path) is None:
                out.append((glob, path))
                break
    return out


def weaker_than(policy: Policy, reference: Policy) -> list[Weakness]:
    """Every way `policy`'s anomaly profile is weaker than `reference`'s; [] when it
    detects and reacts at least as strongly."""
    mine, theirs = policy.anomaly, reference.anomaly
    if theirs.monitor and not mine.monitor:
        return [Weakness("monitor", "off: the reference watches the workload")]
    if not theirs.monitor:
        return []
    found: list[Weakness] = []
    a, b = mine.watch, theirs.watch
    missing = sorted(set(b.deny_syscalls) - set(a.deny_syscalls))
    if missing:
        found.append(Weakness("deny_syscalls", "does not deny " + ", ".join(missing)))
    for name in ("sensitive_paths", "deny_exec"):
        for glob, path in uncovered(getattr(a, name), getattr(b, name)):
            found.append(Weakness(name, f"does not cover {glob!r} (such as {path})"))
    if b.allow_exec:
        if not a.allow_exec:
            found.append(Weakness("allow_exec", "any program may run; the reference allows "
                                  "only its allow_exec"))
        else:
            for glob, path in uncovered(b.allow_exec, a.allow_exec):
                found.append(Weakness("allow_exec", f"allows {glob!r} (such as {path}), "
                                      "which the reference does not"))
    for rate in RATES:
        limit, ref = getattr(a, rate), getattr(b, rate)
        if ref and (not limit or limit > ref):
            found.append(Weakness(rate, f"{'no limit' if not limit else f'{limit:g}'}, the "
                                  f"reference {ref:g}"))
    if b.max_cpu_share and a.max_cpu_share and a.cpu_window > b.cpu_window:
        found.append(Weakness("cpu_window", f"{a.cpu_window:g} s, the reference "
                              f"{b.cpu_window:g} s: sustained use is seen later"))
    if b.provenance:
        if not a.provenance:
            found.append(Weakness("provenance", "off: code of network origin runs unjudged"))
        else:
            for glob, path in uncovered(a.interpreters, b.interpreters):
                found.append(Weakness("interpreters", f"does not cover {glob!r} (such as "
                                      f"{path}): its scripts and stdin are not judged"))
            trusted = sorted(set(a.trusted_origins) - set(b.trusted_origins))
            if trusted:
                found.append(Weakness("trusted_origins", "trusts " + ", ".join(trusted)
                                      + ", which the reference does not"))
    if _CONTAIN.index(mine.contain) < _CONTAIN.index(theirs.contain):
        found.append(Weakness("contain", f"{mine.contain}, the reference {theirs.contain}"))
    if b.drops_are_anomalies and not a.drops_are_anomalies:
        found.append(Weakness("drops_are_anomalies", "false: lost events go unreported"))
    found += _reactions(policy, reference)
    return found


def _reactions(policy: Policy, reference: Policy) -> list[Weakness]:
    """Per category and per count of anomalies (up to where both sequences repeat), the
    policy's reaction must be at least the reference's."""
    mine, theirs = policy.anomaly, reference.anomaly
    counts = range(1, max(len(mine.escalate), len(theirs.escalate)) + 3)
    found = []
    for category in sorted(ANOMALY_CATEGORIES):
        for count in counts:
            own, ref = mine.reaction_for(category, count), theirs.reaction_for(category, count)
            milder = _REACTION.index(own) < _REACTION.index(ref)
            slower = own is ref is Reaction.ACCELERATE and mine.factor < theirs.factor
            if milder or slower:
                how = (f"accelerate by {mine.factor:g}, the reference by {theirs.factor:g}"
                       if slower else f"{own}, the reference {ref}")
                field = f"on.{category}" if category in theirs.on else "reaction"
                found.append(Weakness(field, f"anomaly {count} of {category}: {how}"))
                break  # one finding per category
    return found
