"""A workload's monitoring profile (the ``monitor`` object of ``start`` and ``profile``
messages): each field declared once (`setting`: kind, default, meaning, and whether a
policy sets it), its validation, and the verdicts the monitor asks of it. The protocol's
documentation (`PROFILE_FIELDS`) and the policy loader's [anomaly] fields (`POLICY_FIELDS`)
are read from these declarations.

Globs: ``*`` and ``?`` stay within one path component, ``**`` spans directories (``/a/**``
matches everything below /a, ``/a/**/b`` also /a/b). sensitive_paths must be absolute; an
exec glob that does not start with ``/`` matches at any depth (``*/sh`` is any ``.../sh``).

Limits (a profile beyond them is a ProfileError naming the field and the limit): at most
MAX_PROFILE_LIST entries per list, MAX_GLOB_LENGTH characters per glob, MAX_DOUBLESTARS
``**`` components per glob (runs such as ``/**/**`` count once and are kept collapsed), and
``**`` only as a whole component. Matching takes time linear in the path for each piece of
a glob, whatever the glob and the path (see `glob_regex`).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import posixpath
import re
from dataclasses import dataclass, field, fields
from typing import Any, Union

from guest_agent.protocol import CODE_PATH_TRIGGERS
from guest_agent.syscalls import numbers

NETWORKS = ("full", "loopback", "none")
CONTAINS = ("none", "deny", "kill")
DEFAULT_SHELLS = ("*/sh", "*/bash", "*/dash", "*/zsh", "*/ash", "*/ksh", "*/busybox")
#: programs that run code they read (a script argument, or stdin): judged by its origin
DEFAULT_INTERPRETERS = (
    *DEFAULT_SHELLS, "*/python", "*/python2*", "*/python3*", "*/pypy*", "*/perl", "*/perl5*",
    "*/ruby*",
    "*/node", "*/nodejs", "*/php", "*/php?*", "*/lua", "*/lua5*", "*/tclsh*", "*/awk",
    "*/gawk", "*/mawk")
#: bounds of sample_interval (s): faster would cost more than it tells, slower misses spikes
MIN_SAMPLE = 0.05
MAX_SAMPLE = 10.0
#: seconds a sustained-CPU judgement may span (cpu_window)
MIN_WINDOW = 1.0
MAX_WINDOW = 3600.0
#: how long a held code path may wait for the host (s), and the default
MAX_HOLD = 60.0
DEFAULT_HOLD = 5.0

#: items of any list field of a profile (globs, syscall names, egress entries)
MAX_PROFILE_LIST = 1024
#: characters of one glob a policy writes
MAX_GLOB_LENGTH = 1024
#: '**' components of one glob, after runs of them are collapsed ('/a/**/**' is '/a/**')
MAX_DOUBLESTARS = 8
#: the host's list of foreseen programs (transient.expect_exec): the policy's globs, the
#: workload's own program and what the analysis found; each at most PATH_MAX characters
MAX_EXPECTED_PROGRAMS = 4096
MAX_PROGRAM_PATH = 4096

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ProfileError(ValueError):
    """A profile that cannot be used; `field` names the field (None: the profile itself),
    and the text says "monitor.FIELD: what is wrong"."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.message = message
        super().__init__(f"monitor.{field}: {message}" if field else f"monitor: {message}")


# Globs are matched by regexes built so that they cannot backtrack catastrophically: a
# plain translation ('**' as '.*', '*' as '[^/]*') takes time of the order of
# len(path) ** (number of stars) on a path that almost matches, which a workload chooses.
# Here '**' is a whole component (any number of components), '*' stays within one, and
# every star but the last of its kind commits to its leftmost fit, as the classic wildcard
# matcher does (a later fit never helps: the next star absorbs the difference). Python 3.9
# has no atomic groups; a lookahead is atomic, so "(?=(?P<g>X))(?P=g)" is X, committed.
# Each piece is then tried at most once per position: linear in the path for each piece.

_ANY_COMPONENTS = "(?:[^/]*/)*"


