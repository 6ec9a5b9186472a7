"""Python source -> one segment per function and method, plus one for module-level code.

Calls are resolved through the file's imports (`import subprocess as sp`, `from os import
system`), so a rule names the real target (`subprocess.run`) however the file spells it.
A segment also carries what the functions it calls can do, through any chain of calls:
the file's own (f(), C(), self.m(), C.m(), C().m()) and those of the modules it imports
from its directory (`external`, see local_modules.py). Their evidence keeps its own file
and line and says the way ("requests.get() via fetch()"). Other files are not followed,
nor the calls of the module's `if __name__ == "__main__":` part (the module's segment is
what runs wherever the file is imported).
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from hvtsm.analysis.model import Reason, Segment
from hvtsm.analysis.risk import make_segment
from hvtsm.errors import AnalysisError

#: any call into these modules reaches the network
_NETWORK_MODULES = ("socket", "urllib.request", "urllib3", "http.client", "requests", "httpx",
                    "aiohttp", "ftplib", "smtplib", "telnetlib", "paramiko")
_EXEC_MODULES = ("subprocess",)
_EXEC_CALLS = frozenset({"os.system", "os.popen", "pty.spawn", "os.fork", "os.forkpty",
                         "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell"})
_EXEC_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
_WRITE_CALLS = frozenset({"os.remove", "os.unlink", "os.rename", "os.renames", "os.replace",
                          "os.rmdir", "os.removedirs", "os.truncate", "os.mkfifo",
                          "shutil.move", "shutil.rmtree", "tempfile.mkstemp"})
_WRITE_PREFIXES = ("shutil.copy",)
#: method names that write whatever object they are called on (pathlib.Path mostly)
_WRITE_METHODS = frozenset({"write_text", "write_bytes"})
_NATIVE_MODULES = ("ctypes", "cffi", "_cffi_backend")
_DYNAMIC_CALLS = frozenset({"eval", "exec", "compile", "__import__", "pickle.load",
                            "pickle.loads", "pickle.Unpickler", "_pickle.loads", "marshal.load",
                            "marshal.loads", "dill.load", "dill.loads", "cloudpickle.load",
                            "cloudpickle.loads", "shelve.open", "types.FunctionType",
                            "types.CodeType"})
_INPUT_CALLS = frozenset({"json.load", "json.loads", "yaml.load", "yaml.safe_load",
                          "yaml.full_load", "yaml.unsafe_load", "yaml.load_all", "csv.reader",
                          "csv.DictReader", "input", "tomllib.load", "tomllib.loads",
                          "email.message_from_string", "email.message_from_bytes",
                          "email.message_from_file", "email.message_from_binary_file"})
_INPUT_MODULES = ("xml", "argparse", "email.parser", "html.parser", "lxml", "defusedxml")
_INPUT_ATTRIBUTES = frozenset({"sys.stdin", "sys.stdin.buffer"})
_PRIVILEGED_CALLS = frozenset({"os.setuid", "os.setgid", "os.seteuid", "os.setegid",
                               "os.setreuid", "os.setregid", "os.setresuid", "os.setresgid",
                               "os.setgroups", "os.chroot", "os.initgroups"})
#: libc functions reached through ctypes (libc.mount(...)) that need privilege
_PRIVILEGED_NATIVE = frozenset({"mount", "umount", "umount2", "init_module", "finit_module",
                                "delete_module", "setuid", "setgid", "chroot", "pivot_root",
                                "setns", "unshare"})
_WRITE_MODE_CHARS = frozenset("wax+")


def _under(name: str, modules: Iterable[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


class _Resolver:
    """Import bindings of one file: local name -> dotted target."""

    def __init__(self, tree: ast.Module) -> None:
        self.names: dict[str, str] = {}
        #: `x = f(...)` statements, kept so that a second walk of the tree is not needed
        self.call_assignments: list[ast.Assign] = []
        # best effort: one map for the whole file, as function-local imports rarely
        # rebind a name to something else
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                self.call_assignments.append(node)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.names[a.asname] = a.name
                    else:
                        top = a.name.split(".")[0]
                        self.names[top] = top
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    if a.name != "*":
                        self.names[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(self, node: ast.expr) -> str | None:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Call):
            # ctypes.CDLL("libc.so.6").mount(...) -> ctypes.CDLL().mount
            inner = self.dotted(node.func)
            if inner is None:
                return None
            return ".".join([inner + "()", *reversed(parts)])
        if not isinstance(node, ast.Name):
            return None
        base = self.names.get(node.id, node.id)
        return ".".join([base, *reversed(parts)])


def _mode_writes(call: ast.Call, position: int) -> str | None:
    mode: ast.expr | None = None
    if len(call.args) > position:
        mode = call.args[position]
    for kw in call.keywords:
        if kw.arg == "mode":
            mode = kw.value
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str) \
            and _WRITE_MODE_CHARS & set(mode.value):
        return mode.value
    return None


class _Scanner:
    def __init__(self, file: str, resolver: _Resolver, native_names: frozenset[str]) -> None:
        self.file = file
        self.r = resolver
        # names bound to something from ctypes/cffi (libc = ctypes.CDLL(...)), so that
        # libc.ptrace(...) is known to be a native call
        self.native_names = native_names

    def reason(self, cap: str, node: ast.AST, detail: str) -> Reason:
        return Reason(cap, self.file, getattr(node, "lineno", 0), detail)

    def scan(self, nodes: Iterable[ast.AST],
             calls: list[ast.Call] | None = None) -> Iterator[Reason]:
        """The evidence in `nodes`; every call met is also appended to `calls`, so that
        the calls into the file's own functions need no second walk."""
        for root in nodes:
            for node in ast.walk(root):
                if isinstance(node, ast.Call):
                    if calls is not None:
                        calls.append(node)
                    yield from self.call(node)
                elif isinstance(node, ast.Attribute):
                    name = self.r.dotted(node)
                    if name in _INPUT_ATTRIBUTES:
                        yield self.reason("input-parsing", node, name)
                elif isinstance(node, ast.Import | ast.ImportFrom):
                    yield from self.imported(node)

    def imported(self, node: ast.Import | ast.ImportFrom) -> Iterator[Reason]:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            targets = [f"{node.module}.{a.name}" for a in node.names] if node.module else []
        for t in targets:
            # loading ctypes/cffi is what gives native access; the other modules only
            # matter when called
            if _under(t, _NATIVE_MODULES):
                yield self.reason("native", node, f"import {t}")

    def call(self, call: ast.Call) -> Iterator[Reason]:
        if isinstance(call.func, ast.Attribute) and call.func.attr in _WRITE_METHODS:
            # the receiver is rarely a plain name ((OUT / "x").write_text), so the method
            # name alone decides
            yield self.reason("file-write", call, f"{call.func.attr}()")
        name = self.r.dotted(call.func)
        if name is None:
            return
        detail = f"{name}()"
        last = name.rsplit(".", 1)[-1]
        if "()" in name:
            # a method of a call's result (urlopen(u).read()): the call itself was already
            # judged; only a native library's functions (CDLL(...).mount) say more
            if name.split("()", 1)[0] in ("ctypes.CDLL", "ctypes.cdll.LoadLibrary",
                                          "ctypes.PyDLL", "cffi.FFI().dlopen"):
                yield from self.native_call(call, detail, last)
            return
        if _under(name, _NETWORK_MODULES):
            yield self.reason("network", call, detail)
        if _under(name, _EXEC_MODULES) or name in _EXEC_CALLS or name.startswith(_EXEC_PREFIXES):
            yield Reason("exec", self.file, call.lineno, detail, _programs(name, call))
        if name in ("open", "io.open", "os.fdopen", "codecs.open") or (
                last == "open" and isinstance(call.func, ast.Attribute)):
            # builtin open(file, mode): mode is 2nd; Path(...).open(mode): mode is 1st
            position = 0 if last == "open" and name not in ("open", "io.open", "codecs.open",
                                                            "os.fdopen") else 1
            mode = _mode_writes(call, position)
            if mode is not None:
                yield self.reason("file-write", call, f"{name}(mode={mode!r})")
        if name in _WRITE_CALLS or name.startswith(_WRITE_PREFIXES):
            yield self.reason("file-write", call, detail)
        if _under(name, _NATIVE_MODULES) or name.split(".")[0] in self.native_names:
            yield from self.native_call(call, detail, last)
        if name in ("importlib.util.spec_from_file_location", "importlib.machinery."
                    "ExtensionFileLoader") and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and ".so" in a.value
                for a in call.args):
            yield self.reason("native", call, detail)
        if name in _DYNAMIC_CALLS:
            yield self.reason("dynamic-code", call, detail)
        if name == "importlib.import_module" and not (
                call.args and isinstance(call.args[0], ast.Constant)):
            yield self.reason("dynamic-code", call, f"{detail} with a computed name")
        if name in _INPUT_CALLS or _under(name, _INPUT_MODULES):
            yield self.reason("input-parsing", call, detail)
        if name in _PRIVILEGED_CALLS:
            yield self.reason("privileged", call, detail)


    def native_call(self, call: ast.Call, detail: str, last: str) -> Iterator[Reason]:
        yield self.reason("native", call, detail)
        if last == "ptrace":
            yield self.reason("ptrace", call, detail)
        if last in _PRIVILEGED_NATIVE:
            yield self.reason("privileged", call, detail)


