"""The zone's deputy (guest_agent/deputy.py): its choice by a fake clock, its log, what it
does when a step fails, and its monotonic steps (guest_agent/deputy_steps.py) on a fake
cgroup tree: none of them ever raises a limit or loosens anything."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from guest_agent import deputy_steps as steps
from guest_agent.deputy import Deputy, Phase, Schedule, ScheduleError, decide
from guest_agent.deputy_system import Context, System
from guest_agent.protocol import validate

T = TypeVar("T")
DUE = 1_800_000_000.0


class FakeSystem(System):
    """Files are real (a tmp dir stands for the cgroup tree); the rest is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.signals: list[tuple[int, int]] = []
        self.links = {"eth0": True, "lo": True}
        self.fail: str | None = None

    def in_netns(self, netns: str | None, fn: Callable[[], T]) -> T:
        self.calls.append(("netns", netns))
        return fn()

    def link_down(self, ifname: str) -> bool | None:
        if self.fail == "link":
            raise steps.StepError("cannot set eth0 down: Operation not permitted")
        if ifname not in self.links:
            return None
        was, self.links[ifname] = self.links[ifname], False
        return was

    def interfaces(self) -> list[str]:
        return sorted(self.links)

    def drop_address(self, family: int, address: str, prefix: int, ifname: str) -> bool:
        self.calls.append(("drop", address))
        return True

    def remount_namespace(self, ns_file: str) -> int:
        self.calls.append(("remount", ns_file))
        return 7

    def remount_root(self) -> str:
        self.calls.append(("remount_root", None))
        return "remounted (superblock)"

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))

    def wait_until(self, check: Callable[[], bool], timeout: float) -> bool:
        return check()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def phase(index: int, due: float, *step: steps.Step, terminate: bool = False) -> Phase:
    return Phase(index, due, tuple(step), terminate)


def schedule(*phases: Phase, in_force: int = 0, grace: float = 0.3,
             fail_closed: tuple[steps.Step, ...] = ()) -> Schedule:
    return Schedule("z1", tuple(phases), in_force, grace, fail_closed)


# --- the choice, by the clock ----------------------------------------------------------------


def test_nothing_is_applied_before_due_plus_grace() -> None:
    s = schedule(phase(1, DUE), phase(2, DUE + 2))
    early = decide(s, 0, DUE + 0.29)
    assert early.apply is None and early.wake_at == pytest.approx(DUE + 0.3)
    ripe = decide(s, 0, DUE + 0.3)
    assert ripe.apply is not None and ripe.apply.index == 1
    assert ripe.wake_at == pytest.approx(DUE + 2.3)


def test_a_phase_the_controller_applied_is_never_applied_again() -> None:
    s = schedule(phase(1, DUE), phase(2, DUE + 2))
    assert decide(s, 1, DUE + 1).apply is None
    assert decide(s, 2, DUE + 10) == decide(s, 2, DUE + 10)
    assert decide(s, 2, DUE + 10).apply is None and decide(s, 2, DUE + 10).wake_at is None


def test_overdue_phases_are_applied_as_one_the_latest() -> None:
    s = schedule(phase(1, DUE), phase(2, DUE + 1), phase(3, DUE + 5))
    d = decide(s, 0, DUE + 2)
    assert d.apply is not None and d.apply.index == 2 and d.together == (1,)
    assert d.wake_at == pytest.approx(DUE + 5.3)


def test_the_lifespans_end_wins_over_everything_else_due() -> None:
    s = schedule(phase(1, DUE), phase(2, DUE + 1, terminate=True), phase(3, DUE + 2))
    d = decide(s, 0, DUE + 10)
    assert d.apply is not None and d.apply.terminate and d.wake_at is None


# --- the deputy's run, with a fake clock and a fake kernel -----------------------------------


def deputy(system: FakeSystem, clock: Clock, connected: bool = False
           ) -> tuple[Deputy, list[dict[str, Any]]]:
    emitted: list[dict[str, Any]] = []
    return Deputy(Context(system, lambda wid: [41, 42]), emitted.append,
                  lambda: connected, clock=clock), emitted


def message(*phases: dict[str, Any], in_force: int = 0, **extra: Any) -> dict[str, Any]:
    msg = {"type": "deputy", "id": "z1", "phases": list(phases), "in_force": in_force,
           "grace": 0.3, **extra}
    assert validate(msg) is None
    return msg


