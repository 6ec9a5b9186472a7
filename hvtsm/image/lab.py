"""The lab guest image: the host's Debian kernel plus a small busybox initramfs.

The lab guest needs no disk image: its initramfs loads the virtio, 9p and overlay modules,
mounts the host's own root read-only over 9p under a tmpfs overlay and starts the guest
agent with the host's Python (see `init.sh`). This module builds that initramfs from
what the host has installed (a `linux-image-*` kernel with its modules, `busybox-static`)
and caches it under a content address: the digest covers every input (builder version,
kernel version and file, the module files, busybox, init.sh), so a second call finds the
image and returns at once; a zone never waits for a rebuild.

The kernel is booted as an uncompressed ELF through its PVH entry point when it has one
(Debian's has, CONFIG_PVH=y): under TCG the guest needs about 5 s to decompress its own
xz-compressed bzImage, while QEMU loads the ELF at once. The builder extracts it once per
kernel into the cache (`vmlinux-<version>-<id>`, ~65 MB) and falls back to the packaged
bzImage when the kernel has no PVH note or an unknown compression.

`kernel_cmdline` makes the command line `init.sh` reads (`hvtsm.*` parameters).
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import hashlib
import importlib.util
import io
import ipaddress
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hvtsm.errors import HostError
from hvtsm.image.initramfs import CpioWriter, gzip_bytes

#: bump when the image layout changes in a way the other inputs do not show
BUILDER_VERSION = "1"

#: modules the lab guest needs, in load order (their dependencies are added before them)
LAB_MODULES: tuple[str, ...] = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_console", "failover", "net_failover", "virtio_net", "virtio_balloon",
    "virtio_rng",  # seeds the guest's crng at once: a cold Python start waits ~1.5 s without
    "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay",
)
#: without these (as a module or built in) the guest cannot reach its root or its agent
ESSENTIAL_MODULES = frozenset({"virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay"})

BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/lib/modules")
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
SYSTEM_CACHE_DIR = Path("/var/cache/hvtsm/images")
MODULE_DIR_IN_IMAGE = "lib/hvtsm/modules"

KERNEL_HINT = "apt-get install linux-image-amd64"
BUSYBOX_HINT = "apt-get install busybox-static"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LabImage:
    """A built (or planned) lab image: what a domain's <os> needs."""

    #: the kernel to boot: the cached PVH vmlinux, else the packaged /boot/vmlinuz-<version>
    kernel: Path
    initrd: Path
    kernel_version: str
    digest: str
    #: size of the initrd in bytes (0 while only planned)
    size: int = field(default=0, compare=False)
    #: True when the initrd was already in the cache
    cached: bool = field(default=False, compare=False)
    #: the modules in the image, in load order
    modules: tuple[str, ...] = field(default=(), compare=False)
    #: the packaged kernel (/boot/vmlinuz-<version>) `kernel` comes from
    packaged_kernel: Path | None = field(default=None, compare=False)
    #: "pvh" (uncompressed ELF, PVH entry) or "bzimage" (the packaged kernel as it is)
    boot: str = field(default="bzimage", compare=False)


@dataclass(frozen=True)
class _Module:
    name: str
    path: Path


@dataclass(frozen=True)
class _Inputs:
    kernel: Path
    kernel_version: str
    modules: tuple[_Module, ...]
    builtin: tuple[str, ...]
    absent: tuple[str, ...]
    busybox: Path
    busybox_bytes: bytes
    init_text: bytes
    digest: str


# -- public API -------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """/var/cache/hvtsm/images as root, else $XDG_CACHE_HOME/hvtsm/images (~/.cache)."""
    if os.geteuid() == 0:
        return SYSTEM_CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hvtsm" / "images"


def build_lab_image(*, cache_dir: Path | None = None, kernel_version: str | None = None,
                    force: bool = False, progress: Progress | None = None) -> LabImage:
    """Return the cached lab image for the newest (or the given) kernel, building it if needed.

    The cache lookup hashes the inputs (a few MB) and returns without writing anything when
    the image exists. A build writes a temporary file and renames it into place, under a lock
    so concurrent callers build once.
    """
    say = progress or (lambda _msg: None)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    inputs = _collect_inputs(kernel_version)
    target = _initrd_path(cache, inputs)
    if not force and target.is_file() and _kernel_ready(cache, inputs):
        return _image(inputs, target, cache, cached=True)
    _make_dir(cache)
    with _locked(cache / ".lock"):
        _prepare_kernel(cache, inputs, say, force=force)
        if not force and target.is_file():  # another process built it meanwhile
            return _image(inputs, target, cache, cached=True)
        say(f"building lab image for kernel {inputs.kernel_version} (digest {inputs.digest[:12]})")
        for name in inputs.builtin:
            say(f"module {name}: built into the kernel")
        for name in inputs.absent:
            say(f"module {name}: not in this kernel, skipped")
        data = _build_initramfs(inputs, say)
        say(f"writing {target} ({len(data) / 1e6:.1f} MB)")
        _atomic_write(target, data)
    return _image(inputs, target, cache, cached=False)