def _programs(name: str, call: ast.Call) -> tuple[str, ...]:
    """Programs an exec-family call runs, when the code names them literally: argv[0] of a
    list, the first word of a command string (and the shell that runs a string)."""
    position = 1 if name.startswith(("os.spawn", "os.posix_spawn")) else 0
    if len(call.args) <= position:
        return ()
    first = call.args[position]
    shell = name in ("os.system", "os.popen", "asyncio.create_subprocess_shell") or any(
        kw.arg == "shell" and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords)
    if isinstance(first, ast.List | ast.Tuple) and first.elts:
        head = first.elts[0]
        if isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value:
            return (head.value,)
        return ()
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        try:
            words = shlex.split(first.value)
        except ValueError:
            words = first.value.split()
        if not words:
            return ()
        if shell:
            return ("sh", words[0])
        # subprocess.run("ls") without a shell runs the whole string as one program name
        return (first.value if name.startswith(("subprocess", "os.exec", "os.spawn",
                                                 "os.posix_spawn", "asyncio"))
                else words[0],)
    return ("sh",) if shell else ()


def _native_names(r: _Resolver) -> frozenset[str]:
    names: set[str] = set()
    for node in r.call_assignments:
        assert isinstance(node.value, ast.Call)
        target = r.dotted(node.value.func)
        if target and _under(target, _NATIVE_MODULES):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return frozenset(names)


