"""A workload's monitoring profile (the ``monitor`` object of ``start`` and ``profile``
messages, protocol.PROFILE_FIELDS): validation and the verdicts the monitor asks of it.

Globs: ``*`` and ``?`` stay within one path component, ``**`` spans directories (``/a/**``
matches everything below /a, ``/a/**/b`` also /a/b). sensitive_paths must be absolute; an
exec glob that does not start with ``/`` matches at any depth (``*/sh`` is any ``.../sh``).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, fields
from typing import Any, Union

from guest_agent.protocol import CODE_PATH_TRIGGERS, PROFILE_FIELDS
from guest_agent.syscalls import numbers

NETWORKS = ("full", "loopback", "none")
CONTAINS = ("none", "deny", "kill")
DEFAULT_SHELLS = ("*/sh", "*/bash", "*/dash", "*/zsh", "*/ash", "*/ksh", "*/busybox")
#: bounds of sample_interval (s): faster would cost more than it tells, slower misses spikes
MIN_SAMPLE = 0.05
MAX_SAMPLE = 10.0
#: how long a held code path may wait for the host (s), and the default
MAX_HOLD = 60.0
DEFAULT_HOLD = 5.0

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ProfileError(ValueError):
    """A profile that cannot be used; the text names the field."""


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def glob_regex(glob: str) -> re.Pattern[str]:
    """The compiled regex of a path glob (see the module docstring)."""
    cached = _GLOB_CACHE.get(glob)
    if cached is not None:
        return cached
    pattern = glob if glob.startswith("/") else "**/" + glob
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(c))
            i += 1
    compiled = re.compile("".join(out), re.DOTALL)
    _GLOB_CACHE[glob] = compiled
    return compiled


def glob_match(glob: str, path: str) -> bool:
    return glob_regex(glob).fullmatch(path) is not None


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
            raise ProfileError("monitor.transient: must be an object")
        for key in d:
            if key not in ("triggers", "expect_exec", "hold_timeout"):
                raise ProfileError(f"monitor.transient.{key}: unknown field (known: "
                                   "expect_exec, hold_timeout, triggers)")
        values: dict[str, Any] = {}
        for name in ("triggers", "expect_exec"):
            v = d.get(name, [])
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x
                                                            for x in v):
                raise ProfileError(f"monitor.transient.{name}: must be a list of non-empty "
                                   "strings")
            values[name] = tuple(dict.fromkeys(v))
        for t in values["triggers"]:
            if t not in CODE_PATH_TRIGGERS:
                raise ProfileError(f"monitor.transient.triggers: {t!r} is not one of "
                                   + ", ".join(CODE_PATH_TRIGGERS))
        hold = d.get("hold_timeout", DEFAULT_HOLD)
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) \
                or not 0 < hold <= MAX_HOLD:
            raise ProfileError(f"monitor.transient.hold_timeout: must be a number in "
                               f"(0, {MAX_HOLD:g}] seconds")
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


@dataclass(frozen=True)
class Profile:
    deny_syscalls: tuple[str, ...] = ()
    sensitive_paths: tuple[str, ...] = ()
    allow_exec: tuple[str, ...] = ()
    deny_exec: tuple[str, ...] = ()
    shells: tuple[str, ...] = DEFAULT_SHELLS
    network: str = "full"
    egress: tuple[str, ...] = ()
    max_forks_per_s: float = 0
    max_processes: float = 0
    max_syscalls_per_s: float = 0
    max_new_files_per_s: float = 0
    memory_spike_mib_per_s: float = 0
    contain: str = "kill"
    drops_are_anomalies: bool = True
    sample_interval: float = 0.2
    transient: TransientWatch | None = None

    def __post_init__(self) -> None:
        # parsed once: verdicts run for every notified call
        object.__setattr__(self, "_egress", tuple(parse_egress(r) for r in self.egress))

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        """Validate `d` (a start/profile message's ``monitor``); ProfileError names the
        first bad field."""
        if not isinstance(d, dict):
            raise ProfileError("monitor: must be an object")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ProfileError("monitor.{}: unknown field (known: {})".format(
                    key, ", ".join(sorted(known))))
        values: dict[str, Any] = {}
        transient = TransientWatch.from_dict(d.get("transient"))
        if transient is not None:
            values["transient"] = transient
        for f in fields(cls):
            if f.name not in d or f.name == "transient":
                continue
            v = d[f.name]
            where = "monitor." + f.name
            default = f.default
            if isinstance(default, tuple):
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                    raise ProfileError(f"{where}: must be a list of strings")
                values[f.name] = tuple(v)
            elif isinstance(default, bool):
                if not isinstance(v, bool):
                    raise ProfileError(f"{where}: must be true or false")
                values[f.name] = v
            elif isinstance(default, (int, float)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
                        or v in (float("inf"), float("-inf")):
                    raise ProfileError(f"{where}: must be a number")
                if v < 0:
                    raise ProfileError(f"{where}: must be >= 0")
                values[f.name] = float(v) if isinstance(v, float) else v
            else:
                if not isinstance(v, str):
                    raise ProfileError(f"{where}: must be a string")
                values[f.name] = v
        prof_kwargs = values
        if prof_kwargs.get("network", "full") not in NETWORKS:
            raise ProfileError("monitor.network: must be one of " + ", ".join(NETWORKS))
        if prof_kwargs.get("contain", "kill") not in CONTAINS:
            raise ProfileError("monitor.contain: must be one of " + ", ".join(CONTAINS))
        interval = prof_kwargs.get("sample_interval", 0.2)
        if not MIN_SAMPLE <= interval <= MAX_SAMPLE:
            raise ProfileError(
                f"monitor.sample_interval: must be between {MIN_SAMPLE} and {MAX_SAMPLE}")
        try:
            numbers(prof_kwargs.get("deny_syscalls", ()))
        except ValueError as e:
            raise ProfileError(f"monitor.deny_syscalls: {e}") from None
        for p in prof_kwargs.get("sensitive_paths", ()):
            if not p.startswith("/"):
                raise ProfileError(f"monitor.sensitive_paths: {p!r} is not absolute")
        for name in ("allow_exec", "deny_exec", "shells"):
            for g in prof_kwargs.get(name, ()):
                if not g:
                    raise ProfileError(f"monitor.{name}: empty glob")
        for rule in prof_kwargs.get("egress", ()):
            try:
                parse_egress(rule)
            except ValueError as e:
                raise ProfileError(f"monitor.egress: {e}") from None
        return cls(**prof_kwargs)

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


# every protocol field is a Profile field (sample_interval is the agent's own addition)
assert set(PROFILE_FIELDS) <= {f.name for f in fields(Profile)}

__all__ = ["CONTAINS", "NETWORKS", "EgressRule", "Profile", "ProfileError", "TransientWatch",
           "first_match", "glob_match", "glob_regex", "is_local", "normalize", "parse_egress"]
