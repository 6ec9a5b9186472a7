"""`hvtsm invoke --backend cgroup`: the cold path without libvirt. Real cgroup zones, real
SQLite: the program's output and status come back with its audit id, what it left running
dies with its zone, a timeout really ends it, stored code runs again by id, and the CLI
prints one JSON object."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from hvtsm.host import probe_host
from hvtsm.invoke import Invoker, InvokeRequest
from hvtsm.lifecycle import Manager
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.zones.base import Backend
from hvtsm.zones.cgroup.driver import CgroupDriver
from tests.integration.cli_helpers import hvtsm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def invoker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Invoker]:
    if os.geteuid() != 0:
        pytest.skip("cgroup zones need root")
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('invoke') / 'hvtsm.db'}")
    manager = Manager(store, partial(CgroupDriver, caps=probe_host()), actor="test")
    manager.start()
    yield Invoker(manager)
    manager.shutdown()
    store.dispose()


def alive_with(marker: str) -> list[int]:
    """Host processes whose command line holds `marker`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(entry.name))
            except OSError:
                continue
    return [p for p in out if p != os.getpid()]


def test_cold_cgroup_invoke(invoker: Invoker) -> None:
    marker = "hvtsm-left-" + secrets.token_hex(4)
    code = (f"import os, subprocess, sys\n"
            f"open('made-here', 'w').write('x')\n"
            f"subprocess.Popen(['sleep', '300', '{marker}'], stdout=subprocess.DEVNULL,"
            f" stderr=subprocess.DEVNULL, start_new_session=True)\n"
            f"print('args', sys.argv[1:], os.listdir('.'))\n"
            f"print('to stderr', file=sys.stderr)\n"
            f"sys.exit(3)\n").encode()
    result = invoker.invoke(InvokeRequest(code=code, name="left.py", args=("x", "y z"),
                                          backend=Backend.CGROUP))
    assert result.stdout == b"args ['x', 'y z'] ['made-here']\n"
    assert result.stderr == b"to stderr\n"
    assert result.exit_status == 3 and result.state == "exited" and not result.warm
    assert result.runtime == "python3" and result.anomalies == []
    with invoker.store.session() as session:
        kinds = [e.kind for e in zone_trail(session, zone_id=result.zone_id)]
    assert kinds[0] == "created" and "exited" in kinds
    # the zone's children die with it; its scratch directory is gone with the request
    deadline = time.monotonic() + 5
    while alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive_with(marker) == []
    again = invoker.invoke(InvokeRequest(code_id=result.code_id[:16], backend=Backend.CGROUP))
    assert again.code_id == result.code_id and again.zone_id != result.zone_id
    assert again.stdout == b"args [] ['made-here']\n"


def test_timeout_ends_the_zone(invoker: Invoker) -> None:
    marker = "hvtsm-slow-" + secrets.token_hex(4)
    code = (f"#!/bin/sh\necho started\n"
            f"exec python3 -c 'import time; time.sleep(60)' {marker}\n").encode()
    t0 = time.monotonic()
    result = invoker.invoke(InvokeRequest(code=code, name="slow.sh", timeout=1.0,
                                          backend=Backend.CGROUP))
    assert time.monotonic() - t0 < 20
    assert result.timed_out and result.state == "terminated" and result.runtime == "sh"
    assert result.stdout == b"started\n" and "timeout" in (result.end_reason or "")
    assert result.exec_targets == ("python3",)
    assert alive_with(marker) == []
    with invoker.store.session() as session:
        trail = zone_trail(session, zone_id=result.zone_id)
    assert any(e.kind == "operator" and "timeout" in e.summary for e in trail)


def test_cli_invoke_json(invoker: Invoker, tmp_path: Path) -> None:
    program = tmp_path / "hello.py"
    program.write_text("import sys\nprint('hello', *sys.argv[1:])\n")
    db = invoker.store.url
    out = hvtsm(db, "invoke", str(program), "--arg", "there", "--backend", "cgroup", "--json",
                timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["stdout"] == "hello there\n" and result["exit_status"] == 0
    assert result["audit_id"] == result["zone"] and result["warm"] is False
    stored = hvtsm(db, "invoke", str(program), "--store-only", timeout=30)
    assert stored.stdout.strip() == result["code_id"]
    plain = hvtsm(db, "invoke", "--code-id", result["code_id"][:12], "--backend", "cgroup",
                  "--arg", "again", timeout=60)
    assert plain.returncode == 0 and plain.stdout == "hello again\n"
    assert f"code {result['code_id'][:12]}" in plain.stderr and "(audit id)" in plain.stderr
    failed = hvtsm(db, "invoke", "--code-id", "0" * 16, "--backend", "cgroup", timeout=30)
    assert failed.returncode == 125 and "no stored code" in failed.stderr