def _def_header(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> list[ast.AST]:
    """Parts of a def or class statement that run when the enclosing code runs."""
    parts: list[ast.AST] = list(node.decorator_list)
    if isinstance(node, ast.ClassDef):
        parts += [*node.bases, *node.keywords]
    else:
        parts += [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
    return parts


def parse(path: Path, text: str) -> ast.Module:
    try:
        return ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise AnalysisError(f"Python syntax error: {exc.msg}", file=str(path),
                            line=exc.lineno,
                            hint="the file must parse as Python 3 to be analyzed") from None
    except (RecursionError, MemoryError):
        raise AnalysisError("Python source nested too deeply to parse", file=str(path)) from None
    except ValueError as exc:  # source with NUL bytes
        raise AnalysisError(f"not Python source: {exc}", file=str(path)) from None


class _Function:
    """A def of the file (its segment name, the class it is a method of, its own evidence,
    the calls in its body), or a function of an imported local module (no node: its
    evidence is already whole)."""

    def __init__(self, name: str, owner: str | None,
                 node: ast.FunctionDef | ast.AsyncFunctionDef | None,
                 reasons: list[Reason], calls: list[ast.Call] | None = None) -> None:
        self.name = name
        self.owner = owner
        self.node = node
        self.reasons = reasons
        self.calls = calls or []

    @property
    def line(self) -> int:
        return self.node.lineno if self.node is not None else 0


def _callees(calls: Iterable[ast.Call], owner: str | None, prefix: str,
             known: Mapping[str, _Function], r: _Resolver) -> list[str]:
    """Functions of this file, or of the local modules it imports (`known` holds both),
    that `calls` reach by a name the file binds: f(), C() (its __init__), self.m() /
    cls.m() in a method of C, C.m(), C().m(), and the imported helpers.f() or f()."""
    out: list[str] = []
    for node in calls:
        target = _call_target(node.func, owner, prefix, r)
        if target is not None and target not in known:
            target += ".__init__"  # a class: its constructor runs
        if target is not None and target in known and target not in out:
            out.append(target)
    return out


def _calls_in(nodes: Iterable[ast.AST]) -> list[ast.Call]:
    return [n for root in nodes for n in ast.walk(root) if isinstance(n, ast.Call)]


def _call_target(func: ast.expr, owner: str | None, prefix: str, r: _Resolver) -> str | None:
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call) \
            and isinstance(func.value.func, ast.Name):
        name = func.value.func.id  # C().m()
        return f"{r.names.get(name, prefix + '.' + name)}.{func.attr}"
    base = func
    while isinstance(base, ast.Attribute):
        base = base.value
    if not isinstance(base, ast.Name):
        return None
    if base.id in r.names:
        return r.dotted(func)  # imported: helpers.f(), tools.net.get(), f
    if isinstance(func, ast.Name):
        return f"{prefix}.{func.id}"
    if isinstance(func, ast.Attribute) and func.value is base:
        if base.id in ("self", "cls"):
            return f"{owner}.{func.attr}" if owner is not None else None
        return f"{prefix}.{base.id}.{func.attr}"
    return None


def _propagated(start: str, calls: dict[str, list[str]],
                known: dict[str, _Function]) -> Iterator[Reason]:
    """What the functions `start` calls (directly or through others) can do, as evidence at
    its real file and line, with the calls that reach it ("via a() -> b()")."""
    paths: dict[str, list[str]] = {start: []}
    queue = [start]
    while queue:
        current = queue.pop(0)
        for callee in calls.get(current, []):
            if callee in paths:
                continue
            paths[callee] = [*paths[current], callee]
            queue.append(callee)
    for name, path in paths.items():
        if not path:
            continue
        via = " -> ".join(_shown(p, known[p]) for p in path)
        for r in known[name].reasons:
            # an imported module's evidence may already say its own way: ours comes first
            head, sep, rest = r.detail.partition(" via ")
            detail = f"{head} via {via}" + (f" -> {rest}" if sep else "")
            yield Reason(r.capability, r.file, r.line, detail, r.programs)


def _shown(name: str, function: _Function) -> str:
    """A callee as the evidence names it: f(), C() for a constructor, and an imported
    module's function by its dotted name (helpers.f())."""
    if function.node is None:
        return name.removesuffix(".__init__") + "()"
    if name.endswith(".__init__"):
        return name.rsplit(".", 2)[-2] + "()"
    return name.rsplit(".", 1)[-1] + "()"


def _main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    sides = [test.left, *test.comparators]
    return (len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
            and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides))


