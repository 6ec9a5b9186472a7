"""Choosing the accelerator: KVM when it really runs guest code here, else TCG.

`/dev/kvm` existing proves nothing (on some hosts a KVM guest hangs or crawls), so the
probe boots a 512-byte guest that writes to QEMU's isa-debug-exit port: QEMU exits with a
known status only if guest code actually ran. KVM must also do it fast: on this project's
machines (nested under Firecracker) the probe needs about 5 s under KVM, against 0.15 s
under TCG, and a real guest then hangs; a working KVM host runs it in well under a second.
The answer is cached per boot, since a slow probe costs seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from hvtsm.errors import HostError

#: KVM slower than this on the probe guest is treated as not working
KVM_PROBE_BUDGET_S = 1.5
#: `mov al, 0x31; out 0xf4, al; hlt; jmp $-1`: QEMU then exits with (0x31 << 1) | 1
_BOOT_CODE = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_EXPECTED_STATUS = (0x31 << 1) | 1
CACHE_FILE = Path("/run/hvtsm/accel.json")


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        """libvirt's <domain type=...>: TCG domains are type 'qemu'."""
        return "kvm" if self is Accel.KVM else "qemu"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str


def boot_sector() -> bytes:
    return _BOOT_CODE + bytes(510 - len(_BOOT_CODE)) + b"\x55\xaa"


def guest_code_runs(accel: Accel, *, qemu: str | None = None, timeout: float = 8.0) -> bool:
    """Boot the probe guest with `accel`; True when it reached its exit port in time."""
    binary = qemu or shutil.which("qemu-system-x86_64")
    if binary is None:
        raise HostError("qemu-system-x86_64 is not installed",
                        hint="apt-get install qemu-system-x86 (scripts/install-host.sh does)")
    with tempfile.TemporaryDirectory(prefix="hvtsm-accel-") as tmp:
        image = Path(tmp) / "boot.img"
        image.write_bytes(boot_sector())
        argv = [binary, "-accel", accel.value, "-display", "none", "-nodefaults",
                "-no-user-config", "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-drive", f"file={image},format=raw,if=ide"]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == _EXPECTED_STATUS


def choose_accel(requested: str = "auto", *, qemu: str | None = None,
                 cache: Path | None = CACHE_FILE) -> AccelChoice:
    """An explicit 'kvm' or 'tcg' wins; 'auto' uses KVM only when the probe guest ran."""
    if requested in (Accel.KVM, Accel.TCG):
        return AccelChoice(Accel(requested), "chosen explicitly")
    if requested != "auto":
        raise HostError(f"unknown accelerator {requested!r}; use auto, kvm or tcg")
    boot_id = _boot_id()
    if cache is not None:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("boot_id") == boot_id:
                return AccelChoice(Accel(cached["accel"]), cached["reason"] + " (cached)")
        except (OSError, ValueError, KeyError):
            pass
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        choice = AccelChoice(Accel.TCG, "/dev/kvm is missing or not usable")
    else:
        started = time.monotonic()
        ran = guest_code_runs(Accel.KVM, qemu=qemu, timeout=KVM_PROBE_BUDGET_S * 4)
        took = time.monotonic() - started
        if ran and took <= KVM_PROBE_BUDGET_S:
            choice = AccelChoice(Accel.KVM, f"a KVM probe guest ran in {took:.2f} s")
        elif ran:
            choice = AccelChoice(Accel.TCG, f"a KVM probe guest needed {took:.1f} s (budget "
                                            f"{KVM_PROBE_BUDGET_S} s): KVM is not usable here")
        else:
            choice = AccelChoice(Accel.TCG, "/dev/kvm exists but a KVM probe guest did not "
                                            "run (hung or failed)")
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"boot_id": boot_id, "accel": choice.accel.value,
                                         "reason": choice.reason}))
        except OSError:
            pass
    return choice


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
