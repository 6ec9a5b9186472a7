"""Running the real `hvtsm` CLI as a subprocess in integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def hvtsm_argv(db: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "hvtsm.cli.main", "--db", db, *args]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def hvtsm(db: str, *args: str, timeout: float = 60, check: bool = False,
          user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = hvtsm_argv(db, *args)
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env(),
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"hvtsm {args} exited {result.returncode}: {result.stderr}")
    return result


def spawn(db: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(hvtsm_argv(db, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(),
                            stdin=subprocess.DEVNULL)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def zones(db: str, *, all_: bool = True) -> list[dict[str, Any]]:
    args = ["zones", "--json"] + (["--all"] if all_ else [])
    return json_lines(hvtsm(db, *args, check=True).stdout)


def audit(db: str, zone: str) -> list[dict[str, Any]]:
    return json_lines(hvtsm(db, "audit", zone, "--json", check=True).stdout)


def wait_for(predicate: Any, timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running(pid: int) -> bool:
    """Alive and not a zombie (whoever inherits an orphan may be slow to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_policy(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


#: the start of a probe workload: `gateway()`, the host end of the zone's NIC (None without
#: a default route)
GATEWAY = r"""
import os, socket, struct, sys, time
def gateway():
    for line in open('/proc/net/route').read().splitlines()[1:]:
        f = line.split()
        if f[1] == '00000000':
            return socket.inet_ntoa(struct.pack('<L', int(f[2], 16)))
    return None
"""

#: a workload that tries to reach the host side of its NIC every 100 ms and says how it went
CONNECT_PROBE = GATEWAY + r"""
port = int(sys.argv[1])
gw = gateway()
for _ in range(int(sys.argv[2])):
    target = gw or '10.213.0.1'
    try:
        s = socket.create_connection((target, port), timeout=0.3)
        s.close()
        print('connect ok', time.time(), flush=True)
    except OSError as e:
        print('connect failed', time.time(), e.__class__.__name__, flush=True)
    gw = gw or gateway()
    time.sleep(0.1)
"""
