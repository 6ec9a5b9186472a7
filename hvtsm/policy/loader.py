"""Reading policy TOML files into typed `Policy` objects, refusing anything unclear.

Every error names the file, the phase index and the field, and says what would be valid.
Nothing a zone cannot use gets through, whatever the input's size or shape (the limits are
in hvtsm.limits, README.md "Limits on input"): the file must be a regular file of at most
MAX_POLICY_BYTES, read without blocking; its document's shape is bounded before any field
is read (hvtsm.policy.shape: nesting, array and string sizes, no NaN or infinity); then each
field has its range: at most MAX_PHASES phases, durations up to MAX_DURATION_MS (ten
years), sizes up to MAX_SIZE, CPU lists naming only this host's CPUs, at most MAX_EGRESS
egress entries per phase and MAX_GLOBS globs per list. Validation is linear in the input:
the monotonicity check indexes the earlier egress rules (hvtsm.restrictions).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeGuard

from guest_agent.profile import POLICY_FIELDS, Profile, ProfileError, canonical_glob
from guest_agent.protocol import ANOMALY_CATEGORIES
from hvtsm.errors import PolicyError
from hvtsm.files import FileRefused, read_regular
from hvtsm.limits import (
    MAX_CHANNEL_MESSAGE,
    MAX_CHANNEL_RATE,
    MAX_CPU,
    MAX_CPU_QUOTA,
    MAX_EGRESS,
    MAX_FACTOR,
    MAX_NAME,
    MAX_NESTING,
    MAX_POLICY_BYTES,
    MIN_MEMORY,
    shown,
)
from hvtsm.policy.model import (
    AnomalyRules,
    ChannelGrant,
    Phase,
    Policy,
    Reaction,
    SegmentSelector,
    TransientRules,
)
from hvtsm.policy.shape import ShapeError, check_shape, where
from hvtsm.restrictions import EgressRule, FilesystemMode, NetworkMode, Restrictions
from hvtsm.units import format_cpuset, format_size, parse_cpuset, parse_duration_ms, parse_size

_TOP_FIELDS = ("name", "description", "phase", "anomaly", "segment", "channel", "transient",
               "forensics")
_FORENSICS_FIELDS = ("memory_dump",)
_PHASE_FIELDS = (
    "at", "network", "egress", "cpu_shares", "cpu_quota", "cpus", "memory", "pids",
    "filesystem", "action",
)
#: [anomaly]: the profile fields a policy sets (declared once, in guest_agent/profile.py)
#: and the host's reactions
_ANOMALY_FIELDS = ("monitor", *POLICY_FIELDS, "reaction", "factor", "escalate", "on")
#: categories the host itself raises: about the agent link (hvtsm.monitor.anomalies), and a
#: refused channel message (hvtsm.channels.broker)
_LINK_CATEGORIES = ("agent-lost", "heartbeat-lost", "malformed-message", "message-flood",
                    "seq-gap", "agent-error", "events-dropped", "channel-refused")
_SEGMENT_FIELDS = ("match", "lifespan_scale", "policy")
_CHANNEL_FIELDS = ("from", "to", "direction", "max_message", "max_rate", "phases",
                   "audit_content")
_TRANSIENT_FIELDS = ("enabled", "triggers", "expect_exec", "policy", "lifespan_scale",
                     "max_zones")
_TRIGGERS = ("exec", "connect")
_MATCH_FIELDS = ("role", "capability")
_SYSCALL_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_WHAT = "a policy file (TOML)"
#: `host_cpus` for a policy already in force (a zone `resume` adopts): its CPUs were this
#: host's when the zone was made, and the zone must be followed to its end regardless
EVERY_CPU = frozenset(range(MAX_CPU + 1))


def load_policy(path: str | Path, *, host_cpus: frozenset[int] | None = None) -> Policy:
    """The policy in file `path`; PolicyError naming file, phase and field otherwise.
    `host_cpus`: the CPUs a `cpus` list may name (default: this host's online CPUs)."""
    path = Path(path)
    try:
        raw = read_regular(path, MAX_POLICY_BYTES, what=_WHAT)
    except FileRefused as exc:
        raise PolicyError(str(exc), file=str(path)) from None
    except OSError as exc:
        raise PolicyError(f"cannot read the file: {exc.strerror or exc}",
                          file=str(path)) from None
    return parse_policy(raw, source=str(path), host_cpus=host_cpus)


def parse_policy(raw: bytes, *, source: str, host_cpus: frozenset[int] | None = None) -> Policy:
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{format_size(len(raw))} of policy; {_WHAT} may be at most "
                          f"{format_size(MAX_POLICY_BYTES)}", file=source)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except RecursionError:
        raise PolicyError(f"not valid TOML: nested too deeply to parse (a policy nests at "
                          f"most {MAX_NESTING} levels)", file=source) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"not UTF-8 text (byte {exc.start}: {exc.reason}); a policy is "
                          "TOML", file=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {str(exc)[:200]}", file=source) from None
    except (ValueError, ArithmeticError, MemoryError):
        # what tomllib lets through from its own conversions
        raise PolicyError("not valid TOML: a value too large to read (an integer of "
                          "thousands of digits?)", file=source) from None
    try:
        check_shape(doc)
    except ShapeError as exc:
        phase, field = where(exc.path)
        raise PolicyError(exc.message, file=source, phase=phase, field=field) from None
    policy = _Builder(source, host_cpus).policy(doc, hashlib.sha256(raw).hexdigest())
    return replace(policy, text=raw.decode("utf-8"))


