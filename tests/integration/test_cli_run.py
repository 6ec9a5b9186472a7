"""`hvtsm run` end to end: a real program in a real cgroup zone, effects seen from inside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.cli_helpers import (
    CONNECT_PROBE,
    audit,
    env,
    hvtsm,
    hvtsm_argv,
    json_lines,
    running,
    spawn,
    wait_for,
    write_policy,
    zones,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hvtsm.db'}"


def no_leftovers(zone_id: str) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"hvtsm-{zone_id}" not in netns
    for root in ("/sys/fs/cgroup/memory/hvtsm", "/sys/fs/cgroup/pids/hvtsm",
                 "/sys/fs/cgroup/hvtsm"):
        assert not os.path.exists(os.path.join(root, zone_id))


NETCUT = """
name = "netcut"
[[phase]]
at = "0s"
network = "full"
memory = "256MiB"
[[phase]]
at = "1500ms"
network = "loopback"
[[phase]]
at = "3s"
action = "terminate"
# the cut itself is under test: the agent would kill the prober at its first refused
# connect (tests/integration/test_monitor_cgroup.py covers that)
[anomaly]
monitor = false
"""


def test_network_cut_on_schedule_seen_from_inside(db: str, tmp_path: Path,
                                                 listener: int) -> None:
    policy = write_policy(tmp_path / "netcut.toml", NETCUT)
    result = hvtsm(db, "run", "--policy", policy, "--user", "root", "--json", "--",
                   "python3", "-c", CONNECT_PROBE, str(listener), "100")
    assert result.returncode == 124, result.stderr
    events = json_lines(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "exit"
    zone_id = events[0]["zone"]
    phases = [e for e in events if e["event"] == "phase"]
    assert [p["phase"] for p in phases] == [0, 1, 2]
    assert phases[1]["changes"] == {"network": "loopback"}
    assert all(p["lag_ms"] < 250 for p in phases)
    output = [e["data"].split() for e in events if e["event"] == "output"]
    cut_at = phases[1]["scheduled"] + phases[1]["lag_ms"] / 1000
    before = [o for o in output if float(o[2]) < cut_at - 0.05]
    after = [o for o in output if float(o[2]) > cut_at + 0.05]
    assert before and all(o[1] == "ok" for o in before)
    assert after and all(o[1] == "failed" for o in after)
    assert events[-1]["state"] == "terminated"
    trail = audit(db, zone_id)
    assert [t["phase"] for t in trail if t["kind"] == "phase"] == [0, 1, 2]
    assert trail[-1]["kind"] == "terminated"
    no_leftovers(zone_id)


def test_exit_status_and_live_lines(db: str) -> None:
    result = hvtsm(db, "run", "--", "sh", "-c", "echo hello; exit 7")
    assert result.returncode == 7
    assert result.stdout == "hello\n"
    assert "started" in result.stderr and "phase 0" in result.stderr
    [zone] = zones(db)
    assert zone["state"] == "exited" and zone["exit_status"] == 7
    no_leftovers(zone["zone"])


def test_command_not_found_makes_nothing(db: str) -> None:
    result = hvtsm(db, "run", "--", "no-such-program-hvtsm")
    assert result.returncode == 127
    assert "command not found: no-such-program-hvtsm" in result.stderr
    assert zones(db) == []


def test_missing_command_is_a_usage_error(db: str) -> None:
    result = hvtsm(db, "run")
    assert result.returncode == 2
    assert "no command given" in result.stderr


def test_bad_policy_names_file_phase_and_field(db: str, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "bad.toml", NETCUT.replace('"1500ms"', '"-1s"'))
    result = hvtsm(db, "run", "--policy", policy, "--", "true")
    assert result.returncode == 125
    assert "bad.toml: phase 1: field 'at'" in result.stderr
    assert zones(db) == []


def test_memory_below_usage_fails_closed(db: str, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "squeeze.toml", """
name = "squeeze"
[[phase]]
at = "0s"
memory = "512MiB"
[[phase]]
at = "1500ms"
memory = "8MiB"
[[phase]]
at = "20s"
action = "terminate"
""")
    hog = "b = bytearray(96 * 1024 * 1024); import time; print('holding', flush=True); " \
          "time.sleep(30)"
    result = hvtsm(db, "run", "--policy", policy, "--user", "root", "--json", "--",
                   "python3", "-c", hog)
    # whichever the kernel does (refuse the limit, or kill the workload at it), the zone
    # must not keep running above the limit
    events = json_lines(result.stdout)
    exit_event = events[-1]
    assert exit_event["event"] == "exit"
    # a limit the kernel refuses ends the zone to fail closed (125); one it enforces kills
    # the workload, an oom-kill anomaly that makes the zone hostile (123)
    assert (result.returncode, exit_event["ended_by"]) in (
        (125, "fail-closed"), (123, "workload"), (123, "containment")), result.stderr
    assert exit_event["state"] in ("terminated", "exited")
    no_leftovers(events[0]["zone"])


def test_ctrl_c_ends_the_zone_cleanly(db: str) -> None:
    proc = spawn(db, "run", "--json", "--", "sleep", "60")
    start = json_lines(wait_for(lambda: proc.stdout.readline(), what="start line"))[0]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    [zone] = zones(db)
    assert zone["state"] == "terminated" and "interrupted" in zone["reason"]
    assert any(t["kind"] == "operator" for t in audit(db, start["zone"]))
    no_leftovers(start["zone"])


def test_without_root_one_clear_message(db: str, tmp_path: Path) -> None:
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import sqlmodel"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("this Python installation is not usable by user nobody "
                    "(tests/unit/test_host.py checks the message itself)")
    os.chmod(tmp_path, 0o777)
    result = hvtsm(f"sqlite:///{tmp_path / 'user.db'}", "run", "--", "true", user="nobody")
    assert result.returncode == 125
    assert "root" in result.stderr
    assert "Traceback" not in result.stderr


RESTART = """
name = "restart"
[[phase]]
at = "0s"
network = "full"
[[phase]]
at = "1s"
network = "loopback"
pids = 64
[[phase]]
at = "6s"
action = "terminate"
"""


def _has_nic(pid: int) -> bool:
    with open(f"/proc/{pid}/net/dev") as f:
        return "eth0" in f.read()


def _agent_pid(zone_id: str) -> int:
    record = json.loads((Path("/run/hvtsm/agents") / f"{zone_id}.agent").read_text())
    return int(record["pid"])


def test_controller_and_agent_killed_then_resumed_applies_overdue_at_once(
        db: str, tmp_path: Path) -> None:
    """With the zone's agent gone too, nobody keeps the schedule (the deputy's case is
    tests/integration/test_deputy_cgroup.py): the next controller applies what fell due at
    once, audited as late."""
    policy = write_policy(tmp_path / "restart.toml", RESTART)
    proc = spawn(db, "run", "--policy", policy, "--json", "--", "sleep", "60")
    start = json_lines(wait_for(lambda: proc.stdout.readline(), what="start line"))[0]
    zone_id, pid = start["zone"], start["pid"]
    assert _has_nic(pid)
    agent = _agent_pid(zone_id)
    proc.send_signal(signal.SIGKILL)
    os.kill(agent, signal.SIGKILL)
    proc.wait(10)
    time.sleep(1.6)  # the network phase falls due while no controller runs
    assert _has_nic(pid), "with no agent either, nothing changes while the controller is down"
    resume = spawn(db, "resume", "--json")
    wait_for(lambda: not _has_nic(pid), timeout=10, what="the overdue network cut")
    out, err = resume.communicate(timeout=30)
    assert resume.returncode == 0, err
    events = json_lines(out)
    assert events[0]["event"] == "adopt" and events[0]["zone"] == zone_id
    phase1 = next(e for e in events if e["event"] == "phase" and e["phase"] == 1)
    # late: it fell due while no controller ran (its lag is the resume's start-up, which
    # a loaded host stretches or shortens; the flag is what says it)
    assert phase1["late"] and phase1["lag_ms"] > 0 and phase1["by"] == "controller"
    # the lost agent is an anomaly of its own, recorded (not dropped) for the adopted zone
    assert any(e["event"] == "anomaly" and "is gone" in e["detail"] for e in events), events
    trail = audit(db, zone_id)
    applied = [t for t in trail if t["kind"] == "phase" and t["phase"] == 1]
    assert applied[0]["late"] and "no controller" in applied[0]["note"]
    assert trail[-1]["kind"] == "terminated"
    no_leftovers(zone_id)


def test_cleanup_removes_what_a_dead_controller_left(db: str) -> None:
    proc = spawn(db, "run", "--json", "--", "sleep", "60")
    start = json_lines(wait_for(lambda: proc.stdout.readline(), what="start line"))[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert running(start["pid"])
    dry = hvtsm(db, "cleanup", "--dry-run", "--json", check=True)
    assert start["zone"] in dry.stdout
    assert running(start["pid"])
    result = hvtsm(db, "cleanup", check=True)
    assert start["zone"] in result.stdout
    wait_for(lambda: not running(start["pid"]), what="the workload killed")
    no_leftovers(start["zone"])
    [zone] = zones(db)
    assert zone["state"] == "cleaned"
    assert "nothing to clean up" in hvtsm(db, "cleanup", check=True).stdout


def test_cleanup_spares_a_live_controller_of_another_store(db: str, tmp_path: Path) -> None:
    proc = spawn(db, "run", "--json", "--", "sleep", "60")
    try:
        start = json_lines(wait_for(lambda: proc.stdout.readline(), what="start line"))[0]
        other = f"sqlite:///{tmp_path / 'other.db'}"
        result = hvtsm(other, "cleanup", "--json", check=True)
        assert start["zone"] not in result.stdout
        assert running(start["pid"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 130
    no_leftovers(start["zone"])


LOUD = """
name = "loud"
[[phase]]
at = "0s"
memory = "256MiB"
[[phase]]
at = "60s"
action = "terminate"
[anomaly]
monitor = false
"""
#: runs `hvtsm ARGS`, reads its JSON lines in pieces and prints the controller's peak RSS
#: (KiB), the output events, their largest data and the exit line
_MEASURE = """
import json, resource, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
events = largest = 0
last = b""
rest = b""
while chunk := proc.stdout.read(1 << 20):
    lines = (rest + chunk).split(b"\\n")
    rest = lines.pop()
    for line in lines:
        if line.startswith(b'{"event": "output"'):
            events += 1
            largest = max(largest, len(json.loads(line)["data"]))
        elif line:
            last = line
proc.wait()
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, events, largest,
      last.decode())
"""


def test_a_huge_line_keeps_the_controller_small(db: str, tmp_path: Path) -> None:
    """The issue: 500 MB without a newline took the controller to 2.9 GiB."""
    policy = write_policy(tmp_path / "loud.toml", LOUD)

    def measure(*command: str) -> tuple[int, int, int, dict[str, object]]:
        out = subprocess.run([sys.executable, "-c", _MEASURE, *hvtsm_argv(
            db, "run", "--policy", policy, "--json", "--", *command)], env=env(),
            capture_output=True, text=True, timeout=300, check=True).stdout
        rss, events, largest, last = out.split(" ", 3)
        return int(rss), int(events), int(largest), json.loads(last)

    quiet, _, _, _ = measure("true")
    rss, events, largest, end = measure("sh", "-c", "head -c 200000000 /dev/zero | tr '\\0' x")
    assert end["event"] == "exit" and end["status"] == 0, end
    assert largest == 64 * 1024 and events == 200_000_000 // (64 * 1024) + 1
    assert rss - quiet < 64 * 1024, (quiet, rss)  # KiB: not the 200 MB line, nor copies
