"""Leases: which writers are at work on a library, so that concurrent writers never undo each
other's work (docs/format.md, "Many writers").

A lease is a small JSON file `<library>/_leases/<writer>.json`, one per running writer (an
ingest, a pipeline run, an rm, a gc), written whole by that writer alone (a PUT on object
storage, a rename of a finished file locally) and refreshed by a heartbeat thread. It is void
once its `expires` time has passed, or at once on its own host when its process is gone, so a
writer killed with -9 holds nothing for long. There is no lock service, no rename on object
storage and no conditional write: only whole-file writes and listings, which S3, GCS, Azure and
a local disk all make consistent.

Who proceeds is decided as in Lamport's bakery algorithm, with files as the shared registers:
a writer writes its lease marked `choosing`, lists the leases, takes a ticket one above every
ticket it saw, rewrites its lease with it, then lists again, waits until no conflicting lease
is still choosing, and proceeds only if no conflicting live lease holds an earlier
(ticket, writer). Whatever the timing, of two conflicting writers at least one sees the other
with its final ticket, and both order the pair the same way, so they never both proceed.
Conflicts: a gc conflicts with every other writer; an ingest or rm with a gc and with any
ingest or rm naming one of its model ids. Writers of different models never wait on each other.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

from haagenti.errors import LibraryError

LEASE_DIR = "_leases"
CHOOSING_SECONDS = 5.0  # beyond its `wait`, how long a writer waits for another to finish choosing its ticket
POLL_SECONDS = 0.25  # between listings while waiting behind another writer (a choosing one: a tenth of it)
HOST = socket.gethostname()


def lease_seconds() -> float:
    """How long a lease lives without a refresh (HAAGENTI_LEASE_SECONDS, default 5 minutes).
    Hosts' clocks must agree to within a fifth of it: a writer stops committing once its last
    refresh is older than 4/5 of it."""
    return float(os.environ.get("HAAGENTI_LEASE_SECONDS", "300"))


class LeaseConflict(LibraryError):
    """Another writer holds the part of the library this one needs; nothing was written."""


class LeaseLost(LibraryError):
    """This writer's lease could not be refreshed in time; it must not commit anything more."""


@dataclass(frozen=True)
class Lease:
    kind: str  # ingest | rm | gc
    writer: str  # uuid hex; an ingest's manifests and models rows carry it as their ingest_id
    host: str
    pid: int
    created: float  # epoch seconds
    expires: float
    model_ids: list[str] = field(default_factory=list)
    ticket: int = 0
    choosing: bool = True

    def conflicts(self, other: "Lease") -> bool:
        if other.writer == self.writer:
            return False
        return "gc" in (self.kind, other.kind) or not set(self.model_ids).isdisjoint(other.model_ids)

    def covers(self, kind: str, model_ids: list[str]) -> bool:
        """Whether work of `kind` on `model_ids` may run under this lease (a gc's covers all;
        an ingest's covers an rm of its own ids: a pipeline replacing models)."""
        if self.kind == "gc":
            return True
        return kind != "gc" and (kind == self.kind or kind == "rm") and set(model_ids) <= set(self.model_ids)

    def void(self, now: float) -> bool:
        return self.expires < now or (self.host == HOST and not _alive(self.pid))

    @property
    def order(self) -> tuple[int, str]:
        return (self.ticket, self.writer)

    def describe(self) -> str:
        ids = f" of {', '.join(self.model_ids[:3])}{', ...' if len(self.model_ids) > 3 else ''}" if self.model_ids and self.kind != "gc" else ""
        since = time.strftime("%H:%M:%S", time.gmtime(self.created))
        return f"{self.kind}{ids} by {self.host} pid {self.pid} since {since} UTC"


