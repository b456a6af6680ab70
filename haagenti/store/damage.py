"""Reading a damaged library fails with one line naming what is damaged, never a traceback.

A truncated Parquet file, a corrupt page header or a cut Delta log entry surface from pyarrow
and delta-rs as OSError, ArrowInvalid or DeltaError with messages that name neither the
library nor the file; read paths run under `damaged(where)` to say both."""
from __future__ import annotations

import contextlib
import json
from typing import Iterator

import pyarrow as pa
from deltalake.exceptions import DeltaError

from haagenti.errors import DamagedError, HaagentiError

UNREADABLE = (OSError, pa.ArrowException, DeltaError)


@contextlib.contextmanager
def damaged(where: str) -> Iterator[None]:
    """Turn a read failure inside the block into DamagedError("<where> is damaged: ...")."""
    try:
        yield
    except HaagentiError:
        raise
    except UNREADABLE as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DamagedError(f"{where} is damaged or unreadable ({type(e).__name__}: {first[:300]})") from None


def log_problems(fs, table_root: str, where: str) -> list[str]:
    """Delta log entries of one table that are not the JSON lines a commit writes. delta-rs
    reads an empty entry as a commit with no actions, so a damaged entry can silently drop the
    rows it added: only `verify` reads the log itself to say so."""
    out = []
    paths = fs.glob(f"{table_root}/_delta_log/*.json")
    # One call for all entries: an object store's filesystem fetches them concurrently (one at
    # a time, a log of a thousand commits cost a thousand round trips per verify or gc).
    bodies = fs.cat(sorted(paths), on_error="return") if paths else {}
    for path, body in sorted(bodies.items()):
        if isinstance(body, Exception):
            raise body
        name = path.rsplit("/", 1)[-1]
        try:
            lines = [line for line in body.decode("utf-8").splitlines() if line.strip()]
            ok = bool(lines) and all(isinstance(json.loads(line), dict) for line in lines)
        except (UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            out.append(f"{where}: log entry {name} is damaged (not the JSON lines of a commit)")
    return out
