"""Running a plan: one zone per stage, in order, data passing through the channel broker.

Stages run one after the other, each in a zone made when the previous one has finished, so
each stage's lifespan measures its own work (a parse step's 2 s is not spent waiting for a
download). A stage's result goes to the broker, which holds it for the next stage's zone
until that zone starts. The first stage that does not exit 0 stops the pipeline: later
stages are never made.

Each stage's output and stderr are kept up to MAX_OUTPUT bytes each (hvtsm.limits); what
lies beyond is read, counted and dropped (`truncated`), so a stage writing without end
costs the controller no more memory than that.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hvtsm.agent_stage import stage_agent, stage_program, zone_python
from hvtsm.errors import PipelineError
from hvtsm.lifecycle import Manager, ZoneRun
from hvtsm.limits import MAX_OUTPUT
from hvtsm.pipeline.plan import Plan, Stage
from hvtsm.store.models import ZoneState
from hvtsm.zones.base import Backend, WorkloadIO


@dataclass
class StageResult:
    name: str
    zone_id: str
    state: str
    exit_status: int | None
    reason: str | None
    stderr: bytes = b""
    #: who ended the stage's zone, in the end line's words
    ended: str = ""
    #: stream -> bytes beyond MAX_OUTPUT, read and dropped
    truncated: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == str(ZoneState.EXITED) and self.exit_status == 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "zone": self.zone_id, "state": self.state,
                "exit_status": self.exit_status, "reason": self.reason, "ended": self.ended,
                "stderr": self.stderr.decode("utf-8", errors="replace"),
                "truncated": dict(self.truncated)}


@dataclass
class PipelineResult:
    group: str
    stages: list[StageResult] = field(default_factory=list)
    #: the last stage's output (its printed result)
    output: bytes = b""
    #: stages never made because an earlier one failed
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped and all(s.ok for s in self.stages)

    @property
    def failed(self) -> StageResult | None:
        return next((s for s in self.stages if not s.ok), None)

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "ok": self.ok,
                "stages": [s.to_dict() for s in self.stages], "skipped": self.skipped,
                "output": self.output.decode("utf-8", errors="replace")}


def stage_argv(plan: Plan, index: int, args: Sequence[str], *,
               input_timeout: float = 60.0) -> list[str]:
    """The zone's command: the staged segment runner (readable by any zone user)."""
    stage = plan.stages[index]
    before, after = plan.neighbours(index)
    argv = [zone_python(), str(stage_agent() / "guest_agent" / "segment.py"),
            "--name", stage.name, "--input-timeout", f"{input_timeout:g}"]
    if before:
        argv += ["--recv-from", before]
    if after:
        argv += ["--send-to", after]
    if stage.command:
        return [*argv, "--command", "--", *stage.command]
    if plan.program is None:
        raise PipelineError(f"stage {stage.name!r} calls functions but the plan has no program")
    argv += ["--program", str(stage_program(plan.program, expect=plan.program_digest,
                                            local_files=plan.local_files)), "--call",
             ",".join(stage.functions)]
    if before is None:
        argv += ["--args", json.dumps(first_arguments(plan, args))]
    return argv


def first_arguments(plan: Plan, args: Sequence[str]) -> list[str]:
    """The pipeline's arguments fill the entry function's parameters, by position."""
    if plan.params and len(args) != len(plan.params):
        raise PipelineError(
            f"{plan.name} takes {len(plan.params)} argument(s) "
            f"({', '.join(plan.params)}), got {len(args)}",
            hint="pass them after '--'")
    values = dict(zip(plan.params, args, strict=False))
    return [values[name] for name in plan.first_args] if plan.params else list(args)


def run_pipeline(manager: Manager, plan: Plan, args: Sequence[str] = (), *,
                 user: str | None = None, backend: Backend | None = None,
                 input_timeout: float = 60.0,
                 on_stage: Callable[[Stage, ZoneRun], None] | None = None) -> PipelineResult:
    """Run every stage in its own zone of one group; returns once the pipeline ended."""
    argvs = [stage_argv(plan, i, args, input_timeout=input_timeout)
             for i in range(len(plan.stages))]
    group = "p" + secrets.token_hex(4)
    result = PipelineResult(group)
    manager.broker.open_group(group, [s.name for s in plan.stages], plan.policy.channels)
    try:
        for index, stage in enumerate(plan.stages):
            last = index == len(plan.stages) - 1
            outcome, output = _run_stage(manager, stage, argvs[index], group, user=user,
                                         backend=backend, keep_output=last,
                                         on_stage=on_stage)
            result.stages.append(outcome)
            if last:
                result.output = output
            if not outcome.ok:
                result.skipped = [s.name for s in plan.stages[index + 1:]]
                break
    finally:
        manager.broker.close_group(group)
    return result


def _run_stage(manager: Manager, stage: Stage, argv: list[str], group: str, *,
               user: str | None, backend: Backend | None, keep_output: bool,
               on_stage: Callable[[Stage, ZoneRun], None] | None) -> tuple[StageResult, bytes]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    collected = {out_r: Kept(), err_r: Kept()}
    readers = [threading.Thread(target=_drain, args=(fd, collected[fd]), daemon=True)
               for fd in (out_r, err_r)]
    for reader in readers:
        reader.start()
    try:
        run = manager.launch(stage.policy, argv, io=WorkloadIO(stdout=out_w, stderr=err_w),
                             user=user, scale=stage.scale, backend=backend, name=stage.name,
                             group=group, kind="segment", expect_exec=stage.expect_exec)
    finally:
        # the zone's driver keeps copies of its own: the readers see EOF once the
        # workload's output is all written
        os.close(out_w)
        os.close(err_w)
    if on_stage is not None:
        on_stage(stage, run)
    manager.wait(run.zone_id)
    for reader in readers:
        reader.join(10)
    truncated = {name: collected[fd].dropped for name, fd in (("stdout", out_r),
                                                                 ("stderr", err_r))
                 if collected[fd].dropped}
    outcome = StageResult(stage.name, run.zone_id, str(run.state), run.exit_status,
                          run.end_reason, bytes(collected[err_r].data),
                          run.outcome.describe() if run.outcome is not None else "",
                          truncated)
    output = bytes(collected[out_r].data) if keep_output else b""
    return outcome, output


@dataclass
class Kept:
    """The first `limit` bytes of a stream, and how many more there were."""

    limit: int = MAX_OUTPUT
    data: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        room = max(0, self.limit - len(self.data))
        self.data += chunk[:room]
        self.dropped += len(chunk) - min(room, len(chunk))


def _drain(fd: int, into: Kept) -> None:
    try:
        while chunk := os.read(fd, 65536):
            into.add(chunk)
    finally:
        os.close(fd)

