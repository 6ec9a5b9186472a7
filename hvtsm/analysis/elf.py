"""ELF binaries -> one `binary` segment judged by the symbols it imports (.dynsym).

An imported symbol is what the binary asks the dynamic linker for, so it is a fair list of
the libc calls it can make; a static binary imports nothing and is reported as such.
"""

from __future__ import annotations

import struct
from pathlib import Path

from hvtsm.analysis.model import Reason, Segment
from hvtsm.analysis.risk import make_segment
from hvtsm.errors import AnalysisError

ELF_MAGIC = b"\x7fELF"
_SHT_DYNSYM = 11
_SYMBOLS: dict[str, str] = {
    **dict.fromkeys(["connect", "socket", "getaddrinfo", "sendto", "sendmsg", "recvfrom",
                     "gethostbyname", "bind", "listen", "accept", "accept4"], "network"),
    **dict.fromkeys(["execve", "execv", "execvp", "execvpe", "execl", "execlp", "execle",
                     "fexecve", "execveat", "system", "popen", "posix_spawn", "posix_spawnp"],
                    "exec"),
    **dict.fromkeys(["unlink", "unlinkat", "rename", "renameat", "renameat2", "creat",
                     "creat64", "rmdir", "truncate", "truncate64"], "file-write"),
    **dict.fromkeys(["dlopen", "dlmopen", "mprotect"], "native"),
    "ptrace": "ptrace",
    **dict.fromkeys(["setuid", "setgid", "seteuid", "setegid", "setresuid", "setresgid",
                     "setgroups", "mount", "umount", "umount2", "init_module",
                     "finit_module", "delete_module", "chroot", "pivot_root", "capset"],
                    "privileged"),
}


def _unpack(fmt: str, data: bytes, offset: int, file: str, what: str) -> tuple[int, ...]:
    # offsets come from the file itself, so they may be anything (even past 2**63)
    if offset + struct.calcsize(fmt) > len(data):
        raise AnalysisError(f"truncated or damaged ELF file: {what} lies past the end "
                            f"({len(data)} bytes)", file=file,
                            hint="the binary is damaged or was not fully copied")
    return struct.unpack_from(fmt, data, offset)


def imported_symbols(data: bytes, file: str) -> list[str]:
    if len(data) < 16 or not data.startswith(ELF_MAGIC):
        raise AnalysisError("not an ELF file", file=file)
    elf_class, encoding = data[4], data[5]
    if elf_class not in (1, 2) or encoding not in (1, 2):
        raise AnalysisError(f"unknown ELF class {elf_class} / data encoding {encoding}",
                            file=file)
    end = "<" if encoding == 1 else ">"
    is64 = elf_class == 2
    if is64:
        header = _unpack(end + "HHIQQQIHHHHHH", data, 16, file, "the ELF header")
    else:
        header = _unpack(end + "HHIIIIIHHHHHH", data, 16, file, "the ELF header")
    shoff, shentsize, shnum = header[5], header[10], header[11]
    if shoff == 0 or shnum == 0:
        return []  # stripped of section headers: nothing to read symbols from
    sh_fmt = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    if shentsize < struct.calcsize(sh_fmt):
        raise AnalysisError(f"section header entries of {shentsize} bytes are too small",
                            file=file)
    sections = [_unpack(sh_fmt, data, shoff + i * shentsize, file, f"section header {i}")
                for i in range(shnum)]
    names: list[str] = []
    for sec in sections:
        if sec[1] != _SHT_DYNSYM:
            continue
        offset, size, link, entsize = sec[4], sec[5], sec[6], sec[9]
        if link >= len(sections):
            raise AnalysisError(f".dynsym links to missing section {link}", file=file)
        str_off, str_size = sections[link][4], sections[link][5]
        if str_off + str_size > len(data) or offset + size > len(data):
            raise AnalysisError("truncated or damaged ELF file: .dynsym or .dynstr lies past "
                                f"the end of the file ({len(data)} bytes)", file=file,
                                hint="the binary is damaged or was not fully copied")
        sym_fmt = end + ("IBBHQQ" if is64 else "IIIBBH")
        entsize = entsize or struct.calcsize(sym_fmt)
        if entsize < struct.calcsize(sym_fmt):
            raise AnalysisError(f".dynsym entries of {entsize} bytes are too small", file=file)
        for i in range(1, size // entsize):  # entry 0 is the reserved null symbol
            sym = _unpack(sym_fmt, data, offset + i * entsize, file, f"symbol {i}")
            name_off, shndx = sym[0], sym[3] if is64 else sym[5]
            if shndx != 0 or name_off == 0 or name_off >= str_size:
                continue
            stop = data.find(b"\0", str_off + name_off, str_off + str_size)
            if stop < 0:
                raise AnalysisError(f"symbol {i}'s name runs past the end of .dynstr",
                                    file=file)
            raw = data[str_off + name_off:stop]
            names.append(raw.decode("ascii", "replace").split("@", 1)[0])
    return names


def analyze_elf(path: Path, data: bytes) -> list[Segment]:
    file = str(path)
    reasons = [Reason(_SYMBOLS[name], file, 0, name)
               for name in imported_symbols(data, file) if name in _SYMBOLS]
    return [make_segment(path.name, "binary", file, 0, reasons)]
