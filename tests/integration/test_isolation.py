"""Two cgroup zones, one hostile: from inside its zone, code that has read hvtsm's source
tries to see, signal, trace, read and reach the other zone and hvtsm itself
(isolation/attacker.py), with the kernel's isolation alone and with the default policy's
monitoring on top; then nothing of either zone is left on the host."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvtsm.agent_stage import zone_python
from hvtsm.zones.identity import CLAIM_DIR, in_range
from tests.integration.cli_helpers import (
    REPO,
    hvtsm,
    json_lines,
    spawn,
    wait_for,
    write_policy,
    zones,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

PROBES = Path(__file__).parent / "isolation"
#: a python any uid may run (a virtualenv's may live in a home no zone can enter)
ZONE_PY = zone_python()

#: the kernel's isolation alone: no monitoring, a lifespan long enough for the probes
BARE = """
name = "bare"
[[phase]]
at = "0s"
network = "full"
memory = "256MiB"
[[phase]]
at = "60s"
action = "terminate"
"""


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """The probes where a zone can be given them (their path is named on its command
    line, so its view binds them in read-only)."""
    target = tmp_path / "probes"
    target.mkdir()
    target.chmod(0o755)
    for name in ("victim.py", "attacker.py"):
        shutil.copy(PROBES / name, target / name)
        (target / name).chmod(0o644)
    return target


class Victim:
    def __init__(self, db: str, policy: str, script: Path) -> None:
        self.proc = spawn(db, "run", "--json", "--policy", policy, "--",
                          ZONE_PY, str(script), "60")
        assert self.proc.stdout is not None
        start = json.loads(self.proc.stdout.readline())
        assert start["event"] == "start", start
        self.zone: str = start["zone"]
        self.pid: int = start["pid"]
        ready = Path(f"/proc/{self.pid}/root/tmp/ready")
        wait_for(ready.exists, what="the victim's /tmp/ready")
        self.uid = int(ready.read_text())

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=30)


@pytest.fixture
def victim_of(tmp_path: Path, scripts: Path) -> Iterator[Any]:
    made: list[Victim] = []

    def make(db: str, policy: str) -> Victim:
        victim = Victim(db, policy, scripts / "victim.py")
        made.append(victim)
        return victim
    yield make
    for victim in made:
        victim.end()


def attack(db: str, policy: str, scripts: Path, victim: Victim, store: Path
           ) -> list[dict[str, Any]]:
    result = hvtsm(db, "run", "--policy", policy, "--env", f"PROBE_STORE={store}", "--",
                   ZONE_PY, str(scripts / "attacker.py"), str(victim.pid), str(victim.uid),
                   timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    lines = json_lines(result.stdout)
    assert lines, result.stderr
    return lines


def holes(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("reached")]


def test_kernel_isolation_alone_holds(tmp_path: Path, scripts: Path, victim_of: Any) -> None:
    store = tmp_path / "hvtsm.db"
    db = f"sqlite:///{store}"
    policy = write_policy(tmp_path / "bare.toml", BARE)
    victim = victim_of(db, policy)
    assert in_range(victim.uid)
    lines = attack(db, policy, scripts, victim, store)
    assert lines and lines[-1] == {"done": True}, lines
    probes = [line for line in lines if "probe" in line]
    assert len(probes) == 24, probes
    assert not holes(lines), holes(lines)
    assert os.stat(store).st_mode & 0o077 == 0, oct(os.stat(store).st_mode)
    victim.end()
    nothing_left(db, victim)


def test_isolation_holds_under_the_default_policy(tmp_path: Path, scripts: Path,
                                                  victim_of: Any) -> None:
    """The monitoring may end the attacker early (ptrace is denied by the default
    policy): whatever it ran before, nothing reached."""
    store = tmp_path / "hvtsm.db"
    db = f"sqlite:///{store}"
    policy = str(REPO / "policies" / "default.toml")
    victim = victim_of(db, policy)
    lines = attack(db, policy, scripts, victim, store)
    assert any("probe" in line for line in lines), lines
    assert not holes(lines), holes(lines)
    victim.end()
    nothing_left(db, victim)


def test_another_identity_cannot_signal_trace_or_read(tmp_path: Path, scripts: Path,
                                                      victim_of: Any) -> None:
    """The identity on its own (beside the PID namespace): a process of the host running
    as another zone's uid, or as the user all zones once shared, who can name the
    workload's pid, still cannot signal it, trace it or read its memory."""
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    victim = victim_of(db, write_policy(tmp_path / "bare.toml", BARE))
    code = f"""
import ctypes, errno, os, sys
pid = {victim.pid}
out = []
try:
    os.kill(pid, 0); out.append("signal")
except OSError as e:
    assert e.errno == errno.EPERM, e
try:
    open(f"/proc/{{pid}}/mem", "rb").read(1); out.append("mem")
except OSError as e:
    assert e.errno in (errno.EACCES, errno.EPERM), e
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, pid, None, None) == 0:
    out.append("ptrace")
print(",".join(out) or "none")
"""
    for uid in (victim.uid + 1, 65534):
        result = subprocess.run([ZONE_PY, "-c", code], user=uid, group=uid,
                                extra_groups=[], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "none", (uid, result.stdout)
    assert ctypes  # the probe's own import


def nothing_left(db: str, victim: Victim) -> None:
    """The victim's zone ended: its scratch (files, 32 MiB of bulk, its socket), its
    identity's claim, its cgroups and its namespaces are gone from the host."""
    [row] = [z for z in zones(db) if z["zone"] == victim.zone]
    assert row["state"] != "running", row
    assert not (CLAIM_DIR / str(victim.uid)).exists()
    for place in ("/tmp", "/var/tmp", "/dev/shm"):
        owned = subprocess.run(["find", place, "-xdev", "-uid", str(victim.uid)],
                               capture_output=True, text=True).stdout.split()
        assert not owned, owned
        assert not Path(place, "secret").exists()
    assert not Path("/tmp/victim.sock").exists()
    assert not Path(f"/run/netns/hvtsm-{victim.zone}").exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/hvtsm/{victim.zone}")) \
        and not Path(f"/sys/fs/cgroup/hvtsm/{victim.zone}").exists()
