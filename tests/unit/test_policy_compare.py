"""`weaker_than`: where one policy's anomaly profile detects or reacts less than another's;
the shipped policies are each at least as strong as `default` (issue 12: `strict` caught less
than `default`), and `hvtsm policy validate --against` says so through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvtsm.policy import Policy, load_policy, parse_policy
from hvtsm.policy.compare import Weakness, instances, uncovered, weaker_than

REPO = Path(__file__).resolve().parents[2]
POLICIES = sorted((REPO / "policies").glob("*.toml"))

PHASES = '[[phase]]\nat = "0s"\nnetwork = "full"\n[[phase]]\nat = "10s"\naction = "terminate"\n'


def policy(anomaly: str) -> Policy:
    return parse_policy((f'name = "p"\n{PHASES}[anomaly]\n{anomaly}\n').encode(), source="p")


def fields_of(found: list[Weakness]) -> list[str]:
    return [w.field for w in found]


def test_a_directory_entry_does_not_cover_what_lies_below_it() -> None:
    assert uncovered(("/home/",), ("/home/*/.ssh/**",))
    assert not uncovered(("/home/**",), ("/home/*/.ssh/**",))
    assert not uncovered(("/home/*/.ssh/**",), ("/home/*/.ssh/**",))
    assert uncovered(("/home/*/.ssh/*",), ("/home/*/.ssh/**",))  # one level only
    assert not uncovered(("/etc/**",), ("/etc/shadow", "/etc/ssh/ssh_host_*_key"))
    assert not uncovered(("*/nc",), ("*/nc",))
    assert uncovered(("/usr/bin/nc",), ("*/nc",))


def test_instances_follow_the_glob_rules() -> None:
    # a trailing '**' is at least one component: /a itself is not an instance
    assert "/a" not in instances("/a/**") and "/a/d1" in instances("/a/**")
    assert "/a/b" in instances("/a/**/b")  # a middle '**' may be none
    assert all(p.startswith("/") for p in instances("*/sh"))


def test_each_kind_of_weakness_is_named() -> None:
    ref = policy('deny_syscalls = ["ptrace", "bpf"]\nsensitive_paths = ["/root/.ssh/**"]\n'
                 'deny_exec = ["/tmp/**"]\nmax_forks_per_s = 100\ncontain = "kill"\n'
                 'reaction = "jump"')
    weak = policy('deny_syscalls = ["ptrace"]\nsensitive_paths = ["/root/"]\n'
                  'max_forks_per_s = 500\ncontain = "deny"\nreaction = "accelerate"')
    found = weaker_than(weak, ref)
    assert fields_of(found)[:5] == ["deny_syscalls", "sensitive_paths", "deny_exec",
                                    "max_forks_per_s", "contain"]
    assert "does not deny bpf" in str(found[0])
    assert "'/root/.ssh/**'" in found[1].detail
    assert "500, the reference 100" in found[3].detail
    assert any(w.field == "reaction" and "accelerate, the reference jump" in w.detail
               for w in found)
    assert weaker_than(ref, ref) == []
    # the other way, only the directory /root itself, which the weak one names
    assert fields_of(weaker_than(ref, weak)) == ["sensitive_paths"]


def test_monitoring_off_is_the_one_finding() -> None:
    found = weaker_than(policy("monitor = false"), policy(""))
    assert fields_of(found) == ["monitor"]
    assert weaker_than(policy(""), policy("monitor = false")) == []


def test_reactions_per_category_and_count() -> None:
    ref = policy('reaction = "accelerate"\nfactor = 4\non = { "sensitive-path" = "terminate" }')
    mild = policy('reaction = "accelerate"\nfactor = 2')
    found = weaker_than(mild, ref)
    assert any(w.field == "on.sensitive-path" for w in found)
    assert any("accelerate by 2, the reference by 4" in w.detail for w in found)
    escalating = policy('reaction = "accelerate"\nescalate = ["terminate"]')
    assert any("anomaly 2" in w.detail  # the 2nd anomaly: accelerate where it ends
               for w in weaker_than(policy('reaction = "accelerate"'), escalating))


def test_allow_exec_narrows() -> None:
    narrow = policy('allow_exec = ["/usr/bin/python3*"]')
    wide = policy('allow_exec = ["/usr/bin/*"]')
    assert fields_of(weaker_than(policy(""), narrow)) == ["allow_exec"]
    assert fields_of(weaker_than(wide, narrow)) == ["allow_exec"]
    assert weaker_than(narrow, wide) == []


@pytest.mark.parametrize("path", [p for p in POLICIES if p.stem != "transient"],
                         ids=lambda p: p.stem)
def test_every_shipped_policy_detects_at_least_what_default_does(path: Path) -> None:
    default = load_policy(REPO / "policies" / "default.toml")
    assert [str(w) for w in weaker_than(load_policy(path), default)] == []


def test_the_transient_policy_reacts_at_least_as_default_does() -> None:
    """A transient zone's calls are judged by its parent's profile; its own table decides
    the reactions alone."""
    default = load_policy(REPO / "policies" / "default.toml")
    found = weaker_than(load_policy(REPO / "policies" / "transient.toml"), default)
    assert [w for w in found if w.field == "reaction" or w.field.startswith("on.")] == []


def test_strict_is_stricter_than_default_in_detection_too() -> None:
    strict = load_policy(REPO / "policies" / "strict.toml")
    default = load_policy(REPO / "policies" / "default.toml")
    assert weaker_than(strict, default) == []
    assert weaker_than(default, strict)  # and it adds: /root/**, /home/**, terminate


def test_validate_against_through_the_cli(tmp_path: Path) -> None:
    weak = tmp_path / "weak.toml"
    weak.write_text(f'name = "weak"\n{PHASES}[anomaly]\nsensitive_paths = ["/home/"]\n')

    def validate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hvtsm.cli.main", "policy", "validate",
                               *args], capture_output=True, text=True, cwd=REPO, timeout=60)

    bad = validate(str(weak), "--against", "default")
    assert bad.returncode == 1, bad
    assert "weaker than default: anomaly.sensitive_paths: does not cover '/home/*/.ssh/**'" \
        in bad.stdout
    good = validate("policies/strict.toml", "--against", "default", "--json")
    assert good.returncode == 0, good
    [row] = [json.loads(line) for line in good.stdout.splitlines()]
    assert row["against"] == "default" and row["weaker"] == []
    missing = validate("policies/strict.toml", "--against", "no-such-policy")
    assert missing.returncode == 1 and "--against" in missing.stderr
