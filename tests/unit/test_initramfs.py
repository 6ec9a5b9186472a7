"""The newc cpio writer and the lab image builder (on a fake kernel/modules/busybox layout)."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hvtsm.cli.main import main
from hvtsm.errors import HostError
from hvtsm.image import lab
from hvtsm.image.initramfs import CpioWriter, gzip_bytes, read_newc

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
needs_busybox = pytest.mark.skipif(not Path(BUSYBOX).is_file(), reason="busybox not installed")


def _archive() -> bytes:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    cpio.directory("dev")
    cpio.char_device("dev/console", 5, 1)
    cpio.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    cpio.file("lib/deep/dir/file.bin", bytes(range(256)) * 3)
    cpio.symlink("bin/sh", "/bin/busybox")
    cpio.file("odd", b"x")  # 1 byte: data padding
    cpio.close()
    return out.getvalue()


# -- cpio --------------------------------------------------------------------------------------
def test_roundtrip_and_parents():
    entries = {e.name: e for e in read_newc(_archive())}
    assert list(entries) == ["dev", "dev/console", "init", "lib", "lib/deep", "lib/deep/dir",
                             "lib/deep/dir/file.bin", "bin", "bin/sh", "odd"]
    assert entries["dev"].is_dir and entries["lib/deep"].is_dir
    assert entries["dev/console"].is_char_device and entries["dev/console"].rdev == (5, 1)
    assert entries["init"].is_file and entries["init"].mode & 0o777 == 0o755
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    assert entries["lib/deep/dir/file.bin"].data == bytes(range(256)) * 3
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"/bin/busybox"
    assert entries["odd"].data == b"x"
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())


def test_alignment_and_trailer():
    data = _archive()
    assert len(data) % 4 == 0
    assert data.index(b"TRAILER!!!") > 0
    pos = 0
    for _ in range(3):  # every header starts on a 4-byte boundary with the magic
        assert data[pos:pos + 6] == b"070701"
        namesize = int(data[pos + 94:pos + 102], 16)
        filesize = int(data[pos + 54:pos + 62], 16)
        pos += 110 + namesize
        pos += (4 - pos % 4) % 4
        pos += filesize + (4 - filesize % 4) % 4


def test_deterministic_bytes_and_gzip():
    assert _archive() == _archive()
    assert gzip_bytes(_archive()) == gzip_bytes(_archive())
    assert gzip.decompress(gzip_bytes(_archive())) == _archive()
    assert read_newc(gzip_bytes(_archive()))[0].name == "dev"


def test_rejects_duplicates_and_bad_paths():
    cpio = CpioWriter(io.BytesIO())
    cpio.file("a", b"")
    with pytest.raises(ValueError, match="duplicate"):
        cpio.file("/a", b"")
    for bad in ("", "/", "../etc", "a/../../b"):
        with pytest.raises(ValueError, match="bad member path"):
            cpio.file(bad, b"")
    cpio.close()
    with pytest.raises(ValueError, match="closed"):
        cpio.file("b", b"")


@needs_busybox
def test_busybox_cpio_reads_it(tmp_path):
    """An independent reader (busybox cpio) lists and extracts the archive."""
    listing = subprocess.run([BUSYBOX, "cpio", "-t"], input=_archive(), capture_output=True,
                             check=True).stdout.decode().split()
    assert {"init", "lib/deep/dir/file.bin", "bin/sh", "dev/console"} <= set(listing)
    out = io.BytesIO()
    cpio = CpioWriter(out)
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    cpio.file("lib/x/y", b"payload")
    cpio.symlink("bin/sh", "/bin/busybox")
    cpio.close()
    subprocess.run([BUSYBOX, "cpio", "-i", "-d"], input=out.getvalue(), cwd=tmp_path,
                   check=True, capture_output=True)
    assert (tmp_path / "lib/x/y").read_bytes() == b"payload"
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/sh").readlink() == Path("/bin/busybox")


@needs_busybox
def test_init_script_is_valid_shell():
    script = lab.init_script()
    assert script.startswith(b"#!/bin/sh\n")
    subprocess.run([BUSYBOX, "sh", "-n", "-c", script.decode()], check=True)
    for mark in (b"stage-2 started", b"switch_root", b"hostroot", b"-m guest_agent",
                 b"poweroff -f"):
        assert mark in script


# -- the builder on a fake host -------------------------------------------------------------
VERSION = "6.1.0-99-amd64"
DEPS = {
    "kernel/drivers/virtio/virtio_ring.ko.xz": [],
    "kernel/drivers/virtio/virtio.ko": ["kernel/drivers/virtio/virtio_ring.ko.xz"],
    "kernel/drivers/virtio/virtio_pci.ko": ["kernel/drivers/virtio/virtio.ko",
                                            "kernel/drivers/virtio/virtio_ring.ko.xz"],
    "kernel/drivers/char/virtio_console.ko": ["kernel/drivers/virtio/virtio.ko",
                                              "kernel/drivers/virtio/virtio_ring.ko.xz"],
    "kernel/lib/extra-dep.ko": [],
    "kernel/drivers/net/virtio_net.ko": ["kernel/lib/extra-dep.ko",
                                         "kernel/drivers/virtio/virtio.ko",
                                         "kernel/drivers/virtio/virtio_ring.ko.xz"],
    "kernel/fs/netfs/netfs.ko": [],
    "kernel/fs/fscache/fscache.ko": ["kernel/fs/netfs/netfs.ko"],
    "kernel/net/9p/9pnet.ko": [],
    "kernel/net/9p/9pnet_virtio.ko": ["kernel/net/9p/9pnet.ko",
                                      "kernel/drivers/virtio/virtio.ko"],
    "kernel/fs/9p/9p.ko": ["kernel/net/9p/9pnet.ko", "kernel/fs/fscache/fscache.ko",
                           "kernel/fs/netfs/netfs.ko"],
    "kernel/unrelated/foo.ko": [],
}
EXPECTED_ORDER = ["virtio_ring", "virtio", "virtio_pci", "virtio_console", "extra_dep",
                  "virtio_net", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p"]


def _module_bytes(rel: str) -> bytes:
    return b"\x7fELF fake module " + rel.encode()


@pytest.fixture
def fake_host(tmp_path, monkeypatch):
    if not Path(BUSYBOX).is_file():
        pytest.skip("busybox not installed (the builder runs it to list its applets)")
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / f"vmlinuz-{VERSION}").write_bytes(b"not a bzImage" * 100)
    (boot / "vmlinuz-5.10.0-1-amd64").write_bytes(b"old kernel without modules")
    mods = tmp_path / "modules" / VERSION
    for rel in DEPS:
        path = mods / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = _module_bytes(rel)
        path.write_bytes(lzma.compress(raw) if rel.endswith(".xz") else raw)
    (mods / "modules.dep").write_text(
        "".join(f"{rel}: {' '.join(deps)}\n".replace(" \n", "\n") for rel, deps in DEPS.items()))
    (mods / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    busybox = tmp_path / "busybox"
    shutil.copy(BUSYBOX, busybox)
    monkeypatch.setattr(lab, "BOOT_DIR", boot)
    monkeypatch.setattr(lab, "MODULES_DIR", tmp_path / "modules")
    monkeypatch.setattr(lab, "BUSYBOX_CANDIDATES", (busybox,))
    return tmp_path


def test_build_resolves_modules_and_lays_out_the_image(fake_host):
    messages: list[str] = []
    image = lab.build_lab_image(cache_dir=fake_host / "cache", progress=messages.append)
    assert image.kernel_version == VERSION
    assert image.modules == tuple(EXPECTED_ORDER)
    assert not image.cached and image.initrd.is_file() and image.size == image.initrd.stat().st_size
    assert image.initrd.stat().st_mode & 0o777 == 0o644
    # a fake kernel cannot be booted through PVH: the packaged one is used, and remembered
    assert image.boot == "bzimage" and image.kernel == fake_host / "boot" / f"vmlinuz-{VERSION}"
    assert any("no PVH boot" in m for m in messages)
    assert any("overlay: built into the kernel" in m for m in messages)
    assert any("virtio_balloon: not in this kernel" in m for m in messages)

    entries = {e.name: e for e in read_newc(image.initrd.read_bytes())}
    assert entries["init"].data == lab.init_script() and entries["init"].mode & 0o111
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["bin/busybox"].data == Path(BUSYBOX).read_bytes()
    assert entries["bin/sh"].is_symlink
    mods = sorted(n for n in entries if n.startswith("lib/hvtsm/modules/"))
    assert mods == [f"lib/hvtsm/modules/{i:02d}-{name}.ko"
                    for i, name in enumerate(EXPECTED_ORDER, start=1)]
    # .ko.xz arrives decompressed: busybox insmod loads it as it is
    ring = entries["lib/hvtsm/modules/01-virtio_ring.ko"].data
    assert ring == _module_bytes("kernel/drivers/virtio/virtio_ring.ko.xz")
    assert f"digest={image.digest[:12]}".encode() in entries["etc/hvtsm-image"].data


def test_second_call_is_cached_and_inputs_change_the_digest(fake_host):
    cache = fake_host / "cache"
    first = lab.build_lab_image(cache_dir=cache)
    mtime = first.initrd.stat().st_mtime_ns
    messages: list[str] = []
    again = lab.build_lab_image(cache_dir=cache, progress=messages.append)
    assert again == first and again.cached and messages == []
    assert again.initrd.stat().st_mtime_ns == mtime
    assert lab.plan_lab_image(cache_dir=cache) == first

    forced = lab.build_lab_image(cache_dir=cache, force=True)
    assert forced == first and not forced.cached

    module = fake_host / "modules" / VERSION / "kernel/fs/9p/9p.ko"
    module.write_bytes(module.read_bytes() + b"changed")
    planned = lab.plan_lab_image(cache_dir=cache)
    assert planned.digest != first.digest and not planned.initrd.exists()
    changed = lab.build_lab_image(cache_dir=cache)
    assert changed.digest == planned.digest and changed.initrd != first.initrd
    assert first.initrd.is_file()  # an image a running zone may use is left alone


def test_missing_kernel_and_modules_are_clear_errors(fake_host):
    with pytest.raises(HostError, match=r"no kernel .*vmlinuz-9\.9") as exc:
        lab.build_lab_image(cache_dir=fake_host / "cache", kernel_version="9.9")
    assert VERSION in str(exc.value.hint)
    dep = fake_host / "modules" / VERSION / "modules.dep"
    dep.write_text("".join(line + "\n" for line in dep.read_text().splitlines()
                           if not line.startswith("kernel/fs/9p/")))
    with pytest.raises(HostError, match="9p"):
        lab.build_lab_image(cache_dir=fake_host / "cache")
    shutil.rmtree(fake_host / "modules")
    with pytest.raises(HostError, match="no Debian kernel installed") as exc:
        lab.build_lab_image(cache_dir=fake_host / "cache")
    assert exc.value.hint == "apt-get install linux-image-amd64"


def test_dynamic_busybox_is_refused(fake_host, monkeypatch):
    monkeypatch.setattr(lab, "BUSYBOX_CANDIDATES", (Path("/bin/ls"),))
    with pytest.raises(HostError, match="not a static") as exc:
        lab.build_lab_image(cache_dir=fake_host / "cache")
    assert exc.value.hint == "apt-get install busybox-static"


def test_newest_kernel_wins(fake_host):
    newer = "6.10.0-1-amd64"
    (fake_host / "boot" / f"vmlinuz-{newer}").write_bytes(b"x")
    assert lab.installed_kernels() == [VERSION]  # no modules for the newer one yet
    shutil.copytree(fake_host / "modules" / VERSION, fake_host / "modules" / newer)
    assert lab.installed_kernels() == [newer, VERSION]


def test_image_build_cli(fake_host, capsys):
    argv = ["image", "build", "--cache-dir", str(fake_host / "cache"), "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    built = json.loads(out)
    assert built["cached"] is False and built["kernel_version"] == VERSION
    assert "hvtsm: building lab image" in err
    assert main(argv) == 0
    out, err = capsys.readouterr()
    again = json.loads(out)
    assert again["cached"] is True and again["digest"] == built["digest"] and err == ""
    assert main(argv[:-1]) == 0
    out, _ = capsys.readouterr()
    assert "cached   yes" in out and built["initrd"] in out


# -- PVH kernel extraction --------------------------------------------------------------------
def _elf_with_note(note_type: int) -> bytes:
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", header, 0x20, 64)          # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)      # e_phentsize, e_phnum
    note = struct.pack("<III", 4, 4, note_type) + b"Xen\0" + b"\0\0\0\0"
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 4)                # PT_NOTE
    struct.pack_into("<Q", phdr, 0x08, 64 + 56)       # p_offset
    struct.pack_into("<Q", phdr, 0x20, len(note))     # p_filesz
    return bytes(header + phdr) + note + b"kernel text" * 10


def _bzimage(payload: bytes) -> bytes:
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    blob = payload + struct.pack("<I", 12345)  # the build appends the uncompressed size
    struct.pack_into("<II", setup, 0x248, 16, len(blob))
    return bytes(setup) + b"\0" * 16 + blob + b"trailing"


def test_extract_vmlinux():
    elf = _elf_with_note(18)
    assert lab.extract_vmlinux(_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ))) == elf
    assert lab.extract_vmlinux(_bzimage(gzip.compress(elf))) == elf
    with pytest.raises(ValueError, match="no PVH entry"):
        lab.extract_vmlinux(_bzimage(lzma.compress(_elf_with_note(17))))
    with pytest.raises(ValueError, match="unknown kernel compression"):
        lab.extract_vmlinux(_bzimage(b"LZ4?" + elf))
    with pytest.raises(ValueError, match="not a bzImage"):
        lab.extract_vmlinux(b"\0" * 4096)


def test_pvh_kernel_is_cached(fake_host):
    kernel = fake_host / "boot" / f"vmlinuz-{VERSION}"
    elf = _elf_with_note(18)
    kernel.write_bytes(_bzimage(lzma.compress(elf)))
    image = lab.build_lab_image(cache_dir=fake_host / "cache")
    assert image.boot == "pvh" and image.kernel.read_bytes() == elf
    assert image.packaged_kernel == kernel and image.kernel.parent == fake_host / "cache"
    assert lab.build_lab_image(cache_dir=fake_host / "cache").cached


# -- kernel command line ----------------------------------------------------------------------
def test_kernel_cmdline():
    line = lab.kernel_cmdline(python="/usr/bin/python3", agent_path="/opt/hvtsm",
                              ip="10.214.0.6/30", gateway="10.214.0.5",
                              extra=["hvtsm.dns=10.214.0.5"])
    words = line.split()
    assert words[0] == "console=ttyS0" and "panic=-1" in words
    assert {"hvtsm.python=/usr/bin/python3", "hvtsm.agent=/opt/hvtsm", "hvtsm.ip=10.214.0.6/30",
            "hvtsm.gw=10.214.0.5"} <= set(words)
    assert words[-1] == "hvtsm.dns=10.214.0.5"
    plain = lab.kernel_cmdline(python="/usr/bin/python3", agent_path="/a", ip=None,
                               gateway=None)
    assert "hvtsm.ip" not in plain and "hvtsm.gw" not in plain


@pytest.mark.parametrize("kwargs, match", [
    ({"python": "python3"}, "absolute"),
    ({"agent_path": "/my dir"}, "blanks"),
    ({"agent_path": "/a'b"}, "quotes"),
    ({"ip": "10.0.0.300/30"}, "bad ip"),
    ({"ip": "10.0.0.6"}, "prefix length"),
    ({"ip": None, "gateway": "10.0.0.5"}, "needs an ip"),
    ({"gateway": "gw"}, "bad gateway"),
    ({"extra": ["a b"]}, "blanks"),
])
def test_kernel_cmdline_rejects(kwargs, match):
    args = {"python": "/usr/bin/python3", "agent_path": "/a", "ip": "10.0.0.6/30",
            "gateway": "10.0.0.5", **kwargs}
    with pytest.raises(HostError, match=match):
        lab.kernel_cmdline(**args)


def test_cache_dirs_are_readable_by_qemu_whatever_the_umask(fake_host):
    old = os.umask(0o077)
    try:
        image = lab.build_lab_image(cache_dir=fake_host / "deep" / "cache")
    finally:
        os.umask(old)
    for folder in (fake_host / "deep", fake_host / "deep" / "cache"):
        assert folder.stat().st_mode & 0o777 == 0o755
    assert image.initrd.stat().st_mode & 0o777 == 0o644
