"""Named points on a writer's path where an interruption leaves partial state on disk: the
places the interruption tests stop a process at, to check that nothing committed is lost.

Production code marks a point with `reached(point)`; nothing happens there unless an observer
was added. The fault injector (`haagenti.testing.faults`) is the only observer: it is loaded
the first time a point is reached with HAAGENTI_CHAOS set, so that the processes a test starts
(CLI runs, Ray workers, which receive the variable) and the test's own process carry it.

Points: the pipeline's `encode` and `after-fragments`; each table append's `write-TABLE` (data
file half written), `commit-TABLE` (data file written, not committed) and `committed-TABLE`;
each delete's `deleted-TABLE` (gc: one table's delete committed, the next not yet made);
`published` (the models commit made, its publication record not yet written); `create-marker`
(a new library's tables made, its haagenti.json not yet written); `restore-moved` (a restore's
first file moved into place); `upgraded-models` (an upgrade's models commit made).
"""
from __future__ import annotations

import os
from typing import Callable

_observers: list[Callable[[str], None]] = []


def add_observer(observe: Callable[[str], None]) -> None:
    _observers.append(observe)


def reached(point: str) -> None:
    if not _observers and os.environ.get("HAAGENTI_CHAOS"):
        from haagenti.testing.faults import inject

        add_observer(inject)
    for observe in _observers:
        observe(point)
