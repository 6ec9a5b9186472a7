"""The monitoring profile: validation (every field, the field named in the error) and every
verdict the monitor asks of it; fanotify's mark expansion of sensitive globs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guest_agent.fanotify import ExpandCache, expand
from guest_agent.profile import (
    PROFILE_FIELDS,
    Profile,
    ProfileError,
    glob_match,
    parse_egress,
)


def test_defaults_round_trip() -> None:
    p = Profile.from_dict({})
    assert p == Profile()
    assert p.contain == "kill" and p.network == "full" and p.sample_interval == 0.2
    # transient is absent while off (see test_transient.py)
    assert set(p.to_dict()) | {"transient"} == set(PROFILE_FIELDS) | {"sample_interval"}
    full = {"deny_syscalls": ["ptrace", "bpf"], "sensitive_paths": ["/etc/shadow"],
            "allow_exec": ["/usr/bin/*"], "deny_exec": ["/tmp/**"], "shells": ["*/sh"],
            "network": "loopback", "egress": ["10.0.0.0/8:443"], "max_forks_per_s": 10,
            "max_processes": 64,
            "max_syscalls_per_s": 1e5, "max_new_files_per_s": 5.5,
            "memory_spike_mib_per_s": 100, "contain": "deny", "drops_are_anomalies": False,
            "sample_interval": 0.5, "tripwires": ["/run/hvtsm/tripwires/z1"],
            "max_cpu_share": 0.9, "cpu_window": 30.0, "provenance": False,
            "interpreters": ["*/python3*"], "trusted_origins": ["192.0.2.0/24:443"],
            "max_deletes_per_s": 50}
    assert Profile.from_dict(full).to_dict() == full
    assert Profile.from_dict(Profile.from_dict(full).to_dict()) == Profile.from_dict(full)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("contain", "maybe", "monitor.contain: must be one of none, deny, kill"),
    ("network", "some", "monitor.network: must be one of full, loopback, none"),
    ("surprise", 1, "monitor.surprise: unknown field"),
    ("deny_syscalls", ["ptrace", "nosuch"], "monitor.deny_syscalls: unknown x86_64 syscall: "
                                            "nosuch"),
    ("deny_syscalls", "ptrace", "monitor.deny_syscalls: must be a list of strings"),
    ("sensitive_paths", ["etc/shadow"], "monitor.sensitive_paths: 'etc/shadow' is not "
                                        "absolute"),
    ("allow_exec", [""], "monitor.allow_exec: empty glob"),
    ("shells", [1], "monitor.shells: must be a list of strings"),
    ("max_forks_per_s", -1, "monitor.max_forks_per_s: must be >= 0"),
    ("max_forks_per_s", True, "monitor.max_forks_per_s: must be a number"),
    ("max_syscalls_per_s", "9", "monitor.max_syscalls_per_s: must be a number"),
    ("max_cpu_share", 1.5, "monitor.max_cpu_share: must be between 0 and 1"),
    ("cpu_window", 0, "monitor.cpu_window: must be between 1 and 3600"),
    ("tripwires", ["wire"], "monitor.tripwires: 'wire' is not absolute"),
    ("memory_spike_mib_per_s", float("nan"), "monitor.memory_spike_mib_per_s: must be a "
                                             "number"),
    ("max_new_files_per_s", float("inf"), "monitor.max_new_files_per_s: must be a number"),
    ("drops_are_anomalies", 1, "monitor.drops_are_anomalies: must be true or false"),
    ("sample_interval", 0, "monitor.sample_interval: must be between"),
    ("sample_interval", 60, "monitor.sample_interval: must be between"),
    ("egress", ["example.com:80"], "monitor.egress: 'example.com:80': 'example.com' is not"),
    ("egress", ["10.0.0.1:0"], "monitor.egress: '10.0.0.1:0': ports must be 1-65535"),
    ("egress", ["10.0.0.1:90-80"], "monitor.egress: '10.0.0.1:90-80': ports must be"),
    ("egress", ["10.0.0.1:x"], "is not a port or port range"),
    ("egress", ["[::1"], "unclosed ["),
    ("egress", ["10.0.0.1:"], "empty port"),
])
def test_validation_names_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ProfileError) as info:
        Profile.from_dict({field: value})
    assert message in str(info.value)


def test_not_an_object() -> None:
    with pytest.raises(ProfileError, match="monitor: must be an object"):
        Profile.from_dict(["contain"])


def test_globs() -> None:
    assert glob_match("/home/*/.ssh/**", "/home/ann/.ssh/id_rsa")
    assert glob_match("/home/*/.ssh/**", "/home/ann/.ssh/keys/old/id")
    assert not glob_match("/home/*/.ssh/**", "/home/ann/b/.ssh/id_rsa")  # * is one name
    assert glob_match("/a/**/b", "/a/b") and glob_match("/a/**/b", "/a/x/y/b")
    assert glob_match("/etc/*.key", "/etc/x.key") and not glob_match("/etc/*.key", "/etc/a/x.key")
    assert glob_match("/tmp/?", "/tmp/a") and not glob_match("/tmp/?", "/tmp/ab")
    assert glob_match("/a+b/(c)", "/a+b/(c)")  # regex characters are literal
    # relative: at any depth
    assert glob_match("*/sh", "/bin/sh") and glob_match("*/sh", "/usr/local/bin/sh")
    assert not glob_match("*/sh", "/bin/bash") and not glob_match("*/sh", "/bin/shx")
    assert glob_match("busybox", "/bin/busybox")


def test_path_sensitive() -> None:
    p = Profile(sensitive_paths=("/etc/shadow", "/home/*/.ssh/**", "/root/**"))
    assert p.path_sensitive("/etc/shadow") == "/etc/shadow"
    assert p.path_sensitive("/etc//./shadow") == "/etc/shadow"
    assert p.path_sensitive("/etc/x/../shadow") == "/etc/shadow"
    assert p.path_sensitive("/home/bob/.ssh/id_ed25519") == "/home/*/.ssh/**"
    assert p.path_sensitive("/root/.bash_history") == "/root/**"
    assert p.path_sensitive("/etc/passwd") is None
    assert p.path_sensitive("/etc/shadow-") is None
    assert Profile().path_sensitive("/etc/shadow") is None


def test_exec_verdict() -> None:
    assert Profile().exec_verdict("/tmp/anything") is None
    deny = Profile(deny_exec=("/tmp/**", "*/nc"))
    assert deny.exec_verdict("/tmp/x/evil") == "exec of /tmp/x/evil matches deny_exec /tmp/**"
    assert deny.exec_verdict("/usr/bin/nc") == "exec of /usr/bin/nc matches deny_exec */nc"
    assert deny.exec_verdict("/usr/bin/ls") is None
    allow = Profile(allow_exec=("/usr/bin/*", "/bin/*"), deny_exec=("/usr/bin/curl",))
    assert allow.exec_verdict("/usr/bin/python3") is None
    assert allow.exec_verdict("/opt/x") == "exec of /opt/x is not in allow_exec"
    assert allow.exec_verdict("/usr/bin/curl") == \
        "exec of /usr/bin/curl matches deny_exec /usr/bin/curl"  # deny wins over allow
    assert allow.exec_verdict("/usr/bin/../../opt/x") == "exec of /opt/x is not in allow_exec"


def test_shells_default() -> None:
    p = Profile()
    for sh in ("/bin/sh", "/usr/bin/bash", "/bin/dash", "/bin/busybox", "/usr/bin/zsh"):
        assert any(glob_match(g, sh) for g in p.shells), sh
    assert not any(glob_match(g, "/usr/bin/python3") for g in p.shells)


def test_connect_verdict_network_modes() -> None:
    for network in ("none", "loopback"):
        p = Profile(network=network)
        assert p.connect_verdict("inet", "127.0.0.1", 80) is None
        assert p.connect_verdict("inet", "127.3.4.5", 80) is None
        assert p.connect_verdict("inet6", "::1", 80) is None
        assert p.connect_verdict("inet6", "::ffff:127.0.0.1", 80) is None
        assert p.connect_verdict("inet", "10.0.0.1", 80) == \
            f"connect to 10.0.0.1:80 while the network is {network}"
        assert p.connect_verdict("inet6", "2001:db8::1", 443) == \
            f"connect to [2001:db8::1]:443 while the network is {network}"
    full = Profile()
    assert full.connect_verdict("inet", "192.0.2.9", 1) is None
    assert full.connect_verdict("inet6", "2001:db8::1", 1) is None


def test_connect_verdict_egress() -> None:
    p = Profile(egress=("10.0.0.0/24:80-90", "[2001:db8::1]:443", "192.0.2.1",
                        "2001:db8:1::/48"))
    assert p.connect_verdict("inet", "10.0.0.7", 80) is None
    assert p.connect_verdict("inet", "10.0.0.7", 90) is None
    assert p.connect_verdict("inet", "10.0.0.7", 91) == \
        "connect to 10.0.0.7:91 is outside the egress allow-list"
    assert p.connect_verdict("inet", "10.0.1.7", 80) is not None
    assert p.connect_verdict("inet", "192.0.2.1", 22) is None  # any port
    assert p.connect_verdict("inet6", "2001:db8::1", 443) is None
    assert p.connect_verdict("inet6", "2001:db8::1", 80) is not None
    assert p.connect_verdict("inet6", "2001:db8:1:2::5", 9) is None
    assert p.connect_verdict("inet6", "::ffff:10.0.0.7", 85) is None  # v4-mapped
    assert p.connect_verdict("inet", "127.0.0.1", 9999) is None  # loopback always
    # egress narrows a full network only: none/loopback refuse all the same
    assert Profile(network="none", egress=("10.0.0.0/8",)).connect_verdict(
        "inet", "10.0.0.1", 80) is not None


def test_connect_verdict_unix() -> None:
    p = Profile(network="none", sensitive_paths=("/run/docker.sock", "/var/run/**"))
    assert p.connect_verdict("unix", "/tmp/app.sock", 0) is None
    assert p.connect_verdict("unix", "@abstract", 0) is None
    assert p.connect_verdict("unix", "/run/docker.sock", 0) == \
        "connect to unix socket /run/docker.sock matches /run/docker.sock"
    assert p.connect_verdict("unix", "/var/run/x/y.sock", 0) is not None


def test_parse_egress_forms() -> None:
    r = parse_egress("10.1.2.3/16:80-90")
    assert str(r.net) == "10.1.0.0/16" and (r.low, r.high) == (80, 90)
    assert (parse_egress("[::1]:443").low, parse_egress("[::1]:443").high) == (443, 443)
    r = parse_egress("2001:db8::/32")
    assert str(r.net) == "2001:db8::/32" and (r.low, r.high) == (1, 65535)


def test_expand_marks(tmp_path: Path) -> None:
    (tmp_path / "home" / "ann" / ".ssh" / "old").mkdir(parents=True)
    (tmp_path / "home" / "bob").mkdir(parents=True)
    (tmp_path / "home" / "ann" / ".ssh" / "id").write_text("k")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shadow").write_text("s")
    marks, warnings = expand((f"{tmp_path}/home/*/.ssh/**", f"{tmp_path}/etc/shadow",
                              f"{tmp_path}/etc/*.key", f"{tmp_path}/etc/gone"))
    got = dict(marks)
    assert got == {f"{tmp_path}/home/ann/.ssh": True, f"{tmp_path}/home/ann/.ssh/old": True,
                   f"{tmp_path}/etc/shadow": False,  # a literal file: that file only
                   f"{tmp_path}/etc": True}  # *.key and a file not there yet: its dir
    assert warnings == []
    for i in range(10):
        (tmp_path / "many" / str(i)).mkdir(parents=True)
    marks, warnings = expand((f"{tmp_path}/many/**",), limit=5)
    assert len(marks) == 5 and "stopped at 5 marks" in warnings[0]


def test_expand_cache_follows_directory_changes(tmp_path: Path) -> None:
    """A cached expansion is reused only while the directories that decided it are
    unchanged: a .ssh made later under /home/* must be marked for the next workload."""
    (tmp_path / "home" / "ann").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    globs = (f"{tmp_path}/home/*/.ssh/**", f"{tmp_path}/etc/shadow")
    cache = ExpandCache()
    first, _ = cache.expand(globs)
    again, _ = cache.expand(globs)
    assert again == first and (cache.hits, cache.misses) == (1, 1)
    assert dict(first) == {f"{tmp_path}/etc": True}
    (tmp_path / "home" / "ann" / ".ssh").mkdir()
    after, _ = cache.expand(globs)
    assert f"{tmp_path}/home/ann/.ssh" in dict(after) and cache.misses == 2
    (tmp_path / "etc" / "shadow").write_text("s")
    after, _ = cache.expand(globs)
    assert dict(after)[f"{tmp_path}/etc/shadow"] is False and cache.misses == 3
    (tmp_path / "home" / "cid" / ".ssh" / "deep").mkdir(parents=True)
    after, _ = cache.expand(globs)
    assert f"{tmp_path}/home/cid/.ssh/deep" in dict(after)
    (tmp_path / "home" / "cid" / ".ssh" / "deep" / "deeper").mkdir()
    after, _ = cache.expand(globs)
    assert f"{tmp_path}/home/cid/.ssh/deep/deeper" in dict(after)
    stale = ExpandCache(max_age=0.0)
    stale.expand(globs)
    stale.expand(globs)
    assert stale.hits == 0 and stale.misses == 2
