"""A zone's lifecycle, from its row to its outcome. One module per step:

    manager.py     the facade callers hold (CLI, pipelines, the invoker)
    core.py        what the parts share: store, zones, drivers, timeline, broker, notices
    zonerun.py     a zone driven here (ZoneRun) and the registry of them
    launch.py      a launch: monitoring profile, channel endpoint, create + start
    opening.py     the one path a zone comes to be by (launch and transient split)
    phases.py      a due phase becomes an applied restriction (fail closed)
    inbox.py       what drivers report, worked off in order on one supervised thread
    reactions.py   an anomaly becomes a reaction; the steering verbs; failing closed
    transient.py   transient zones at run time (split, follow the parent, attribute)
    ending.py      ended or exited: one outcome, recorded and announced
    outcome.py     who ended a zone, hostile or not (pure)
    adoption.py    taking over the zones of dead controllers
    notices.py     the typed notices every watcher consumes
"""

from hvtsm.lifecycle.manager import Manager
from hvtsm.lifecycle.notices import Notice
from hvtsm.lifecycle.outcome import EndCause, Outcome
from hvtsm.lifecycle.zonerun import ZoneKind, ZoneRun

__all__ = ["EndCause", "Manager", "Notice", "Outcome", "ZoneKind", "ZoneRun"]
