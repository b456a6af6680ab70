"""Fault injection for the interruption tests: a real process death, or a full disk, once, at a
named point of a writer.

HAAGENTI_CHAOS="POINT:/path/marker" kills the process (SIGKILL) the first time it reaches POINT;
HAAGENTI_CHAOS="POINT=enospc:/path/marker" raises the OSError a full disk raises there instead;
HAAGENTI_CHAOS="POINT=stop:/path/marker" stops the whole process (SIGSTOP) until a SIGCONT, as a
machine that stalls does; HAAGENTI_CHAOS="POINT=interrupt:/path/marker" sends it a SIGINT, as
Ctrl-C does.
The marker file records that it happened, so a retry (Ray's, or the test's re-run) goes through.
Points: the pipeline's `encode` and `after-fragments`; each table append's `write-TABLE` (data
file half written), `commit-TABLE` (data file written, not committed) and `committed-TABLE`;
each delete's `deleted-TABLE` (gc: one table's delete committed, the next not yet made);
`published` (the models commit made, its publication record not yet written); `create-marker`
(a new library's tables made, its haagenti.json not yet written).
"""
from __future__ import annotations

import errno
import os
import signal


def maybe_die(point: str) -> None:
    spec = os.environ.get("HAAGENTI_CHAOS", "")
    head, _, marker = spec.partition(":")
    where, _, action = head.partition("=")
    if where != point or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"injected at {point}")
    os.kill(os.getpid(), {"stop": signal.SIGSTOP, "interrupt": signal.SIGINT}.get(action, signal.SIGKILL))