def _collapsed(parts: list[str]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part != "**" or not out or out[-1] != "**":
            out.append(part)
    return out


def _components(glob: str) -> list[str]:
    """The glob's components, '**' runs collapsed; a relative glob ('*/sh', 'busybox')
    matches at any depth, so it starts with '**'."""
    parts = glob.split("/")
    return _collapsed(parts if glob.startswith("/") else ["**", *parts])


class _Names:
    """Group names unique within one regex."""

    def __init__(self) -> None:
        self.count = 0

    def committed(self, inner: str) -> str:
        self.count += 1
        name = f"g{self.count}"
        return f"(?=(?P<{name}>{inner}))(?P={name})"


def _block(text: str) -> str:
    return "".join("[^/]" if c == "?" else re.escape(c) for c in text)


def _component(part: str, names: _Names) -> str:
    """One component: blocks between '*'s, the first anchored at the component's start,
    the last at its end (the '/' or the end of the path that follows), the middle ones
    committed to their leftmost fit. '**' within a name is '*' there."""
    blocks = part.split("*")
    if len(blocks) == 1:
        return _block(part)
    middle = "".join(names.committed("[^/]*?" + _block(b)) for b in blocks[1:-1] if b)
    return _block(blocks[0]) + middle + "[^/]*" + _block(blocks[-1])


def _translate(glob: str) -> str:
    parts = _components(glob)
    if parts[-1] == "**":
        # a trailing '**' is at least one more component: '/a/**' is what lies below /a
        parts.append("*")
    names = _Names()
    # pieces: the components before the first '**', then those after each '**'
    pieces: list[list[str]] = [[]]
    for part in parts:
        if part == "**":
            pieces.append([])
        else:
            pieces[-1].append(part)
    total = len(parts) - parts.count("**")
    seen = 0
    out: list[str] = []
    for index, piece in enumerate(pieces):
        text = ""
        for part in piece:
            seen += 1
            text += _component(part, names) + ("/" if seen < total else "")
        if index == 0:
            out.append(text)
        elif index < len(pieces) - 1:
            out.append(names.committed("(?:[^/]*/)*?" + text))
        else:
            out.append(_ANY_COMPONENTS + text)
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def glob_regex(glob: str) -> re.Pattern[str]:
    """The compiled regex of a path glob (see the module docstring), for `fullmatch`."""
    return re.compile(_translate(glob), re.DOTALL)


def glob_match(glob: str, path: str) -> bool:
    return glob_regex(glob).fullmatch(path) is not None


def canonical_glob(glob: str) -> str:
    """`glob` as a policy may write it, with '**' runs collapsed; ValueError saying why it
    cannot be used."""
    if not glob:
        raise ValueError("empty glob")
    if len(glob) > MAX_GLOB_LENGTH:
        raise ValueError(f"a glob of {len(glob)} characters; at most {MAX_GLOB_LENGTH}")
    if "\0" in glob:
        raise ValueError("a glob with a NUL character (no path has one)")
    parts = _collapsed(glob.split("/"))
    for part in parts:
        if "**" in part and part != "**":
            raise ValueError(f"{part[:60]!r}: '**' spans directories only as a whole "
                             "component (/a/**/b); within a name write '*'")
    stars = parts.count("**")
    if stars > MAX_DOUBLESTARS:
        raise ValueError(f"{stars} '**' components; at most {MAX_DOUBLESTARS} per glob")
    return "/".join(parts)


def first_match(globs: tuple[str, ...], path: str) -> str | None:
    for g in globs:
        if glob_match(g, path):
            return g
    return None


def normalize(path: str) -> str:
    """`path` without "." and ".." components or doubled slashes (no symlink resolution)."""
    if not path:
        return path
    norm = posixpath.normpath(path)
    return "/" + norm.lstrip("/") if norm.startswith("/") else norm


@dataclass(frozen=True)
class EgressRule:
    net: Network
    low: int
    high: int

    def matches(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                port: int) -> bool:
        return address.version == self.net.version and address in self.net \
            and self.low <= port <= self.high


def parse_egress(rule: str) -> EgressRule:
    """'10.0.0.0/24:80-90', '[::1]:443', '192.0.2.1', '2001:db8::/32' -> EgressRule;
    ValueError saying what is wrong."""
    text = rule.strip()
    ports = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{rule!r}: unclosed [")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{rule!r}: expected ':port' after ]")
            ports = rest[1:]
    elif text.count(":") == 1:
        host, ports = text.split(":")
    else:
        host = text  # an IPv4 net, or a bare IPv6 net (several colons, no port)
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        raise ValueError(f"{rule!r}: {host!r} is not an IP address or network") from None
    low, high = 1, 65535
    if ports:
        lo, _, hi = ports.partition("-")
        try:
            low = int(lo)
            high = int(hi) if hi else low
        except ValueError:
            raise ValueError(f"{rule!r}: {ports!r} is not a port or port range") from None
        if not (0 < low <= high <= 65535):
            raise ValueError(f"{rule!r}: ports must be 1-65535, low <= high")
    elif text.count(":") == 1 or text.endswith(":"):
        raise ValueError(f"{rule!r}: empty port")
    return EgressRule(net, low, high)


def _is_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # 0.0.0.0 and :: as a destination reach the local host, like loopback
    return address.is_loopback or address.is_unspecified


def is_local(address: str) -> bool:
    """Whether a connect to `address` (text, an IPv6 zone allowed) stays on this host."""
    try:
        return _is_local(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return False


@dataclass(frozen=True)
class TransientWatch:
    """The profile's ``transient``: which code paths are unforeseen. The expected programs
    are the host's list (the workload's own program, the policy's expect_exec, what the
    analysis found); any other exec, or a process's first connect off the host, is held
    and reported so the host can give the process subtree a transient zone."""

    triggers: tuple[str, ...] = ()
    expect_exec: tuple[str, ...] = ()
    hold_timeout: float = DEFAULT_HOLD

    @classmethod
    def from_dict(cls, d: Any) -> TransientWatch | None:
        """None when off (absent, empty, or no trigger); ProfileError names the field."""
        if d is None or d == {}:
            return None
        if not isinstance(d, dict):
            raise ProfileError("must be an object", field="transient")
        for key in d:
            if key not in ("triggers", "expect_exec", "hold_timeout"):
                raise ProfileError("unknown field (known: expect_exec, hold_timeout, triggers)",
                                   field=f"transient.{key}")
        values: dict[str, Any] = {}
        for name in ("triggers", "expect_exec"):
            v = d.get(name, [])
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x
                                                            for x in v):
                raise ProfileError("must be a list of non-empty strings",
                                   field=f"transient.{name}")
            if len(v) > MAX_EXPECTED_PROGRAMS:
                raise ProfileError(f"{len(v)} entries; at most {MAX_EXPECTED_PROGRAMS}",
                                   field=f"transient.{name}")
            longest = max(v, key=len, default="")
            if len(longest) > MAX_PROGRAM_PATH:
                raise ProfileError(f"an entry of {len(longest)} characters; at most "
                                   f"{MAX_PROGRAM_PATH} (PATH_MAX)", field=f"transient.{name}")
            values[name] = tuple(dict.fromkeys(v))
        for t in values["triggers"]:
            if t not in CODE_PATH_TRIGGERS:
                raise ProfileError(f"{t!r} is not one of " + ", ".join(CODE_PATH_TRIGGERS),
                                   field="transient.triggers")
        hold = d.get("hold_timeout", DEFAULT_HOLD)
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) \
                or not 0 < hold <= MAX_HOLD:
            raise ProfileError(f"must be a number in (0, {MAX_HOLD:g}] seconds",
                               field="transient.hold_timeout")
        if not values["triggers"]:
            return None
        return cls(values["triggers"], values["expect_exec"], float(hold))

    def to_dict(self) -> dict[str, Any]:
        return {"triggers": list(self.triggers), "expect_exec": list(self.expect_exec),
                "hold_timeout": self.hold_timeout}

    def on(self, trigger: str) -> bool:
        return trigger in self.triggers

    def expected(self, path: str, real: str = "") -> bool:
        """Whether exec'ing `path` (which resolves to `real`) is a foreseen code path: it
        or its resolved form matches an expect_exec glob."""
        path = normalize(path)
        if first_match(self.expect_exec, path) is not None:
            return True
        return bool(real) and first_match(self.expect_exec, normalize(real)) is not None


