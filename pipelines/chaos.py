"""Fault injection for the fault-tolerance tests: a real process death, once, at a named point.

HAAGENTI_CHAOS="encode:/path/marker" kills the worker running the encode step the first time
(the marker file records it), so Ray's retry must produce the same output as an undisturbed run.
"""
from __future__ import annotations

import os
import signal


def maybe_die(point: str) -> None:
    spec = os.environ.get("HAAGENTI_CHAOS", "")
    if not spec.startswith(point + ":"):
        return
    marker = spec.split(":", 1)[1]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
