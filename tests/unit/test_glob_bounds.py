"""The agent's globs: the same matches as the plain regex translation they replace, in time
linear in the path whatever the glob (a workload chooses the paths it makes the agent
judge), and bounded in number, length and '**' components."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from guest_agent import fanotify
from guest_agent.profile import (
    MAX_DOUBLESTARS,
    MAX_EXPECTED_PROGRAMS,
    MAX_GLOB_LENGTH,
    MAX_PROFILE_LIST,
    Profile,
    ProfileError,
    TransientWatch,
    canonical_glob,
    glob_match,
)

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")


def plain_regex(glob: str) -> re.Pattern[str]:
    """The translation glob_regex used before: '**/' as '(?:.*/)?', '**' as '.*', '*' as
    '[^/]*' (exponential on near misses, the reference for what matches)."""
    pattern = glob if glob.startswith("/") else "**/" + glob
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            c = pattern[i]
            out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    glob=st.lists(st.sampled_from(["a", "b", "/", "*", "?", "**", "/**/", "/**", "ab"]),
                  min_size=1, max_size=8).map("".join),
    path=st.lists(st.sampled_from(["a", "b", "/", "ab", "/a/"]), max_size=8).map("".join))
def test_matches_as_the_plain_translation(glob: str, path: str) -> None:
    hypothesis.assume(glob.startswith(("/", "*")))
    try:
        canonical_glob(glob)
    except ValueError:
        hypothesis.assume(False)  # refused by every profile: '**' inside a name
    assert glob_match(glob, path) == bool(plain_regex(glob).fullmatch(path))


ADVERSARIAL_GLOBS = [
    "/**/a" * MAX_DOUBLESTARS + "/b",
    "/" + "*a" * 300 + "*b",
    "*a*a*a*a*a*a*a*b",
    "/**/*a*a*a*a/**/*a*a*a*b/**/x",
    "/**/" + "/".join(["*a*a*a"] * 100) + "/b",
    "/" + "/".join(["*"] * 400) + "/b",
    "/**/" + "/".join(["?"] * 300) + "/**/z",
]
ADVERSARIAL_PATHS = [
    "/" + "a/" * 2047 + "c",
    "/" + "a" * 4094,
    "/" + "/".join(["a" * 20] * 190) + "/b",
    "/" + "a/" * 1000 + "a" * 2000,
]


@pytest.mark.parametrize("glob", ADVERSARIAL_GLOBS, ids=lambda g: g[:30])
def test_no_glob_backtracks_catastrophically(glob: str) -> None:
    assert canonical_glob(glob) == glob  # a glob a policy may write
    glob_match(glob, "/")  # compiled outside the timing
    for path in ADVERSARIAL_PATHS:
        started = time.perf_counter()
        glob_match(glob, path)
        took = time.perf_counter() - started
        # the plain translation took minutes on the first of these
        assert took < 0.05, f"{glob[:30]!r} on {path[:30]!r}: {took * 1000:.1f} ms"


def test_canonical_globs() -> None:
    assert canonical_glob("/a/**/**/b") == "/a/**/b"
    assert canonical_glob("**/**/x") == "**/x"
    assert canonical_glob("/a" + "/**" * 300) == "/a/**"
    for bad, says in [("", "empty"), ("/x" * 600, f"at most {MAX_GLOB_LENGTH}"),
                      ("/a**", "whole component"), ("/a\0b", "NUL"),
                      ("/**/x" * (MAX_DOUBLESTARS + 1), f"at most {MAX_DOUBLESTARS}")]:
        with pytest.raises(ValueError, match=says):
            canonical_glob(bad)


def test_profile_lists_are_bounded() -> None:
    too_many = [f"/etc/f{i}" for i in range(MAX_PROFILE_LIST + 1)]
    for field in ("sensitive_paths", "deny_exec", "allow_exec", "shells"):
        with pytest.raises(ProfileError, match=f"at most {MAX_PROFILE_LIST}") as info:
            Profile.from_dict({field: too_many})
        assert info.value.field == field
    with pytest.raises(ProfileError, match=f"at most {MAX_PROFILE_LIST}"):
        Profile.from_dict({"egress": ["10.0.0.1:80"] * (MAX_PROFILE_LIST + 1)})
    with pytest.raises(ProfileError, match=f"at most {MAX_PROFILE_LIST}"):
        Profile.from_dict({"deny_syscalls": ["ptrace"] * (MAX_PROFILE_LIST + 1)})
    with pytest.raises(ProfileError, match=f"at most {MAX_EXPECTED_PROGRAMS}"):
        TransientWatch.from_dict({"triggers": ["exec"],
                                  "expect_exec": ["/x"] * (MAX_EXPECTED_PROGRAMS + 1)})
    with pytest.raises(ProfileError, match="PATH_MAX"):
        TransientWatch.from_dict({"triggers": ["exec"], "expect_exec": ["/" + "x" * 5000]})
    assert Profile.from_dict({"sensitive_paths": ["/a/**/**"]}).sensitive_paths == ("/a/**",)


def test_sensitive_path_expansion_walks_each_tree_once(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"d{i}" / "x" / "y").mkdir(parents=True)
    started = time.monotonic()
    # uncollapsed (as a profile never is now) and with several '**': each walks once
    marks, _ = fanotify.expand((f"{tmp_path}" + "/**" * 200 + "/y",
                                f"{tmp_path}/**/x/**/y/**/z"))
    assert time.monotonic() - started < 2
    assert (str(tmp_path / "d3" / "x" / "y"), True) in marks


def test_sensitive_path_expansion_stops_walking(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        (tmp_path / f"d{i}").mkdir()
    monkeypatch.setattr(fanotify, "MAX_WALKED", 5)
    marks, warnings = fanotify.expand((f"{tmp_path}/**/nothing",))
    assert any("stopped after walking 5 directories" in w for w in warnings), warnings
    assert len(marks) <= 6
