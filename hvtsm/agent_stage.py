"""The agent package and a Python to run it, where any zone can read them.

Guests see the host's root over 9p as QEMU's user, and cgroup zones run their workloads as
an unprivileged user: neither can enter an installation under a home directory, so the
agent's files are copied once per version to /var/lib/hvtsm/agent/<digest>.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import guest_agent
from hvtsm.errors import ZoneError

STAGE_ROOT = Path("/var/lib/hvtsm/agent")
_STAGING = threading.Lock()


def stage_agent() -> Path:
    """The staged copy's directory (the one to put on PYTHONPATH). Zones created at once
    stage once: they must not copy into one directory together."""
    with _STAGING:
        return _stage()


def _stage() -> Path:
    source = Path(guest_agent.__file__).parent
    files = sorted(p for p in source.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
    target = STAGE_ROOT / digest
    if not (target / "guest_agent" / "__init__.py").exists():
        tmp = target.with_name(f".{digest}.{os.getpid()}")
        (tmp / "guest_agent").mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copy2(p, tmp / "guest_agent" / p.name)
        for d in (tmp, tmp / "guest_agent"):
            d.chmod(0o755)
        # compiled once here, or every guest compiles it again at boot (about 1 s of TCG)
        subprocess.run([zone_python(), "-m", "compileall", "-q", str(tmp / "guest_agent")],
                       check=False, capture_output=True)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        with contextlib.suppress(OSError):
            tmp.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
    for d in (STAGE_ROOT.parent, STAGE_ROOT, target):
        d.chmod(0o755)
    return target


def zone_python() -> str:
    """A python3 every zone can run from the host's root (QEMU's user, the zone's user)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and os.stat(candidate).st_mode & 0o005:
            return candidate
    raise ZoneError("no world-readable python3 on this host for zones to run",
                    hint="apt-get install python3")


PROGRAM_ROOT = Path("/var/lib/hvtsm/programs")


def stage_program(path: str | os.PathLike[str], *, expect: str | None = None) -> Path:
    """A read-only snapshot of one program file, named by its digest: the zone runs exactly
    the bytes that were analyzed (`expect`: their sha256), and a zone user can read it
    wherever the original lives."""
    data = Path(path).read_bytes()
    full = hashlib.sha256(data).hexdigest()
    if expect is not None and full != expect:
        raise ZoneError(f"{path} changed after it was analyzed; nothing was run",
                        hint="run the command again to analyze the new version")
    digest = full[:16]
    target = PROGRAM_ROOT / digest / Path(path).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.chmod(0o444)
        tmp.rename(target)
    for d in (PROGRAM_ROOT.parent, PROGRAM_ROOT, target.parent):
        d.chmod(0o755)
    return target
