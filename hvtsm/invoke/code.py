"""The code store: program code kept by content (sha256), so a request can name code by id
instead of sending it again. The analysis decides the language when code is stored."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from sqlmodel import col, select

from hvtsm.analysis import Report, analyze
from hvtsm.errors import AnalysisError, InvokeError
from hvtsm.limits import MAX_CODE_BYTES
from hvtsm.store import Store
from hvtsm.store.invoke_models import StoredCode

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_SUFFIX = {"python": ".py", "shell": ".sh", "elf": ""}


def code_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_name(name: str | None, language: str | None = None) -> str:
    """A file name the code can be written under (no directories, no oddities)."""
    base = _SAFE_NAME.sub("_", os.path.basename(name or "")).lstrip(".")[:64]
    if not base:
        base = "program" + _SUFFIX.get(language or "", "")
    return base


def analyze_bytes(data: bytes, name: str) -> Report:
    """The analysis of `data` as if it were the file `name` (its suffix counts)."""
    with tempfile.TemporaryDirectory(prefix="hvtsm-code-") as tmp:
        path = Path(tmp) / safe_name(name)
        path.write_bytes(data)
        try:
            return analyze(path)
        except AnalysisError as exc:  # the user's name, not the temporary copy's
            raise AnalysisError(exc.detail, file=name, line=exc.line, hint=exc.hint) from None


def put_code(store: Store, data: bytes, name: str | None = None) -> tuple[StoredCode, Report]:
    """Store `data` (once: the same bytes keep their first name); returns the row and the
    analysis. AnalysisError for code hvtsm cannot read (nothing is stored then)."""
    if len(data) > MAX_CODE_BYTES:
        raise InvokeError(f"program code of {len(data)} bytes is larger than the "
                          f"{MAX_CODE_BYTES} bytes hvtsm invoke takes")
    report = analyze_bytes(data, name or "program")
    cid = code_id(data)
    with store.session() as session:
        row = session.get(StoredCode, cid)
        if row is None:
            row = StoredCode(id=cid, name=safe_name(name, report.language),
                             language=report.language, size=len(data), stored_at=time.time(),
                             data=data)
            session.add(row)
    return row, report


def get_code(store: Store, ident: str) -> StoredCode:
    """Stored code by id or by a unique prefix of at least 8 hex digits."""
    ident = ident.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", ident):
        raise InvokeError(f"{ident!r} is not a code id",
                          hint="a code id is the sha256 `hvtsm invoke PATH` printed "
                          "(a unique prefix of 8 or more hex digits works)")
    with store.session() as session:
        rows = session.exec(select(StoredCode).where(
            col(StoredCode.id).startswith(ident)).limit(2)).all()
    if not rows:
        raise InvokeError(f"no stored code {ident} in {store.safe_url}",
                          hint="store it first: hvtsm invoke PATH")
    if len(rows) > 1:
        raise InvokeError(f"code id prefix {ident} is ambiguous", hint="give more digits")
    return rows[0]
