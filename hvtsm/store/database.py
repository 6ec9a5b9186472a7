"""Opening the store: one SQLAlchemy engine shared by the audit trail and the timeline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine

from hvtsm.errors import StoreError
from hvtsm.store import (
    invoke_models,  # noqa: F401  (code, warm pool)
    models,  # noqa: F401  (registers the tables)
)


def default_db_url() -> str:
    """$HVTSM_DB, else /var/lib/hvtsm for root, else the user's XDG state directory."""
    if url := os.environ.get("HVTSM_DB"):
        return url
    if os.geteuid() == 0:
        base = Path("/var/lib/hvtsm")
    else:
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        base = Path(state) / "hvtsm"
    return f"sqlite:///{base / 'hvtsm.db'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets several controllers and `hvtsm zones` read while one writes; NORMAL keeps
    # commits off fsync's critical path, which phase lag would otherwise feel.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # many controllers at once on a busy host (each imports, starts an agent, writes its
    # start) hold the write lock in turn: waiting is right, failing a run is not
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def _private_file(path: Path) -> None:
    """The store's file (and SQLite's -wal and -shm beside it, which take the file's mode)
    readable by its owner alone: it holds every zone's audit trail and commands, and a
    zone must not read it whatever the zone's user. hvtsm's own directory is not
    listable either."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent == Path("/var/lib/hvtsm"):
            path.parent.chmod(0o711)  # agent_stage.guarded opens it to QEMU's group
    if path.exists() and not path.is_file():
        raise OSError(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    os.close(fd)
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = file.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & 0o077:
            file.chmod(mode & 0o700)


class Store:
    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_db_url()
        try:
            if self.url.startswith("sqlite:///"):
                path = Path(self.url.removeprefix("sqlite:///"))
                if str(path) not in ("", ":memory:"):
                    _private_file(path)
            self.engine: Engine = create_engine(self.url)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            SQLModel.metadata.create_all(self.engine)
            _add_new_columns(self.engine)
        except (SQLAlchemyError, OSError, ImportError) as exc:
            raise StoreError(
                f"cannot open the store {self.safe_url}: {exc}",
                hint="pass a working SQLAlchemy URL with --db (or set HVTSM_DB)",
            ) from None

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                yield session
                session.commit()
        except SQLAlchemyError as exc:
            raise StoreError(f"store {self.safe_url}: {exc}") from exc

    def dispose(self) -> None:
        self.engine.dispose()


def _add_new_columns(engine: Engine) -> None:
    """create_all makes missing tables but never alters old ones: columns added to a model
    since a store was made are added here (nullable or with their default)."""
    inspector = inspect(engine)
    for table in SQLModel.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            default = getattr(column.default, "arg", None)
            clause = f" DEFAULT '{default}'" if isinstance(default, str) else ""
            with engine.begin() as conn:
                conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN '
                                  f'"{column.name}" {kind}{clause}'))
