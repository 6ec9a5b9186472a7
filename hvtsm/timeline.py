"""The timeline: one APScheduler job per pending phase transition, per zone.

Each controller keeps its jobs in its own table of the store (`hvtsm_jobs_<controller>`),
so several controllers can share one database without running each other's jobs; a
controller that adopts the zones of a dead one moves that table's jobs into its own.

Jobs never expire: misfire_grace_time=None makes a transition that fell due while no
controller ran fire at once on the next start instead of being dropped (APScheduler's
default grace of 1 s would drop it: fail closed, never open).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.engine import Engine

from hvtsm.errors import TimelineError

log = logging.getLogger(__name__)

#: (zone_id, phase_index, due epoch seconds) -> None; set by the controller at start
PhaseHandler = Callable[[str, int, float], None]

_handler_lock = threading.Lock()
_handler: PhaseHandler | None = None


def phase_due(zone_id: str, phase_index: int, due: float) -> None:
    """The job function. Module level and id-only, because the job store pickles it."""
    with _handler_lock:
        handler = _handler
    if handler is None:
        log.error("phase %d of zone %s fell due with no controller attached", phase_index,
                  zone_id)
        return
    handler(zone_id, phase_index, due)


def job_id(zone_id: str, phase_index: int) -> str:
    return f"{zone_id}:{phase_index}"


def jobs_table_name(controller_id: str) -> str:
    return f"hvtsm_jobs_{controller_id}"


class Timeline:
    def __init__(self, engine: Engine, controller_id: str, *, workers: int = 16) -> None:
        self.engine = engine
        self.table = jobs_table_name(controller_id)
        self.scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=engine, tablename=self.table)},
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            job_defaults={"misfire_grace_time": None, "coalesce": False, "max_instances": 1},
            timezone=UTC,
        )

    def start(self, handler: PhaseHandler, *, adopt_tables: list[str] = (),  # type: ignore[assignment]
              keep: Callable[[str], bool] = lambda _job: True) -> int:
        """Start firing jobs; first move the jobs of `adopt_tables` (dead controllers') into
        this controller's table, those `keep` (a job id) says are still pending (a phase
        the zone's agent applied meanwhile, or of a zone that ended, is dropped). Returns how
        many jobs were adopted."""
        global _handler
        with _handler_lock:
            _handler = handler
        self.scheduler.start(paused=True)
        adopted = 0
        for table in adopt_tables:
            if table == self.table or not inspect(self.engine).has_table(table):
                continue
            alias = f"adopt_{table}"
            self.scheduler.add_jobstore(SQLAlchemyJobStore(engine=self.engine, tablename=table),
                                        alias=alias)
            for job in self.scheduler.get_jobs(jobstore=alias):
                if keep(job.id):
                    self.scheduler.add_job(phase_due, trigger=job.trigger, args=job.args,
                                           id=job.id, replace_existing=True,
                                           jobstore="default")
                    adopted += 1
                self.scheduler.remove_job(job.id, jobstore=alias)
            self.scheduler.remove_jobstore(alias)
            drop_table(self.engine, table)
        self.scheduler.resume()
        return adopted

    def shutdown(self, *, drop: bool) -> None:
        """Stop firing. With drop (a clean exit: every zone ended, its jobs cancelled), remove
        this controller's table; a controller that crashed keeps it for the next to adopt."""
        global _handler
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        with _handler_lock:
            _handler = None
        if drop:
            drop_table(self.engine, self.table)

    def schedule(self, zone_id: str, phase_index: int, due: float) -> None:
        self.scheduler.add_job(
            phase_due,
            trigger=DateTrigger(run_date=datetime.fromtimestamp(due, tz=UTC)),
            args=[zone_id, phase_index, due],
            id=job_id(zone_id, phase_index),
            replace_existing=True,
        )

    def move(self, zone_id: str, phase_index: int, due: float) -> None:
        """Make a pending transition fire at `due` instead."""
        try:
            self.scheduler.modify_job(job_id(zone_id, phase_index),
                                      args=[zone_id, phase_index, due])
            self.scheduler.reschedule_job(job_id(zone_id, phase_index),
                                          trigger=DateTrigger(run_date=datetime.fromtimestamp(
                                              due, tz=UTC)))
        except JobLookupError:
            # it fired in the meantime: nothing left to move
            log.debug("job %s already ran", job_id(zone_id, phase_index))

    def cancel(self, zone_id: str, phase_indexes: list[int]) -> None:
        for index in phase_indexes:
            with contextlib.suppress(JobLookupError):
                self.scheduler.remove_job(job_id(zone_id, index))

    def pending(self) -> dict[str, float]:
        """job id -> next run epoch, for diagnostics and tests."""
        return {job.id: job.next_run_time.timestamp() for job in self.scheduler.get_jobs()
                if job.next_run_time is not None}


def drop_table(engine: Engine, table: str) -> None:
    if not table.startswith("hvtsm_jobs_"):
        raise TimelineError(f"refusing to drop {table!r}: not a timeline table")
    meta = MetaData()
    if inspect(engine).has_table(table):
        Table(table, meta, autoload_with=engine).drop(engine, checkfirst=True)
