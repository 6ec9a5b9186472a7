"""Reading a Python program's entry function as a chain of steps.

A program needs no markup to be split: its entry function (``main`` by default) is read as
``a = fetch(url)``, ``b = parse(a)``, ``return compute(b)``: each statement calls one of the
module's own functions on the previous step's result. Anything else in the entry function
would run outside every zone, so it is refused with its line rather than guessed at.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from hvtsm.errors import AnalysisError

_HINT = ("write the entry function as 'a = f(args)', 'b = g(a)', ..., 'return h(b)', or name "
         "the segments in a manifest (hvtsm pipeline --manifest)")


@dataclass(frozen=True)
class Step:
    function: str
    line: int


@dataclass(frozen=True)
class Chain:
    entry: str
    #: the entry function's parameters: the pipeline's arguments, in order
    params: tuple[str, ...]
    #: the first step's arguments, as names of `params`
    first_args: tuple[str, ...]
    steps: tuple[Step, ...]


def read_chain(path: Path, source: str, entry: str = "main") -> Chain:
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise AnalysisError(f"not valid Python: {exc.msg}", file=str(path),
                            line=exc.lineno) from None
    except (RecursionError, MemoryError, ValueError):
        raise AnalysisError("not Python source, or nested too deeply to parse",
                            file=str(path)) from None
    functions = {n.name: n for n in tree.body
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    if entry not in functions:
        raise AnalysisError(f"no module-level function {entry!r} to split into segments",
                            file=str(path), hint="name the entry function with --entry")
    node = functions[entry]
    if isinstance(node, ast.AsyncFunctionDef):
        raise AnalysisError(f"{entry}() is async; a pipeline entry must be a plain function",
                            file=str(path), line=node.lineno)
    args = node.args
    if args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
        raise AnalysisError(f"{entry}() may only take plain positional parameters",
                            file=str(path), line=node.lineno, hint=_HINT)
    params = tuple(a.arg for a in args.args)
    return _Reader(path, dict(functions), entry, params).read(node)


class _Reader:
    def __init__(self, path: Path, functions: dict[str, ast.AST], entry: str,
                 params: tuple[str, ...]) -> None:
        self.path = path
        self.functions = functions
        self.entry = entry
        self.params = params

    def fail(self, node: ast.AST, message: str) -> AnalysisError:
        return AnalysisError(f"cannot split {self.entry}() into segments: {message}",
                             file=str(self.path), line=getattr(node, "lineno", None),
                             hint=_HINT)

    def read(self, node: ast.FunctionDef) -> Chain:
        body = list(node.body)
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]  # the docstring
        steps: list[Step] = []
        first_args: tuple[str, ...] = ()
        previous: str | None = None
        ended = False
        for stmt in body:
            if ended:
                raise self.fail(stmt, "nothing may follow the last step")
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 \
                    and isinstance(stmt.targets[0], ast.Name):
                call, target = stmt.value, stmt.targets[0].id
            elif isinstance(stmt, ast.Return) and stmt.value is not None:
                if isinstance(stmt.value, ast.Name) and stmt.value.id == previous:
                    ended = True
                    continue
                call, target, ended = stmt.value, None, True
            elif isinstance(stmt, ast.Expr):
                call, target, ended = stmt.value, None, True
            else:
                raise self.fail(stmt, f"a {type(stmt).__name__} statement is not a step")
            function, names = self.step_call(call, first=not steps, previous=previous)
            if not steps:
                first_args = names
            steps.append(Step(function, stmt.lineno))
            previous = target
        if not steps:
            raise self.fail(node, "it calls none of the module's functions")
        return Chain(self.entry, self.params, first_args, tuple(steps))

    def step_call(self, call: ast.expr, *, first: bool,
                  previous: str | None) -> tuple[str, tuple[str, ...]]:
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            raise self.fail(call, "each step must call one of the module's functions by name")
        name = call.func.id
        if name not in self.functions or name == self.entry:
            raise self.fail(call, f"{name}() is not a function defined in this module")
        if call.keywords:
            raise self.fail(call, f"{name}() takes keyword arguments; pass positional ones")
        names: list[str] = []
        for arg in call.args:
            if not isinstance(arg, ast.Name):
                raise self.fail(arg, f"the arguments of {name}() must be plain names")
            names.append(arg.id)
        if first:
            unknown = [n for n in names if n not in self.params]
            if unknown:
                raise self.fail(call, f"the first step may only use {self.entry}()'s "
                                f"parameters, not {unknown[0]!r}")
        elif names != [previous]:
            raise self.fail(call, f"{name}() must take exactly the previous step's result "
                            f"({previous!r}): data passes between zones only that way")
        return name, tuple(names)
