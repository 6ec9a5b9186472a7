"""Property-based fuzz of the policy loader: TOML documents built from the real field names
with hostile values (extreme and non-finite numbers, huge strings and lists, deep nesting,
wrong types), raw bytes, and documents nested to any depth. Each either loads or raises a
PolicyError naming the file, never another exception, within the example's deadline; what
loads holds only values a zone can use."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

import pytest

from guest_agent.profile import MAX_GLOB_LENGTH, POLICY_FIELDS
from hvtsm import limits
from hvtsm.errors import PolicyError
from hvtsm.policy import Policy, parse_policy
from hvtsm.policy.loader import (
    _ANOMALY_FIELDS,
    _CHANNEL_FIELDS,
    _PHASE_FIELDS,
    _SEGMENT_FIELDS,
    _TOP_FIELDS,
    _TRANSIENT_FIELDS,
)

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

HOST_CPUS = frozenset({0, 1})
#: per example: the issue's worst case took 57 s; a bounded loader takes milliseconds
DEADLINE = timedelta(seconds=2)


# --- a TOML writer (inline tables and arrays only: any document is one expression) --------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_key(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_key(key: object) -> str:
    """A basic string: JSON's escapes are TOML's, but for DEL and the C1 controls, which
    TOML wants escaped too."""
    return "".join(f"\\u{ord(c):04x}" if 0x7f <= ord(c) <= 0x9f else c
                   for c in json.dumps(str(key), ensure_ascii=False))


def toml_document(doc: dict[str, Any]) -> bytes:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items()).encode(
        "utf-8", "surrogatepass")


# --- hostile values -----------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
huge_ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(
    [0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 10**19]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0]))
digits = st.one_of(st.integers(0, 10**6).map(str), st.integers(1, 4000).map(lambda n: "9" * n),
                   st.sampled_from(["0.5", "1.5", "1e9", "99999999999999999999"]))
durations = st.builds(lambda n, u: f"{n}{u}", digits,
                      st.sampled_from(["ms", "s", "m", "h", "y", "d", "", " h"]))
sizes = st.builds(lambda n, u: f"{n}{u}", digits,
                  st.sampled_from(["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", ""]))
cpusets = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 10**9), st.integers(0, 10**9)),
    st.lists(st.integers(0, 9000).map(str), min_size=1, max_size=20).map(",".join),
    st.sampled_from(["0", "0-1", "1", "0-99999999", "", ",", "a", "3-1", "0-8191"]))
egress = st.one_of(
    st.builds(lambda a, b, p: f"10.{a}.{b}.0/24:{p}", st.integers(0, 300), st.integers(0, 300),
              st.one_of(st.integers(0, 70000).map(str), st.just("1-65535"), digits)),
    st.sampled_from(["[::1]:80", "[2001:db8::]:1-2", "192.0.2.1", "example.com:443", ":", "[",
                     "10.0.0.0/33:80", "0.0.0.0/0"]))
globs = st.one_of(
    st.builds(lambda parts: "/" + "/".join(parts),
              st.lists(st.sampled_from(["**", "*", "a", "?", "a*b", "x**", "etc", ""]),
                       max_size=30)),
    st.integers(1, 3000).map(lambda n: "/**" * n),
    st.integers(0, 2 * MAX_GLOB_LENGTH).map(lambda n: "/" + "x" * n),
    st.sampled_from(["*/sh", "relative", "", "/\x00", "/home/*/.ssh/**"]))


def nested(leaf: Any, depth: int) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


scalars = st.one_of(huge_ints, floats, text, st.booleans(), durations, sizes, cpusets,
                    egress, globs, st.sampled_from(["full", "loopback", "none", "ro", "rw",
                                                    "terminate", "kill", "deny", "jump"]))
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(text, inner, max_size=5)), max_leaves=20)
hostile = st.one_of(
    anything,
    st.builds(nested, scalars, st.integers(1, 40)),
    st.lists(scalars, min_size=0, max_size=1500),
    st.integers(0, 20_000).map(lambda n: "s" * n))

def usual_or(usual: Any, *odd: Any) -> Any:
    """Mostly (8 in 10) a value a policy would hold, so that the checks after the first
    are reached too; else an odd one of its kind, else anything."""
    unusual = st.one_of(*odd, hostile)
    return st.integers(0, 9).flatmap(lambda n: usual if n < 8 else unusual)


FIELD_VALUES: dict[str, Any] = {
    "at": usual_or(st.sampled_from(["1s", "5s", "10m", "2h"]), durations),
    "network": usual_or(st.sampled_from(["full", "loopback", "none"])),
    "egress": usual_or(st.lists(egress, max_size=40), st.integers(0, 3000).map(
        lambda n: [f"10.0.{i // 256 % 256}.{i % 256}" for i in range(n)])),
    "cpu_shares": usual_or(st.integers(2, 262144), st.integers(-5, 10**7)),
    "cpu_quota": usual_or(st.integers(1, 400), floats, st.integers(-5, 10**7)),
    "cpus": usual_or(st.sampled_from(["0", "1", "0-1", "0,1"]), cpusets),
    "memory": usual_or(st.sampled_from(["64MiB", "512MiB", "1GiB", "1EiB"]), sizes, huge_ints),
    "pids": usual_or(st.integers(1, 4096), st.integers(-5, 5_000_000)),
    "filesystem": usual_or(st.sampled_from(["rw", "ro"])),
    "action": usual_or(st.just("terminate")),
    "factor": usual_or(st.floats(1.01, 100), floats, huge_ints),
    "lifespan_scale": usual_or(st.floats(0.01, 1), floats),
    "max_rate": usual_or(st.floats(0.1, 1000), floats),
    "max_message": usual_or(st.sampled_from(["1KiB", "1MiB", "16MiB"]), sizes, huge_ints),
    "from": usual_or(st.sampled_from(["a", "b", "c"])),
    "to": usual_or(st.sampled_from(["a", "b", "c"])),
    "match": usual_or(st.fixed_dictionaries({"role": st.sampled_from(["fetch", "parse"])})),
    "reaction": usual_or(st.sampled_from(["accelerate", "jump", "freeze", "terminate"])),
    "contain": usual_or(st.sampled_from(["none", "deny", "kill"])),
    "deny_syscalls": usual_or(st.lists(st.sampled_from(["ptrace", "bpf", "nosuch"]),
                                       max_size=5)),
    **dict.fromkeys(("sensitive_paths", "allow_exec", "deny_exec", "expect_exec"),
                    usual_or(st.lists(globs, max_size=20), st.integers(0, 1500).map(
                        lambda n: [f"/f{i}" for i in range(n)]))),
    **dict.fromkeys(("max_forks_per_s", "max_processes", "max_syscalls_per_s",
                     "max_new_files_per_s", "memory_spike_mib_per_s"),
                    usual_or(st.integers(0, 1000), floats, huge_ints)),
}


def values_for(field: str) -> Any:
    return FIELD_VALUES.get(field, hostile)


def table_of(fields: tuple[str, ...], *, needs: tuple[str, ...] = ()) -> Any:
    return st.fixed_dictionaries({f: values_for(f) for f in needs},
                                 optional={f: values_for(f) for f in fields if f not in needs})


@st.composite
def phase_lists(draw: Any) -> list[dict[str, Any]]:
    """Phases, usually in increasing time (else the first check refuses them all)."""
    phases = draw(st.lists(table_of(tuple(f for f in _PHASE_FIELDS if f != "action"),
                                    needs=("at",)), min_size=1, max_size=6))
    if draw(st.integers(0, 3)):
        for i, phase in enumerate(phases):
            phase["at"] = f"{i}s"
    if draw(st.booleans()):
        phases.append({"at": "1h", "action": draw(values_for("action"))})
    return phases


phase_table = table_of(_PHASE_FIELDS, needs=("at",))
documents = st.fixed_dictionaries(
    {"name": usual_or(st.just("fuzz")), "phase": st.one_of(phase_lists(), phase_lists(),
                                                          hostile)},
    optional={
        "description": usual_or(text),
        "anomaly": usual_or(table_of(_ANOMALY_FIELDS)),
        "segment": usual_or(st.lists(table_of(_SEGMENT_FIELDS, needs=("match",
                                                                        "lifespan_scale")),
                                     max_size=3)),
        "channel": usual_or(st.lists(table_of(_CHANNEL_FIELDS, needs=("from", "to")),
                                     max_size=3)),
        "transient": usual_or(table_of(_TRANSIENT_FIELDS)),
        "forensics": hostile,
    })


def check(raw: bytes) -> Policy | None:
    """Load or a PolicyError naming the file; what loads is usable by a zone."""
    try:
        policy = parse_policy(raw, source="fuzz.toml", host_cpus=HOST_CPUS)
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.toml"), str(exc)
        assert len(str(exc)) < 1000, str(exc)
        return None
    for phase in policy.phases:
        assert 0 <= phase.at_ms <= limits.MAX_DURATION_MS
        r = phase.restrictions
        assert r.memory is None or limits.MIN_MEMORY <= r.memory <= limits.MAX_SIZE
        assert r.cpus is None or r.cpus <= HOST_CPUS
        assert r.cpu_quota is None or 1 <= r.cpu_quota <= limits.MAX_CPU_QUOTA
        assert r.egress is None or len(r.egress) <= limits.MAX_EGRESS
    assert len(policy.phases) <= limits.MAX_PHASES
    assert math.isfinite(policy.anomaly.factor) and policy.anomaly.factor > 1
    watch = policy.anomaly.watch
    for glob in (*watch.sensitive_paths, *watch.allow_exec, *watch.deny_exec,
                 *policy.transient.expect_exec):
        assert len(glob) <= MAX_GLOB_LENGTH and "/**/**" not in glob
    assert all(math.isfinite(getattr(watch, f)) for f in POLICY_FIELDS
               if isinstance(getattr(watch, f), float))
    return policy


@hypothesis.settings(deadline=DEADLINE)
@hypothesis.given(documents)
def test_documents_of_real_fields_load_or_name_the_problem(doc: dict[str, Any]) -> None:
    check(toml_document(doc))


@hypothesis.settings(deadline=DEADLINE)
@hypothesis.given(st.one_of(phase_lists(), st.lists(phase_table, min_size=1, max_size=8),
                           st.integers(0, 400).map(lambda n: [{"at": f"{i}s", "pids": 1000 - i}
                                                              for i in range(n)])))
def test_phases_load_or_name_the_problem(phases: list[dict[str, Any]]) -> None:
    check(toml_document({"name": "fuzz", "phase": phases}))


@hypothesis.settings(deadline=DEADLINE)
@hypothesis.given(st.binary(max_size=4096))
def test_raw_bytes_load_or_name_the_problem(raw: bytes) -> None:
    check(raw)


@hypothesis.settings(deadline=DEADLINE, max_examples=40)
@hypothesis.given(depth=st.integers(1, 50_000), kind=st.sampled_from(["[", "{"]),
                  where=st.sampled_from(["x", "anomaly.on", "phase"]))
def test_any_nesting_loads_or_names_the_problem(depth: int, kind: str, where: str) -> None:
    value = "[" * depth + "]" * depth if kind == "[" else "{a = " * depth + "1" + "}" * depth
    head = 'name = "fuzz"\n'
    if where == "phase":
        raw = head + f"phase = [{{at = \"0s\", pids = 9, egress = {value}}}]\n"
    elif where == "anomaly.on":
        raw = head + '[[phase]]\nat = "0s"\npids = 9\n[anomaly]\non = ' + value + "\n"
    else:
        raw = head + f"x = {value}\n"
    # the one usable document among them: an empty egress list (nothing may leave)
    usable = where == "phase" and kind == "[" and depth == 1
    assert (check(raw.encode()) is None) is not usable


@hypothesis.settings(deadline=DEADLINE, max_examples=30)
@hypothesis.given(st.sampled_from((*_TOP_FIELDS, "phase.egress", "anomaly.deny_exec")),
                  st.integers(limits.MAX_STRING, 300_000))
def test_huge_strings_are_refused_with_a_short_message(field: str, size: int) -> None:
    value = toml_value("\u00e9" * size)
    if field == "phase.egress":
        raw = f'name = "f"\n[[phase]]\nat = "0s"\negress = [{value}]\n'
    elif field == "anomaly.deny_exec":
        raw = f'name = "f"\n[[phase]]\nat = "0s"\npids = 1\n[anomaly]\ndeny_exec = [{value}]\n'
    else:
        raw = f'name = "f"\n[[phase]]\nat = "0s"\npids = 1\n{json.dumps(field)} = {value}\n'
    assert check(raw.encode()) is None
