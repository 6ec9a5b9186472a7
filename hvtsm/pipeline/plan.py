"""Turning a program into a plan: which segments run in which zone, under which policy.

Functions are grouped by what the analysis found in them: consecutive steps with the same
role share a zone, and the role comes from the capabilities (network -> fetch,
input-parsing -> parse, file-write -> store, anything else -> compute). The pipeline policy's
[[segment]] selectors then pick each stage's policy and lifespan scale, and its [[channel]]
grants must let each stage hand its result to the next: a plan that could not pass its data
is refused before any zone is made.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtsm.analysis import analyze, read_source
from hvtsm.analysis.local_modules import program_digest
from hvtsm.analysis.model import Reason, Report, exec_globs
from hvtsm.errors import AnalysisError, PipelineError, PolicyError
from hvtsm.files import FileRefused, read_regular
from hvtsm.limits import MAX_MANIFEST_BYTES, MAX_NESTING
from hvtsm.pipeline.entry import read_chain
from hvtsm.policy import Policy
from hvtsm.policy.catalog import load_referenced
from hvtsm.policy.segments import choose
from hvtsm.policy.shape import ShapeError, check_shape, where

#: capability -> role, first match wins (a fetch that also parses is still a fetch: it is
#: the network that needs a zone of its own)
ROLE_RULES = (("network", "fetch"), ("input-parsing", "parse"), ("file-write", "store"))
DEFAULT_ROLE = "compute"
_MANIFEST_FIELDS = ("name", "program", "entry", "policy", "segment")
_SEGMENT_FIELDS = ("name", "role", "functions", "command", "policy", "lifespan_scale")


def role_of(capabilities: frozenset[str]) -> str:
    for capability, role in ROLE_RULES:
        if capability in capabilities:
            return role
    return DEFAULT_ROLE


@dataclass(frozen=True)
class Stage:
    """One segment group: runs in a zone of its own."""

    name: str
    role: str
    capabilities: frozenset[str]
    policy: Policy
    scale: float
    #: Python functions called in order (function stages) ...
    functions: tuple[str, ...] = ()
    #: ... or a command whose stdin/stdout carry the data (command stages)
    command: tuple[str, ...] = ()
    reasons: tuple[Reason, ...] = ()
    #: exec globs of the programs the analysis found in the stage (no transient zone for them)
    expect_exec: tuple[str, ...] = ()
    #: where the policy and scale came from, for the plan's printout
    chosen_by: str = "pipeline policy"

    @property
    def lifespan_ms(self) -> float | None:
        lifespan = self.policy.lifespan_ms
        return None if lifespan is None else lifespan * self.scale

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role,
                "capabilities": sorted(self.capabilities), "functions": list(self.functions),
                "command": list(self.command), "policy": self.policy.name,
                "policy_source": self.policy.source, "scale": self.scale,
                "lifespan_ms": self.lifespan_ms, "chosen_by": self.chosen_by,
                "expect_exec": list(self.expect_exec),
                "reasons": [r.to_dict() for r in self.reasons]}


@dataclass(frozen=True)
class Plan:
    name: str
    #: the Python program the function stages load (None: command stages only)
    program: str | None
    #: the pipeline's own policy: its [[channel]] grants join the stages
    policy: Policy
    stages: tuple[Stage, ...]
    #: names of the entry function's parameters, which the pipeline's arguments fill
    params: tuple[str, ...] = ()
    #: the first stage's arguments, as names of `params`
    first_args: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: agent_stage.program_digest of the program as analyzed: the zones run exactly these
    #: bytes
    program_digest: str | None = None
    #: the local modules the program imports (relative to its directory), shipped with it
    local_files: tuple[str, ...] = ()

    def neighbours(self, index: int) -> tuple[str | None, str | None]:
        before = self.stages[index - 1].name if index > 0 else None
        after = self.stages[index + 1].name if index + 1 < len(self.stages) else None
        return before, after

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "program": self.program, "policy": self.policy.name,
                "params": list(self.params), "stages": [s.to_dict() for s in self.stages],
                "channels": [{"from": g.source, "to": g.target, "both": g.both,
                              "max_message": g.max_message, "max_rate": g.max_rate}
                             for g in self.policy.channels]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _stage_policy(pipeline: Policy, role: str, capabilities: frozenset[str],
                  explicit: str | None = None, explicit_scale: float | None = None, *,
                  manifest: str | None = None,
                  field: str = "segment.policy") -> tuple[Policy, float, str]:
    if explicit is not None:
        policy = load_referenced(explicit, beside=manifest, field=field)
        return policy, explicit_scale or 1.0, f"manifest policy {explicit}"
    choice = choose(pipeline, [(role, capabilities)])
    if choice.selector is None:
        return pipeline, explicit_scale or 1.0, "pipeline policy"
    return choice.policy, explicit_scale or choice.scale, choice.describe(pipeline)


def plan_python(path: str | Path, pipeline: Policy, *, entry: str = "main") -> Plan:
    """Split a Python program along its entry function's steps."""
    path = Path(path)
    report = analyze(path)
    if report.language != "python":
        raise AnalysisError(f"is {report.language}, not Python: only a Python program's "
                            "functions can be split by analysis", file=str(path),
                            hint="name the segments (commands) in a manifest")
    chain = read_chain(path, _python_text(path), entry)
    module = path.stem
    groups: list[tuple[str, list[str], set[str], list[Reason], set[str]]] = []
    for step in chain.steps:
        segment = report.segment(f"{module}.{step.function}")
        role = role_of(segment.capabilities)
        if groups and groups[-1][0] == role:
            groups[-1][1].append(step.function)
            groups[-1][2].update(segment.capabilities)
            groups[-1][3].extend(segment.reasons)
            groups[-1][4].update(segment.programs)
        else:
            groups.append((role, [step.function], set(segment.capabilities),
                           list(segment.reasons), set(segment.programs)))
    module_caps = _module_capabilities(report, module)
    stages: list[Stage] = []
    seen: dict[str, int] = {}
    module_programs = _module_programs(report, module)
    for role, functions, caps, reasons, programs in groups:
        seen[role] = seen.get(role, 0) + 1
        name = role if seen[role] == 1 else f"{role}-{seen[role]}"
        # module-level code (imports, constants) runs in every zone that loads the program
        capabilities = frozenset(caps) | module_caps
        policy, scale, chosen = _stage_policy(pipeline, role, capabilities)
        stages.append(Stage(name=name, role=role, capabilities=capabilities, policy=policy,
                            scale=scale, functions=tuple(functions), reasons=tuple(reasons),
                            expect_exec=exec_globs(programs | module_programs),
                            chosen_by=chosen))
    plan = Plan(name=module, program=str(path.resolve()), policy=pipeline,
                stages=tuple(stages), params=chain.params, first_args=chain.first_args,
                program_digest=program_digest(path, report.local_files),
                local_files=report.local_files)
    check_channels(plan)
    return plan


