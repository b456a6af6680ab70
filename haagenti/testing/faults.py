"""Fault injection for the interruption tests: a real process death, a full disk, a stall or a
Ctrl-C, once, at a named checkpoint (haagenti.checkpoints) of a writer.

HAAGENTI_CHAOS="POINT:/path/marker" kills the process (SIGKILL) the first time it reaches POINT;
HAAGENTI_CHAOS="POINT=enospc:/path/marker" raises the OSError a full disk raises there instead;
HAAGENTI_CHAOS="POINT=stop:/path/marker" stops the whole process (SIGSTOP) until a SIGCONT, as a
machine that stalls does; HAAGENTI_CHAOS="POINT=interrupt:/path/marker" sends it a SIGINT, as
Ctrl-C does. The marker file records that it happened, so a retry (Ray's, or the test's re-run)
goes through. The variable is read at each point, so a test may set and clear it in-process.
"""
from __future__ import annotations

import errno
import os
import signal


def inject(point: str) -> None:
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