def _checked(lease: Lease) -> Lease:
    """A lease read from a file, its fields of the types a writer writes (TypeError if not: the
    file is not a lease, and a ticket "7" must not break the ordering of every writer)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    ok = (
        all(isinstance(v, str) for v in (lease.kind, lease.writer, lease.host))
        and all(isinstance(v, int) and not isinstance(v, bool) for v in (lease.pid, lease.ticket))
        and number(lease.created) and number(lease.expires) and isinstance(lease.choosing, bool)
        and isinstance(lease.model_ids, list) and all(isinstance(m, str) for m in lease.model_ids)
    )
    if not ok:
        raise TypeError("not a lease")
    return lease


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Leases:
    """The leases of one library (`root` on filesystem `fs`)."""

    def __init__(self, fs, root: str, local: bool):
        self.fs, self.dir, self.local = fs, posixpath.join(root, LEASE_DIR), local

    def _path(self, lease: Lease) -> str:
        return posixpath.join(self.dir, f"{lease.writer}.json")

    def write(self, lease: Lease) -> None:
        data = json.dumps(asdict(lease)).encode()
        path = self._path(lease)
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: readers see the old lease or the new one
            return
        os.makedirs(self.dir, exist_ok=True)
        tmp = posixpath.join(self.dir, f".{lease.writer}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def remove(self, lease: Lease) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(lease))

    def _listing(self) -> list[tuple[str, Lease | None]]:
        """(path, lease or None when the file is not a lease) of every file listed, uncached."""
        self.fs.invalidate_cache(self.dir)
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in names:
            if posixpath.basename(p).startswith("."):
                continue  # a local lease being written
            try:
                out.append((p, _checked(Lease(**json.loads(self.fs.cat_file(p))))))
            except FileNotFoundError:
                continue  # released while we listed
            except (ValueError, TypeError):
                out.append((p, None))  # not a lease: nobody holds it
        return out

    def all(self) -> list[Lease]:
        """Every lease file, void or live."""
        return [lease for _, lease in self._listing() if lease is not None]

    def live(self) -> list[Lease]:
        now = time.time()
        return [lease for lease in self.all() if not lease.void(now)]

    def clear_void(self) -> int:
        """Remove void leases and files that are not leases (gc does this under its own lease)."""
        now = time.time()
        stale = [p for p, lease in self._listing() if lease is None or lease.void(now)]
        for p in stale:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(p)
        return len(stale)

    def acquire(self, kind: str, model_ids: list[str] = (), wait: float = 0.0) -> "HeldLease":
        """Take a lease, waiting up to `wait` seconds for a gc (or, for a gc, any writer) ahead of
        it; an ingest or rm of a model id another writer holds is refused at once. Raises
        LeaseConflict (one line, nothing written) when it cannot proceed."""
        ttl = lease_seconds()
        now = time.time()
        held = HeldLease(self, Lease(kind, uuid.uuid4().hex, HOST, os.getpid(), now, now + ttl, sorted(set(model_ids))), ttl)
        try:
            held.update(ticket=1 + max((lease.ticket for lease in self.live()), default=0), choosing=False)
            began = time.monotonic()
            deadline = began + wait
            while True:
                mine = held.lease
                others = [lease for lease in self.live() if mine.conflicts(lease)]
                choosing = [lease for lease in others if lease.choosing]
                if choosing:  # milliseconds for a running writer; one stalled there is waited on no longer than `wait` allows
                    waits = any("gc" in (kind, lease.kind) for lease in choosing)  # a writer of the same ids is refused at once
                    if time.monotonic() >= (deadline if waits else began) + CHOOSING_SECONDS:
                        raise LeaseConflict(_refusal(mine, choosing[0], wait))
                    time.sleep(POLL_SECONDS / 10)
                    continue
                ahead = sorted((lease for lease in others if lease.order < mine.order), key=lambda lease: lease.order)
                if not ahead:
                    return held
                same_id = [lease for lease in ahead if "gc" not in (kind, lease.kind)]
                if same_id or time.monotonic() >= deadline:
                    raise LeaseConflict(_refusal(mine, (same_id or ahead)[0], wait))
                time.sleep(POLL_SECONDS)
        except BaseException:
            held.release()
            raise


def _refusal(mine: Lease, first: Lease, wait: float) -> str:
    if mine.kind != "gc" and first.kind != "gc":
        shared = sorted(set(mine.model_ids) & set(first.model_ids))
        doing = "ingested" if first.kind == "ingest" else "removed"
        return f"model {shared[0]!r} is being {doing} by another writer ({first.describe()}); nothing was written"
    waited = f" after waiting {wait:g}s" if wait else ""
    if mine.kind == "gc":
        return f"gc refused{waited}: the library is in use ({first.describe()}); gc runs when no other writer does (retry later, or pass --wait SECONDS)"
    return f"a gc holds the library ({first.describe()}){waited}; nothing was written (retry when it ends)"


class HeldLease:
    """A lease this process holds: refreshed every fifth of its life by a heartbeat thread until
    released. `check()` before every commit: a writer whose lease may have been seen void by
    another host (no refresh for 4/5 of its life) must stop, since a gc may have started."""

    def __init__(self, leases: Leases, lease: Lease, ttl: float):
        self.leases, self.lease, self.ttl = leases, lease, ttl
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refreshed = time.monotonic()
        leases.write(lease)
        self._thread = threading.Thread(target=self._beat, name=f"haagenti-lease-{lease.writer[:8]}", daemon=True)
        self._thread.start()

    @property
    def writer(self) -> str:
        return self.lease.writer

    def update(self, **changes) -> None:
        with self._lock:
            self.check()  # a lapsed lease is never renewed: another host may have seen it void
            started = time.monotonic()
            lease = replace(self.lease, expires=time.time() + self.ttl, **changes)
            self.leases.write(lease)
            self.lease, self._refreshed = lease, started

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            try:
                self.update()
            except LeaseLost:
                return  # the writer stops at its next check()
            except Exception:
                continue  # a refresh that failed (a network error): the next one may succeed

    def check(self) -> None:
        """Raise LeaseLost once the last refresh is older than 4/5 of the lease's life (a
        process stopped, a store unreachable): from then on it stays lost."""
        age = time.monotonic() - self._refreshed
        if age > self.ttl * 0.8:
            raise LeaseLost(f"this writer's lease was last refreshed {age:.0f}s ago (its life is {self.ttl:g}s); stopping before the next commit, nothing more is written")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.leases.remove(self.lease)


@contextlib.contextmanager
def writing(store, kind: str, model_ids: list[str] = (), wait: float = 0.0) -> Iterator[HeldLease]:
    """Hold a lease on `store`'s library for the block; the store checks it before each commit.
    Inside a block already holding a lease that covers the work, runs under that lease."""
    held = store.lease
    if held is not None:
        if not held.lease.covers(kind, list(model_ids)):
            raise LibraryError(f"a {kind} cannot run inside this process's {held.lease.kind} of {held.lease.model_ids}")
        yield held
        return
    held = store.leases.acquire(kind, list(model_ids), wait)
    store.lease = held
    try:
        yield held
    finally:
        store.lease = None
        held.release()
