"""Transient zones without a kernel: the profile's `transient` field, the agent's held calls
(hold, release, refuse, timeout) against a recording listener, the host's parsing of the
hostile code-path event, `tighter`, and the manager's split logic with an in-memory driver."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from guest_agent.holds import Holds
from guest_agent.judge import Action, Verdict
from guest_agent.profile import Profile, ProfileError, TransientWatch
from guest_agent.protocol import validate
from guest_agent.reports import Reporter
from guest_agent.watch import Transient, Watch
from hvtsm.lifecycle import Manager
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.code_path import CodePath, from_event
from hvtsm.policy import load_policy
from hvtsm.policy.transient import expected_programs, monitor_transient
from hvtsm.restrictions import EgressRule, FilesystemMode, NetworkMode, Restrictions
from hvtsm.store import Store
from hvtsm.zones.base import ZoneHandle, ZoneSpec
from tests.unit.fake_driver import FakeDriver, FakeState, FakeWorkload

# -- the profile ----------------------------------------------------------------------------


def test_transient_profile_round_trips_and_is_off_when_empty() -> None:
    p = Profile.from_dict({"transient": {"triggers": ["exec", "connect"],
                                         "expect_exec": ["/bin/sh", "*/python3*"],
                                         "hold_timeout": 2}})
    assert p.transient == TransientWatch(("exec", "connect"), ("/bin/sh", "*/python3*"), 2.0)
    assert Profile.from_dict(p.to_dict()) == p
    for off in ({}, {"triggers": []}, None):
        assert Profile.from_dict({"transient": off}).transient is None
    assert "transient" not in Profile().to_dict()


@pytest.mark.parametrize("bad, field", [
    ({"triggers": ["fork"]}, "triggers"),
    ({"triggers": "exec"}, "triggers"),
    ({"triggers": ["exec"], "expect_exec": [""]}, "expect_exec"),
    ({"triggers": ["exec"], "hold_timeout": 0}, "hold_timeout"),
    ({"triggers": ["exec"], "hold_timeout": 600}, "hold_timeout"),
    ({"triggers": ["exec"], "expect": []}, "expect"),
    ([], "transient"),
])
def test_bad_transient_profile_names_the_field(bad: Any, field: str) -> None:
    with pytest.raises(ProfileError, match=field):
        Profile.from_dict({"transient": bad})


def test_expected_programs_match_path_or_resolved_path_by_glob() -> None:
    w = TransientWatch(("exec",), ("/usr/bin/dash", "*/python3*", "/opt/tool/**"))
    assert w.expected("/bin/sh", "/usr/bin/dash")  # by what it resolves to
    assert w.expected("/usr/local/bin/python3.11")
    assert w.expected("/opt/tool/bin/x") and w.expected("/opt/tool/a/../b")
    assert not w.expected("/bin/sleep", "/usr/bin/sleep")
    assert not w.expected("/usr/bin/python")  # * stays within one name, no match of "3"


def test_transient_message_is_validated() -> None:
    assert validate({"type": "transient", "id": "w", "op": "split", "hold": 3,
                     "zone": "zt", "network": "none"}) is None
    assert validate({"type": "transient", "id": "w", "op": "explode"}) is not None
    assert validate({"type": "transient", "id": "w", "op": "deny", "hold": -1}) is not None


# -- the agent's held calls -------------------------------------------------------------------

class RecordingListener:
    fd = 1 << 20  # never polled: only answers are recorded

    def __init__(self) -> None:
        self.answers: list[tuple[int, bool]] = []

    def respond(self, notif_id: int, *, allow: bool, error: int = 1) -> bool:
        self.answers.append((notif_id, allow))
        return True

    def close(self) -> None:
        pass


class Notif:
    def __init__(self, notif_id: int, pid: int) -> None:
        self.id, self.pid, self.nr, self.arch, self.args = notif_id, pid, 59, 0, [0] * 6


def agent_holds(hold_timeout: float = 5.0) -> tuple[Holds, Watch, list[tuple[str, dict]],
                                                   Reporter]:
    events: list[tuple[str, dict]] = []
    reporter = Reporter(lambda kind, _wid, data: events.append((kind, data)) or True)
    profile = Profile.from_dict({"transient": {"triggers": ["exec"], "expect_exec": [],
                                               "hold_timeout": hold_timeout}})
    watch = Watch("w1", profile, RecordingListener(), frozenset())  # type: ignore[arg-type]
    holds = Holds(reporter, lambda: [watch], lambda wid: watch if wid == "w1" else None)
    return holds, watch, events, reporter


def hold(holds: Holds, watch: Watch, notif_id: int) -> int:
    verdict = Verdict(Action.HOLD, "code-path", "exec of /bin/x", "execve",
                      {"path": "/bin/x", "argv": ["/bin/x", "-y"]}, trigger="exec")
    holds.hold(watch, Notif(notif_id, os.getpid()), verdict,  # type: ignore[arg-type]
               time.time(), time.monotonic())
    return max(watch.holds)


def test_held_exec_is_reported_and_released_into_its_zone() -> None:
    holds, watch, events, _reporter = agent_holds()
    number = hold(holds, watch, 77)
    kind, data = events[-1]
    assert kind == "code-path"
    assert data["hold"] == number and data["trigger"] == "exec"
    assert data["program"] == "/bin/x" and data["argv"] == ["/bin/x", "-y"]
    assert watch.listener.answers == []  # type: ignore[union-attr]  # still held
    holds.on_message({"id": "w1", "op": "split", "hold": number, "zone": "zt1",
                      "network": "none"})
    assert watch.listener.answers == [(77, True)]  # type: ignore[union-attr]
    assert watch.transients == {"zt1": Transient(None, "none")}
    kind, data = events[-1]
    assert kind == "transient" and data["ok"] and data["pid"] == os.getpid()
    # a second answer for the same hold finds nothing to release
    holds.on_message({"id": "w1", "op": "split", "hold": number, "zone": "zt1"})
    assert events[-1][1]["ok"] is False and "no held call" in events[-1][1]["error"]


def test_refused_hold_fails_the_call() -> None:
    holds, watch, _events, _reporter = agent_holds()
    number = hold(holds, watch, 5)
    holds.on_message({"id": "w1", "op": "deny", "hold": number, "reason": "max"})
    assert watch.listener.answers == [(5, False)]  # type: ignore[union-attr]
    assert watch.holds == {} and watch.transients == {}


def test_unanswered_hold_times_out_refused_with_an_anomaly() -> None:
    holds, watch, events, _reporter = agent_holds(hold_timeout=0.05)
    hold(holds, watch, 9)
    holds.expire()
    assert watch.listener.answers == []  # type: ignore[union-attr]  # not yet
    assert 0 <= holds.timeout_ms() <= 51
    time.sleep(0.06)
    holds.expire()
    assert watch.listener.answers == [(9, False)]  # type: ignore[union-attr]
    kind, data = events[-1]
    assert kind == "anomaly" and data["category"] == "transient-timeout"
    assert data["contained"] == "denied"
    assert holds.timeout_ms() == 1000


def test_hold_that_cannot_be_reported_is_refused_at_once() -> None:
    holds, watch, _events, reporter = agent_holds()
    reporter.emit = lambda *_a: False  # outbox full
    hold(holds, watch, 4)
    holds.expire()
    assert watch.listener.answers == [(4, False)]  # type: ignore[union-attr]


# -- host side ------------------------------------------------------------------------------

def test_code_path_event_from_a_hostile_agent() -> None:
    ok = from_event({"hold": 3, "pid": 42, "trigger": "exec", "program": "/bin/x" * 500,
                     "argv": ["a"] * 100 + [7]}, "w")
    assert ok is not None and ok.hold == 3 and len(ok.program) <= 512
    assert len(ok.argv) == 16 and ok.describe().startswith("exec of /bin/x")
    for bad in ({"hold": -1, "pid": 1, "trigger": "exec"}, {"hold": 1, "pid": 0,
                                                             "trigger": "exec"},
                {"hold": 1, "pid": 2, "trigger": "fork"}, {"hold": True, "pid": 2,
                                                            "trigger": "exec"}):
        assert from_event(bad) is None


def test_tighter_takes_the_tighter_of_each_field() -> None:
    rule = EgressRule.parse("10.0.0.0/8:443")
    inner = EgressRule.parse("10.1.0.0/16:443")
    a = Restrictions(network=NetworkMode.FULL, egress=(rule,), memory=100, pids=None,
                     cpu_quota=50, cpus=frozenset({0, 1}))
    b = Restrictions(network=NetworkMode.FULL, egress=(inner,), memory=200, pids=10,
                     cpus=frozenset({1}), filesystem=FilesystemMode.RO)
    t = a.tighter(b)
    assert (t.memory, t.pids, t.cpu_quota, t.cpus) == (100, 10, 50, frozenset({1}))
    assert t.egress == (inner,) and t.filesystem is FilesystemMode.RO
    assert b.tighter(Restrictions(network=NetworkMode.NONE)).network is NetworkMode.NONE
    assert b.tighter(Restrictions(network=NetworkMode.NONE)).egress is None
    assert not a.loosenings(a.tighter(b)) and not b.loosenings(a.tighter(b))


def test_expected_programs_are_the_workloads_own_the_policys_and_the_callers() -> None:
    policy = load_policy(Path(__file__).parents[2] / "policies" / "demo.toml")
    programs = expected_programs(policy, ["sh", "-c", "x"], ["/opt/found"])
    sh = shutil.which("sh")
    assert sh is not None and os.path.realpath(sh) in programs
    assert "/usr/bin/env" in programs and programs[-1] == "/opt/found"
    assert monitor_transient(policy, ["sh"])["triggers"] == ["exec"]  # type: ignore[index]
    default = load_policy(Path(__file__).parents[2] / "policies" / "default.toml")
    assert monitor_transient(default, ["sh"]) is None


class SplittingDriver(FakeDriver):
    def __init__(self) -> None:
        super().__init__()
        self.refused: list[tuple[int, str]] = []
        self.splits: list[tuple[str, int, Restrictions]] = []

    def split(self, parent: ZoneHandle[Any], spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle[Any], FakeWorkload]:
        self.splits.append((spec.zone_id, request.pid, initial))
        self.live.add(spec.zone_id)
        work = FakeWorkload(request.pid)
        self.workloads[spec.zone_id] = work
        return ZoneHandle(spec.zone_id, self.backend, FakeState(parent=parent.zone_id),
                          initial), work

    def refuse(self, parent: ZoneHandle[Any], request: CodePath, reason: str) -> None:
        self.refused.append((request.hold, reason))


def fake_manager(tmp_path: Path, max_zones: int = 1) -> tuple[Manager, SplittingDriver, Any]:
    (tmp_path / "child.toml").write_text(
        'name = "c"\n[[phase]]\nat = "0s"\nnetwork = "none"\nmemory = "64MiB"\n'
        '[[phase]]\nat = "10s"\naction = "terminate"\n[anomaly]\nreaction = "terminate"\n')
    (tmp_path / "p.toml").write_text(
        'name = "p"\n[[phase]]\nat = "0s"\nmemory = "32MiB"\npids = 8\n[[phase]]\nat = "1h"\n'
        'network = "loopback"\n[transient]\nenabled = true\npolicy = "child.toml"\n'
        f'lifespan_scale = 0.5\nmax_zones = {max_zones}\n')
    driver = SplittingDriver()
    manager = Manager(Store(f"sqlite:///{tmp_path / 'db'}"), driver.bound)
    manager.start()
    return manager, driver, load_policy(tmp_path / "p.toml")


def request(hold_no: int, pid: int) -> CodePath:
    return CodePath(hold=hold_no, pid=pid, trigger="exec", program="/bin/x", argv=("/bin/x",))


def wait_for(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_split_never_looser_than_parent_then_limit_then_parent_end(tmp_path: Path) -> None:
    manager, driver, policy = fake_manager(tmp_path)
    parent = manager.launch(policy, ["/bin/true"])
    manager.events.code_path(parent.zone_id, request(1, 501))
    wait_for(lambda: len(parent.children) == 1)
    child = manager.zones[parent.children[0]]
    (_zone, pid, initial), = driver.splits
    assert pid == 501 and child.scale == 0.5 and child.parent == parent.zone_id
    # memory: the parent's 32MiB beats the child's 64MiB; network: the child's none
    assert initial.memory == 32 << 20 and initial.pids == 8
    assert initial.network is NetworkMode.NONE
    assert child.pending == {1: pytest.approx(child.started_at + 5, abs=0.01)}
    # one split too many: refused, and an anomaly of the parent
    manager.events.code_path(parent.zone_id, request(2, 502))
    wait_for(lambda: driver.refused)
    assert driver.refused[0][0] == 2 and "max_zones" in driver.refused[0][1]
    manager.settle()
    assert parent.anomalies == 1 and len(parent.children) == 1
    # an anomaly the agent names the transient zone for is the transient zone's: its
    # policy terminates it, the parent goes on
    report = AnomalyReport("connect-out", "x", "agent", {"zone": child.zone_id})
    manager.events.anomaly(parent.zone_id, report)
    assert child.ended.wait(5) and str(child.state) == "terminated"
    assert not parent.ended.is_set() and parent.anomalies == 1
    # a zone it does not own stays with the parent
    assert manager.transients.attribute(parent.zone_id, AnomalyReport(
        "connect-out", "x", "agent", {"zone": "zother"})) == parent.zone_id
    manager.shutdown()


def test_parent_tightening_and_end_reach_the_child(tmp_path: Path) -> None:
    manager, driver, policy = fake_manager(tmp_path, max_zones=4)
    parent = manager.launch(policy, ["/bin/true"])
    manager.events.code_path(parent.zone_id, request(1, 600))
    wait_for(lambda: len(parent.children) == 1)
    child = manager.zones[parent.children[0]]
    child.handle.applied = Restrictions(network=NetworkMode.FULL, memory=1 << 30)
    manager.jump(parent.zone_id, reason="test")  # parent: network loopback now
    wait_for(lambda: child.handle.applied.network is NetworkMode.LOOPBACK)
    assert child.handle.applied.memory == 32 << 20
    driver.workloads[parent.zone_id].exit(0)
    assert parent.ended.wait(5) and child.ended.wait(5)
    assert child.end_reason == f"its parent zone {parent.zone_id} ended"
    manager.shutdown()