def plan_lab_image(*, cache_dir: Path | None = None,
                   kernel_version: str | None = None) -> LabImage:
    """The image `build_lab_image` would return, without building it (initrd may not exist)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    inputs = _collect_inputs(kernel_version)
    target = _initrd_path(cache, inputs)
    if target.is_file() and _kernel_ready(cache, inputs):
        return _image(inputs, target, cache, cached=True)
    kernel, boot = _boot_kernel(cache, inputs)
    return LabImage(kernel=kernel, initrd=target, kernel_version=inputs.kernel_version,
                    digest=inputs.digest, modules=tuple(m.name for m in inputs.modules),
                    packaged_kernel=inputs.kernel, boot=boot)


def kernel_cmdline(*, python: str, agent_path: str, ip: str | None, gateway: str | None,
                   extra: Sequence[str] = ()) -> str:
    """The kernel command line for a lab guest (read by init.sh).

    `ip` is `ADDR/PREFIXLEN` for eth0, `gateway` its default route; `extra` are more words
    (for instance `hvtsm.dns=ADDR`, `hvtsm.hostname=NAME` or `hvtsm.shell=1`).
    Values cannot hold blanks or quotes: init.sh splits the command line on blanks.
    """
    for what, value in (("python", python), ("agent_path", agent_path)):
        _check_word(what, value)
        if not value.startswith("/"):
            raise HostError(f"kernel command line: {what} must be an absolute path, "
                            f"not {value!r}")
    words = [
        "console=ttyS0",   # the serial console the domain logs to a file
        "quiet",           # kernel messages only from warnings up; init marks still print
        "panic=-1",        # a panic (or a dying PID 1) reboots at once; on_reboot=destroy
        "8250.nr_uarts=1",  # probe one UART, not four
        "i8042.noaux",     # no PS/2 mouse probe (slow under TCG)
        "acpi=noirq",      # PCI IRQ routing from the BIOS table: ACPI's costs ~0.25 s a device
        f"hvtsm.python={python}",
        f"hvtsm.agent={agent_path}",
    ]
    if ip is not None:
        try:
            iface = ipaddress.ip_interface(ip)
        except ValueError as exc:
            raise HostError(f"kernel command line: bad ip {ip!r}: {exc}") from None
        if "/" not in ip:
            raise HostError(f"kernel command line: ip {ip!r} needs a prefix length "
                            "(ADDR/LEN)")
        words.append(f"hvtsm.ip={iface.with_prefixlen}")
    if gateway is not None:
        if ip is None:
            raise HostError("kernel command line: a gateway needs an ip")
        try:
            words.append(f"hvtsm.gw={ipaddress.ip_address(gateway)}")
        except ValueError as exc:
            raise HostError(f"kernel command line: bad gateway {gateway!r}: {exc}") from None
    for word in extra:
        _check_word("extra", word)
        words.append(word)
    return " ".join(words)


def default_agent_path() -> str:
    """The directory to put on the guest's PYTHONPATH: the one holding `guest_agent`."""
    spec = importlib.util.find_spec("guest_agent")
    if spec is not None and spec.origin:
        return str(Path(spec.origin).resolve().parent.parent)
    return str(Path(__file__).resolve().parents[2])


def installed_kernels() -> list[str]:
    """Kernel versions with both /boot/vmlinuz-<ver> and /lib/modules/<ver>, newest first."""
    found = []
    for vmlinuz in BOOT_DIR.glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if vmlinuz.is_file() and (MODULES_DIR / version / "modules.dep").is_file():
            found.append(version)
    return sorted(found, key=_version_key, reverse=True)


# -- inputs and digest ------------------------------------------------------------------------
def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version))


def _check_word(what: str, value: str) -> None:
    if not value or re.search(r"[\s'\"]", value):
        raise HostError(f"kernel command line: {what} {value!r} is empty or holds blanks or "
                        "quotes, which the guest init cannot read")