def _online_cpus() -> frozenset[int]:
    from hvtsm.host import online_cpus

    return online_cpus()


class _Builder:
    def __init__(self, source: str, host_cpus: frozenset[int] | None = None) -> None:
        self.source = source
        self._host_cpus = host_cpus

    @property
    def host_cpus(self) -> frozenset[int]:
        if self._host_cpus is None:
            self._host_cpus = _online_cpus()
        return self._host_cpus

    def fail(self, message: str, *, phase: int | None = None, field: str | None = None,
             hint: str | None = None) -> PolicyError:
        return PolicyError(message, file=self.source, phase=phase, field=field, hint=hint)

    def only_known(self, table: dict[str, Any], known: tuple[str, ...], *,
                   phase: int | None = None, where: str = "") -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                suggestion = f"; did you mean '{close[0]}'?" if close else ""
                raise self.fail(
                    f"unknown field{where}{suggestion} Valid fields: {', '.join(known)}",
                    phase=phase, field=key,
                )

    def policy(self, doc: dict[str, Any], digest: str) -> Policy:
        self.only_known(doc, _TOP_FIELDS)
        name = doc.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > MAX_NAME:
            raise self.fail("a policy needs a name of letters, digits, '.', '_' or '-' "
                            f"(e.g. name = \"default\"), at most {MAX_NAME} characters",
                            field="name")
        description = doc.get("description", "")
        if not isinstance(description, str):
            raise self.fail("must be a string", field="description")
        raw_phases = doc.get("phase")
        if not isinstance(raw_phases, list) or not raw_phases:
            raise self.fail("a policy needs at least one [[phase]] table", field="phase")
        return Policy(
            name=name,
            description=description,
            source=self.source,
            digest=digest,
            phases=self.phases(raw_phases),
            anomaly=self.anomaly(doc.get("anomaly", {})),
            segments=tuple(self.segment(i, s) for i, s in enumerate(
                self.table_list(doc, "segment"))),
            channels=self.channels(self.table_list(doc, "channel"), len(raw_phases)),
            transient=self.transient(doc.get("transient", {})),
            memory_dump=self.forensics(doc.get("forensics", {})),
        )

    def table_list(self, doc: dict[str, Any], name: str) -> list[Any]:
        value = doc.get(name, [])
        if not isinstance(value, list):
            raise self.fail(f"write [[{name}]] tables (an array of tables)", field=name)
        return value

    def channels(self, raw: list[Any], phase_count: int) -> tuple[ChannelGrant, ...]:
        grants: list[ChannelGrant] = []
        #: (sender, receiver) pairs granted so far: a set, so many grants stay linear
        granted: set[tuple[str, str]] = set()
        for index, table in enumerate(raw):
            where = f"channel[{index}]"
            if not isinstance(table, dict):
                raise self.fail("each channel must be a [[channel]] table", field=where)
            self.only_known(table, _CHANNEL_FIELDS, where=f" in {where}")
            ends = []
            for end in ("from", "to"):
                value = table.get(end)
                if not isinstance(value, str) or not _NAME_RE.match(value) \
                        or len(value) > MAX_NAME:
                    raise self.fail("needs a zone name (a segment's name) of letters, digits, "
                                    f"'.', '_' or '-', at most {MAX_NAME} characters",
                                    field=f"{where}.{end}")
                ends.append(value)
            if ends[0] == ends[1]:
                raise self.fail("a channel joins two different zones", field=f"{where}.to")
            direction = table.get("direction", "one-way")
            if direction not in ("one-way", "both"):
                raise self.fail(f"{shown(direction)} is not a direction; use \"one-way\" (from -> "
                                "to) or \"both\"", field=f"{where}.direction")
            try:
                size = parse_size(table.get("max_message", "64KiB"))
            except (ValueError, TypeError) as exc:
                raise self.fail(str(exc), field=f"{where}.max_message") from None
            if not 0 < size <= MAX_CHANNEL_MESSAGE:
                raise self.fail(f"must be above 0 and at most {MAX_CHANNEL_MESSAGE // 2**20}MiB",
                                field=f"{where}.max_message")
            rate = table.get("max_rate", 100)
            if not _number(rate) or not 0 < rate <= MAX_CHANNEL_RATE:
                raise self.fail(f"{shown(rate)} must be a number of messages per second above 0 "
                                f"and at most {MAX_CHANNEL_RATE:,}", field=f"{where}.max_rate")
            phases = table.get("phases")
            if phases is not None:
                if (not isinstance(phases, list) or not phases or not all(
                        isinstance(p, int) and not isinstance(p, bool) for p in phases)):
                    raise self.fail("must be a list of phase indices, e.g. [0, 1]",
                                    field=f"{where}.phases")
                bad = [p for p in phases if not 0 <= p < phase_count]
                if bad:
                    raise self.fail(f"no phase {bad[0]}: the phases are 0 to "
                                    f"{phase_count - 1} (the sender's)",
                                    field=f"{where}.phases")
            content = table.get("audit_content", False)
            if not isinstance(content, bool):
                raise self.fail("must be true or false", field=f"{where}.audit_content")
            grant = ChannelGrant(ends[0], ends[1], direction == "both", size, float(rate),
                                 None if phases is None else tuple(sorted(set(phases))),
                                 content)
            paths = [(grant.source, grant.target)] + (
                [(grant.target, grant.source)] if grant.both else [])
            if any(p in granted for p in paths):
                raise self.fail(f"{grant.source} -> {grant.target} is granted twice",
                                field=where)
            granted.update(paths)
            grants.append(grant)
        return tuple(grants)

    def transient(self, table: Any) -> TransientRules:
        if not isinstance(table, dict):
            raise self.fail("[transient] must be a table", field="transient")
        self.only_known(table, _TRANSIENT_FIELDS, where=" in [transient]")
        enabled = table.get("enabled", False)
        if not isinstance(enabled, bool):
            raise self.fail("must be true or false", field="transient.enabled")
        triggers = _str_list(table.get("triggers", ["exec"]))
        if triggers is None or not triggers or any(t not in _TRIGGERS for t in triggers):
            raise self.fail("must be a list of \"exec\" and/or \"connect\"",
                            field="transient.triggers")
        expect = _str_list(table.get("expect_exec", []))
        if expect is None or not all(v.startswith(("/", "*")) for v in expect):
            raise self.fail("must be a list of absolute path globs",
                            field="transient.expect_exec")
        try:
            expect = [canonical_glob(v) for v in expect]
        except ValueError as exc:
            raise self.fail(str(exc), field="transient.expect_exec") from None
        policy = table.get("policy")
        if policy is not None and (not isinstance(policy, str) or not policy):
            raise self.fail("must be a policy name or path", field="transient.policy")
        scale = table.get("lifespan_scale", 0.25)
        if not _number(scale) or not 0 < scale <= 1:
            raise self.fail(f"{shown(scale)} must be a number in (0, 1]: a transient zone never "
                            "outlives its parent's schedule", field="transient.lifespan_scale")
        most = table.get("max_zones", 8)
        if isinstance(most, bool) or not isinstance(most, int) or not 1 <= most <= 256:
            raise self.fail(f"{shown(most)} must be a whole number from 1 to 256",
                            field="transient.max_zones")
        return TransientRules(enabled, tuple(dict.fromkeys(triggers)), tuple(expect), policy,
                              float(scale), most)

    def forensics(self, table: Any) -> bool:
        if not isinstance(table, dict):
            raise self.fail("[forensics] must be a table", field="forensics")
        self.only_known(table, _FORENSICS_FIELDS, where=" in [forensics]")
        dump = table.get("memory_dump", False)
        if not isinstance(dump, bool):
            raise self.fail("must be true or false", field="forensics.memory_dump")
        return dump

    def phases(self, raw_phases: list[Any]) -> tuple[Phase, ...]:
        phases: list[Phase] = []
        current = Restrictions()
        for index, table in enumerate(raw_phases):
            if not isinstance(table, dict):
                raise self.fail("each phase must be a [[phase]] table", phase=index)
            self.only_known(table, _PHASE_FIELDS, phase=index)
            at_ms = self.at(index, table)
            if phases and at_ms <= phases[-1].at_ms:
                raise self.fail(
                    f"at {shown(table['at'])} is not after the previous phase's "
                    f"{shown(raw_phases[index - 1]['at'])}; phases must be listed in strictly "
                    "increasing time order", phase=index, field="at")
            if phases and phases[-1].terminate:
                raise self.fail("no phase may follow the terminate phase", phase=index,
                                field="at")
            sets = self.restriction_fields(index, table)
            terminate = self.action(index, table)
            if terminate and sets:
                raise self.fail(
                    "a terminate phase ends the zone; it cannot also set "
                    + ", ".join(sets), phase=index, field=next(iter(sets)))
            if terminate and at_ms == 0:
                raise self.fail("a terminate phase at 0 would end the zone before its workload "
                                "runs; give it a later 'at'", phase=index, field="at")
            if not terminate and not sets:
                raise self.fail("the phase changes nothing; set a restriction or "
                                "action = \"terminate\"", phase=index)
            following = current.merged(**sets)
            if "egress" in sets and following.network is not NetworkMode.FULL:
                raise self.fail("an egress allow-list only applies while network is 'full'",
                                phase=index, field="egress")
            if following.network is not NetworkMode.FULL:
                # without a NIC an allow-list has nothing left to filter
                following = replace(following, egress=None)
            for field, why in current.loosenings(following):
                raise self.fail(
                    f"{why}; a later phase may only tighten (monotonic policies)",
                    phase=index, field=field)
            if "cpus" in sets:  # after the order of the phases: a policy's own error first
                self.on_this_host(index, table["cpus"], following.cpus)
            current = following
            phases.append(Phase(index=index, at_ms=at_ms, sets=sets, restrictions=current,
                                terminate=terminate))
        return tuple(phases)

    def at(self, index: int, table: dict[str, Any]) -> int:
        if "at" not in table:
            raise self.fail("every phase needs 'at', e.g. at = \"30s\"", phase=index,
                            field="at")
        value = table["at"]
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise self.fail(f"{shown(value)} has no unit; write e.g. \"{value}s\" (units: ms, s, "
                            "m, h)", phase=index, field="at")
        if not isinstance(value, str):
            raise self.fail("must be a duration string like \"5s\"", phase=index, field="at")
        if value.strip().startswith("-"):
            raise self.fail(f"{shown(value)} is negative; 'at' counts from the workload's start",
                            phase=index, field="at")
        try:
            return parse_duration_ms(value)
        except ValueError as exc:
            raise self.fail(str(exc), phase=index, field="at") from None

    def restriction_fields(self, index: int, table: dict[str, Any]) -> dict[str, object]:
        parsers: dict[str, Callable[[Any], object]] = {
            "network": _network,
            "egress": _egress,
            "cpu_shares": _int_in(2, 262144, "cpu_shares"),
            "cpu_quota": _quota,
            "cpus": _cpus,
            "memory": _memory,
            "pids": _int_in(1, 4_194_304, "pids"),
            "filesystem": _filesystem,
        }
        sets: dict[str, object] = {}
        for field, parse in parsers.items():
            if field in table:
                try:
                    sets[field] = parse(table[field])
                except (ValueError, TypeError) as exc:
                    raise self.fail(str(exc), phase=index, field=field) from None
        return sets

    def on_this_host(self, index: int, value: Any, cpus: frozenset[int] | None) -> None:
        """A zone pinned to a CPU the host lacks could not even be made (the cpuset write
        fails): refused here, at load time."""
        missing = (cpus or frozenset()) - self.host_cpus
        if missing:
            raise self.fail(f"{shown(value)} names CPU(s) {format_cpuset(missing)[:60]} this "
                            f"host does not have (its CPUs: {format_cpuset(self.host_cpus)})",
                            phase=index, field="cpus",
                            hint="CPU numbers as in /sys/devices/system/cpu/online")

    def action(self, index: int, table: dict[str, Any]) -> bool:
        if "action" not in table:
            return False
        if table["action"] != "terminate":
            raise self.fail(f"{shown(table['action'])} is not an action; the only action is "
                            "\"terminate\"", phase=index, field="action")
        return True

    def anomaly(self, table: Any) -> AnomalyRules:
        if not isinstance(table, dict):
            raise self.fail("[anomaly] must be a table", field="anomaly")
        self.only_known(table, _ANOMALY_FIELDS, where=" in [anomaly]")
        monitor = table.get("monitor", True)
        if not isinstance(monitor, bool):
            raise self.fail("must be true or false", field="anomaly.monitor")
        # what the agent watches for: the profile's own declaration checks it
        try:
            watch = Profile.from_dict({k: table[k] for k in POLICY_FIELDS if k in table})
        except ProfileError as exc:
            hint = "names as in syscalls(2), e.g. \"finit_module\"" \
                if exc.field == "deny_syscalls" else None
            raise self.fail(exc.message, field=f"anomaly.{exc.field}", hint=hint) from None
        reaction = self._reaction(table.get("reaction", "accelerate"), "anomaly.reaction")
        factor = table.get("factor", 4.0)
        if not _number(factor) or not 1 < factor <= MAX_FACTOR:
            raise self.fail(f"{shown(factor)} must be a number above 1 and at most "
                            f"{MAX_FACTOR:,} (remaining lifespan is divided by it)",
                            field="anomaly.factor")
        escalate_raw = table.get("escalate", [])
        if not isinstance(escalate_raw, list):
            raise self.fail("must be a list of reactions for the 2nd, 3rd, ... anomaly, like "
                            "[\"jump\", \"terminate\"]", field="anomaly.escalate")
        escalate = tuple(self._reaction(r, f"anomaly.escalate[{i}]")
                         for i, r in enumerate(escalate_raw))
        on_raw = table.get("on", {})
        if not isinstance(on_raw, dict):
            raise self.fail("must be a table of category = reaction", field="anomaly.on")
        known = (*ANOMALY_CATEGORIES, *_LINK_CATEGORIES)
        on = {}
        for category, value in on_raw.items():
            if category not in known:
                raise self.fail(f"{shown(category)} is not an anomaly category; known: "
                                + ", ".join(sorted(set(known))), field=f"anomaly.on.{category}")
            on[category] = self._reaction(value, f"anomaly.on.{category}")
        return AnomalyRules(monitor=monitor, watch=watch, reaction=reaction,
                            factor=float(factor), escalate=escalate, on=on)

    def _reaction(self, value: Any, field: str) -> Reaction:
        try:
            return Reaction(value)
        except ValueError:
            raise self.fail(f"{shown(value)} is not a reaction; use one of: "
                            + ", ".join(r.value for r in Reaction), field=field) from None

    def segment(self, index: int, table: Any) -> SegmentSelector:
        field = f"segment[{index}]"
        if not isinstance(table, dict):
            raise self.fail("each segment must be a [[segment]] table", field=field)
        self.only_known(table, _SEGMENT_FIELDS, where=f" in {field}")
        match = table.get("match")
        if not isinstance(match, dict) or not match:
            raise self.fail("needs match = { role = \"...\" } and/or capability",
                            field=f"{field}.match")
        self.only_known(match, _MATCH_FIELDS, where=f" in {field}.match")
        role = match.get("role")
        if role is not None and not isinstance(role, str):
            raise self.fail("must be a string", field=f"{field}.match.role")
        capability = match.get("capability", [])
        caps = [capability] if isinstance(capability, str) else _str_list(capability)
        if caps is None:
            raise self.fail("must be a string or a list of strings",
                            field=f"{field}.match.capability")
        scale = table.get("lifespan_scale")
        if not _number(scale) or not 0 < scale <= 100:
            raise self.fail(f"{shown(scale)} must be a number in (0, 100]; 0.25 gives a quarter of "
                            "the lifespan", field=f"{field}.lifespan_scale")
        policy = table.get("policy")
        if policy is not None and (not isinstance(policy, str) or not policy):
            raise self.fail("must be a policy name (policies/NAME.toml) or a path",
                            field=f"{field}.policy")
        return SegmentSelector(role, tuple(caps), float(scale), policy)


