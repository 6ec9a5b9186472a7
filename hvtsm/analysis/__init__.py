"""Risk analysis of program code: which capabilities each part of a program uses.

`analyze(path)` picks the reader by content (ELF magic, then a shebang, then the suffix)
and returns a `Report`; input it cannot read raises `AnalysisError`, never anything else.
A Python program's report also covers the modules it imports from its own directory.

What it reads must be a regular file (a FIFO, a device or a directory is refused from its
stat, before it is opened for reading: /dev/zero never ends, a FIFO never opens) of at
most MAX_SOURCE_BYTES for a script or MAX_BINARY_BYTES for an ELF file (hvtsm.limits).
"""

from __future__ import annotations

import os
from pathlib import Path

from hvtsm.analysis.elf import ELF_MAGIC, analyze_elf
from hvtsm.analysis.local_modules import local_modules
from hvtsm.analysis.model import CAPABILITIES, Reason, Report, Segment
from hvtsm.analysis.python_source import analyze_python, parse
from hvtsm.analysis.risk import risk_of
from hvtsm.analysis.shell import analyze_shell
from hvtsm.errors import AnalysisError
from hvtsm.files import FileRefused, open_regular, read_fd
from hvtsm.limits import MAX_BINARY_BYTES, MAX_SOURCE_BYTES
from hvtsm.units import format_size

__all__ = ["CAPABILITIES", "AnalysisError", "Reason", "Report", "Segment", "analyze",
           "command_exec_globs", "risk_of"]

_SHELL_INTERPRETERS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash"})


def _interpreter(first_line: str) -> str | None:
    if not first_line.startswith("#!"):
        return None
    words = first_line[2:].split()
    if not words:
        return None
    name = os.path.basename(words[0])
    if name == "env":
        rest = [w for w in words[1:] if not w.startswith("-")]
        name = rest[0] if rest else ""
    return name


def read_source(path: Path, *, binary: bool = True) -> bytes:
    """The bytes of a program to analyze (an ELF file only when `binary`), bounded; an
    AnalysisError naming the file otherwise."""
    what = "one program file"
    try:
        fd = open_regular(path, MAX_BINARY_BYTES if binary else MAX_SOURCE_BYTES, what=what)
    except FileRefused as exc:
        raise AnalysisError(str(exc), file=str(path)) from None
    except OSError as exc:
        raise AnalysisError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    try:
        # the first bytes say which limit applies: a script's parse costs far more per byte
        limit = MAX_BINARY_BYTES if binary and os.pread(fd, 4, 0) == ELF_MAGIC \
            else MAX_SOURCE_BYTES
        size = os.fstat(fd).st_size
        if size > limit:
            raise AnalysisError(f"is {format_size(size)} ({size} bytes); a script to analyze "
                                f"may be at most {format_size(limit)}", file=str(path))
        return read_fd(fd, limit, what=what)
    except FileRefused as exc:
        raise AnalysisError(str(exc), file=str(path)) from None
    except OSError as exc:
        raise AnalysisError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    finally:
        os.close(fd)


def analyze(path: str | os.PathLike[str]) -> Report:
    p = Path(path)
    data = read_source(p)
    if data.startswith(ELF_MAGIC):
        return Report(str(p), "elf", tuple(analyze_elf(p, data)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AnalysisError("unknown format: neither ELF nor UTF-8 text", file=str(p),
                            hint="hvtsm analyze reads Python, shell scripts and ELF binaries"
                            ) from None
    interpreter = _interpreter(text.split("\n", 1)[0])
    if interpreter in _SHELL_INTERPRETERS or (interpreter is None and p.suffix in (".sh",
                                                                                   ".bash")):
        return Report(str(p), "shell", tuple(analyze_shell(p, text)))
    if (interpreter or "").startswith("python") or (interpreter is None and p.suffix in (
            ".py", ".pyw")):
        return _python_program(p, text)
    raise AnalysisError(
        f"unknown format (interpreter {interpreter!r})" if interpreter else
        "unknown format: no ELF magic, no shebang, not .py or .sh", file=str(p),
        hint="hvtsm analyze reads Python, shell scripts and ELF binaries")


def _python_program(path: Path, text: str) -> Report:
    """The program and the local modules it imports (local_modules.py): theirs are
    analyzed until their calls into one another say nothing new, then the program's
    functions carry what the modules' functions they call can do."""
    tree = parse(path, text)
    modules = local_modules(path, tree)
    texts = {m.name: m.text for m in modules}
    external: dict[str, Segment] = {}
    theirs: list[Segment] = []
    for _ in range(len(modules) + 1):
        theirs = [s for m in modules
                  for s in analyze_python(m.path, texts[m.name], module=m.name,
                                          external=external)]
        now = {s.name: s for s in theirs if s.kind == "function"}
        if now == external:
            break
        external = now
    own = analyze_python(path, text, external=external, tree=tree)
    return Report(str(path), "python", (*own, *theirs),
                  local_files=tuple(m.relative for m in modules))


_INTERPRETERS = _SHELL_INTERPRETERS | {"python", "python3"}


def command_exec_globs(argv: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Exec globs of the programs a command's script runs, as far as analysis can tell:
    the script is argv[0] itself (a shebang script) or the file an interpreter is given
    (`sh deploy.sh`, `python3 job.py`). Nothing when there is no script to read."""
    import shutil

    if not argv:
        return ()
    first = shutil.which(argv[0]) or argv[0]
    name = os.path.basename(argv[0])
    script: str | None = None
    if name in _SHELL_INTERPRETERS and "-c" in argv[1:-1]:
        # `sh -c 'command string'`: the string is the script
        text = argv[argv.index("-c", 1) + 1]
        try:
            segments = analyze_shell(Path("<sh -c>"), text)
        except AnalysisError:
            return ()
        return Report("<sh -c>", "shell", tuple(segments)).exec_globs()
    if name in _INTERPRETERS or name.startswith("python3."):
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
    elif os.path.isfile(first):
        script = first
    if script is None or not os.path.isfile(script):
        return ()
    try:
        report = analyze(script)
    except AnalysisError:
        return ()
    return report.exec_globs()
