"""The one committer of an ingest, library or pipeline: it alone writes the ingest's rows.

Commit order (docs/format.md states it for readers and writers):
  1. new fragments (the pieces of the models' verbatim bytes first, add_verbatim) in chunks of
     about `chunk_bytes`: each chunk's `signatures` rows, then its
     `fragments` rows, then their index rows (haagenti.index: the layout's tables), one commit
     each;
  2. the `manifests` rows of every model of the ingest, in one commit;
  3. their `models` rows, in one commit: the publication (haagenti.store.publication: on top
     of the models version whose ids it checked, never publishing an id twice).
Manifests and models rows carry the ingest's id (its lease's writer id), so rows of an ingest
that never published belong to no model (docs/format.md, "Many writers").
A model is visible only once step 3 is committed, so a reader never sees a model whose
fragments or manifest rows are missing. A crash anywhere before it leaves rows no model
references: signatures without fragments, fragments (with their index rows: the next ingest
reuses them as exact matches and references, or `gc` removes them). A crash between a chunk's
fragments and its index rows leaves fragments the index does not know: the next ingest stores
them again (readers keep one row per id) and `gc` removes the unreferenced copies.

Row groups: each model's new fragments start a row group of their own, so restoring one model
reads none of its neighbour's rows (docs/decisions/0045-located-by-id.md).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.codecs import PLANES
from haagenti.encode import PendingFragment, encode_fragment, rows_table
from haagenti.fragment import FragmentId, FragmentType
from haagenti.index import IndexLayout
from haagenti.manifest import ModelManifest, stored_pieces
from haagenti.records import record_digest
from haagenti.store import LIBRARY_FORMAT_VERSION, SCHEMAS, LibraryStore
from haagenti.store.schema import empty
from haagenti.store.publication import publish

# A chunk is also committed once its fragments' raw bytes reach this many times `chunk_bytes`:
# the library's ingest holds a fragment's raw bytes until its commit (ingest_steps.RunBytes), and
# a well-deduplicated model's chunk otherwise covers many times its stored size (a merged LoRA
# stores 1.3 MB in 2.5 KB), so the driver held a model's worth (docs/decisions/0274-driver-peak-bounded.md).
RAW_CHUNK_FACTOR = 2


class Committer:
    def __init__(self, store: LibraryStore, index: IndexLayout, ingest_id: str, note: str, chunk_bytes: int,
                 on_commit: Callable[[list[str]], None] | None = None):
        self.store, self.index, self.ingest_id, self.note, self.chunk_bytes, self.on_commit = store, index, ingest_id, note, chunk_bytes, on_commit
        self.fragments: list[pa.Table] = []
        self.signatures: list[pa.Table] = []
        self.owners: list[np.ndarray] = []  # the model (index in the ingest) of each fragment row
        self.held = 0
        self.raw = 0  # raw bytes of the fragments held

    def add(self, fragments: pa.Table, signatures: pa.Table, owner: int | np.ndarray) -> None:
        """New rows (signatures of some of `fragments`, none of others); `owner` is the model
        each fragment row belongs to (one index, or one per row). Commits a chunk when full: of
        `chunk_bytes` stored, or RAW_CHUNK_FACTOR times that raw."""
        if fragments.num_rows:
            self.fragments.append(fragments)
            self.owners.append(np.broadcast_to(np.asarray(owner, np.int64), (fragments.num_rows,)))
            self.held += fragments.nbytes
            self.raw += int(pc.sum(fragments["raw_size"]).as_py() or 0)
        if signatures.num_rows:
            self.signatures.append(signatures)
        if self.held >= self.chunk_bytes or self.raw >= RAW_CHUNK_FACTOR * self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        """Commit what is held: signatures, then fragments, each model's rows a run of row groups."""
        sigs = pa.concat_tables(self.signatures) if self.signatures else None
        if sigs is not None:
            self.store.append("signatures", sigs, self.note)
        committed: list[str] = []
        if self.fragments:
            owners = np.concatenate(self.owners)
            frags = pa.concat_tables(self.fragments)
            if np.any(owners[1:] < owners[:-1]):  # verbatim pieces held ahead of the run: each joins its model's rows
                order = np.argsort(owners, kind="stable")
                owners, frags = owners[order], frags.take(order)
            bounds = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1], True])
            data_file = self.store.append("fragments", frags, self.note, np.diff(bounds).tolist())
            self.index.append(frags.drop_columns(["blob"]), sigs if sigs is not None else SCHEMAS["signatures"].empty_table(), data_file, self.note)
            committed = frags["fragment_id"].to_pylist()
        self.fragments, self.signatures, self.owners, self.held, self.raw = [], [], [], 0, 0
        if self.on_commit:
            self.on_commit(committed)

    def commit_manifests(self, manifests: list[ModelManifest]) -> None:
        """Everything held, then every model's manifest rows in one commit."""
        self.flush()
        if manifests:
            self.store.append("manifests", pa.concat_tables([m.manifest_rows(self.ingest_id) for m in manifests]), self.note)

    def add_verbatim(self, headers: list[list[bytes]]) -> None:
        """Hold the pieces of each model's files' verbatim bytes (`headers[model][file]`) that
        the library lacks, plain coded, no signature (haagenti.manifest.stored_pieces): a large
        header, graph or side file shared by models or by files of one model is stored once.
        Added before the run's fragments, they ride in its first commit."""
        pieces: dict[str, tuple[bytes, int]] = {}  # id -> (piece, the first model holding it)
        for owner, files in enumerate(headers):
            for header in files:
                for piece in stored_pieces(header):
                    pieces.setdefault(FragmentId.of(piece), (piece, owner))
        stored = self.index.known(list(pieces))
        new = [(fid, piece, owner) for fid, (piece, owner) in pieces.items() if fid not in stored]
        if new:
            rows = [encode_fragment(PendingFragment(fid, "U8", piece, FragmentType.VERBATIM, 0), [], PLANES) for fid, piece, _ in new]
            # In their model's run (no row group of their own: ~2 KB each on disk), first: reading
            # its record reads the run's first row group, which a restore then reads again.
            self.add(rows_table(rows, SCHEMAS["fragments"]), empty(SCHEMAS["signatures"]), np.array([o for _, _, o in new], np.int64))

    def publish(self, manifests: list[ModelManifest]) -> None:
        """The models rows (numbered after the library's last by publish): the commit that
        publishes them."""
        rows = [model_row(m, self.ingest_id) for m in manifests]
        publish(self.store, pa.Table.from_pylist(rows, schema=SCHEMAS["models"]), self.note)


def model_row(m: ModelManifest, ingest_id: str) -> dict:
    """The models-table row of a manifest (publish numbers its ingest_seq), with its record
    digest: published in the same commit as the record it vouches for."""
    return {
        "model_id": m.model_id,
        "family": m.family,
        "content_hash": m.content_hash,
        "raw_bytes": m.raw_bytes,
        "n_tensors": len(m.tensors),
        "lossy": m.lossy,
        "files": [f.row() for f in m.files],
        "source_uris": m.source_uris,
        "ingest_seq": -1,
        "format_version": LIBRARY_FORMAT_VERSION,
        "ingest_id": ingest_id,
        "record_digest": record_digest(m, ingest_id, len(m.tensors), m.lossy),
    }
