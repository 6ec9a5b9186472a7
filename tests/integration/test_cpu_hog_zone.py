"""A miner after a benign start (issue 12): a cgroup zone whose workload behaves for a
moment, then pegs its CPU, is a `cpu-hog` once its use has lasted the policy's window, and
the process is contained; a workload that sleeps is not. Real zone, real agent, real
/proc accounting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.cli_helpers import hvtsm, json_lines, write_policy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

POLICY = """
name = "miner-watch"
[[phase]]
at = "0s"
network = "none"
cpus = "0"
[[phase]]
at = "40s"
action = "terminate"
[anomaly]
max_cpu_share = 0.6
cpu_window = 3
reaction = "terminate"
"""

MINER = ("import time\n"
         "time.sleep(1)\n"                        # benign for a moment
         "print('mining', flush=True)\n"
         "end = time.monotonic() + 30\n"
         "while time.monotonic() < end:\n"
         "    pass\n"
         "print('SURVIVED', flush=True)\n")


def run(tmp_path: Path, code: str) -> list[dict[str, object]]:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    policy = write_policy(tmp_path / "p.toml", POLICY)
    result = hvtsm(db, "run", "--json", "--policy", policy, "--", "python3", "-c", code,
                   timeout=90)
    assert "Traceback" not in result.stderr, result.stderr
    return json_lines(result.stdout)


def test_a_miner_is_a_cpu_hog_and_is_contained(tmp_path: Path) -> None:
    events = run(tmp_path, MINER)
    said = "".join(str(e["data"]) for e in events if e["event"] == "output")
    assert "mining" in said and "SURVIVED" not in said, said
    [anomaly] = [e for e in events if e["event"] == "anomaly"]
    assert anomaly["kind"] == "cpu-hog", anomaly
    assert "of 1 CPU(s)" in str(anomaly["detail"]), anomaly
    evidence = anomaly["evidence"]
    assert isinstance(evidence, dict) and evidence["contained"] == "killed"
    assert str(evidence["program"]).startswith("/usr/bin/python3")
    end = events[-1]
    assert end["event"] == "exit" and end["ended_by"] in ("reaction", "containment"), end


def test_a_quiet_workload_is_no_hog(tmp_path: Path) -> None:
    events = run(tmp_path, "import time\ntime.sleep(5)\nprint('done', flush=True)\n")
    assert [e for e in events if e["event"] == "anomaly"] == []
    assert events[-1]["event"] == "exit" and events[-1]["status"] == 0
