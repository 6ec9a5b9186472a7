"""Misbehaves: a fork loop (bounded, so a monitor that fails does not hang the test)."""

from __future__ import annotations

import os
import time

from _common import act, behave, survived

behave()
act("fork_loop")
children = []
for _ in range(3000):
    try:
        pid = os.fork()
    except OSError:
        time.sleep(0.001)
        continue
    if pid == 0:
        time.sleep(30)  # a bomb's processes stay: they pile up
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
survived("fork_loop")
