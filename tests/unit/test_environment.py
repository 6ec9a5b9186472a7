"""A zone's environment from --env/--pass-env: only what the operator names, bounded, with
errors that name the option; the audit's note has names, never values."""

from __future__ import annotations

import pytest

from guest_agent.workload import base_env
from hvtsm.zones.environment import MAX_VALUE, MAX_VARS, EnvError, from_options


def test_only_what_is_named_passes() -> None:
    source = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "HVTSM_DB": "sqlite:////x", "LANG": "de"}
    env = from_options(["FOO=bar", "EMPTY=", "EQ=a=b"], ["LANG"], source)
    assert dict(env.values) == {"FOO": "bar", "EMPTY": "", "EQ": "a=b", "LANG": "de"}
    assert env.audit_note() == "environment EMPTY, EQ, FOO, LANG (values not recorded)"
    assert "bar" not in (env.audit_note() or "")
    assert from_options([], [], source).values == {}
    assert from_options([], [], source).audit_note() is None


def test_a_later_one_of_the_same_name_wins() -> None:
    assert dict(from_options(["A=1", "A=2"], [], {}).values) == {"A": "2"}
    assert dict(from_options(["A=1"], ["A"], {"A": "3"}).values) == {"A": "3"}


@pytest.mark.parametrize(("assignments", "passed", "says"), [
    (["FOO"], [], "--env 'FOO': expected NAME=VALUE"),
    (["1A=x"], [], "--env '1A': not a variable name"),
    (["A-B=x"], [], "not a variable name"),
    (["=x"], [], "not a variable name"),
    ([], ["MISSING"], "--pass-env MISSING: not set in this environment"),
    ([], ["BAD NAME"], "--pass-env 'BAD NAME': not a variable name"),
    (["A=x\0y"], [], "A: a value with a NUL character"),
    (["A=" + "x" * (MAX_VALUE + 1)], [], f"at most {MAX_VALUE}"),
    ([f"V{i}=x" for i in range(MAX_VARS + 1)], [], f"at most {MAX_VARS}"),
    (["N" * 300 + "=x"], [], "a name of 300 characters"),
])
def test_what_cannot_be_given_is_an_error_naming_it(assignments: list[str], passed: list[str],
                                                     says: str) -> None:
    with pytest.raises(EnvError) as caught:
        from_options(assignments, passed, {})
    assert says in str(caught.value)


def test_the_total_is_bounded() -> None:
    big = "x" * (MAX_VALUE - 10)
    with pytest.raises(EnvError, match="bytes"):
        from_options([f"V{i}={big}" for i in range(10)], [], {})


def test_the_clean_environment_has_nothing_of_the_starter() -> None:
    assert base_env() == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                          "LANG": "C.UTF-8", "HOME": "/", "TERM": "dumb"}
    assert base_env("zone", "/nonexistent")["USER"] == "zone"