def test_it_applies_on_time_records_and_forgets_what_is_acknowledged(tmp_path: Path) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text("536870912\n")
    system, clock = FakeSystem(), Clock(DUE - 1)
    dep, emitted = deputy(system, clock)
    dep.schedule(message({"index": 1, "due": DUE, "steps": [
        {"op": "lower", "path": str(limit), "value": 268435456},
        {"op": "link_down", "netns": "/run/netns/hvtsm-z1", "ifname": "eth0"}]}))
    dep.host_lost()
    assert dep.busy()
    for now in (DUE - 1, DUE, DUE + 0.29):
        clock.now = now
        assert dep.step() == pytest.approx(DUE + 0.3)
        assert dep.records() == []
    clock.now = DUE + 0.3
    dep.step()
    [record] = dep.records()
    assert (record.phase, record.ok, record.alone, record.terminate) == (1, True, True, False)
    assert limit.read_text() == "268435456"
    assert system.links["eth0"] is False and ("netns", "/run/netns/hvtsm-z1") in system.calls
    assert emitted == []  # no host to tell: it waits in the log
    report = dep.report()
    assert report["alone_since"] == DUE - 1 and report["records"][0]["phase"] == 1
    dep.step()
    assert len(dep.records()) == 1, "applied once"
    dep.ack("z1", record.seq)
    assert dep.records() == [] and dep.report()["alone_since"] is None and not dep.busy()


def test_a_connected_host_hears_at_once(tmp_path: Path) -> None:
    system, clock = FakeSystem(), Clock(DUE + 1)
    dep, emitted = deputy(system, clock, connected=True)
    dep.schedule(message({"index": 1, "due": DUE, "steps": [
        {"op": "loopback_down", "netns": None}]}))
    dep.step()
    assert [e["phase"] for e in emitted] == [1] and not emitted[0]["alone"]
    assert ("drop", "127.0.0.1") in system.calls and system.links["lo"] is False


def test_a_failing_step_ends_the_zone_and_says_so_before_the_kill(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"
    procs.write_text("41\n42\n")
    system, clock = FakeSystem(), Clock(DUE + 1)
    system.fail = "link"
    dep, _ = deputy(system, clock, connected=True)
    kill = {"op": "kill", "procs": [str(procs)], "version": 1, "kill": None, "freezer": None}
    order: list[str] = []
    dep._emit = lambda record: order.append("told")  # type: ignore[method-assign]
    real_kill = system.kill

    def kill_signal(pid: int, sig: int) -> None:
        order.append("kill")
        procs.write_text("")
        real_kill(pid, sig)

    system.kill = kill_signal  # type: ignore[method-assign]
    dep.schedule(message({"index": 1, "due": DUE, "steps": [
        {"op": "link_down", "netns": None, "ifname": "eth0"}]}, fail_closed=[kill]))
    dep.step()
    [record] = dep.records()
    assert not record.ok and record.terminate and "Operation not permitted" in (record.error or "")
    assert order[0] == "told" and "kill" in order
    assert (41, signal.SIGKILL) in system.signals
    assert not dep.busy() or dep.records()  # its schedule is over; the record waits


def test_the_terminate_phase_is_told_before_the_kill(tmp_path: Path) -> None:
    system, clock = FakeSystem(), Clock(DUE + 1)
    dep, _ = deputy(system, clock, connected=True)
    order: list[str] = []
    dep._emit = lambda record: order.append(f"told {record['phase']}")  # type: ignore[method-assign]
    system.kill = lambda pid, sig: order.append(f"kill {pid}")  # type: ignore[method-assign]
    dep.schedule(message({"index": 3, "due": DUE, "terminate": True,
                          "steps": [{"op": "kill_workload", "workload": "z1"}]}))
    dep.step()
    assert order[0] == "told 3" and order[1:] == ["kill 41", "kill 42", "kill 41", "kill 42"]
    assert dep.records()[0].terminate


def test_a_stand_in_freeze_is_thawed_only_when_the_host_says(tmp_path: Path) -> None:
    system, clock = FakeSystem(), Clock(DUE + 1)
    dep, _ = deputy(system, clock)
    dep.schedule(message({"index": 1, "due": DUE,
                          "steps": [{"op": "freeze_workload", "workload": "z1"}]}))
    dep.step()
    assert dep.records()[0].froze
    assert system.signals == [(41, signal.SIGSTOP), (42, signal.SIGSTOP)]
    dep.ack("z1", 1)
    assert (41, signal.SIGCONT) not in system.signals
    dep.schedule(message({"index": 2, "due": DUE + 100, "steps": []}, in_force=1))
    dep.step()
    dep.ack("z1", 1, thaw=True)
    assert system.signals[-2:] == [(41, signal.SIGCONT), (42, signal.SIGCONT)]


def test_the_host_may_move_the_schedule_but_never_back_what_was_applied() -> None:
    system, clock = FakeSystem(), Clock(DUE + 1)
    dep, _ = deputy(system, clock)
    dep.schedule(message({"index": 1, "due": DUE, "steps": []}))
    dep.step()
    # a controller that did not hear of it sends phase 1 again, in_force 0
    dep.schedule(message({"index": 1, "due": DUE, "steps": []}))
    dep.step()
    assert len(dep.records()) == 1


@pytest.mark.parametrize("bad", [
    {"phases": "x"},
    {"phases": [{"index": -1, "due": DUE, "steps": []}]},
    {"phases": [{"index": 1, "due": float("inf"), "steps": []}]},
    {"phases": [{"index": 1, "due": DUE, "steps": [{"op": "rm -rf"}]}]},
    {"phases": [{"index": 1, "due": DUE, "steps": [{"op": "lower", "path": "rel", "value": 1}]}]},
    {"phases": [], "grace": 60},
])
def test_a_schedule_that_cannot_be_used_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ScheduleError):
        Schedule.from_message({"id": "z1", **bad})


