"""A schedule that holds without a controller (issue 11, part 6), through the real CLI and
real cgroup zones: the controller is SIGKILLed before a phase falls due, and the zone's
agent (its deputy) still cuts the network, lowers the memory limit and ends the zone on
time, seen from inside the zone and from the host; `hvtsm resume` then audits each as
applied by the agent, and `hvtsm zones --json` shows the stretch without a controller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from sqlmodel import select

from hvtsm.lifecycle.deputy import DEPUTY_GRACE_S
from hvtsm.store import Store
from hvtsm.store.models import Zone
from tests.integration.cli_helpers import (
    GATEWAY,
    audit,
    env,
    hvtsm,
    hvtsm_argv,
    json_lines,
    running,
    wait_for,
    write_policy,
    zones,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

#: what the deputy's lag may be beyond its grace here: applying the steps (an `ip`-free
#: netlink call, a cgroup write: milliseconds), the probe's own 50 ms period, a loaded host
SLACK_S = 0.35

SCHEDULE = """
name = "unattended"
[[phase]]
at = "0s"
network = "full"
memory = "256MiB"
[[phase]]
at = "2s"
network = "loopback"
[[phase]]
at = "4s"
memory = "128MiB"
[[phase]]
at = "8s"
action = "terminate"
# the cut itself is under test (the agent's containment would kill the prober at its first
# refused connect); the agent is still there: every zone with phases has one, its deputy
[anomaly]
monitor = false
"""

ENDS = """
name = "ends-alone"
[[phase]]
at = "0s"
network = "full"
[[phase]]
at = "2500ms"
action = "terminate"
[anomaly]
monitor = false
"""

#: every 50 ms: a connect to the host end of the zone's NIC, and the memory limit the zone's
#: own cgroup file says (found through /proc/self/cgroup), each line stamped
PROBE = GATEWAY + r"""
def limit_file():
    for line in open('/proc/self/cgroup').read().splitlines():
        _, controllers, path = line.split(':', 2)
        if 'memory' in controllers.split(','):
            return '/sys/fs/cgroup/memory' + path + '/memory.limit_in_bytes'
        if controllers == '':
            v2 = '/sys/fs/cgroup' + path + '/memory.max'
            if os.path.exists(v2):
                return v2
port, gw, limit = int(sys.argv[1]), gateway(), limit_file()
while True:
    try:
        s = socket.create_connection((gw, port), timeout=0.2)
        s.close()
        net = 'ok'
    except OSError:
        net = 'failed'
    mem = open(limit).read().strip()
    print(time.time(), net, mem, flush=True)
    time.sleep(0.05)
