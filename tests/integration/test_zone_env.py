"""The operator's environment stays out of a zone (issue 12): a secret in the shell that
runs `hvtsm run` (and the store's URL in HVTSM_DB) is not in the workload's environment
unless passed by name; what is passed is audited by name, and its value is nowhere in the
store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.cli_helpers import audit, env, hvtsm_argv, json_lines

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

#: the workload's whole environment, as JSON, and what its /proc says of itself
DUMP = "import json, os; print(json.dumps(dict(os.environ)))"


def _run(db: str, *options: str, backend_env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    operator = {**env(), "AWS_SECRET_ACCESS_KEY": SECRET, "HVTSM_DB": db,
                "MY_TOKEN": "tok-123", **(backend_env or {})}
    return subprocess.run(hvtsm_argv(db, "run", "--json", *options, "--", "python3", "-c",
                                     DUMP), capture_output=True, text=True, env=operator,
                          timeout=60, stdin=subprocess.DEVNULL)


def _workload_env(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    out = "".join(e["data"] for e in json_lines(result.stdout) if e["event"] == "output")
    return dict(json.loads(out))


def test_the_operators_environment_stays_out(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    seen = _workload_env(_run(db))
    assert "AWS_SECRET_ACCESS_KEY" not in seen and "MY_TOKEN" not in seen
    assert "HVTSM_DB" not in seen and not any(SECRET in v for v in seen.values())
    assert set(seen) <= {"PATH", "LANG", "HOME", "TERM", "USER", "LOGNAME"}, seen
    assert seen["USER"].startswith("hvtsm-")  # the zone's own identity
    assert seen["PATH"].startswith("/usr/local/sbin")


def test_what_is_named_passes_and_is_audited_by_name_only(tmp_path: Path) -> None:
    db_file = tmp_path / "hvtsm.db"
    db = f"sqlite:///{db_file}"
    result = _run(db, "--pass-env", "AWS_SECRET_ACCESS_KEY", "--env", "MODE=fast")
    seen = _workload_env(result)
    assert seen["AWS_SECRET_ACCESS_KEY"] == SECRET and seen["MODE"] == "fast"
    assert "MY_TOKEN" not in seen
    zone = json_lines(result.stdout)[0]["zone"]
    trail = audit(db, zone)
    [started] = [t for t in trail if t["kind"] == "started"]
    assert "environment AWS_SECRET_ACCESS_KEY, MODE (values not recorded)" \
        in started["detail"], started
    # the value is nowhere in the audit, the store's file or the run's own lines
    assert SECRET not in json.dumps(trail)
    for path in tmp_path.glob("hvtsm.db*"):
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.stderr
    assert SECRET not in "".join(line for line in result.stdout.splitlines()
                                 if '"event": "output"' not in line)


def test_a_variable_that_is_not_set_is_a_usage_error_and_nothing_is_made(
        tmp_path: Path) -> None:
    db_file = tmp_path / "hvtsm.db"
    result = _run(f"sqlite:///{db_file}", "--pass-env", "NOT_SET_ANYWHERE")
    assert result.returncode == 2, result
    assert "--pass-env NOT_SET_ANYWHERE: not set in this environment" in result.stderr
    assert "Traceback" not in result.stderr and not db_file.exists()
    bad = _run(f"sqlite:///{db_file}", "--env", "NOVALUE")
    assert bad.returncode == 2 and "expected NAME=VALUE" in bad.stderr


def test_invoke_gives_only_what_is_named(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    program = tmp_path / "show.py"
    program.write_text(DUMP + "\n")
    operator = {**env(), "AWS_SECRET_ACCESS_KEY": SECRET, "MY_TOKEN": "tok-123"}
    result = subprocess.run(hvtsm_argv(db, "invoke", str(program), "--backend", "cgroup",
                                       "--json", "--pass-env", "MY_TOKEN", "--env", "A=1"),
                            capture_output=True, text=True, env=operator, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    seen = json.loads(json.loads(result.stdout)["stdout"])
    assert seen["MY_TOKEN"] == "tok-123" and seen["A"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in seen and "HVTSM_INVOKE" in seen