# --- the steps: monotonic, idempotent -----------------------------------------------------------


def run(step: steps.Step, system: System | None = None) -> steps.Outcome:
    return step.run(Context(system or System()))


@pytest.mark.parametrize(("held", "target", "after", "changed"), [
    ("max", 100, "100", True),
    ("536870912", 268435456, "268435456", True),
    ("100", 200, "100", False),  # never raised
    ("100", 100, "100", False),
    ("9223372036854771712", 4096, "4096", True),  # v1's "unlimited"
    ("-1", 5, "5", True),
])
def test_lower_limit_only_ever_lowers(tmp_path: Path, held: str, target: int, after: str,
                                      changed: bool) -> None:
    f = tmp_path / "pids.max"
    f.write_text(held + "\n")
    outcome = run(steps.LowerLimit(str(f), target))
    assert f.read_text().strip() == after and outcome.changed is changed


@pytest.mark.parametrize(("held", "quota", "after"), [
    ("max 100000", 50000, "50000 100000"),
    ("80000 100000", 50000, "50000 100000"),
    ("20000 100000", 50000, "20000 100000"),  # tighter already
    ("10000 50000", 50000, "10000 50000"),  # 20% of a CPU beats 50%
])
def test_cpu_max_only_ever_lowers(tmp_path: Path, held: str, quota: int, after: str) -> None:
    f = tmp_path / "cpu.max"
    f.write_text(held)
    run(steps.LowerCpuMax(str(f), quota, 100000))
    assert f.read_text() == after


def test_cfs_quota_only_ever_lowers(tmp_path: Path) -> None:
    quota, period = tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    quota.write_text("-1")
    period.write_text("100000")
    step = steps.LowerCfsQuota(str(quota), str(period), 50000, 100000)
    assert run(step).changed and quota.read_text() == "50000"
    quota.write_text("30000")
    assert not run(step).changed and quota.read_text() == "30000"


def test_cpus_are_only_ever_taken_away(tmp_path: Path) -> None:
    f = tmp_path / "cpuset.cpus"
    f.write_text("0-3")
    assert run(steps.NarrowCpus(str(f), (1, 2))).changed and f.read_text() == "1,2"
    run(steps.NarrowCpus(str(f), (0, 1, 2, 3)))  # a wider set adds nothing
    assert f.read_text() == "1,2"
    run(steps.NarrowCpus(str(f), (2, 3)))  # only what both allow
    assert f.read_text() == "2"


def test_v2_empty_cpuset_reads_the_effective_one(tmp_path: Path) -> None:
    f, eff = tmp_path / "cpuset.cpus", tmp_path / "cpuset.cpus.effective"
    f.write_text("")
    eff.write_text("0-1")
    run(steps.NarrowCpus(str(f), (0,), str(eff)))
    assert f.read_text() == "0"


