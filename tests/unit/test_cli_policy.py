"""`hvtsm policy validate` and `hvtsm policy show` through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvtsm.cli.main import main

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "validate", *map(str, sorted(POLICIES.glob("*.toml")))]) == 0
    assert capsys.readouterr().out.count("ok: ") == len(list(POLICIES.glob("*.toml")))


def test_validate_reports_every_bad_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "loosens.toml"
    bad.write_text('name = "x"\n[[phase]]\nat = "0s"\nmemory = "64MiB"\n'
                   '[[phase]]\nat = "1s"\nmemory = "1GiB"\n')
    code = main(["policy", "validate", str(POLICIES / "default.toml"), str(bad), "--json"])
    assert code == 1
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert results[0]["valid"] is True
    assert results[1] == {"file": str(bad), "valid": False, "phase": 1, "field": "memory",
                          "error": results[1]["error"]}
    assert "only tighten" in results[1]["error"]


def test_show_prints_the_timeline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "show", str(POLICIES / "demo.toml")]) == 0
    out = capsys.readouterr().out
    assert "2s   network loopback" in out
    assert "action terminate" in out


def test_show_scales_for_a_segment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "show", str(POLICIES / "default.toml"), "--role",
                 "input-validation", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["scale"] == 0.25
    assert shown["timeline"][-1] == {"phase": 4, "at_ms": 150_000.0,
                                     "tightens": {"action": "terminate"}}


def test_show_bad_file_is_an_hvtsm_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "show", str(tmp_path / "missing.toml")]) == 125
    assert "missing.toml: cannot read" in capsys.readouterr().err


def test_validate_checks_the_policies_a_policy_names(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "refs.toml"
    path.write_text('name = "refs"\n[[phase]]\nat = "0s"\nnetwork = "none"\n'
                    '[[segment]]\nmatch = { role = "fetch" }\npolicy = "no-such-policy"\n'
                    'lifespan_scale = 1\n')
    assert main(["policy", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "segment[0].policy" in err and "no-such-policy" in err