def _python_text(path: Path) -> str:
    """The program's text read again for its entry function (bounded, as the analysis)."""
    try:
        return read_source(path, binary=False).decode("utf-8")
    except UnicodeDecodeError:
        raise AnalysisError("is no longer UTF-8 text (changed since it was analyzed?)",
                            file=str(path)) from None


def _read_manifest(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        raw = read_regular(path, MAX_MANIFEST_BYTES, what="a manifest file (TOML)")
        doc = tomllib.loads(raw.decode("utf-8"))
    except FileRefused as exc:
        raise PipelineError(str(exc), file=source) from None
    except OSError as exc:
        raise PipelineError(f"cannot read the manifest: {exc.strerror or exc}",
                            file=source) from None
    except RecursionError:
        raise PipelineError(f"not valid TOML: nested too deeply to parse (a manifest nests "
                            f"at most {MAX_NESTING} levels)", file=source) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"not valid TOML: {str(exc)[:200]}", file=source) from None
    except (ValueError, ArithmeticError, MemoryError):
        raise PipelineError("not valid TOML: a value too large to read", file=source) from None
    try:
        check_shape(doc)
    except ShapeError as exc:
        raise PipelineError(exc.message, file=source, field=where(exc.path)[1]) from None
    return doc


def _module_programs(report: Report, module: str) -> frozenset[str]:
    try:
        return frozenset(report.segment(module).programs)
    except KeyError:
        return frozenset()


def _module_capabilities(report: Report, module: str) -> frozenset[str]:
    try:
        return report.segment(module).capabilities
    except KeyError:
        return frozenset()


