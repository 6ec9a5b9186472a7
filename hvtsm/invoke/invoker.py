"""`Invoker.invoke`: program code (or a stored code id) plus execution information in, the
program's result and its audit id (the zone id) out. The CLI (`hvtsm invoke`) and a daemon
API are thin layers over it.

The flow: store and analyze the code; pick the policy and scale its lifespan by the
segments the analysis found; write the code where the zone sees it; take a warm guest of
the request's (runtime, trust level) from the pool, or boot one; launch the zone (the
manager audits every step); collect output, exit status and anomalies; end the zone at the
timeout; then give the guest back to the pool or retire it (`hvtsm.pool.rules`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pwd
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypedDict, cast

from sqlmodel import col, select

from hvtsm.agent_stage import INVOKE_SPOOL, guarded
from hvtsm.errors import HvtsmError, InvokeError, ZoneError
from hvtsm.invoke.code import get_code, put_code
from hvtsm.invoke.plan import command, exec_targets, runtime_for, segment_choice
from hvtsm.lifecycle import Manager, Outcome, ZoneRun
from hvtsm.limits import MAX_OUTPUT  # bytes of each output stream kept in the result
from hvtsm.policy import Policy, load_policy
from hvtsm.policy.catalog import default_policy_path, resolve
from hvtsm.pool.rules import PoolKey
from hvtsm.pool.warm import SCRATCH, Lease, WarmPool
from hvtsm.restrictions import Restrictions
from hvtsm.store.models import Anomaly, ZoneState
from hvtsm.zones.base import (
    ZONE_USER,
    Backend,
    PooledDriver,
    WorkloadIO,
    ZoneHandle,
    ZoneSpec,
    guest_user,
)

log = logging.getLogger(__name__)

SPOOL = INVOKE_SPOOL
DEFAULT_TRUST = "untrusted"


@dataclass(frozen=True)
class InvokeRequest:
    """Program code (`code`, named `name`) or a stored `code_id`, and how to run it."""

    code: bytes | None = None
    name: str | None = None
    code_id: str | None = None
    args: tuple[str, ...] = ()
    #: seconds before the zone is ended (audited as the invoke timeout)
    timeout: float = 30.0
    #: policy name (policies/NAME.toml) or path; None: the default policy
    policy: str | None = None
    trust: str = DEFAULT_TRUST
    #: None: from the analysis (python -> python3, shell -> sh, elf -> native)
    runtime: str | None = None
    user: str = ZONE_USER
    backend: Backend = Backend.LIBVIRT
    #: False: never a pooled guest (always boot one)
    warm: bool = True
    #: on top of the workload's clean environment (--env, --pass-env)
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class InvokeResult:
    zone_id: str
    code_id: str
    runtime: str
    trust: str
    backend: str
    #: the pooled guest that ran it (None: a cold zone, which was its own guest)
    guest_id: str | None
    warm: bool
    exit_status: int | None
    state: str
    end_reason: str | None
    timed_out: bool
    stdout: bytes
    stderr: bytes
    #: bytes of output beyond MAX_OUTPUT, per stream, not kept
    truncated: dict[str, int]
    anomalies: list[dict[str, Any]]
    lifespan_scale: float
    policy: str
    exec_targets: tuple[str, ...]
    #: request in -> result ready (the guest's release afterwards not included)
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: what became of a pooled guest: None (back in the pool) or why it was retired
    guest_retired: str | None = None
    #: how the workload started when its guest had a standby (as in the zone's trail):
    #: "started from a standby prepared at ... (pid N)" or why the standby was not used
    start_note: str | None = None
    #: who ended the zone, hostile or not (None: unknown, it never ended in time)
    outcome: Outcome | None = None

    @property
    def from_standby(self) -> bool:
        return bool(self.start_note and self.start_note.startswith("started from a standby"))

    def to_json(self) -> dict[str, Any]:
        return {
            "zone": self.zone_id, "audit_id": self.zone_id, "code_id": self.code_id,
            "runtime": self.runtime, "trust": self.trust, "backend": self.backend,
            "guest": self.guest_id, "warm": self.warm, "exit_status": self.exit_status,
            "state": self.state, "reason": self.end_reason, "timed_out": self.timed_out,
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"), "truncated": self.truncated,
            "anomalies": self.anomalies, "lifespan_scale": self.lifespan_scale,
            "policy": self.policy, "exec_targets": list(self.exec_targets),
            "latency_ms": round(self.latency_ms, 1),
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
            "guest_retired": self.guest_retired, "start": self.start_note,
            "ended_by": None if self.outcome is None else str(self.outcome.cause),
            "hostile": None if self.outcome is None else self.outcome.hostile,
        }


class _Launch(TypedDict):
    """What every launch of an invocation passes, warm or cold."""

    io: WorkloadIO
    user: str
    scale: float
    name: str
    group: str
    env: dict[str, str]


class Invoker:
    """See the module docstring. `manager` must drive the backends requests ask for;
    `pool` serves libvirt requests warm (None: every request boots cold)."""

    def __init__(self, manager: Manager, *, pool: WarmPool | None = None,
                 spool: Path = SPOOL) -> None:
        self.manager = manager
        self.store = manager.store
        self.pool = pool
        self.spool = spool

    def store_code(self, data: bytes, name: str | None = None) -> str:
        row, _report = put_code(self.store, data, name)
        return row.id

    def invoke(self, request: InvokeRequest) -> InvokeResult:
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        _check_user(request.user)
        key_trust = request.trust
        if request.code is not None:
            row, report = put_code(self.store, request.code, request.name)
            data = request.code
        elif request.code_id is not None:
            row = get_code(self.store, request.code_id)
            data = row.data
            report = None
        else:
            raise InvokeError("no code to run", hint="give program code or a code id")
        policy = _load(request.policy)
        request_dir = self._spool_dir()
        try:
            code_path = request_dir / row.name
            code_path.write_bytes(data)
            code_path.chmod(0o755 if row.language == "elf" else 0o644)
            if report is None:
                from hvtsm.analysis import analyze

                report = analyze(code_path)
            runtime = runtime_for(report, request.runtime)
            key = PoolKey(runtime, key_trust)
            choice = segment_choice(policy, report)
            policy, scale = choice.policy, choice.scale
            timings["prepare"] = _ms(t0)
            result = self._run(request, policy, key, scale, code_path, request_dir, row.id,
                               exec_targets(report), t0, timings)
        finally:
            shutil.rmtree(request_dir, ignore_errors=True)
        return result

    # -- internals ----------------------------------------------------------------------------

    def _run(self, request: InvokeRequest, policy: Policy, key: PoolKey, scale: float,
             code_path: Path, request_dir: Path, code_id: str, targets: tuple[str, ...],
             t0: float, timings: dict[str, float]) -> InvokeResult:
        backend = request.backend
        initial = policy.initial()
        argv = command(key.runtime, str(code_path), request.args, python=self._python(backend))
        group = "i" + secrets.token_hex(4)
        io = WorkloadIO(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lease: Lease | None = None
        if backend is Backend.LIBVIRT and self.pool is not None and request.warm:
            lease = self.pool.acquire(key, initial)
        timings["claim"] = _ms(t0)
        launch = _Launch(io=io, user=request.user, scale=scale, name=code_path.name,
                         group=group, env={**request.env, "HVTSM_INVOKE": group})
        run: ZoneRun | None = None
        if lease is not None:
            pool, leased = self.pool, lease
            assert pool is not None

            def bind(spec: ZoneSpec, init: Restrictions) -> ZoneHandle[Any]:
                return pool.bind(leased, spec, init)

            try:
                run = self.manager.launch(policy, argv, backend=backend, cwd=SCRATCH,
                                          create=bind, **launch)
            except ZoneError as exc:
                # a guest that failed a zone is retired (pool.bind, release); one the
                # zone never reached goes back; the request still gets a guest
                log.warning("warm guest %s failed (%s): booting one", lease.guest_id, exc)
                if lease.handle is None and lease.zone_id is None:
                    pool.give_back(lease)
                else:
                    pool.release(lease, zone_state=ZoneState.FAILED, request_key=key)
                lease = None
        if run is None:
            run = self._launch_cold(policy, argv, backend, request.user, launch)
        timings["started"] = _ms(t0)
        readers = _Readers(run)
        timed_out = not run.ended.wait(request.timeout)
        if timed_out:
            self.manager.terminate(run.zone_id, reason=f"invoke timeout: {request.timeout:g} s",
                                   by="operator")
            run.ended.wait(60)
        readers.join(10)
        self.manager.settle(5)
        timings["ended"] = _ms(t0)
        anomalies = self._anomalies(run.zone_id)
        latency = _ms(t0)
        result = InvokeResult(
            zone_id=run.zone_id, code_id=code_id, runtime=key.runtime, trust=key.trust,
            backend=str(backend), guest_id=lease.guest_id if lease else None,
            warm=lease is not None, exit_status=run.exit_status, state=str(run.state),
            end_reason=run.end_reason, timed_out=timed_out, stdout=readers.data["stdout"],
            stderr=readers.data["stderr"], truncated=readers.truncated, anomalies=anomalies,
            lifespan_scale=scale, policy=policy.name, exec_targets=targets,
            latency_ms=latency, timings_ms=timings,
            start_note=run.workload.start_note if run.workload is not None else None,
            outcome=run.outcome)
        if lease is not None:
            assert self.pool is not None
            result.guest_retired = self.pool.release(
                lease, zone_state=run.state, request_key=key,
                settle=lambda: self.manager.settle(5))
        return result

    def _launch_cold(self, policy: Policy, argv: list[str], backend: Backend,
                     user: str, launch: _Launch) -> ZoneRun:
        driver = self.manager.drivers.get(backend)
        if driver is None:
            raise InvokeError(f"this invoker has no {backend} driver",
                              hint="use another --backend")
        if backend is Backend.LIBVIRT:
            pooled = cast(PooledDriver, driver)

            def create(spec: ZoneSpec, initial: Restrictions) -> ZoneHandle[Any]:
                handle = driver.create(spec, initial)
                try:
                    # the same empty, private working directory a warm guest gives
                    pooled.scrub(spec.zone_id, guest_user(user) or user, SCRATCH)
                except HvtsmError:
                    driver.terminate(handle)
                    raise
                return handle

            return self.manager.launch(policy, argv, backend=backend, cwd=SCRATCH,
                                       create=create, **launch)
        # the zone's own /tmp: empty, private, writable, and gone with the zone
        return self.manager.launch(policy, argv, backend=backend, cwd="/tmp", **launch)

    def _python(self, backend: Backend) -> str | None:
        driver = self.manager.drivers.get(backend)
        guest_python = getattr(driver, "guest_python", None)
        return guest_python() if guest_python is not None else None

    def _spool_dir(self) -> Path:
        # the guest's QEMU user reads it over 9p, the workload's user in the guest too; the
        # spool itself is enterable, not listable: no zone learns another request's name
        for d in reversed([d for d in (self.spool, *self.spool.parents) if not d.exists()]):
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o755)
            d.chmod(0o755)
        guarded(self.spool)
        path = self.spool / ("r" + secrets.token_hex(16))
        path.mkdir(mode=0o755)
        path.chmod(0o755)
        return path

    def _anomalies(self, zone_id: str) -> list[dict[str, Any]]:
        with self.store.session() as session:
            rows = session.exec(select(Anomaly).where(Anomaly.zone_id == zone_id)
                                .order_by(col(Anomaly.id))).all()
        out = []
        for a in rows:
            try:
                evidence = json.loads(a.evidence)
            except ValueError:
                evidence = {}
            out.append({"kind": a.kind, "detail": a.detail, "source": a.source,
                        "evidence": evidence, "ts": a.ts})
        return out


class _Readers:
    """Both output streams read to their end, at most MAX_OUTPUT bytes of each kept."""

    def __init__(self, run: ZoneRun) -> None:
        assert run.workload is not None
        self.data: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.truncated: dict[str, int] = {"stdout": 0, "stderr": 0}
        self.threads = []
        for name, pipe in (("stdout", run.workload.stdout), ("stderr", run.workload.stderr)):
            if pipe is None:
                continue
            t = threading.Thread(target=self._read, args=(name, pipe), daemon=True,
                                 name=f"invoke-{name}-{run.zone_id}")
            t.start()
            self.threads.append(t)

    def _read(self, name: str, pipe: IO[bytes]) -> None:
        kept = bytearray()
        with contextlib.suppress(OSError, ValueError):
            while chunk := pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536):
                room = MAX_OUTPUT - len(kept)
                kept += chunk[:max(0, room)]
                self.truncated[name] += max(0, len(chunk) - max(0, room))
        with contextlib.suppress(OSError):
            pipe.close()
        self.data[name] = bytes(kept)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _load(ref: str | None) -> Policy:
    if ref is None:
        return load_policy(default_policy_path())
    return load_policy(resolve(ref))


def _check_user(user: str) -> None:
    if user == ZONE_USER:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise InvokeError(f"no such user: {user}") from None
    if entry.pw_uid == 0:
        # a guest cannot be scrubbed of root's leftovers, and code is run untrusted
        raise InvokeError("hvtsm invoke does not run code as root",
                          hint="use an unprivileged user (default: zone, an identity of its own)")


def _ms(t0: float) -> float:
    return (time.monotonic() - t0) * 1000


__all__ = ["InvokeRequest", "InvokeResult", "Invoker"]
