"""The modules a Python program imports from its own directory, which run with it.

`import helpers`, `from helpers import get` and `import tools.net` load `helpers.py` or the
package `tools/` that sit beside the program (its directory comes first on `sys.path`), and
those files' own such imports, transitively. Their code is analyzed with the program, and a
pipeline's zones get them in the program's snapshot. Relative imports inside a package are
followed within that package; anything not found beside the program is the installed
library's business, neither analyzed nor shipped.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hvtsm.errors import AnalysisError
from hvtsm.files import FileRefused, read_regular
from hvtsm.limits import MAX_LOCAL_FILES, MAX_SOURCE_BYTES


@dataclass(frozen=True)
class LocalModule:
    #: the dotted name it is imported by ("helpers", "tools.net", "tools" for __init__)
    name: str
    path: Path
    #: its path relative to the program's directory
    relative: str
    #: its source as it was read for the analysis
    text: str = dataclasses.field(default="", repr=False, compare=False)


def _module_file(base: Path, dotted: str) -> tuple[str, Path] | None:
    parts = dotted.split(".")
    as_file = base.joinpath(*parts).with_suffix(".py")
    if as_file.is_file():
        return dotted, as_file
    as_package = base.joinpath(*parts, "__init__.py")
    if as_package.is_file():
        return dotted, as_package
    return None


def _import_statements(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, wherever it sits (in functions, classes, if and try
    blocks), found without visiting any expression."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                stack.extend(n for n in block if isinstance(n, ast.stmt | ast.excepthandler
                                                            | ast.match_case))
    return found


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Dotted names a module's imports may load, each parent package included."""
    names: list[str] = []
    for node in _import_statements(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # relative: only inside a package (the program itself is __main__)
                package = module.split(".") if is_package else module.split(".")[:-1]
                keep = len(package) - (node.level - 1)
                if module == "__main__" or keep <= 0:
                    continue
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from tools import net` may load the module tools.net
            targets = [base, *(f"{base}.{a.name}" for a in node.names if a.name != "*")]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return names


def local_modules(program: Path, tree: ast.Module) -> tuple[LocalModule, ...]:
    """The local modules `program` (parsed as `tree`) loads, in the order found."""
    base = program.resolve().parent
    found: dict[str, LocalModule] = {}
    queue: list[tuple[str, ast.Module, bool]] = [("__main__", tree, False)]
    while queue:
        module, module_tree, is_package = queue.pop(0)
        for name in _imported_names(module_tree, module, is_package):
            if name in found:
                continue
            located = _module_file(base, name)
            if located is None:
                continue
            dotted, path = located
            if path.resolve() == program.resolve():
                continue
            if len(found) >= MAX_LOCAL_FILES:
                raise AnalysisError(f"imports more than {MAX_LOCAL_FILES} local modules",
                                    file=str(program),
                                    hint="name the segments as commands in a manifest")
            try:
                text = read_module(path)
                sub_tree = ast.parse(text, filename=str(path))
            except SyntaxError as exc:
                raise AnalysisError(f"Python syntax error in an imported module: {exc.msg}",
                                    file=str(path), line=exc.lineno) from None
            except (RecursionError, MemoryError):
                raise AnalysisError("an imported module nested too deeply to parse",
                                    file=str(path)) from None
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise AnalysisError(f"cannot read an imported module: {exc}",
                                    file=str(path)) from None
            found[dotted] = LocalModule(dotted, path, str(path.relative_to(base)), text)
            queue.append((dotted, sub_tree, path.name == "__init__.py"))
    return tuple(found.values())


def read_module(path: Path) -> str:
    """A local module's text: a regular file of at most MAX_SOURCE_BYTES (FileRefused,
    a ValueError, otherwise)."""
    return read_regular(path, MAX_SOURCE_BYTES, what="a Python module").decode("utf-8")


def read_program(path: str | os.PathLike[str],
                 local_files: Sequence[str] = ()) -> list[tuple[str, bytes]]:
    """(name, bytes) of a program (its file name) and then of its local modules (paths
    relative to its directory, sorted): read once, for the digest and the snapshot alike.
    Each is a regular file of at most MAX_SOURCE_BYTES (an AnalysisError otherwise)."""
    source = Path(path)
    files = [(source.name, source), *((rel, source.parent / rel) for rel in sorted(local_files))]
    out = []
    for name, file in files:
        try:
            out.append((name, read_regular(file, MAX_SOURCE_BYTES, what="a Python source")))
        except (FileRefused, OSError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise AnalysisError(f"cannot read: {detail}", file=str(file)) from None
    return out


def digest_files(files: Sequence[tuple[str, bytes]]) -> str:
    """sha256 of `read_program`'s files: names and bytes, each delimited."""
    (name, data), *modules = files
    h = hashlib.sha256(name.encode() + b"\0" + data)
    for rel, content in modules:
        h.update(b"\0" + rel.encode() + b"\0" + str(len(content)).encode() + b"\0" + content)
    return h.hexdigest()


def program_digest(path: str | os.PathLike[str], local_files: Sequence[str] = ()) -> str:
    """What an analysis read, and what a snapshot must hold (`digest_files`)."""
    return digest_files(read_program(path, local_files))


__all__ = ["MAX_LOCAL_FILES", "LocalModule", "digest_files", "local_modules",
           "program_digest", "read_program"]