def plan_manifest(path: str | Path, pipeline: Policy | None = None) -> Plan:
    """A manifest names the segments itself (TOML):

        name = "report"
        program = "report.py"      # for function segments
        policy = "pipeline"        # the grants; default: the --policy given
        [[segment]]
        name = "fetch"
        functions = ["download"]   # or command = ["python3", "fetch.py"]
        role = "fetch"             # for the selectors; default from the analysis
    """
    path = Path(path)
    source = str(path)
    doc = _read_manifest(path)
    for key in doc:
        if key not in _MANIFEST_FIELDS:
            raise PipelineError(f"unknown field; valid: {', '.join(_MANIFEST_FIELDS)}",
                                file=source, field=key)
    if "policy" in doc:
        if not isinstance(doc["policy"], str):
            raise PipelineError("must be a policy name or path", file=source, field="policy")
        pipeline = load_referenced(doc["policy"], beside=source, field="policy")
    if pipeline is None:
        raise PipelineError("names no policy and none was given", file=source, field="policy",
                            hint="add policy = \"pipeline\" or pass --policy")
    program = doc.get("program")
    report: Report | None = None
    digest: str | None = None
    if program is not None:
        if not isinstance(program, str):
            raise PipelineError("must be a path", file=source, field="program")
        program_path = (path.parent / program).resolve()
        report = analyze(program_path)
        digest = program_digest(program_path, report.local_files)
        program = str(program_path)
    raw = doc.get("segment")
    if not isinstance(raw, list) or not raw:
        raise PipelineError("needs at least one [[segment]] table", file=source,
                            field="segment")
    stages: list[Stage] = []
    for index, table in enumerate(raw):
        stages.append(_manifest_stage(source, index, table, pipeline, report, program))
    names: set[str] = set()
    for stage in stages:
        if stage.name in names:
            raise PipelineError(f"two segments are named {stage.name!r}", file=source,
                                field="segment.name")
        names.add(stage.name)
    params: tuple[str, ...] = ()
    first_args: tuple[str, ...] = ()
    entry = doc.get("entry")
    if entry is not None and program is not None:
        chain = read_chain(Path(program), _python_text(Path(program)), entry)
        params, first_args = chain.params, chain.first_args
    plan = Plan(name=str(doc.get("name", path.stem)), program=program, policy=pipeline,
                stages=tuple(stages), params=params, first_args=first_args,
                program_digest=digest, local_files=report.local_files if report else ())
    check_channels(plan)
    return plan


def _manifest_stage(source: str, index: int, table: Any, pipeline: Policy,
                    report: Report | None, program: str | None) -> Stage:
    where = f"segment[{index}]"
    if not isinstance(table, dict):
        raise PipelineError("each segment must be a [[segment]] table", file=source,
                            field=where)
    for key in table:
        if key not in _SEGMENT_FIELDS:
            raise PipelineError(f"unknown field; valid: {', '.join(_SEGMENT_FIELDS)}",
                                file=source, field=f"{where}.{key}")
    name = table.get("name")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise PipelineError("needs a name of letters, digits, '-' and '_'", file=source,
                            field=f"{where}.name")
    functions = table.get("functions", [])
    command = table.get("command", [])
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(functions, list) or not all(isinstance(f, str) for f in functions):
        raise PipelineError("must be a list of function names", file=source,
                            field=f"{where}.functions")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise PipelineError("must be a command line (a list of words)", file=source,
                            field=f"{where}.command")
    if bool(functions) == bool(command):
        raise PipelineError("give either functions (of the manifest's program) or a command",
                            file=source, field=where)
    capabilities: set[str] = set()
    reasons: list[Reason] = []
    programs: set[str] = set(command[:1])
    if functions:
        if report is None or program is None:
            raise PipelineError("function segments need program = \"file.py\" in the manifest",
                                file=source, field=f"{where}.functions")
        module = Path(program).stem
        for function in functions:
            try:
                segment = report.segment(f"{module}.{function}")
            except KeyError:
                raise PipelineError(f"{program} has no function {function!r}", file=source,
                                    field=f"{where}.functions") from None
            capabilities |= segment.capabilities
            reasons.extend(segment.reasons)
            programs.update(segment.programs)
        capabilities |= _module_capabilities(report, module)
        programs |= _module_programs(report, module)
    role = table.get("role", role_of(frozenset(capabilities)))
    if not isinstance(role, str) or not role:
        raise PipelineError("must be a role name", file=source, field=f"{where}.role")
    explicit = table.get("policy")
    if explicit is not None and not isinstance(explicit, str):
        raise PipelineError("must be a policy name or path", file=source,
                            field=f"{where}.policy")
    scale = table.get("lifespan_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)
                              or not 0 < scale <= 100):
        raise PipelineError(f"{scale!r} must be a number in (0, 100]", file=source,
                            field=f"{where}.lifespan_scale")
    policy, used_scale, chosen = _stage_policy(pipeline, role, frozenset(capabilities),
                                               explicit, scale, manifest=source,
                                               field=f"{where}.policy")
    return Stage(name=name, role=role, capabilities=frozenset(capabilities), policy=policy,
                 scale=used_scale, functions=tuple(functions), command=tuple(command),
                 reasons=tuple(reasons), expect_exec=exec_globs(programs), chosen_by=chosen)


def check_channels(plan: Plan) -> None:
    """Each stage hands its result to the next over a channel: the grant must exist."""
    for index in range(len(plan.stages) - 1):
        sender, receiver = plan.stages[index].name, plan.stages[index + 1].name
        if plan.policy.grant_for(sender, receiver) is None:
            raise PolicyError(
                f"stage {sender!r} hands its result to {receiver!r}, but no [[channel]] "
                f"grants {sender} -> {receiver}", file=plan.policy.source, field="channel",
                hint=f"add [[channel]] from = \"{sender}\" to = \"{receiver}\" to the "
                "pipeline policy")
