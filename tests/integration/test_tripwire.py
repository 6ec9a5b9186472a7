"""A cgroup zone's sensitive files behind its tripwire (issue 12): a read of a key the zone's
user could open delivers nothing and is contained before any byte; an attempt the kernel
would have refused (/etc/shadow) is recorded all the same; `contain = "deny"` fails the open
and the zone goes on; a host process reading the real file never waits on the zone's agent;
nothing is left after the zone. Through the real CLI and real fanotify permission events."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from hvtsm.zones.cgroup import tripwire
from tests.integration.cli_helpers import (
    audit,
    hvtsm,
    json_lines,
    spawn,
    wait_for,
    write_policy,
)
from tests.integration.monitor_corpus import decoy_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

DENY = """
name = "deny-only"
[[phase]]
at = "0s"
network = "none"
[[phase]]
at = "30s"
action = "terminate"
[anomaly]
sensitive_paths = ["/home/*/.ssh/**", "/etc/shadow"]
contain = "deny"
reaction = "accelerate"
"""


def run(db: str, script: str, *options: str) -> list[dict[str, object]]:
    result = hvtsm(db, "run", "--json", *options, "--", "sh", "-c", script, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return json_lines(result.stdout)


def output(events: list[dict[str, object]]) -> str:
    return "".join(str(e["data"]) + "\n" for e in events if e["event"] == "output")


def test_a_readable_key_delivers_nothing_and_is_contained_first(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    with decoy_key() as key:
        assert os.stat(key).st_mode & 0o004  # the zone's user could read the real one
        events = run(db, f"ls -l {key}; cat {key}; echo after $?")
    said = output(events)
    assert "PRIVATE KEY" not in said and "\ndecoy\n" not in said, said
    # what the zone's ls sees there: the tripwire, root's and empty
    assert "-r--r--r-- 1 root root 0 " in said, said
    [anomaly] = [e for e in events if e["event"] == "anomaly"]
    assert anomaly["kind"] == "sensitive-path", anomaly
    assert f"attempt to open {key}" in str(anomaly["detail"])
    evidence = anomaly["evidence"]
    assert isinstance(evidence, dict) and evidence["contained"] == "killed", evidence
    assert evidence["program"] == "/usr/bin/cat" and evidence["args"]["attempt"] is True
    end = events[-1]
    assert end["event"] == "exit" and end["ended_by"] == "reaction", end
    zone = str(end["zone"])
    assert [t["kind"] for t in audit(db, zone)].count("anomaly") == 1
    assert not tripwire.path_of(zone).exists()  # gone with the zone


def test_an_attempt_the_kernel_would_refuse_is_recorded(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    assert not os.stat("/etc/shadow").st_mode & 0o004  # EACCES for the zone's user
    events = run(db, "cat /etc/shadow; echo after $?")
    [anomaly] = [e for e in events if e["event"] == "anomaly"]
    assert "attempt to open /etc/shadow" in str(anomaly["detail"]), anomaly


def test_deny_fails_the_open_and_the_zone_goes_on(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    policy = write_policy(tmp_path / "deny.toml", DENY)
    with decoy_key() as key:
        link = f"/tmp/innocent-{os.getpid()}"  # in the zone's own /tmp: a symlink to it
        events = run(db, f"ln -s {key} {link}; cat {link}; echo after $?; echo still here",
                     "--policy", policy)
    said = output(events)
    assert "Operation not permitted" in said and "after 1" in said and "still here" in said
    assert "PRIVATE KEY" not in said
    [anomaly] = [e for e in events if e["event"] == "anomaly"]
    assert f"attempt to open {key}" in str(anomaly["detail"])
    assert events[-1]["event"] == "exit" and events[-1]["status"] == 0, events[-1]


def test_a_host_process_never_waits_on_the_zones_agent(tmp_path: Path) -> None:
    """With the zone's agent stopped outright, the host still reads the real file at once:
    the permission marks are on the zone's tripwire alone, which no host process opens."""
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    with decoy_key() as key:
        proc = spawn(db, "run", "--json", "--", "sleep", "30")
        try:
            start = json_lines(wait_for(lambda: proc.stdout.readline(), what="start"))[0]
            zone = str(start["zone"])
            assert tripwire.path_of(zone).exists()
            record = json.loads((Path("/run/hvtsm/agents") / f"{zone}.agent").read_text())
            agent = int(record["pid"])
            os.kill(agent, signal.SIGSTOP)
            try:
                got: list[str] = []
                reader = threading.Thread(target=lambda: got.append(key.read_text()))
                reader.start()
                reader.join(10)
                assert not reader.is_alive() and "decoy" in got[0], \
                    "a host read waited on the zone's agent"
            finally:
                os.kill(agent, signal.SIGCONT)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