def _number(value: Any) -> TypeGuard[int | float]:
    """A finite int or float (not a bool: TOML's true is no number)."""
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _str_list(value: Any) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _network(value: Any) -> NetworkMode:
    try:
        return NetworkMode(value)
    except ValueError:
        raise ValueError(f"{shown(value)} is not a network mode; use one of: "
                         + ", ".join(m.value for m in NetworkMode)) from None


def _filesystem(value: Any) -> FilesystemMode:
    try:
        return FilesystemMode(value)
    except ValueError:
        raise ValueError(f"{shown(value)} is not a filesystem mode; use 'rw' or 'ro'") from None


def _egress(value: Any) -> tuple[EgressRule, ...]:
    items = _str_list(value)
    if items is None:
        raise ValueError("must be a list of \"address:port\" strings, e.g. [\"192.0.2.10:443\"]")
    if len(items) > MAX_EGRESS:
        raise ValueError(f"{len(items)} egress entries; at most {MAX_EGRESS} per phase")
    return tuple(sorted({EgressRule.parse(item) for item in items}, key=EgressRule.sort_key))


def _int_in(low: int, high: int, name: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{shown(value)} must be a whole number from {low} to {high}")
        return value

    return parse


def _quota(value: Any) -> float:
    if not _number(value) or not 0 < value <= MAX_CPU_QUOTA:
        raise ValueError(f"{shown(value)} must be a percentage of one CPU above 0 and at most "
                         f"{MAX_CPU_QUOTA} (50 = half a CPU, 200 = two CPUs)")
    if value < 1:
        raise ValueError(f"{shown(value)} is below 1% of a CPU; the kernel's minimum quota is 1 ms "
                         "per 100 ms period, so use at least 1")
    return float(value)


def _cpus(value: Any) -> frozenset[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("must be a CPU list string like \"0\" or \"0-1\"")
    return parse_cpuset(value)


def _memory(value: Any) -> int:
    size = parse_size(value)
    if size < MIN_MEMORY:
        raise ValueError(f"{shown(value)} is below the 4MiB a zone needs to run anything; "
                         "write e.g. \"64MiB\"")
    return size


def _unknown_syscalls(names: list[str]) -> list[str]:
    """Names the agent's syscall table does not know (it is what the filter is built from)."""
    from guest_agent import syscalls  # the agent's own table: one source of truth

    return [n for n in names if n not in syscalls.X86_64]
