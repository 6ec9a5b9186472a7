"""The agent package and a Python to run it, where any zone can read them.

Guests see the host's root over 9p as QEMU's user, and cgroup zones run their workloads as
an unprivileged user: neither can enter an installation under a home directory, so the
agent's files are copied once per version to /var/lib/hvtsm/agent/<digest>.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import guest_agent
from hvtsm.analysis.local_modules import digest_files, read_program
from hvtsm.errors import ZoneError

STAGE_ROOT = Path("/var/lib/hvtsm/agent")
#: the user libvirt runs QEMU as (qemu.conf's default on Debian)
QEMU_USER = "libvirt-qemu"
#: hvtsm's state directory: enterable by anyone (a guest's workload reaches its snapshot
#: through it), listable by root and QEMU's group alone (QEMU's 9p server opens each
#: directory on the way to read it: see `guarded`)
STATE_ROOT = STAGE_ROOT.parent
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
    guarded(STATE_ROOT)
    for d in (STAGE_ROOT, target):
        d.chmod(0o755)
    return target


def _qemu_gid() -> int | None:
    try:
        return pwd.getpwnam(QEMU_USER).pw_gid
    except KeyError:
        return None  # no libvirt here, or QEMU runs as root


def guarded(directory: Path) -> None:
    """`directory` enterable by anyone, its list readable by root and QEMU's group: a
    guest's 9p server (QEMU, as its own user) must open the directories on the way to what
    a guest reads, while no zone may learn the names in it (another zone's snapshot or
    request). A guest's workload is not in that group inside its guest."""
    gid = _qemu_gid()
    if gid is not None:
        os.chown(directory, 0, gid)
        directory.chmod(0o751)
    else:
        directory.chmod(0o711)


def zone_python() -> str:
    """A python3 every zone can run from the host's root (QEMU's user, the zone's user)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and os.stat(candidate).st_mode & 0o005:
            return candidate
    raise ZoneError("no world-readable python3 on this host for zones to run",
                    hint="apt-get install python3")


PROGRAM_ROOT = Path("/var/lib/hvtsm/programs")
#: where each invoke request's code is written: a guest sees the host root read-only at the
#: same path (not under /var/lib/hvtsm, which the default policy holds sensitive, nor /run,
#: which is the guest's own tmpfs); like PROGRAM_ROOT, enterable and not listable
INVOKE_SPOOL = Path("/var/spool/hvtsm/invoke")
#: the directories whose entries are units a zone is given whole (a snapshot and the
#: modules beside its program, an invoke request's directory), never another zone's
ZONE_UNITS = (STAGE_ROOT, PROGRAM_ROOT, INVOKE_SPOOL)


def stage_program(path: str | os.PathLike[str], *, expect: str | None = None,
                  local_files: Sequence[str] = ()) -> Path:
    """A read-only snapshot of a program file and the local modules it imports (at their
    places beside it), named by their digest: the zone runs exactly the bytes that were
    analyzed (`expect`: `program_digest`), and a zone user can read it wherever the
    original lives. The snapshot root is not listable: a cgroup zone sees its own snapshot
    alone (hvtsm/zones/cgroup/view.py), a guest reaches one only by its digest. Returns the
    program's path in the snapshot."""
    source = Path(path)
    files = read_program(source, local_files)
    full = digest_files(files)
    if expect is not None and full != expect:
        raise ZoneError(f"{path} (or a module it imports) changed after it was analyzed; "
                        "nothing was run",
                        hint="run the command again to analyze the new version")
    root = PROGRAM_ROOT / full[:16]
    target = root / source.name
    if not target.exists():
        # built aside and renamed into place whole: a concurrent stage sees all or nothing
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.with_name(f".{root.name}.{os.getpid()}.{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, data in files:
            copy = tmp / rel
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(data)
            copy.chmod(0o444)
        for d in (tmp, *(p for p in tmp.rglob("*") if p.is_dir())):
            d.chmod(0o755)
        try:
            tmp.rename(root)
        except OSError:
            # another process staged the same digest first (the same bytes)
            shutil.rmtree(tmp, ignore_errors=True)
    guarded(STATE_ROOT)
    guarded(PROGRAM_ROOT)
    root.chmod(0o755)
    return target
