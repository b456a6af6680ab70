"""The dedup job: catalog -> scan -> fragment, then the ingest's steps (sign -> match ->
encode -> commit, haagenti.ingest_steps.ingest_batches) batch after batch, all run by an
executor; RunReport.stages holds each stage's time summed over the batches.

Re-runs are incremental: models whose files hash the same as in the library are skipped,
changed ones are replaced, new ones added, and (with prune) models gone from the catalog are
removed and their fragments collected. Every table is committed atomically and the models
table last, so a run killed at any point leaves the previous snapshot whole; the next run
sees the missing models as new and finishes the work.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import pyarrow.compute as pc

from haagenti.checkpoints import reached
from haagenti.config import LibraryConfig
from haagenti.errors import LibraryError
from haagenti.executors import Executor, LocalExecutor
from haagenti.formats.source import expand_urls
from haagenti.ingest_steps import encode_batch_bytes, ingest_batches, occurrence_batches
from haagenti.library import FragmentLibrary
from haagenti.maintenance import closest_models
from haagenti.store import LibraryStore
from haagenti.store.leases import LeaseConflict, writing
from haagenti.writer import Committer
from pipelines.catalog import Catalog, read_catalog
from pipelines.stamps import read_stamps, write_stamps
from pipelines.steps import FragmentModel, scan_model

CHECK_THREADS = 16  # catalog entries whose files preflight checks at once: a few requests each on an object store
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
    with ThreadPoolExecutor(CHECK_THREADS) as pool:  # every file there and a regular file (or a folder of model files)
        for _ in pool.map(lambda e: expand_urls(list(e.files)), catalog.entries):  # the first error in catalog order is raised
            pass
    return catalog


def run_dedup(
    catalog_url: str, library_url: str, executor: Executor, config: LibraryConfig | None = None, prune: bool = False, progress: StageProgress | None = None,
    rehash: bool = False,
) -> RunReport:
    """`rehash`: hash every catalog file, trusting no scan stamp (pipelines.stamps)."""
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
        gone = _run(lib, catalog, executor, config, report, prune, progress, claimed, lease.writer, rehash)
    if gone or report.replaced:
        try:
            lib.gc()
        except LeaseConflict as e:  # the models are published; their old fragments wait for a later gc
            report.gc_skipped = str(e)
    report.seconds = time.perf_counter() - started
    return report


def _run(lib: FragmentLibrary, catalog: Catalog, executor: Executor, config: LibraryConfig, report: RunReport, prune: bool,
         progress: StageProgress | None, claimed: set[str], ingest_id: str, rehash: bool) -> list[str]:
    """Scan, ingest what changed and remove (with prune) what left the catalog; returns the removed ids."""

    def stage(name: str, t0: float) -> float:
        now = time.perf_counter()
        report.stages[name] = round(now - t0, 3)
        if progress:
            progress(name)
        return now

    t = time.perf_counter()
    existing = {m["model_id"]: m for m in lib.models()}
    scanned = _scan(lib.store.url, catalog, executor, existing, rehash, config.fragment_elements)
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


def _scan(library_url: str, catalog: Catalog, executor: Executor, existing: dict, rehash: bool, fragment_elements: int) -> list[dict]:
    """The catalog's models scanned (pipelines.steps.scan_model), in catalog order: with the
    stamps kept by the last run, unless `rehash`, so that unchanged models are not read; the
    stamps are then kept for the next run (those of models still in the library and not in the
    catalog stay, the others go)."""
    old = read_stamps(library_url)
    rows = []
    for e in catalog.entries:
        stored = existing.get(e.model_id)
        trusted = not rehash and stored is not None and not stored["lossy"]
        rows.append(dict(e.as_row(), known=old.get(e.model_id, {}) if trusted else {}, stored_hash=stored["content_hash"] if trusted else None))
    scanned = sorted(executor.map(partial(scan_model, fragment_elements=fragment_elements), rows), key=lambda r: r["rank"])
    kept = {mid: s for mid, s in old.items() if mid in existing}
    kept.update({s["model_id"]: s["stamps"] for s in scanned})
    if kept != old:
        write_stamps(library_url, kept)
    return scanned


def _ingest(lib: FragmentLibrary, executor: Executor, config: LibraryConfig, todo: list[dict], report: RunReport, existing: dict, t: float, stage,
            ingest_id: str) -> None:
    """Cut the models on the executor, then the ingest's steps over their occurrences
    (haagenti.ingest_steps.ingest_batches, the same executor), then publish."""
    report.raw_bytes_in = sum(s["raw_bytes"] for s in todo)
    cuts = executor.map(FragmentModel(config), todo)
    manifests = [m for m, _ in cuts]
    t = stage("fragment", t)

    # Committed in chunks the executor can afford to have pinned.
    committer = Committer(lib.store, lib.index, ingest_id, "dedup", min(config.batch_bytes, executor.held_bytes or config.batch_bytes))
    committer.add_verbatim([[f.header for f in m.files] for m in manifests])
    seconds: dict[str, float] = {}
    # On a cluster the run is one batch: a batch boundary drains the actor pools (a 2-batch
    # catalog on Ray ran 20-30% slower warm, decisions/0242); in one process batches bound memory.
    whole_run = not isinstance(executor, LocalExecutor)
    batches = occurrence_batches([o for _, o in cuts], None if whole_run else encode_batch_bytes(config))
    for done in ingest_batches(lib, lib.index, batches, executor, committer, seconds):
        report.new_fragments += done.stored.num_rows
        report.delta_fragments += int(pc.sum(pc.not_equal(done.stored["encoding"], "plain")).as_py() or 0)
        report.stored_bytes_added += int(pc.sum(done.stored["stored_size"]).as_py() or 0)
    reached("after-fragments")
    for name in ("sign", "match", "encode+write"):
        stage(name, time.perf_counter() - seconds.get(name, 0.0))
    t = time.perf_counter()

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