def analyze_python(path: Path, text: str, *, module: str | None = None,
                   external: Mapping[str, Segment] | None = None,
                   tree: ast.Module | None = None) -> list[Segment]:
    """Segments of one Python file. `module`: its dotted name (default: the file's stem).
    `external`: function segments of the local modules it imports, by dotted name, whose
    evidence its calls carry. `tree`: the file already parsed (`parse`)."""
    if tree is None:
        tree = parse(path, text)
    file = str(path)
    module = module or path.stem
    r = _Resolver(tree)
    scanner = _Scanner(file, r, _native_names(r))
    functions: dict[str, _Function] = {}
    module_nodes: list[ast.AST] = []

    def visit_body(body: list[ast.stmt], prefix: str, owner: str | None) -> None:
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                module_nodes.extend(_def_header(stmt))
                name = f"{prefix}.{stmt.name}"
                calls: list[ast.Call] = []
                reasons = list(scanner.scan(stmt.body, calls))
                functions[name] = _Function(name, owner, stmt, reasons, calls)
            elif isinstance(stmt, ast.ClassDef):
                module_nodes.extend(_def_header(stmt))
                visit_body(stmt.body, f"{prefix}.{stmt.name}", f"{prefix}.{stmt.name}")
            else:
                module_nodes.append(stmt)

    visit_body(tree.body, module, None)
    own = list(functions)
    known: dict[str, _Function] = dict(functions)
    for name, segment in (external or {}).items():
        if name not in known and segment.kind == "function":
            known[name] = _Function(name, None, None, list(segment.reasons))
    # a function is what it calls, too: fetch() that only calls a helper using urllib
    # reaches the network, and its zone must allow it
    calls = {name: _callees(functions[name].calls, functions[name].owner, module, known, r)
             for name in own}
    # the module's segment is what runs wherever the file is loaded (a pipeline's every
    # zone imports it): its `if __name__ == "__main__":` part runs only as a script, and
    # what it calls is the called functions' own segments
    calls[module] = _callees(_calls_in(n for n in module_nodes if not _main_guard(n)), None,
                             module, known, r)
    segments = [make_segment(name, "function", file, functions[name].line,
                             [*functions[name].reasons, *_propagated(name, calls, known)])
                for name in own]
    module_segment = make_segment(module, "module", file, 1,
                                  [*scanner.scan(module_nodes),
                                   *_propagated(module, calls, known)])
    return [module_segment, *segments]