def setting(kind: str, default: Any, doc: str, *, policy: bool = False) -> Any:
    """A profile field, declared once: its kind (which `from_dict` checks), its default,
    what it means (the protocol's documentation, `PROFILE_FIELDS`), and whether a policy's
    [anomaly] table sets it (`POLICY_FIELDS`; the others come from the phase in force or
    the agent itself)."""
    return field(default=default, metadata={"kind": kind, "doc": doc, "policy": policy})


@dataclass(frozen=True)
class Profile:
    deny_syscalls: tuple[str, ...] = setting(
        "syscalls", (), "syscall names whose every call is an anomaly", policy=True)
    sensitive_paths: tuple[str, ...] = setting(
        "paths", (), "absolute path globs (* within a name, ** across directories)",
        policy=True)
    allow_exec: tuple[str, ...] = setting(
        "globs", (), "globs of programs that may be exec'd (empty: any not denied)",
        policy=True)
    deny_exec: tuple[str, ...] = setting(
        "globs", (), "globs of programs whose exec is an anomaly", policy=True)
    tripwires: tuple[str, ...] = setting(
        "paths", (), "files only this zone reaches, bound over its sensitive files in its "
        "view: every open of one is an attempt, decided before any byte is read "
        "(permission events; set by the host)")
    shells: tuple[str, ...] = setting(
        "globs", DEFAULT_SHELLS,
        "globs of shells: exec'd with a socket on stdin/stdout is a reverse shell")
    provenance: bool = setting(
        "bool", True, "judge code by its origin: an exec, executable mapping or preload of a "
        "file written from network data (by a process that connected out, or read what one "
        "wrote), or an interpreter running such a script or stdin, is dropped-code",
        policy=True)
    interpreters: tuple[str, ...] = setting(
        "globs", DEFAULT_INTERPRETERS,
        "globs of programs whose script argument or stdin is code (provenance)", policy=True)
    trusted_origins: tuple[str, ...] = setting(
        "egress", (), "destinations ('net[:port[-port]]') whose data is not network code: "
        "a package mirror (provenance)", policy=True)
    network: str = setting("network", "full", "full | loopback | none: the zone's network now")
    egress: tuple[str, ...] = setting(
        "egress", (), "allowed destinations now, as 'net[:port[-port]]' (empty: any when full)")
    max_forks_per_s: float = setting(
        "rate", 0, "process creations per second, counted at each sample (0: no limit)",
        policy=True)
    max_processes: float = setting(
        "rate", 0, "processes alive at once in the zone, at each sample: a fork loop under a "
        "slow CPU (0: no limit)", policy=True)
    max_syscalls_per_s: float = setting(
        "rate", 0, "read/write-family syscalls per second (0: no limit)", policy=True)
    max_cpu_share: float = setting(
        "share", 0, "share (0-1) of the CPUs the zone may run on that its processes may use, "
        "sustained over cpu_window: a miner after a benign start (0: no limit)", policy=True)
    cpu_window: float = setting(
        "window", 30, "seconds over which max_cpu_share is judged", policy=True)
    max_new_files_per_s: float = setting(
        "rate", 0, "files created per second (0: no limit)", policy=True)
    max_deletes_per_s: float = setting(
        "rate", 0, "files and directories removed (or truncated) per second: mass "
        "destruction (0: no limit)", policy=True)
    memory_spike_mib_per_s: float = setting(
        "rate", 0, "resident memory growth per second (0: no limit)", policy=True)
    contain: str = setting(
        "contain", "kill", "none | deny | kill: what the agent does to the offending process",
        policy=True)
    drops_are_anomalies: bool = setting(
        "bool", True, "lost or dropped monitoring events are an anomaly", policy=True)
    sample_interval: float = setting(
        "interval", 0.2, "seconds between two samples of the watched processes")
    transient: TransientWatch | None = setting(
        "transient", None, "{triggers: [exec|connect], expect_exec: [globs], hold_timeout: s}: "
        "a program outside expect_exec (or a process's first connect) is held and reported "
        "as a code-path event (empty or absent: off)")

    def __post_init__(self) -> None:
        # parsed once: verdicts run for every notified call
        object.__setattr__(self, "_egress", tuple(parse_egress(r) for r in self.egress))
        object.__setattr__(self, "_trusted",
                           tuple(parse_egress(r) for r in self.trusted_origins))

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        """Validate `d` (a start/profile message's ``monitor``, or a policy's [anomaly]
        fields); ProfileError names the first bad field."""
        if not isinstance(d, dict):
            raise ProfileError("must be an object")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ProfileError("unknown field (known: {})".format(
                    ", ".join(sorted(known))), field=str(key))
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in d:
                values[f.name] = _check(str(f.metadata["kind"]), f.name, d[f.name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, TransientWatch):
                v = v.to_dict()
            elif f.name == "transient":
                continue  # off: absent
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    # --- verdicts ---------------------------------------------------------------------

    def path_sensitive(self, path: str) -> str | None:
        """The sensitive_paths glob `path` matches, or None."""
        return first_match(self.sensitive_paths, normalize(path))

    def exec_verdict(self, path: str) -> str | None:
        """Why exec'ing `path` is unexpected, or None if it is fine."""
        path = normalize(path)
        denied = first_match(self.deny_exec, path)
        if denied is not None:
            return f"exec of {path} matches deny_exec {denied}"
        if self.allow_exec and first_match(self.allow_exec, path) is None:
            return f"exec of {path} is not in allow_exec"
        return None

    def trusted_origin(self, address: str, port: int) -> bool:
        """Whether data from (`address`, `port`) is trusted as code (trusted_origins)."""
        rules: tuple[EgressRule, ...] = getattr(self, "_trusted", ())
        if not rules:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(r.matches(ip, port) for r in rules)

    def connect_verdict(self, family: str, address: str, port: int) -> str | None:
        """Why a connect to (`family` inet|inet6|unix, `address`, `port`) is not allowed
        now, or None. For unix, `address` is the socket path ("@name": abstract)."""
        if family == "unix":
            if address.startswith("@") or not address:
                return None  # abstract sockets have no path to protect
            glob = self.path_sensitive(address)
            if glob is not None:
                return f"connect to unix socket {address} matches {glob}"
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"connect to unparsable address {address!r}"
        if _is_local(ip):
            return None
        shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        if self.network != "full":
            return f"connect to {shown} while the network is {self.network}"
        rules: tuple[EgressRule, ...] = getattr(self, "_egress", ())
        if not rules:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(r.matches(ip, port) for r in rules):
            return None
        return f"connect to {shown} is outside the egress allow-list"


def _strings(name: str, value: Any, most: int = MAX_PROFILE_LIST) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
        raise ProfileError("must be a list of strings", field=name)
    if len(value) > most:
        raise ProfileError(f"{len(value)} entries; at most {most}", field=name)
    return tuple(value)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


def _check(kind: str, name: str, value: Any) -> Any:
    """`value` of field `name` as the profile keeps it, or ProfileError saying why not."""
    if kind in ("syscalls", "paths", "globs", "egress"):
        items = _strings(name, value)
        if kind == "syscalls":
            try:
                numbers(items)
            except ValueError as e:
                raise ProfileError(str(e), field=name) from None
        out = []
        for item in items:
            if kind == "paths" and not item.startswith("/"):
                raise ProfileError(f"{_short(item)} is not absolute", field=name)
            if kind == "globs" and item and not item.startswith(("/", "*")):
                raise ProfileError(f"{_short(item)} must start with '/' (a path) or '*' (any "
                                   "directory, like '*/sh')", field=name)
            if kind in ("paths", "globs"):
                try:
                    item = canonical_glob(item)
                except ValueError as e:
                    raise ProfileError(str(e), field=name) from None
            if kind == "egress":
                try:
                    parse_egress(item)
                except ValueError as e:
                    raise ProfileError(str(e), field=name) from None
            out.append(item)
        return tuple(out)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ProfileError("must be true or false", field=name)
        return value
    if kind in ("rate", "interval"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ProfileError("must be a number", field=name)
        if kind == "rate" and value < 0:
            raise ProfileError("must be >= 0", field=name)
        if kind == "interval" and not MIN_SAMPLE <= value <= MAX_SAMPLE:
            raise ProfileError(f"must be between {MIN_SAMPLE} and {MAX_SAMPLE}", field=name)
        return float(value) if isinstance(value, float) else value
    if kind in ("share", "window"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ProfileError("must be a number", field=name)
        low, high = (0, 1) if kind == "share" else (MIN_WINDOW, MAX_WINDOW)
        if not low <= value <= high:
            raise ProfileError(f"must be between {low:g} and {high:g}", field=name)
        return float(value)
    if kind in ("network", "contain"):
        choices = NETWORKS if kind == "network" else CONTAINS
        if value not in choices:
            raise ProfileError("must be one of " + ", ".join(choices), field=name)
        return value
    if kind == "transient":
        return TransientWatch.from_dict(value)
    raise AssertionError(f"profile field {name} has an unknown kind {kind}")


#: field -> meaning (the protocol's documentation of ``start.monitor``/``profile.monitor``)
PROFILE_FIELDS = {f.name: str(f.metadata["doc"]) for f in fields(Profile)}
#: the fields a policy's [anomaly] table sets (the host adds the network ones per phase)
POLICY_FIELDS = tuple(f.name for f in fields(Profile) if f.metadata["policy"])

__all__ = ["CONTAINS", "MAX_DOUBLESTARS", "MAX_EXPECTED_PROGRAMS", "MAX_GLOB_LENGTH",
           "MAX_PROFILE_LIST", "MAX_PROGRAM_PATH", "NETWORKS", "POLICY_FIELDS", "PROFILE_FIELDS",
           "EgressRule", "Profile", "ProfileError", "TransientWatch", "canonical_glob",
           "first_match", "glob_match", "glob_regex", "is_local", "normalize", "parse_egress"]