"""


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _start(db: str, policy: str, *argv: str) -> tuple[subprocess.Popen[str], str]:
    """`hvtsm run` whose workload writes to the test's own pipe (it outlives the
    controller: the controller passes it on, it does not relay it); the zone's id, from the
    controller's own start line (read at once: polling the store from a CLI would be late
    on a busy host)."""
    zones(db)  # the store's tables exist before two processes race to make them
    proc = subprocess.Popen(hvtsm_argv(db, "run", "--policy", policy, "--", *argv),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        words = proc.stderr.readline().split()
        if len(words) > 4 and words[2] == "zone" and words[4] == "started:":
            return proc, words[3]
    raise AssertionError("the controller never said the zone started")


def _started(db: str, zone_id: str) -> float:
    store = Store(db)
    try:
        with store.session() as session:
            row = session.exec(select(Zone).where(Zone.id == zone_id)).one()
            assert row.started_at is not None
            return row.started_at
    finally:
        store.dispose()


def _lines(text: str) -> list[tuple[float, str, int]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            out.append((float(parts[0]), parts[1], int(parts[2])))
    return out


def _agent_alive(zone_id: str) -> bool:
    try:
        record = json.loads((Path("/run/hvtsm/agents") / f"{zone_id}.agent").read_text())
    except OSError:
        return False
    return running(int(record["pid"]))


def test_tightenings_happen_on_time_with_the_controller_killed(
        tmp_path: Path, listener: int) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    policy = write_policy(tmp_path / "unattended.toml", SCHEDULE)
    proc, zone_id = _start(db, policy, "python3", "-c", PROBE, str(listener))
    try:
        _unattended_run(db, proc, zone_id)
    finally:
        hvtsm(db, "cleanup", zone_id)  # whatever a failure left (the zone, its agent)


def _unattended_run(db: str, proc: subprocess.Popen[str], zone_id: str) -> None:
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)  # at ~1 s: before the first tightening is due
    proc.wait(10)
    killed = time.time()
    started = _started(db, zone_id)
    assert killed < started + 2, "the controller must die before the network cut is due"
    assert _agent_alive(zone_id), "an unwatched zone with phases has an agent: its deputy"
    # the probe writes straight to our pipe: read what it said until after the memory cut
    wait_for(lambda: time.time() > started + 5.0, timeout=10, what="the memory cut")
    resume = subprocess.Popen(hvtsm_argv(db, "resume", "--json"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(),
                              stdin=subprocess.DEVNULL)
    out, err = resume.communicate(timeout=60)
    probe_out = proc.stdout.read() if proc.stdout else ""
    assert resume.returncode == 0, err
    samples = _lines(probe_out)
    assert samples, f"the probe said nothing: {probe_out[:400]!r}"

    net_due, mem_due = started + 2, started + 4
    oks = [t for t, net, _ in samples if net == "ok"]
    cut = min(t for t, net, _ in samples if net == "failed")
    assert oks and max(oks) < net_due + DEPUTY_GRACE_S + SLACK_S
    assert net_due <= cut <= net_due + DEPUTY_GRACE_S + SLACK_S, (cut - net_due, samples[:5])
    assert all(net == "failed" for t, net, _ in samples if t > cut)
    lowered = min(t for t, _, mem in samples if mem == 128 * 2**20)
    assert all(mem == 256 * 2**20 for t, _, mem in samples if t < lowered)
    assert mem_due <= lowered <= mem_due + DEPUTY_GRACE_S + SLACK_S, lowered - mem_due

    # resumed at ~5 s: the zone's agent said what it applied; the rest is the controller's
    events = json_lines(out)
    assert events[0]["event"] == "adopt" and events[0]["zone"] == zone_id
    by_agent = {e["phase"]: e for e in events if e["event"] == "phase" and e["by"] == "agent"}
    assert set(by_agent) == {1, 2}
    assert all(not e["late"] and e["lag_ms"] < (DEPUTY_GRACE_S + SLACK_S) * 1000
               for e in by_agent.values())
    end = events[-1]
    assert end["event"] == "exit" and end["ended_by"] == "policy", end
    trail = audit(db, zone_id)
    applied = {t["phase"]: t for t in trail if t["kind"] == "phase"}
    for index in (1, 2):
        assert "applied by the zone's agent while no controller ran" in applied[index]["note"]
        assert not applied[index]["late"]
    assert abs(applied[1]["applied_at"] - cut) < SLACK_S
    assert abs(applied[2]["applied_at"] - lowered) < SLACK_S
    assert "NIC unplugged" in applied[1]["note"]  # the controller completed the cut
    assert not applied[3]["late"], applied[3]  # the end: the resumed controller's, on time
    [row] = zones(db)
    assert row["state"] == "terminated" and abs(_epoch(row["ended"]) - (started + 8)) < 1.0
    [span] = row["unattended"]
    assert [p["phase"] for p in span["phases"]] == [1, 2]
    assert _epoch(span["since"]) == pytest.approx(killed, abs=0.5)
    assert _epoch(span["until"]) > started + 5
    table = hvtsm(db, "zones", "--all", check=True).stdout
    assert "UNATTENDED" in table and "1,2 by agent" in table
    assert not _agent_alive(zone_id)


def test_the_lifespans_end_with_no_controller_at_all(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    policy = write_policy(tmp_path / "ends.toml", ENDS)
    proc, zone_id = _start(db, policy, "sleep", "60")
    try:
        _ends_alone(db, proc, zone_id)
    finally:
        hvtsm(db, "cleanup", zone_id)


def _ends_alone(db: str, proc: subprocess.Popen[str], zone_id: str) -> None:
    pids = Path(f"/sys/fs/cgroup/pids/hvtsm/{zone_id}/cgroup.procs")
    if not pids.exists():
        pids = Path(f"/sys/fs/cgroup/hvtsm/{zone_id}/cgroup.procs")
    workload = int(pids.read_text().split()[0])
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    started = _started(db, zone_id)
    assert time.time() < started + 2, "the controller must die before the end is due"
    wait_for(lambda: not running(workload), timeout=10, what="the zone's processes gone")
    gone = time.time()
    due = started + 2.5
    assert due <= gone <= due + DEPUTY_GRACE_S + SLACK_S, gone - due
    assert [z["state"] for z in zones(db)] == ["running"], "no controller recorded it yet"
    result = hvtsm(db, "resume", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    events = json_lines(result.stdout)
    [end] = [e for e in events if e["event"] == "phase" and e["phase"] == 1]
    assert end["by"] == "agent" and end["changes"] == {"action": "terminate"}
    assert events[-1]["event"] == "exit" and events[-1]["ended_by"] == "policy"
    [row] = zones(db)
    assert row["state"] == "terminated" and abs(_epoch(row["ended"]) - gone) < SLACK_S
    assert [p["phase"] for p in row["unattended"][0]["phases"]] == [1]
    assert row["unattended"][0]["phases"][0]["terminate"]
    for root in ("/sys/fs/cgroup/memory/hvtsm", "/sys/fs/cgroup/hvtsm"):
        assert not os.path.exists(os.path.join(root, zone_id))
    assert not _agent_alive(zone_id)


READ_ONLY = """
name = "goes-read-only"
[[phase]]
at = "0s"
network = "none"
filesystem = "rw"
[[phase]]
at = "2s"
filesystem = "ro"
[[phase]]
at = "6s"
action = "terminate"
[anomaly]
monitor = false
"""

#: every 50 ms: a write to the zone's own /tmp, stamped
WRITER = r"""
import time
while True:
    try:
        with open('/tmp/w', 'w') as f:
            f.write('x')
        said = 'ok'
    except OSError as e:
        said = 'refused-%d' % e.errno
    print(time.time(), said, flush=True)
    time.sleep(0.05)
