"""The dedup job: catalog -> scan -> fragment -> sign -> match -> encode -> commit, each stage
the ingest core's (haagenti.ingest, haagenti.matching, haagenti.writer) run by an executor.

Re-runs are incremental: models whose files hash the same as in the library are skipped,
changed ones are replaced, new ones added, and (with prune) models gone from the catalog are
removed and their fragments collected. Every table is committed atomically and the models
table last, so a run killed at any point leaves the previous snapshot whole; the next run
sees the missing models as new and finishes the work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haagenti.checkpoints import reached
from haagenti.config import LibraryConfig
from haagenti.errors import LibraryError
from haagenti.executors import Executor, LocalExecutor
from haagenti.formats.source import expand_urls
from haagenti.groups import sort_rows
from haagenti.ingest_steps import ASSIGNMENT_SCHEMA, EncodeFragments, MatchBands, SignFragments, signature_table
from haagenti.library import FragmentLibrary
from haagenti.maintenance import closest_models
from haagenti.matching import BUCKET, choose_references, hamming_limit, match_rows
from haagenti.store import LibraryStore
from haagenti.store.leases import LeaseConflict, writing
from haagenti.writer import Committer
from pipelines.catalog import Catalog, read_catalog
from pipelines.steps import FragmentModel, scan_model

# Fragments per encode call: measured on 2 CPUs, 32 per call spent ~4 s of a 7-model run in
# per-call overhead, 128 per call 0.4 s; 64 keeps an output batch (~10 MB) well inside a small
# object store with a few calls in flight.
ENCODE_BATCH = 64
MATCH_PART_ROWS = 4096  # run band rows per match task: 256 fragments x 16 bands, an ingest batch's lookup
FAMILY_SHARE = 0.3  # a model joins the family of the model it shares most with, above this share


@dataclass
class RunReport:
    catalog: str
    library: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    relabeled: list[str] = field(default_factory=list)  # same bytes, family changed by the catalog
    removed: list[str] = field(default_factory=list)
    inferred_families: dict[str, str | None] = field(default_factory=dict)
    raw_bytes_in: int = 0
    new_fragments: int = 0
    delta_fragments: int = 0
    stored_bytes_added: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    gc_skipped: str = ""  # why the run's gc did not run (another writer held the library)

    @property
    def nothing_to_do(self) -> bool:
        return not (self.added or self.replaced or self.removed or self.relabeled)

    def summary(self) -> str:
        if self.nothing_to_do:
            return f"nothing to do: all {len(self.unchanged)} models in the catalog are unchanged in {self.library}"
        saved = 1 - self.stored_bytes_added / self.raw_bytes_in if self.raw_bytes_in else 0.0
        return (
            f"added {len(self.added)}, replaced {len(self.replaced)}, removed {len(self.removed)}, unchanged {len(self.unchanged)} models"
            + (f" ({len(self.relabeled)} given the catalog's family)" if self.relabeled else "") + "; "
            f"{self.raw_bytes_in:,} B in -> {self.stored_bytes_added:,} B stored ({saved:.1%} saved; "
            f"{self.new_fragments} new fragments, {self.delta_fragments} as deltas) in {self.seconds:.1f}s"
        )


STAGES = ("scan", "fragment", "sign", "match", "encode+write", "commit")
StageProgress = Callable[[str], None]  # called with each stage's name as it ends


def preflight(catalog_url: str, library_url: str, distributed: bool) -> Catalog:
    """Everything that can be checked before a cluster starts (seconds on Ray): the catalog
    parses and names valid ids and files that exist, and the library URL can hold a library."""
    if library_url.startswith("memory://") and distributed:
        raise LibraryError(f"{library_url}: a memory:// library lives in one process, and Ray's workers are others; use a folder or object store")
    catalog = read_catalog(catalog_url)
    store = LibraryStore(library_url)
    if store.fs.isfile(store.root):
        raise LibraryError(f"{library_url}: is a file, not a library folder")
    if store.exists():
        store.marker()
    for e in catalog.entries:  # every file there and a regular file (or a folder of model files)
        expand_urls(list(e.files))
    return catalog


def run_dedup(
    catalog_url: str, library_url: str, executor: Executor, config: LibraryConfig | None = None, prune: bool = False, progress: StageProgress | None = None
) -> RunReport:
    config = config or LibraryConfig()
    if config.lossy_threshold is not None:
        raise LibraryError("the pipeline stores models losslessly; lossy sharing is `haagenti ingest --lossy-threshold`")
    catalog = preflight(catalog_url, library_url, not isinstance(executor, LocalExecutor))
    started = time.perf_counter()
    report = RunReport(catalog_url, library_url)
    lib = FragmentLibrary.open(library_url, config)
    config = lib.config  # with the library's invariants
    # The run holds an ingest lease on every model it may write: the catalog's, and with prune
    # the library's (models published after this read are left to the next run).
    claimed = {e.model_id for e in catalog.entries} | ({m["model_id"] for m in lib.models()} if prune else set())
    with writing(lib.store, "ingest", sorted(claimed), wait=60.0) as lease:
        gone = _run(lib, catalog, executor, config, report, prune, progress, claimed, lease.writer)
    if gone or report.replaced:
        try:
            lib.gc()
        except LeaseConflict as e:  # the models are published; their old fragments wait for a later gc
            report.gc_skipped = str(e)
    report.seconds = time.perf_counter() - started
    return report


def _run(lib: FragmentLibrary, catalog: Catalog, executor: Executor, config: LibraryConfig, report: RunReport, prune: bool,
         progress: StageProgress | None, claimed: set[str], ingest_id: str) -> list[str]:
    """Scan, ingest what changed and remove (with prune) what left the catalog; returns the removed ids."""

    def stage(name: str, t0: float) -> float:
        now = time.perf_counter()
        report.stages[name] = round(now - t0, 3)
        if progress:
            progress(name)
        return now

    t = time.perf_counter()
    scanned = sorted(executor.map(scan_model, [e.as_row() for e in catalog.entries]), key=lambda r: r["rank"])
    existing = {m["model_id"]: m for m in lib.models()}
    todo = []
    for s in scanned:
        old = existing.get(s["model_id"])
        # Same bytes: unchanged, unless stored lossy (the catalog's model is re-stored exact) or
        # the catalog now gives it another family (applied to its record).
        if old is not None and old["content_hash"] == s["content_hash"] and not old["lossy"]:
            if s["family"] and s["family"] != old["family"]:
                lib.store.set_family(s["model_id"], s["family"])
                report.relabeled.append(s["model_id"])
            else:
                report.unchanged.append(s["model_id"])
            continue
        (report.replaced if old is not None else report.added).append(s["model_id"])
        todo.append(s)
    gone = sorted((set(existing) & claimed) - {e.model_id for e in catalog.entries}) if prune else []
    t = stage("scan", t)
    if todo:
        _ingest(lib, executor, config, todo, report, existing, t, stage, ingest_id)
    for mid in gone:
        lib.rm(mid)
        report.removed.append(mid)
    return gone


def _ingest(lib: FragmentLibrary, executor: Executor, config: LibraryConfig, todo: list[dict], report: RunReport, existing: dict, t: float, stage,
            ingest_id: str) -> None:
    """The ingest core's stages (haagenti.ingest), each distributed by the executor; the
    driver decides which fragments are new, chooses references and commits."""
    report.raw_bytes_in = sum(s["raw_bytes"] for s in todo)
    cuts = executor.map(FragmentModel(config), todo)
    manifests = [m for m, _ in cuts]
    occ = pa.concat_tables([o for _, o in cuts])
    t = stage("fragment", t)

    # New fragments: ids not in the library (looked up by key in its index, never the whole id
    # set), first occurrence of each (run order).
    known = lib.index.known(pc.unique(occ["fragment_id"]).to_pylist())
    first: dict[str, int] = {}
    for i, fid in enumerate(occ["fragment_id"].to_pylist()):
        if fid not in known and fid not in first:
            first[fid] = i
    new = occ.take(pa.array(list(first.values()), pa.int64()))  # a copy: the cut results are let go
    del cuts, occ

    # Signatures on the actor pool (GPU when there is one), then reference choice.
    sigs = _sign(executor, config, new.filter(new["signs"]))
    t = stage("sign", t)
    refs, depths = _match(lib, executor, config, sigs, new["fragment_id"]) if sigs.num_rows else ({}, {})
    t = stage("match", t)

    # Encode: each new fragment plain or as a delta against its best reference; commit as the
    # results arrive, in chunks the executor can afford to have pinned.
    known.update(lib.index.known(list({c for cs in refs.values() for c in cs} - set(first))))  # the library references' dtypes
    assignments = _assignments(new, refs, depths, set(first), known)
    encoded = executor.map_batches(EncodeFragments, (lib.store.url, config), assignments, ENCODE_BATCH)
    committer = Committer(lib.store, lib.index, ingest_id, "dedup", min(config.batch_bytes, executor.held_bytes or config.batch_bytes))
    for tb in encoded:
        report.new_fragments += tb.num_rows
        report.delta_fragments += int(pc.sum(pc.not_equal(tb["encoding"], "plain")).as_py() or 0)
        report.stored_bytes_added += int(pc.sum(tb["stored_size"]).as_py() or 0)
        at = pc.index_in(tb["fragment_id"], value_set=new["fragment_id"])
        committer.add(tb, sigs.filter(pc.is_in(sigs["fragment_id"], value_set=tb["fragment_id"])), new["rank"].take(at).to_numpy())
    committer.flush()
    reached("after-fragments")
    t = stage("encode+write", t)

    # Publish: manifests, then models (the commit that makes them visible).
    for mid in report.replaced:
        lib.rm(mid)
    committer.commit_manifests(manifests)
    families = _infer_families(lib, todo, existing, ingest_id)
    report.inferred_families = {s["model_id"]: families[s["model_id"]] for s in todo if not s["family"]}
    for m in manifests:
        m.family = families[m.model_id]
    committer.publish(manifests)
    stage("commit", t)


def _sign(executor: Executor, config: LibraryConfig, floats: pa.Table) -> pa.Table:
    parts = list(executor.map_batches(SignFragments, (config.signature,), floats, 64, actors=True)) if config.similarity else []
    return sort_rows(pa.concat_tables(parts), ["fragment_id"]) if parts else signature_table([], config.signature)


def _match(lib: FragmentLibrary, executor: Executor, config: LibraryConfig, sigs: pa.Table,
           new_ids: pa.ChunkedArray) -> tuple[dict[str, list[str]], dict[str, int]]:
    """haagenti.matching's rule over the whole run, as a join by bucket: the driver holds this
    run's band rows only; each task takes whole buckets of them, at most MATCH_PART_ROWS rows
    (what one ingest batch looks up: the library rows a task reads grow with its buckets times
    the library's bucket fill), and reads the library's rows of those buckets straight from
    storage (haagenti.ingest_steps.MatchBands).
    Returns each new fragment's reference candidates and the chain depths of them and their
    candidates (the band and pair tables are freed on return, not held through encoding)."""
    pos = pc.index_in(sigs["fragment_id"], value_set=new_ids).to_numpy(zero_copy_only=False)
    bands = lib.index.scoper()(match_rows(sigs, config.signature, pos))
    limit = hamming_limit(config.signature, config.thresholds.similar_cosine)
    pairs = executor.group_by(bands, BUCKET, MatchBands(lib.store.url, config, limit), MATCH_PART_ROWS)
    in_run_order = sigs["fragment_id"].take(pa.array(np.argsort(pos, kind="stable"))).to_pylist()
    return choose_references(pairs, in_run_order, config.candidates)


def _assignments(new: pa.Table, refs: dict[str, list[str]], depths: dict[str, int], in_run: set[str], known: dict[str, str]) -> pa.Table:
    """One row per new fragment with where to read it and its candidate references: a byte
    range in this run's files or a library fragment (url None, dtype from the library), and
    each one's chain depth."""
    loc = {fid: (u, o, ln, dt) for fid, u, o, ln, dt in zip(*(new[c].to_pylist() for c in ("fragment_id", "url", "byte_offset", "byte_len", "dtype")))}
    rows = []
    for r in new.select(["fragment_id", "dtype", "fragment_type", "url", "byte_offset", "byte_len", "data"]).to_pylist():
        ids = refs.get(r["fragment_id"], [])
        run = [loc[i] if i in in_run else None for i in ids]
        rows.append(dict(
            r, ref_ids=ids, ref_urls=[x[0] if x else None for x in run], ref_offsets=[x[1] if x else 0 for x in run],
            ref_lens=[x[2] if x else 0 for x in run], ref_dtypes=[x[3] if x else known[i] for x, i in zip(run, ids)],
            ref_depths=[depths[i] for i in ids],
        ))
    return pa.Table.from_pylist(rows, schema=ASSIGNMENT_SCHEMA)


def _infer_families(lib: FragmentLibrary, todo: list[dict], existing: dict, ingest_id: str) -> dict[str, str | None]:
    """Explicit families stand. A model without one is linked to the model it shares the most
    fragments (exact or as delta references) with, when that share is large enough; linked
    models form one family, named by the declared family of its first member that has one,
    else by its first member's id (library models first, then catalog order). With reference
    chains a fine-tune's closest model can be another fine-tune: the family is the linked
    group's, not that model's id."""
    declared = {mid: m["family"] for mid, m in existing.items()}
    declared.update({s["model_id"]: s["family"] for s in todo})
    order = {mid: i for i, mid in enumerate([*existing, *(s["model_id"] for s in todo)])}
    closest = closest_models(lib, [s["model_id"] for s in todo if not s["family"]], ingest_id)
    parent: dict[str, str] = {}

    def root(mid: str) -> str:
        while parent.get(mid, mid) != mid:
            mid = parent[mid]
        return mid

    linked = set()
    for s in todo:
        best, share = closest.get(s["model_id"]) or (None, 0.0)
        if s["family"] or best is None or share < FAMILY_SHARE:
            continue
        a, b = sorted((root(s["model_id"]), root(best)), key=lambda m: order.get(m, len(order)))
        parent[b] = a
        linked.add(s["model_id"])
    members: dict[str, list[str]] = {}
    for mid in sorted({*order, *parent, *parent.values()}, key=lambda m: order.get(m, len(order))):
        members.setdefault(root(mid), []).append(mid)
    out = {}
    for s in todo:
        mid = s["model_id"]
        if s["family"] or mid not in linked:
            out[mid] = s["family"] or None
            continue
        group = members[root(mid)]
        out[mid] = next((declared[m] for m in group if declared.get(m)), group[0])
    return out
