"""Publishing models: the one commit that makes an ingest's rows part of the library, and what
readers, gc and verify make of rows no publication owns (docs/format.md, "Many writers").

Every manifests and models row carries the `ingest_id` of the writer that made it. A model is
its models row plus the manifest rows with its model_id *and* ingest_id, so the rows of an
interrupted or refused ingest (written before its models commit) are invisible, a re-ingest
never mixes its rows with them, and gc deletes them.

The models commit is made on top of the version whose model ids were checked, without delta's
automatic retry: if another writer committed in between, the check runs again on the newer
version, so a model id is never published twice whatever the leases said. After the commit a
publication record `_published/models-<version>.json` names the version and its models: a
models log whose latest entry has gone missing (and a model with it) then no longer matches
the record, which verify reports and publish refuses to build on.
"""
from __future__ import annotations

import contextlib
import json
import posixpath
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
from deltalake.exceptions import CommitFailedError

from haagenti.checkpoints import reached
from haagenti.errors import LibraryError
from haagenti.store.delta import LibraryStore
from haagenti.store.schema import SCHEMAS

RECORD_DIR = "_published"
PUBLISH_TRIES = 50


def _keys(t: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(t["model_id"], pc.fill_null(t["ingest_id"], ""), "/")


def published_keys(store: LibraryStore) -> pa.Array:
    """"model_id/ingest_id" of every published model (the models table is small)."""
    return _keys(store.read("models", ["model_id", "ingest_id"]))


def scan_manifests(store: LibraryStore, columns: list[str], pending: str | None = None) -> Iterator[pa.Table]:
    """The manifests table in batches (LibraryStore.scan), only the rows a published model owns,
    and with `pending` those of that ingest (the caller's own, not yet published). The models
    table is read first: a model published after that read is left out whole, never half."""
    keys = published_keys(store)
    need = list(columns) + [c for c in ("model_id", "ingest_id") if c not in columns]
    for t in store.scan("manifests", need):
        mask = pc.is_in(_keys(t), value_set=keys)
        if pending:
            mask = pc.or_(mask, pc.equal(t["ingest_id"], pending))
        yield t.filter(mask).select(list(columns))


def orphan_manifest_keys(store: LibraryStore) -> list[tuple[str, str]]:
    """(model_id, ingest_id) of manifest rows no published model owns."""
    keys = published_keys(store)
    out: set[tuple[str, str]] = set()
    for t in store.scan("manifests", ["model_id", "ingest_id"]):
        stray = t.filter(pc.invert(pc.is_in(_keys(t), value_set=keys)))
        out.update(zip(stray["model_id"].to_pylist(), stray["ingest_id"].to_pylist()))
    return sorted(out)


def publish(store: LibraryStore, rows: pa.Table, note: str = "") -> int:
    """Commit models rows (their ingest_seq numbered after the checked version's); refuses with
    one line, having published nothing, if one of their ids is already published. Returns the
    models table version that published them."""
    ids = rows["model_id"].to_pylist()
    for _ in range(PUBLISH_TRIES):
        latest = _latest_record(store)  # before the version: a record is written after its commit
        version = store.table("models").version()
        if latest is not None and latest["version"] > version:
            raise LibraryError(_damaged(store, version, latest))
        current = store.read("models", ["model_id", "ingest_seq"], version=version)
        present = sorted(set(current["model_id"].to_pylist()) & set(ids))
        if present:
            raise LibraryError(f"model {present[0]!r} was published by another writer while this ingest ran; nothing of this ingest was published")
        seq = (pc.max(current["ingest_seq"]).as_py() if current.num_rows else -1) + 1
        numbered = rows.set_column(rows.column_names.index("ingest_seq"), "ingest_seq", pa.array(range(seq, seq + rows.num_rows), pa.int64()))
        try:
            store.append("models", numbered, note, on_version=version)
        except CommitFailedError:
            continue  # another writer committed version + 1: check again on top of it
        record(store, version + 1, ids)
        return version + 1
    raise LibraryError(f"{store.url}: the models table kept moving; gave up publishing {', '.join(ids)} after {PUBLISH_TRIES} tries (nothing published)")


def unpublish(store: LibraryStore, model_id: str, ingest_id: str) -> None:
    """Remove a published model: its models row (one commit), then its manifest rows."""
    store.delete_owned("models", [(model_id, ingest_id)])
    record(store, store.table("models").version(), [], removed=[model_id])
    store.delete_owned("manifests", [(model_id, ingest_id)])


def record(store: LibraryStore, version: int, model_ids: list[str], removed: list[str] = ()) -> None:
    """Write the publication record of a models commit and drop the older ones."""
    reached("published")
    path = posixpath.join(store.root, RECORD_DIR, f"models-{version:020d}.json")
    store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
    store.fs.pipe_file(path, json.dumps({"version": version, "published": model_ids, "removed": list(removed), "time": time.time()}).encode())
    for old in _records(store):
        if old < path:
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm_file(old)


def _records(store: LibraryStore) -> list[str]:
    d = posixpath.join(store.root, RECORD_DIR)
    store.fs.invalidate_cache(d)
    try:
        return sorted(p for p in store.fs.ls(d, detail=False) if posixpath.basename(p).startswith("models-") and p.endswith(".json"))
    except FileNotFoundError:
        return []


def _latest_record(store: LibraryStore) -> dict | None:
    for path in reversed(_records(store)):
        with contextlib.suppress(FileNotFoundError, ValueError):
            return json.loads(store.fs.cat_file(path))
    return None


def _damaged(store: LibraryStore, version: int, latest: dict) -> str:
    lost = f" (it published {', '.join(latest['published'])})" if latest.get("published") else ""
    return (f"{store.url}: the models table's log ends at version {version}, but version {latest['version']} was committed{lost}: "
            f"its log entry models/_delta_log/{latest['version']:020d}.json is missing")


def log_errors(store: LibraryStore) -> list[str]:
    """What verify reports about the models log: a missing latest entry, a model id published twice."""
    errors = []
    latest = _latest_record(store)
    version = store.table("models").version()
    if latest is not None and latest["version"] > version:
        errors.append(_damaged(store, version, latest))
    counts = pc.value_counts(store.read("models", ["model_id"])["model_id"])
    twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    if twice:
        errors.append(f"model {twice[0]!r} is published more than once: the models table holds several rows for it")
    return errors
