"""A real, throwaway PostgreSQL server for the test session (a pytest plugin).

Enable it once, in the top-level ``tests/conftest.py`` (pytest refuses
``pytest_plugins`` in a non-root conftest or in a test module)::

    pytest_plugins = ["tests.pg_fixture"]

Fixtures:

- ``pg_url`` (session): a SQLAlchemy URL
  ``postgresql+psycopg://USER@127.0.0.1:PORT/hvtsm_test`` of a server started for
  this session from the host's PostgreSQL binaries (``initdb``/``pg_ctl``/``postgres``
  on PATH, else the newest ``/usr/lib/postgresql/*/bin``, or ``$HVTSM_PG_BINDIR``).
  The cluster lives in a temporary directory, listens on 127.0.0.1 on a free port
  and on a unix socket in that directory, trusts every local login, runs with
  ``fsync=off``, and is stopped (``pg_ctl stop -m immediate``) and removed at the
  end of the session.
- ``pg_empty_url`` (function): a URL of a fresh, empty database ``hvtsm_t_<n>`` on
  the same server, so a test never sees another test's tables. It is dropped after
  the test.

initdb refuses to run as root, so as root the cluster is owned by the ``postgres``
user (or ``nobody``) and the server commands run through ``runuser -u USER --``.

No PostgreSQL binaries: the tests that use these fixtures are skipped, except when
the ``CI`` environment variable is set, where they fail: CI must install PostgreSQL
(``scripts/install-host.sh --dev`` does).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

TEST_DB = "hvtsm_test"
START_TIMEOUT_S = 30
_BINARIES = ("initdb", "pg_ctl", "postgres")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> NoReturn:
    """Skip outside CI; fail loudly in CI, where PostgreSQL must be installed."""
    if _in_ci():
        pytest.fail(f"{reason} (CI is set: PostgreSQL must be installed there, "
                    "see scripts/install-host.sh --dev)", pytrace=False)
    pytest.skip(reason)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.parent.name)) or (0,)


def find_pg_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates: list[Path] = []
    if os.environ.get("HVTSM_PG_BINDIR"):
        candidates.append(Path(os.environ["HVTSM_PG_BINDIR"]))
    on_path = shutil.which("initdb")
    if on_path:
        # /usr/local/bin/initdb may be a symlink into /usr/lib/postgresql/N/bin:
        # take its real directory so that all three binaries are of one version.
        candidates.append(Path(os.path.realpath(on_path)).parent)
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key)
    candidates.extend(p.parent for p in reversed(debian))
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _BINARIES):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bindir: Path
    workdir: Path
    user: str
    port: int = 0

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def sockdir(self) -> Path:
        return self.workdir / "sock"

    @property
    def logfile(self) -> Path:
        return self.workdir / "postgres.log"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        proc = subprocess.run(cmd, cwd=self.workdir, env=env, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                               f"{proc.stdout}{proc.stderr}{self._log_tail()}")
        return proc

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- postgres.log ---\n" + "\n".join(text)

    def init(self) -> None:
        self.sockdir.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.user)
            for path in (self.workdir, self.sockdir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync", "-U", self.user)

    def start(self) -> None:
        # A free port can be taken between the probe and the bind: retry a few times.
        for attempt in range(3):
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                    f"-c unix_socket_directories='{self.sockdir}' -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off")
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                          "-l", str(self.logfile), "-o", opts, "-w",
                          "-t", str(START_TIMEOUT_S), "start",
                          timeout=START_TIMEOUT_S + 10)
                break
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL on port {self.port} does not accept "
                                       f"connections: {exc}{self._log_tail()}") from exc
                time.sleep(0.1)

    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def stop(self) -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                      "-m", "immediate", "-w", "-t", "20", "stop", timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._kill_postmaster()

    def _kill_postmaster(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)


def _cluster_user() -> str:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@pytest.fixture(scope="session")
def _pg_server() -> Iterator[PgServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg (v3) is not installed: pip install -e '.[dev]'")
    bindir = find_pg_bindir()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or "
                     "under /usr/lib/postgresql/*/bin: apt-get install postgresql")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _unavailable("running as root but runuser(1) is missing")

    workdir = Path(tempfile.mkdtemp(prefix="hvtsm-pg-"))
    server = PgServer(bindir=bindir, workdir=workdir, user=_cluster_user())
    try:
        server.init()
        server.start()
        server.admin(f"CREATE DATABASE {TEST_DB}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(_pg_server: PgServer) -> str:
    """SQLAlchemy URL of the session's ``hvtsm_test`` database (shared by all tests)."""
    return _pg_server.url(TEST_DB)


_db_numbers = itertools.count(1)


@pytest.fixture
def pg_empty_url(_pg_server: PgServer) -> Iterator[str]:
    """SQLAlchemy URL of a new empty database, private to one test."""
    name = f"hvtsm_t_{next(_db_numbers)}"
    _pg_server.admin(f"CREATE DATABASE {name}")
    yield _pg_server.url(name)
    # FORCE ends connections a test left open (an engine not disposed, say).
    with contextlib.suppress(Exception):
        _pg_server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
