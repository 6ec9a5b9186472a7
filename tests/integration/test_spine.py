"""The zone lifecycle as a new user meets it, through the real CLI and real cgroup zones:
the README's first command, a PATH search, who ended a zone and how the exit status says
it, cleanup's plan, and many controllers on one store at once."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.cli_helpers import (
    REPO,
    env,
    hvtsm,
    hvtsm_argv,
    json_lines,
    running,
    spawn,
    wait_for,
    zones,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

LOOP = 'for i in 1 2 3 4 5 6 7 8; do echo "tick $i"; sleep 1; done'


def test_readme_first_command(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    t0 = time.monotonic()
    result = hvtsm(db, "run", "--policy", str(REPO / "policies" / "demo.toml"), "--",
                   "sh", "-c", LOOP, timeout=60)
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"tick {i}" for i in range(1, 9)]
    assert "Traceback" not in result.stderr, result.stderr
    phases = [line for line in result.stderr.splitlines() if " phase " in line]
    assert [p.split(" phase ")[1].split()[0] for p in phases] == ["0", "1", "2", "3"], phases
    # no held code path: the shell's own program and the loop's sleeps are foreseen
    assert "split from" not in result.stderr and "code-path" not in result.stderr
    # a held exec would cost its 5 s hold; the loop itself takes 8 s
    assert took < 8 + 5, f"{took:.1f} s for an 8 s loop"
    [zone] = zones(db)
    assert zone["state"] == "exited" and zone["exit_status"] == 0


def test_a_path_search_through_missing_directories_is_no_attack(tmp_path: Path) -> None:
    """PATH entries under /tmp and /home that hold no such program: the C library's
    execve of each fails with ENOENT and ran nothing; the default policy denies execs
    under /tmp/** and /home/**, and must not take those attempts for execs."""
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    script = "import subprocess; subprocess.run(['ls', '/'], check=True, " \
             "stdout=subprocess.DEVNULL); print('listed')"
    path = "/tmp/hvtsm-no-venv/bin:/home/nobody-at-all/.local/bin:/usr/bin:/bin"
    argv = hvtsm_argv(db, "run", "--json", "--", "python3", "-c", script)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                            env={**env(), "PATH": path}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr + result.stdout
    events = json_lines(result.stdout)
    assert not [e for e in events if e["event"] in ("anomaly", "reaction")], events
    assert any(e["event"] == "output" and e["data"] == "listed\n" for e in events)
    assert events[-1]["event"] == "exit" and events[-1]["ended_by"] == "workload"


def test_the_agents_containment_ends_the_zone_with_122(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    # ptrace is deny-listed by the default policy, whose containment kills the caller
    script = "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0); print('not contained')"
    result = hvtsm(db, "run", "--", "python3", "-c", script, timeout=60)
    assert result.returncode == 122, result.stderr
    assert "not contained" not in result.stdout
    end = result.stderr.strip().splitlines()[-1]
    assert "ended by the agent's containment" in end and "denied-syscall" in end, end
    assert "hostile" in end
    [zone] = zones(db)
    assert zone["state"] == "terminated"


def test_an_operator_terminate_and_a_lifespan_say_who_ended_the_zone(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    short = tmp_path / "short.toml"
    short.write_text('name = "short"\n[[phase]]\nat = "0s"\nnetwork = "full"\n'
                     '[[phase]]\nat = "1s"\naction = "terminate"\n')
    result = hvtsm(db, "run", "--policy", str(short), "--json", "--", "sleep", "30",
                   timeout=60)
    assert result.returncode == 124, result.stderr
    end = json_lines(result.stdout)[-1]
    assert (end["ended_by"], end["hostile"], end["state"]) == ("policy", False, "terminated")


def test_cleanup_leaves_another_stores_zone_unless_asked(tmp_path: Path) -> None:
    ours = f"sqlite:///{tmp_path / 'ours.db'}"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    proc = spawn(other, "run", "--json", "--", "sleep", "120")
    start = json_lines(wait_for(lambda: proc.stdout.readline(), what="start line"))[0]
    zone, pid = start["zone"], start["pid"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    try:
        dry = json_lines(hvtsm(ours, "cleanup", "--dry-run", "--json", check=True).stdout)[0]
        [planned] = [z for z in dry["zones"] if z["zone"] == zone]
        assert planned["action"] == "leave" and not planned["known"]
        assert any(r.startswith("cgroup ") for r in planned["removed"])
        done = json_lines(hvtsm(ours, "cleanup", "--json", check=True).stdout)[0]
        [carried] = [z for z in done["zones"] if z["zone"] == zone]
        # the run did exactly what its dry run said: nothing, for this zone
        assert carried["action"] == "leave" and running(pid)
        named = hvtsm(ours, "cleanup", "--dry-run", zone, check=True).stdout
        assert f"{zone} (not in this store): would remove" in named
        removed = hvtsm(ours, "cleanup", zone, check=True).stdout
        assert f"{zone} (not in this store): removed" in removed
        wait_for(lambda: not running(pid), what="the other store's workload killed")
    finally:
        hvtsm(other, "cleanup", zone)
    # the other store still records it as its own: its cleanup closes the record
    assert {z["state"] for z in zones(other)} == {"cleaned"}


def test_fifty_runs_at_once_on_one_store(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    hvtsm(db, "zones", check=True)  # the store's tables exist before the crowd arrives

    def one(i: int) -> subprocess.CompletedProcess[str]:
        return hvtsm(db, "run", "--json", "--", "sh", "-c", f"sleep 1; echo run {i}",
                     timeout=600)

    with concurrent.futures.ThreadPoolExecutor(50) as crowd:
        results = list(crowd.map(one, range(50)))
    failed = [(r.returncode, r.stderr[:1500]) for r in results if r.returncode != 0]
    assert not failed, failed
    for i, result in enumerate(results):
        events = json_lines(result.stdout)
        assert [e["data"] for e in events if e["event"] == "output"] == [f"run {i}\n"]
        # a loaded controller is no silent agent: no link anomaly, no reaction
        assert not [e for e in events if e["event"] in ("anomaly", "reaction")], events
    listed = zones(db)
    assert len(listed) == 50 and {z["state"] for z in listed} == {"exited"}
    owners = Path(os.environ.get("HVTSM_RUN_DIR", "/run/hvtsm")) / "owners"
    assert not {z["zone"] for z in listed} & set(os.listdir(owners))