def _pick_kernel(kernel_version: str | None) -> tuple[Path, str]:
    if kernel_version is not None:
        kernel = BOOT_DIR / f"vmlinuz-{kernel_version}"
        if not kernel.is_file():
            raise HostError(f"no kernel {kernel} for version {kernel_version}",
                            hint=f"installed: {', '.join(installed_kernels()) or 'none'}")
        if not (MODULES_DIR / kernel_version / "modules.dep").is_file():
            raise HostError(f"kernel {kernel_version} has no modules in "
                            f"{MODULES_DIR / kernel_version}", hint=KERNEL_HINT)
        return kernel, kernel_version
    versions = installed_kernels()
    if not versions:
        raise HostError(f"no Debian kernel installed: no {BOOT_DIR}/vmlinuz-<version> with "
                        f"{MODULES_DIR}/<version>/modules.dep (the lab guest boots the "
                        "host's packaged kernel)", hint=KERNEL_HINT)
    return BOOT_DIR / f"vmlinuz-{versions[0]}", versions[0]


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


def _resolve_modules(version: str) -> tuple[list[_Module], list[str], list[str]]:
    root = MODULES_DIR / version
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        name = _module_name(mod)
        paths[name] = mod.strip()
        deps[name] = [_module_name(d) for d in rest.split()]
    builtin_file = root / "modules.builtin"
    builtin = ({_module_name(x) for x in builtin_file.read_text().split()}
               if builtin_file.is_file() else set())
    order: list[_Module] = []
    seen: set[str] = set()
    built_in: list[str] = []
    absent: list[str] = []

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in paths:
            (built_in if name in builtin else absent).append(name)
            return
        for dep in reversed(deps[name]):  # modprobe loads the last listed dependency first
            add(dep)
        order.append(_Module(name, root / paths[name]))

    for name in LAB_MODULES:
        add(name)
    missing = sorted(ESSENTIAL_MODULES & set(absent))
    if missing:
        raise HostError(f"kernel {version} has neither a module nor built-in support for "
                        f"{', '.join(missing)}; the lab guest needs them for its 9p root and "
                        "its agent channel", hint=KERNEL_HINT)
    return order, built_in, absent


def _find_busybox() -> Path:
    for path in BUSYBOX_CANDIDATES:
        if path.is_file():
            return path
    raise HostError("busybox not found (the lab initramfs is built around it)",
                    hint=BUSYBOX_HINT)


def _is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP (dynamic loader) header."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def init_script() -> bytes:
    """The guest init (hvtsm/image/init.sh), shipped as package data."""
    return resources.files("hvtsm.image").joinpath("init.sh").read_bytes()


def _collect_inputs(kernel_version: str | None) -> _Inputs:
    kernel, version = _pick_kernel(kernel_version)
    modules, builtin, absent = _resolve_modules(version)
    busybox = _find_busybox()
    bb = busybox.read_bytes()
    if not _is_static_elf(bb):
        raise HostError(f"{busybox} is not a static x86-64 binary; the initramfs has no "
                        "shared libraries", hint=BUSYBOX_HINT)
    init_text = init_script()
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)

    kst = kernel.stat()
    part("builder", BUILDER_VERSION.encode())
    part("kernel", f"{version}:{kst.st_size}:{kst.st_mtime_ns}".encode())
    for mod in modules:
        part(f"module:{mod.name}:{mod.path.name}", mod.path.read_bytes())
    part("builtin", ",".join(builtin).encode())
    part("busybox", bb)
    part("init", init_text)
    return _Inputs(kernel=kernel, kernel_version=version, modules=tuple(modules),
                   builtin=tuple(builtin), absent=tuple(absent), busybox=busybox,
                   busybox_bytes=bb, init_text=init_text, digest=h.hexdigest())


def _initrd_path(cache: Path, inputs: _Inputs) -> Path:
    return cache / f"lab-{inputs.kernel_version}-{inputs.digest[:16]}.cpio.gz"


def _image(inputs: _Inputs, target: Path, cache: Path, *, cached: bool) -> LabImage:
    kernel, boot = _boot_kernel(cache, inputs)
    return LabImage(kernel=kernel, initrd=target, kernel_version=inputs.kernel_version,
                    digest=inputs.digest, size=target.stat().st_size, cached=cached,
                    modules=tuple(m.name for m in inputs.modules),
                    packaged_kernel=inputs.kernel, boot=boot)


