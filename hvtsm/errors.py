"""The one error hierarchy of hvtsm.

Every error carries what the user must know to act; only the CLI turns them into
messages and exit codes.
"""

from __future__ import annotations


class HvtsmError(Exception):
    """Base of every error hvtsm raises on purpose."""

    #: a short hint of what to do next, printed under the message by the CLI
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class PolicyError(HvtsmError):
    """A policy file that cannot be used, located down to file, phase and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        phase: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.phase = phase
        self.field = field
        self.detail = message
        super().__init__(self._render(), hint=hint)

    def _render(self) -> str:
        where: list[str] = []
        if self.file:
            where.append(self.file)
        if self.phase is not None:
            where.append(f"phase {self.phase}")
        if self.field:
            where.append(f"field '{self.field}'")
        return ": ".join([*where, self.detail]) if where else self.detail


class ZoneError(HvtsmError):
    """A zone could not be made, changed or ended."""

    def __init__(self, message: str, *, zone_id: str | None = None, hint: str | None = None):
        self.zone_id = zone_id
        super().__init__(f"zone {zone_id}: {message}" if zone_id else message, hint=hint)


class HostError(HvtsmError):
    """The host lacks something hvtsm needs (root, cgroups, a tool)."""


class StoreError(HvtsmError):
    """The audit store cannot be opened or written."""


class TimelineError(HvtsmError):
    """The phase scheduler refused an operation."""


class TemplateError(HvtsmError):
    """A domain template (or the values to fill it) that cannot be used, named by file."""

    def __init__(self, message: str, *, file: str | None = None, hint: str | None = None):
        self.file = file
        self.detail = message
        super().__init__(f"{file}: {message}" if file else message, hint=hint)


class AnalysisError(HvtsmError):
    """Program code that cannot be analyzed, named by file (and line when the parser knows it)."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.detail = message
        super().__init__(self._render(), hint=hint)

    def _render(self) -> str:
        where = self.file or ""
        if where and self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.detail}" if where else self.detail


class PipelineError(HvtsmError):
    """A pipeline manifest that cannot be used, or a pipeline that cannot run, named by file
    and field."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 hint: str | None = None) -> None:
        self.file = file
        self.field = field
        self.detail = message
        where = ", ".join(w for w in (file, field) if w)
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