def test_a_link_already_down_or_gone_is_in_force() -> None:
    system = FakeSystem()
    system.links = {"eth0": False}
    assert not run(steps.LinkDown("/run/netns/x", "eth0"), system).changed
    gone = run(steps.LinkDown("/run/netns/x", "eth1"), system)
    assert not gone.changed and "gone" in gone.detail
    system.links = {"lo": True, "eth0": True, "eth1": True}
    assert run(steps.LinkDown(None, "*"), system).changed
    assert system.links == {"lo": True, "eth0": False, "eth1": False}


def test_freeze_v1_and_its_thaw(tmp_path: Path) -> None:
    state = tmp_path / "freezer.state"
    state.write_text("THAWED")
    step = steps.Freeze(str(state), 1)
    assert run(step).changed and state.read_text() == "FROZEN"
    assert not run(step).changed
    step.thaw(Context(System()))
    assert state.read_text() == "THAWED"


def test_remount_skips_the_hosts_own_mount_namespace(tmp_path: Path) -> None:
    system = FakeSystem()
    procs = tmp_path / "cgroup.procs"
    procs.write_text(f"{1}\n")  # pid 1 shares the test's (the host's) mount namespace here
    outcome = run(steps.RemountReadOnly(None, (str(procs),)), system)
    assert not outcome.changed and ("remount", "/proc/1/ns/mnt") not in system.calls
    assert run(steps.RemountReadOnly(None), system).detail == "root remounted (superblock)"


def test_every_step_survives_the_wire() -> None:
    samples: list[steps.Step] = [
        steps.LowerLimit("/a/memory.max", 5), steps.LowerCpuMax("/a/cpu.max", 5, 10),
        steps.LowerCfsQuota("/a/q", "/a/p", 5, 10), steps.NarrowCpus("/a/c", (0, 2), "/a/e"),
        steps.LinkDown("/run/netns/n", "eth0"), steps.LinkDown(None, "*"),
        steps.LoopbackDown(None), steps.RemountReadOnly("/run/hvtsm/ns/z", ("/a/p",)),
        steps.Freeze("/a/cgroup.freeze", 2), steps.Kill(("/a/cgroup.procs",), 2, "/a/k"),
        steps.FreezeWorkload("w1"), steps.KillWorkload("w1")]
    assert {type(s) for s in samples} == set(steps.STEPS.values())
    for step in samples:
        assert steps.from_dict(step.to_dict()) == step


@pytest.mark.parametrize("bad", [
    None, {"op": "nope"}, {"op": "lower", "path": "/a/../etc/x", "value": 1},
    {"op": "lower", "path": "/a", "value": -1}, {"op": "lower", "path": "/a", "value": True},
    {"op": "link_down", "netns": None, "ifname": "a/b"},
    {"op": "narrow_cpus", "path": "/a", "cpus": []}, {"op": "freeze", "path": "/a", "version": 3},
])
def test_a_step_that_cannot_be_used_is_refused(bad: Any) -> None:
    with pytest.raises(steps.StepError):
        steps.from_dict(bad)


def test_a_guest_clock_that_is_off_keeps_the_hosts_due_times() -> None:
    system, clock = FakeSystem(), Clock(DUE - 10)  # the host says DUE - 5: we are 5 s behind
    dep, _ = deputy(system, clock, connected=True)
    dep.schedule(message({"index": 1, "due": DUE, "steps": []}, sent=DUE - 5))
    clock.now = DUE - 5 + 0.29  # host time DUE + 0.29
    dep.step()
    assert dep.records() == []
    clock.now = DUE - 5 + 0.3
    dep.step()
    [record] = dep.records()
    assert record.finished == pytest.approx(DUE + 0.3)  # reported in the host's time


def test_kill_reaches_the_transient_zones_below(tmp_path: Path) -> None:
    top = tmp_path / "zone"
    (top / "t1").mkdir(parents=True)
    (top / "cgroup.procs").write_text("41\n")
    (top / "t1" / "cgroup.procs").write_text("77\n")
    system = FakeSystem()

    def kill(pid: int, sig: int) -> None:
        system.signals.append((pid, sig))
        for f in (top / "cgroup.procs", top / "t1" / "cgroup.procs"):
            f.write_text("\n".join(p for p in f.read_text().split() if p != str(pid)))

    system.kill = kill  # type: ignore[method-assign]
    outcome = run(steps.Kill((str(top / "cgroup.procs"),), 1), system)
    assert outcome.changed and {p for p, _ in system.signals} == {41, 77}