# -- the PVH kernel ---------------------------------------------------------------------------
def _vmlinux_path(cache: Path, inputs: _Inputs) -> Path:
    st = inputs.kernel.stat()
    ident = hashlib.sha256(f"{BUILDER_VERSION}:{inputs.kernel}:{st.st_size}:"
                           f"{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache / f"vmlinux-{inputs.kernel_version}-{ident}"


def _kernel_ready(cache: Path, inputs: _Inputs) -> bool:
    vmlinux = _vmlinux_path(cache, inputs)
    return vmlinux.is_file() or vmlinux.with_suffix(".nopvh").is_file()


def _boot_kernel(cache: Path, inputs: _Inputs) -> tuple[Path, str]:
    vmlinux = _vmlinux_path(cache, inputs)
    if vmlinux.is_file():
        return vmlinux, "pvh"
    return inputs.kernel, "bzimage"


def _prepare_kernel(cache: Path, inputs: _Inputs, say: Progress, *, force: bool) -> None:
    """Extract the PVH vmlinux into the cache once (or note why it cannot be used)."""
    vmlinux = _vmlinux_path(cache, inputs)
    marker = vmlinux.with_suffix(".nopvh")
    if not force and (vmlinux.is_file() or marker.is_file()):
        return
    say(f"extracting the uncompressed kernel from {inputs.kernel} for PVH boot")
    try:
        elf = extract_vmlinux(inputs.kernel.read_bytes())
    except ValueError as exc:
        say(f"kernel {inputs.kernel_version}: no PVH boot ({exc}); booting the bzImage")
        _atomic_write(marker, f"{exc}\n".encode())
        return
    say(f"writing {vmlinux} ({len(elf) / 1e6:.0f} MB)")
    _atomic_write(vmlinux, elf)
    with contextlib.suppress(OSError):
        marker.unlink()


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage, if it has a PVH entry point; ValueError otherwise."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage")
    version, = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise ValueError(f"boot protocol {version:#x} has no payload fields")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    elf = _decompress_payload(payload)
    if elf[:4] != b"\x7fELF":
        raise ValueError("the payload is not an ELF image")
    if not _has_pvh_note(elf):
        raise ValueError("no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); CONFIG_PVH is off")
    return elf


def _decompress_payload(payload: bytes) -> bytes:
    if payload[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload[:2] == b"\x1f\x8b":
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload[:3] == b"BZh":
        return bz2.BZ2Decompressor().decompress(payload)
    if payload[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if payload[:4] == b"\x28\xb5\x2f\xfd":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ValueError("zstd-compressed kernel and no zstd tool")
        # the kernel build appends the 4-byte uncompressed size after the frame
        return subprocess.run([zstd, "-dc"], input=payload[:-4], check=True,
                              capture_output=True).stdout
    raise ValueError(f"unknown kernel compression (magic {payload[:4].hex()})")


def _has_pvh_note(elf: bytes) -> bool:
    """True when an ELF64 note `Xen` of type 18 (XEN_ELFNOTE_PHYS32_ENTRY) is present."""
    if elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        off, = struct.unpack_from("<Q", elf, base + 0x08)
        size, = struct.unpack_from("<Q", elf, base + 0x20)
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


# -- building ---------------------------------------------------------------------------------
def _module_bytes(path: Path) -> bytes:
    """The module as busybox insmod can load it: decompressed."""
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise HostError(f"{path} is zstd-compressed and no zstd tool is installed",
                            hint="apt-get install zstd")
        return subprocess.run([zstd, "-dc", str(path)], check=True,
                              capture_output=True).stdout
    return raw


def _busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True,
                         text=True).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def _build_initramfs(inputs: _Inputs, say: Progress) -> bytes:
    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    for d in ("dev", "proc", "sys", "run", "tmp", "lower", "rw", "newroot", "root",
              "bin", "sbin", "usr/bin", "usr/sbin", "etc", MODULE_DIR_IN_IMAGE):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1, 0o600)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", inputs.init_text, 0o755)
    cpio.file("bin/busybox", inputs.busybox_bytes, 0o755)
    for applet in _busybox_applets(inputs.busybox):
        if applet != "bin/busybox" and applet not in cpio:
            cpio.symlink(applet, "/bin/busybox")
    for i, mod in enumerate(inputs.modules, start=1):
        data = _module_bytes(mod.path)
        cpio.file(f"{MODULE_DIR_IN_IMAGE}/{i:02d}-{mod.name}.ko", data, 0o644)
        say(f"module {mod.name}: {mod.path} ({len(data) // 1024} KiB)")
    cpio.file("etc/hvtsm-image",
              f"kernel={inputs.kernel_version}\ndigest={inputs.digest[:12]}\n".encode())
    cpio.close()
    return gzip_bytes(raw.getvalue())


def _make_dir(path: Path) -> None:
    """Make the cache directory; QEMU (often the libvirt-qemu user) reads the files in it,
    so the directories made here are 0755 whatever the umask."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for made in {*missing, path}:
        with contextlib.suppress(OSError):
            if made.stat().st_uid == os.geteuid():
                made.chmod(0o755)


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_write(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