"""


def test_the_agent_makes_the_zone_read_only_in_its_own_namespaces(tmp_path: Path) -> None:
    """The deputy's remount joins the zone's mount namespace, whose /proc is the zone's own
    PID namespace's: the zone's writes fail from the due time on, and it runs on."""
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    policy = write_policy(tmp_path / "ro.toml", READ_ONLY)
    proc, zone_id = _start(db, policy, "python3", "-c", WRITER)
    try:
        time.sleep(0.8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        started = _started(db, zone_id)
        assert time.time() < started + 2, "the controller must die before `ro` is due"
        wait_for(lambda: time.time() > started + 4.0, timeout=10, what="the switch to ro")
        result = hvtsm(db, "resume", "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        said = [line.split() for line in (proc.stdout.read() if proc.stdout else "")
                .splitlines()]
        samples = [(float(ts), word) for ts, word in said]
        due = started + 2
        refused = [t for t, word in samples if word == "refused-30"]  # EROFS
        assert refused, samples[-5:]
        assert due <= min(refused) <= due + DEPUTY_GRACE_S + SLACK_S, min(refused) - due
        assert all(word == "ok" for t, word in samples if t < min(refused))
        assert all(word == "refused-30" for t, word in samples if t > min(refused))
        assert max(t for t, _ in samples) > started + 3.5, "the zone ran on, read-only"
        events = json_lines(result.stdout)
        [ro] = [e for e in events if e["event"] == "phase" and e["phase"] == 1]
        assert ro["by"] == "agent" and not ro["late"], ro
        assert events[-1]["event"] == "exit" and events[-1]["ended_by"] == "policy"
    finally:
        hvtsm(db, "cleanup", zone_id)


HELD = """
name = "lowered-while-locked"
[[phase]]
at = "0s"
network = "none"
memory = "256MiB"
[[phase]]
at = "1s"
memory = "128MiB"
[[phase]]
at = "3s"
action = "terminate"
"""

#: the workload takes an exclusive flock on every cgroup directory and file it can open (its
#: own cgroup is what it sees at /sys/fs/cgroup) and on anything under /run it can, then
#: holds them: were the zone's lock among them, every tightening would wait on it
LOCKER = r"""
import fcntl, os, sys, time
held = []
for top in ('/sys/fs/cgroup', '/run', '/tmp'):
    for root, dirs, files in os.walk(top):
        for name in [''] + files:
            path = os.path.join(root, name) if name else root
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(fd)
            except OSError:
                pass
print('held', len(held), flush=True)
time.sleep(60)
"""


def test_a_workload_holding_every_lock_it_can_reach_does_not_delay_a_tightening(
        tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    policy = write_policy(tmp_path / "held.toml", HELD)
    result = hvtsm(db, "run", "--json", "--policy", policy, "--", "python3", "-c", LOCKER,
                   timeout=60)
    events = json_lines(result.stdout)
    out = " ".join(e["data"] for e in events if e["event"] == "output")
    assert "held" in out and int(out.split()[1]) > 0, out  # it did hold locks
    [lowered] = [e for e in events if e["event"] == "phase" and e["phase"] == 1]
    assert lowered["changes"] == {"memory": "128MiB"} and not lowered["late"], lowered
    assert lowered["lag_ms"] < 500, lowered
    end = events[-1]
    assert end["event"] == "exit" and end["ended_by"] == "policy", end
