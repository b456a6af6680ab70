"""The dedup job: catalog -> scan -> fragment -> sign -> match -> encode -> commit.

Re-runs are incremental: models whose files hash the same as in the library are skipped,
changed ones are replaced, new ones added, and (with prune) models gone from the catalog are
removed and their fragments collected. Every table is committed atomically and the models
table last, so a run killed at any point leaves the previous snapshot whole; the next run
sees the missing models as new and finishes the work.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.config import LibraryConfig
from haagenti.errors import LibraryError
from haagenti.library import FragmentLibrary, model_relations
from haagenti.manifest import FileRecord
from haagenti.similarity import band_rows
from haagenti.store import LIBRARY_FORMAT_VERSION, SCHEMAS
from pipelines.catalog import read_catalog
from pipelines.chaos import maybe_die
from pipelines.executors import Executor, LocalExecutor
from pipelines.groups import group_starts, sort_rows
from pipelines.steps import (
    ASSIGNMENT_SCHEMA,
    OCCURRENCE_SCHEMA,
    EncodeFragments,
    FragmentModel,
    SignFragments,
    band_pairs,
    choose_references,
    shared_buckets,
    hamming_limit,
    manifest_rows,
    scan_model,
)

# Fragments per encode call: measured on 2 CPUs, 32 per call spent ~4 s of a 7-model run in
# per-call overhead, 128 per call 0.4 s; 64 keeps an output batch (~10 MB) well inside a small
# object store with a few calls in flight.
ENCODE_BATCH = 64
FAMILY_SHARE = 0.3  # a model joins the family of the model it shares most with, above this share


@dataclass
class RunReport:
    catalog: str
    library: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    inferred_families: dict[str, str | None] = field(default_factory=dict)
    raw_bytes_in: int = 0
    new_fragments: int = 0
    delta_fragments: int = 0
    stored_bytes_added: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def nothing_to_do(self) -> bool:
        return not (self.added or self.replaced or self.removed)

    def summary(self) -> str:
        if self.nothing_to_do:
            return f"nothing to do: all {len(self.unchanged)} models in the catalog are unchanged in {self.library}"
        saved = 1 - self.stored_bytes_added / self.raw_bytes_in if self.raw_bytes_in else 0.0
        return (
            f"added {len(self.added)}, replaced {len(self.replaced)}, removed {len(self.removed)}, unchanged {len(self.unchanged)} models; "
            f"{self.raw_bytes_in:,} B in -> {self.stored_bytes_added:,} B stored ({saved:.1%} saved; "
            f"{self.new_fragments} new fragments, {self.delta_fragments} as deltas) in {self.seconds:.1f}s"
        )


def run_dedup(catalog_url: str, library_url: str, executor: Executor, config: LibraryConfig | None = None, prune: bool = False) -> RunReport:
    config = config or LibraryConfig()
    if library_url.startswith("memory://") and not isinstance(executor, LocalExecutor):
        raise LibraryError(f"{library_url}: a memory:// library lives in one process, and Ray's workers are others; use a folder or object store")
    started = time.perf_counter()
    report = RunReport(catalog_url, library_url)
    lib = FragmentLibrary.open(library_url, config)
    catalog = read_catalog(catalog_url)

    def stage(name: str, t0: float) -> float:
        now = time.perf_counter()
        report.stages[name] = round(now - t0, 3)
        return now

    t = time.perf_counter()
    scanned = sorted(executor.map(scan_model, [e.as_row() for e in catalog.entries]), key=lambda r: r["rank"])
    existing = {m["model_id"]: m for m in lib.models()}
    todo = []
    for s in scanned:
        old = existing.get(s["model_id"])
        if old is not None and old["content_hash"] == s["content_hash"]:
            report.unchanged.append(s["model_id"])
            continue
        (report.replaced if old is not None else report.added).append(s["model_id"])
        todo.append(s)
    gone = sorted(set(existing) - {e.model_id for e in catalog.entries}) if prune else []
    t = stage("scan", t)
    if todo:
        _ingest(lib, executor, config, todo, report, existing, t, stage)
    for mid in gone:
        lib.rm(mid)
        report.removed.append(mid)
    if gone or report.replaced:
        lib.gc()
    report.seconds = time.perf_counter() - started
    return report


def _ingest(lib: FragmentLibrary, executor: Executor, config: LibraryConfig, todo: list[dict], report: RunReport, existing: dict, t: float, stage) -> None:
    report.raw_bytes_in = sum(s["raw_bytes"] for s in todo)
    occ = sort_rows(executor.flat_map(FragmentModel(config), todo, OCCURRENCE_SCHEMA), ["rank", "tensor_index", "fragment_seq"])
    t = stage("fragment", t)

    # New fragments: ids not in the library, first occurrence of each (catalog order).
    known = lib.known_fragments()
    real = occ.filter(pc.is_valid(occ["fragment_id"]))
    first: dict[str, int] = {}
    for i, fid in enumerate(real["fragment_id"].to_pylist()):
        if fid not in known and fid not in first:
            first[fid] = i
    new = real.take(pa.array(sorted(first.values()), pa.int64()))
    order = {fid: i for i, fid in enumerate(new["fragment_id"].to_pylist())}
    floats = new.filter(pc.is_in(new["dtype"], pa.array(["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"])))

    # Signatures on the actor pool (GPU when there is one); sorting copies them out of the store.
    sigs = _sign(executor, config, floats)
    t = stage("sign", t)
    refs = _match(lib, executor, config, sigs, order) if sigs.num_rows else {}
    t = stage("match", t)

    # Encode: each new fragment plain or as a delta against its best reference.
    assignments = _assignments(new, refs, order, known)
    encoded = executor.map_batches(EncodeFragments, (lib.store.url, config), assignments, ENCODE_BATCH)

    lib.store.append("signatures", sigs, "dedup")
    # Fragments are committed in bounded chunks (memory stays flat; the encode stream may not
    # run inside a Delta write, which would nest delta-rs runtimes). Chunks committed before a
    # crash are unreferenced until published: gc removes them, or the next run reuses them.
    # Each model's new fragments get row groups of their own (a restore reads no neighbour's rows).
    rank_of = dict(zip(new["fragment_id"].to_pylist(), new["rank"].to_pylist()))

    def commit(chunk: list[pa.Table]) -> None:
        rows = pa.concat_tables(chunk)
        ranks = pa.table({"rank": [rank_of[f] for f in rows["fragment_id"].to_pylist()]})
        lib.store.append("fragments", rows, "dedup", np.diff(group_starts(ranks, ["rank"])).tolist())

    chunk: list[pa.Table] = []
    held = min(config.batch_bytes, executor.held_bytes or config.batch_bytes)
    for tb in encoded:
        report.new_fragments += tb.num_rows
        report.delta_fragments += int(pc.sum(pc.not_equal(tb["encoding"], "plain")).as_py() or 0)
        report.stored_bytes_added += int(pc.sum(tb["stored_size"]).as_py() or 0)
        chunk.append(tb)
        if sum(t.nbytes for t in chunk) >= held:
            commit(chunk)
            chunk = []
    if chunk:
        commit(chunk)
    maybe_die("after-fragments")
    t = stage("encode+write", t)

    # Publish: manifests, then models (the commit that makes them visible).
    for mid in report.replaced:
        lib.rm(mid)
    lib.store.append("manifests", manifest_rows(occ), "dedup")
    families = _infer_families(lib, todo, existing)
    report.inferred_families = {s["model_id"]: families[s["model_id"]] for s in todo if not s["family"]}
    seq = max((m["ingest_seq"] for m in existing.values()), default=-1) + 1
    rows = []
    for i, s in enumerate(todo):
        mine = occ.filter(pc.equal(occ["model_id"], s["model_id"]))
        n_tensors = len(set(mine["tensor_index"].to_pylist()))
        ids: list[list[str]] = [[] for _ in s["file_records"]]  # each file's fragment ids in file order (its layout)
        for fi, fid in zip(mine["file_index"].to_pylist(), mine["fragment_id"].to_pylist()):
            if fid is not None:
                ids[fi].append(fid)
        files = [FileRecord.with_layout(*(f[k] for k in ("name", "format", "size", "blake3", "header")), ids[j]) for j, f in enumerate(s["file_records"])]
        rows.append({
            "model_id": s["model_id"], "family": families[s["model_id"]], "content_hash": s["content_hash"], "raw_bytes": s["raw_bytes"],
            "n_tensors": n_tensors, "lossy": False,
            "files": [asdict(f) for f in files],
            "source_uris": list(s["files"]), "ingest_seq": seq + i, "format_version": LIBRARY_FORMAT_VERSION,
        })
    lib.store.append("models", pa.Table.from_pylist(rows, schema=SCHEMAS["models"]), "dedup")
    stage("commit", t)


def _sign(executor: Executor, config: LibraryConfig, floats: pa.Table) -> pa.Table:
    parts = list(executor.map_batches(SignFragments, (config.signature,), floats, 64, actors=True)) if config.similarity else []
    return sort_rows(pa.concat_tables(parts), ["fragment_id"]) if parts else SCHEMAS["signatures"].empty_table()


def _match(lib: FragmentLibrary, executor: Executor, config: LibraryConfig, sigs: pa.Table, order: dict[str, int]) -> dict[str, list[str]]:
    """Global index: the library's plain fragments and this run's, as band rows grouped by
    bucket; returns each new fragment's reference candidates (the band and pair tables, ~70 MB
    at 1.4 GB of models, are freed on return, not held through encoding)."""
    bands = pa.concat_tables([_bands(sigs, True, config), _bands(lib.similarity_index().to_table(), False, config)])
    limit = hamming_limit(config.signature, config.thresholds.similar_cosine)
    keys = ["band", "band_hash"]
    pairs = executor.group_by(shared_buckets(bands, keys), keys, lambda g: band_pairs(g, limit))
    return choose_references(pairs, order, config.candidates)


def _bands(sig_table: pa.Table, is_new: bool, config: LibraryConfig) -> pa.Table:
    """Band rows of signatures, carrying the bits and length each bucket needs to rank pairs."""
    ids, bits = sig_table["fragment_id"].to_pylist(), sig_table["bits"].to_pylist()
    reps = config.signature.bands
    b = band_rows(ids, bits, config.signature)
    return (
        b.append_column("bits", pa.array([x for x in bits for _ in range(reps)], pa.binary()))
        .append_column("n_elements", pa.array([n for n in sig_table["n_elements"].to_pylist() for _ in range(reps)], pa.int64()))
        .append_column("is_new", pa.array([is_new] * b.num_rows, pa.bool_()))
    )


def _assignments(new: pa.Table, refs: dict[str, list[str]], order: dict[str, int], known: dict[str, str]) -> pa.Table:
    """One row per new fragment with where to read it and its candidate references: a byte
    range in this run's files (anchors) or a library fragment (url None, dtype from the library)."""
    loc = {fid: (u, o, ln, dt) for fid, u, o, ln, dt in zip(*(new[c].to_pylist() for c in ("fragment_id", "url", "byte_offset", "byte_len", "dtype")))}
    rows = []
    for r in new.select(["fragment_id", "dtype", "fragment_type", "url", "byte_offset", "byte_len"]).to_pylist():
        ids = refs.get(r["fragment_id"], [])
        run = [loc.get(i) if i in order else None for i in ids]
        rows.append(dict(
            r, ref_ids=ids, ref_urls=[x[0] if x else None for x in run], ref_offsets=[x[1] if x else 0 for x in run],
            ref_lens=[x[2] if x else 0 for x in run], ref_dtypes=[x[3] if x else known[i] for x, i in zip(run, ids)],
        ))
    return pa.Table.from_pylist(rows, schema=ASSIGNMENT_SCHEMA)


def _infer_families(lib: FragmentLibrary, todo: list[dict], existing: dict) -> dict[str, str | None]:
    """Explicit families stand; a model without one joins the family of the model it shares
    the most fragments (exact or as delta references) with, when that share is large enough."""
    declared = {mid: m["family"] for mid, m in existing.items()}
    declared.update({s["model_id"]: s["family"] for s in todo})
    rel = model_relations(lib)
    out = {}
    for s in todo:
        mid = s["model_id"]
        if s["family"]:
            out[mid] = s["family"]
            continue
        scores = {}
        for (a, b), share in rel.items():
            if mid in (a, b):
                other = b if a == mid else a
                scores[other] = max(scores.get(other, 0.0), share)
        best = max(sorted(scores), key=lambda o: scores[o], default=None)
        out[mid] = (declared.get(best) or best) if best is not None and scores[best] >= FAMILY_SHARE else None
    return out
