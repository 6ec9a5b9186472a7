"""The three-stage pipeline of test_pipeline_cgroup.py in real TCG guests: the same result,
the same stage output and reasons, whichever backend runs the stages (three guests boot
one after the other, about 40 s in all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.cli_helpers import hvtsm, json_lines
from tests.integration.test_libvirt_zone import ready  # noqa: F401
from tests.integration.test_pipeline_cgroup import READINGS, Server, server  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]


def test_three_stages_in_guests_keep_their_output(
        ready: None, tmp_path: Path, server: Server) -> None:  # noqa: F811
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    result = hvtsm(db, "pipeline", "--backend", "libvirt", "--json", str(READINGS), "--",
                   str(server.port), timeout=400)
    assert result.returncode == 0, result.stderr + result.stdout
    final = json_lines(result.stdout)[-1]
    assert final["event"] == "pipeline" and final["ok"], final
    # the last stage's printed result reached the host, after its zone's output pipe was
    # closed by the runner (the driver writes through a descriptor of its own)
    summary = json.loads(final["output"])
    assert summary["count"] == 3 and summary["mean"] == 3.0 and summary["max"] == 5.0
    assert summary["parse_network"].startswith("unreachable")
    assert summary["leak"].startswith("refused")
    assert [s["name"] for s in final["stages"]] == ["fetch", "parse", "compute"]
    assert all(s["ended"].startswith("workload exited") for s in final["stages"]), final


def test_a_failing_stage_in_a_guest_says_why(ready: None,  # noqa: F811
                                             tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    result = hvtsm(db, "pipeline", "--backend", "libvirt", "--json", str(READINGS), "--",
                   "9", timeout=300)
    assert result.returncode == 1, result.stderr
    final = json_lines(result.stdout)[-1]
    assert not final["ok"] and final["skipped"] == ["parse", "compute"]
    fetch = final["stages"][0]
    # the stage's own stderr, as in a cgroup zone: the reason is shown
    assert "Connection refused" in fetch["stderr"] or "ConnectionRefused" in fetch["stderr"]
    assert fetch["ended"].startswith("workload exited"), fetch
