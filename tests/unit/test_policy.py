"""Policy loading: valid files become typed timelines; bad ones name file, phase and field."""

from pathlib import Path

import pytest

from guest_agent.profile import Profile
from hvtsm.errors import PolicyError
from hvtsm.policy import Reaction, load_policy, parse_policy
from hvtsm.policy.model import Containment
from hvtsm.policy.segments import choose
from hvtsm.restrictions import EgressRule, FilesystemMode, NetworkMode

POLICIES = Path(__file__).resolve().parents[2] / "policies"

BASE = """
name = "t"
[[phase]]
at = "0s"
network = "full"
memory = "512MiB"
cpu_shares = 1024
pids = 100
cpus = "0-1"
"""


def load(text: str):
    return parse_policy(text.encode(), source="t.toml")


def fails(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load(text)
    return info.value


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_policies_load(path: Path) -> None:
    policy = load_policy(path)
    assert policy.phases
    assert policy.lifespan_ms is not None


def test_phases_accumulate() -> None:
    policy = load(BASE + """
[[phase]]
at = "5s"
network = "loopback"
memory = "256MiB"
[[phase]]
at = "1m"
filesystem = "ro"
[[phase]]
at = "2m"
action = "terminate"
""")
    r = policy.phases[2].restrictions
    assert r.network is NetworkMode.LOOPBACK
    assert r.memory == 256 * 1024**2
    assert r.cpu_shares == 1024
    assert r.filesystem is FilesystemMode.RO
    assert policy.phases[3].terminate
    assert policy.lifespan_ms == 120_000
    assert policy.initial().memory == 512 * 1024**2
    assert [p.index for p in policy.later_phases()] == [1, 2, 3]


@pytest.mark.parametrize(("extra", "field"), [
    ('[[phase]]\nat = "5s"\nnetwork = "full"\nmemory = "1GiB"\n', "memory"),
    ('[[phase]]\nat = "5s"\ncpu_shares = 2048\n', "cpu_shares"),
    ('[[phase]]\nat = "5s"\npids = 101\n', "pids"),
    ('[[phase]]\nat = "5s"\ncpus = "0-2"\n', "cpus"),
])
def test_loosening_is_rejected_naming_phase_and_field(extra: str, field: str) -> None:
    err = fails(BASE + extra)
    assert err.phase == 1 and err.field == field
    assert "t.toml: phase 1: field" in str(err)
    assert "only tighten" in str(err)


def test_network_cannot_come_back() -> None:
    err = fails(BASE + '[[phase]]\nat = "5s"\nnetwork = "none"\n'
                       '[[phase]]\nat = "6s"\nnetwork = "loopback"\n')
    assert (err.phase, err.field) == (2, "network")


def test_filesystem_cannot_become_writable() -> None:
    err = fails(BASE + '[[phase]]\nat = "5s"\nfilesystem = "ro"\n'
                       '[[phase]]\nat = "6s"\nfilesystem = "rw"\n')
    assert (err.phase, err.field) == (2, "filesystem")


def test_egress_list_may_only_shrink() -> None:
    ok = load(BASE + '[[phase]]\nat = "1s"\negress = ["192.0.2.0/24:443"]\n'
                     '[[phase]]\nat = "2s"\negress = ["192.0.2.7:443"]\n')
    assert ok.phases[2].restrictions.egress == (EgressRule.parse("192.0.2.7:443"),)
    err = fails(BASE + '[[phase]]\nat = "1s"\negress = ["192.0.2.7:443"]\n'
                       '[[phase]]\nat = "2s"\negress = ["192.0.2.7:443", "192.0.2.8:80"]\n')
    assert (err.phase, err.field) == (2, "egress")
    assert "192.0.2.8:80" in str(err)
    # restating network = "full" later keeps the allow-list: fields accumulate
    kept = load(BASE + '[[phase]]\nat = "1s"\negress = ["192.0.2.7:443"]\n'
                       '[[phase]]\nat = "2s"\nnetwork = "full"\ncpu_shares = 10\n')
    assert kept.phases[2].restrictions.egress == (EgressRule.parse("192.0.2.7:443"),)


def test_egress_needs_addresses_not_names() -> None:
    err = fails(BASE + '[[phase]]\nat = "1s"\negress = ["example.com:443"]\n')
    assert err.field == "egress" and "host names are not resolved" in str(err)


@pytest.mark.parametrize(("body", "phase", "field", "says"), [
    ('[[phase]]\nat = "-5s"\nmemory = "64MiB"\n', 0, "at", "negative"),
    ('[[phase]]\nat = 5\nmemory = "64MiB"\n', 0, "at", "no unit"),
    ('[[phase]]\nat = "5s"\nmemory = "64MiB"\n[[phase]]\nat = "2s"\npids = 4\n', 1, "at",
     "increasing"),
    ('[[phase]]\nat = "5s"\nmemroy = "64MiB"\n', 0, "memroy", "did you mean 'memory'"),
    ('[[phase]]\nat = "5s"\nmemory = "1KiB"\n', 0, "memory", "4MiB"),
    ('[[phase]]\nat = "5s"\nnetwork = "some"\n', 0, "network", "full, loopback, none"),
    ('[[phase]]\nat = "5s"\ncpu_quota = 0\n', 0, "cpu_quota", "above 0"),
    ('[[phase]]\nat = "5s"\naction = "explode"\n', 0, "action", "terminate"),
    ('[[phase]]\nat = "5s"\n', 0, None, "changes nothing"),
    ('[[phase]]\nat = "0s"\naction = "terminate"\n', 0, "at", "before its workload"),
    ('[[phase]]\nat = "5s"\naction = "terminate"\n[[phase]]\nat = "6s"\npids = 1\n', 1, "at",
     "follow the terminate"),
    ('[[phase]]\nat = "5s"\nnetwork = "none"\negress = ["192.0.2.1:1"]\n', 0, "egress",
     "only applies"),
])
def test_bad_phases(body: str, phase: int, field: str | None, says: str) -> None:
    err = fails('name = "t"\n' + body)
    assert err.file == "t.toml"
    assert err.phase == phase
    assert err.field == field
    assert says in str(err)


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[[phase]\n')
    with pytest.raises(PolicyError, match=r"broken\.toml: not valid TOML"):
        load_policy(path)


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy("/nonexistent/policy.toml")


def test_unknown_top_level_field() -> None:
    err = fails('name = "t"\nphases = []\n')
    assert err.field == "phases" and "did you mean 'phase'" in str(err)


def test_anomaly_and_segments() -> None:
    policy = load(BASE + """
[anomaly]
deny_syscalls = ["ptrace"]
sensitive_paths = ["/etc/shadow"]
reaction = "terminate"

[[segment]]
match = { role = "input-validation" }
lifespan_scale = 0.25

[[segment]]
match = { capability = ["network", "exec"] }
lifespan_scale = 0.5
""")
    assert policy.anomaly.reaction is Reaction.TERMINATE
    assert choose(policy, [("input-validation", frozenset())]).scale == 0.25
    assert choose(policy, [("parser", frozenset({"network", "exec", "x"}))]).scale == 0.5
    assert choose(policy, [("parser", frozenset({"network"}))]).scale == 1.0


@pytest.mark.parametrize(("section", "field"), [
    ('[anomaly]\nreaction = "panic"\n', "anomaly.reaction"),
    ('[anomaly]\nfactor = 1\n', "anomaly.factor"),
    ('[anomaly]\ndeny_syscalls = ["Not A Syscall"]\n', "anomaly.deny_syscalls"),
    ('[anomaly]\nsensitive_paths = ["relative/path"]\n', "anomaly.sensitive_paths"),
    ('[anomaly]\ndeny_syscalls = ["not_a_real_call"]\n', "anomaly.deny_syscalls"),
    ('[anomaly]\ndeny_exec = ["bin/sh"]\n', "anomaly.deny_exec"),
    ('[anomaly]\nmax_forks_per_s = -1\n', "anomaly.max_forks_per_s"),
    ('[anomaly]\ncontain = "maim"\n', "anomaly.contain"),
    ('[anomaly]\nmonitor = "yes"\n', "anomaly.monitor"),
    ('[anomaly]\nescalate = ["jump", "explode"]\n', "anomaly.escalate[1]"),
    ('[anomaly]\non = { "made-up" = "terminate" }\n', "anomaly.on.made-up"),
    ('[anomaly]\non = { "reverse-shell" = "nothing" }\n', "anomaly.on.reverse-shell"),
    ('[[segment]]\nmatch = { role = "x" }\nlifespan_scale = 0\n', "segment[0].lifespan_scale"),
    ('[[segment]]\nlifespan_scale = 0.5\n', "segment[0].match"),
])
def test_bad_anomaly_and_segment_sections(section: str, field: str) -> None:
    err = fails(BASE + section)
    assert err.field == field


def test_forensics_section() -> None:
    assert load(BASE).memory_dump is False
    assert load(BASE + "[forensics]\nmemory_dump = true\n").memory_dump is True
    err = fails(BASE + '[forensics]\nmemory_dump = "yes"\n')
    assert err.field == "forensics.memory_dump"


def test_anomaly_profile_and_escalation() -> None:
    policy = load(BASE + """
[anomaly]
deny_syscalls = ["ptrace", "init_module"]
sensitive_paths = ["/home/*/.ssh/**"]
deny_exec = ["/tmp/**"]
max_forks_per_s = 50
contain = "deny"
reaction = "accelerate"
escalate = ["jump", "freeze", "terminate"]
on = { "reverse-shell" = "terminate" }
""")
    rules = policy.anomaly
    assert rules.contain is Containment.DENY
    assert [rules.reaction_for("fork-rate", n) for n in (1, 2, 3, 4, 9)] == [
        Reaction.ACCELERATE, Reaction.JUMP, Reaction.FREEZE, Reaction.TERMINATE,
        Reaction.TERMINATE]
    assert rules.reaction_for("reverse-shell", 1) is Reaction.TERMINATE
    profile = rules.profile()
    assert profile["deny_syscalls"] == ["ptrace", "init_module"]
    assert profile["max_forks_per_s"] == 50 and profile["contain"] == "deny"
    # the agent accepts what the host builds from a policy
    assert Profile.from_dict({**profile, "network": "full", "egress": []}).contain == "deny"


def test_shipped_default_profile_is_accepted_by_the_agent() -> None:
    rules = load_policy(Path(__file__).parents[2] / "policies" / "default.toml").anomaly
    assert rules.monitor and rules.watch.deny_syscalls and rules.watch.sensitive_paths
    Profile.from_dict({**rules.profile(), "network": "none", "egress": []})


def test_channel_grants_and_transient_rules() -> None:
    policy = load(BASE + '[[phase]]\nat = "5s"\nnetwork = "none"\n'
                  '[[channel]]\nfrom = "fetch"\nto = "parse"\nmax_message = "1MiB"\n'
                  'max_rate = 5\nphases = [0]\n'
                  '[[channel]]\nfrom = "parse"\nto = "compute"\ndirection = "both"\n'
                  'audit_content = true\n'
                  '[transient]\nenabled = true\ntriggers = ["exec", "connect"]\n'
                  'expect_exec = ["/usr/bin/*"]\nlifespan_scale = 0.5\n')
    fetch = policy.grant_for("fetch", "parse")
    assert fetch is not None and fetch.max_message == 2**20 and fetch.max_rate == 5
    assert fetch.phases == (0,) and not fetch.audit_content
    assert policy.grant_for("parse", "fetch") is None  # one-way by default
    both = policy.grant_for("compute", "parse")
    assert both is not None and both.audit_content and both.phases is None
    assert policy.transient.enabled and policy.transient.triggers == ("exec", "connect")
    assert policy.transient.expect_exec == ("/usr/bin/*",)
    assert policy.transient.lifespan_scale == 0.5 and policy.transient.max_zones == 8


@pytest.mark.parametrize(("section", "field"), [
    ('[[channel]]\nto = "b"\n', "channel[0].from"),
    ('[[channel]]\nfrom = "a"\nto = "a"\n', "channel[0].to"),
    ('[[channel]]\nfrom = "a"\nto = "b"\ndirection = "sideways"\n', "channel[0].direction"),
    ('[[channel]]\nfrom = "a"\nto = "b"\nmax_message = "64MiB"\n', "channel[0].max_message"),
    ('[[channel]]\nfrom = "a"\nto = "b"\nmax_rate = 0\n', "channel[0].max_rate"),
    ('[[channel]]\nfrom = "a"\nto = "b"\nphases = [3]\n', "channel[0].phases"),
    ('[[channel]]\nfrom = "a"\nto = "b"\nbogus = 1\n', "bogus"),
    ('[[channel]]\nfrom = "a"\nto = "b"\n[[channel]]\nfrom = "b"\nto = "a"\n'
     'direction = "both"\n', "channel[1]"),
    ('channel = 3\n', "channel"),
    ('[transient]\ntriggers = ["fork"]\n', "transient.triggers"),
    ('[transient]\nlifespan_scale = 2\n', "transient.lifespan_scale"),
    ('[transient]\nmax_zones = 0\n', "transient.max_zones"),
    ('[transient]\nexpect_exec = ["bin/sh"]\n', "transient.expect_exec"),
    ('[[segment]]\nmatch = { role = "x" }\nlifespan_scale = 1\npolicy = 3\n',
     "segment[0].policy"),
])
def test_bad_channel_transient_and_segment_policy(section: str, field: str) -> None:
    # a plain key after BASE's [[phase]] would land inside that phase
    error = fails(section + BASE if section.startswith("channel =") else BASE + section)
    assert error.field == field and error.file == "t.toml"
