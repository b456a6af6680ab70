"""Library maintenance in bounded memory: verify, gc, stats, rm and model relations.

Each streams over the tables in batches (`LibraryStore.scan`) and aggregates in Arrow, so no
step holds every fragment's bytes or a Python object per row. What still grows with the
library, as compact Arrow columns: the ids some model references (gc), the distinct
(model, fragment) pairs and the fragments' sizes (stats, relations) — docs/decisions/0038-maintenance-streaming.md.
"""
from __future__ import annotations

import io
import struct
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from blake3 import blake3

from haagenti import restore
from haagenti.config import LibraryConfig, LibraryStats, ModelStats
from haagenti.encode import RawCache, decode_row, decode_rows, fragment_rows
from haagenti.checkpoints import reached
from haagenti.core import LibraryCore
from haagenti.errors import DamagedError, FragmentError, HaagentiError, LibraryError
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import Encoding
from haagenti.formats.container import SplicedFormat
from haagenti.formats.registry import container
from haagenti.hashing import model_hash
from haagenti.manifest import PIECES_FROM, FileRecord, ModelManifest, read_header_field
from haagenti.records import check_manifest, record_digest
from haagenti.store import LIBRARY_FORMAT_VERSION, LibraryStore
from haagenti.store.files import strings
from haagenti.store.leases import writing
from haagenti.store.schema import SCHEMAS, UPGRADABLE_FROM
from haagenti.store.publication import log_errors, orphan_manifest_keys, scan_manifests, unpublish
from haagenti.writer import Committer


VerifyProgress = Callable[[str, int, int], None]  # (phase, bytes done, bytes in the phase)

REF_CACHE_BYTES = 128 * 1024 * 1024  # decoded delta references kept between batches
MODEL_BATCH_BYTES = 16 * 1024 * 1024  # raw bytes per fetch when a model's files are re-hashed
BLOB_BATCH_ROWS = 32  # fragments decoded per batch: at most 32 MiB of raw bytes at the largest size
MAX_ERRORS = 100  # fragment errors listed one by one; the rest are counted


@dataclass
class VerifyReport:
    fragments_checked: int = 0
    models_checked: int = 0
    files_checked: int = 0
    lossy_tensors: dict[str, dict[str, float]] = field(default_factory=dict)  # "model:tensor" -> errors
    errors: list[str] = field(default_factory=list)
    unpublished_manifests: int = 0  # model manifests (by model and ingest) no publication owns: ignored, gc removes them

    @property
    def ok(self) -> bool:
        return not self.errors


# ---- verify ------------------------------------------------------------------------------
def verify(lib: LibraryCore, model_id: str | None = None, progress: VerifyProgress | None = None) -> VerifyReport:
    """Re-hash fragments and restored files. With a model: every fragment it needs and every
    file it restores. Without: the tables' Delta logs, every stored fragment (streamed, batch
    by batch), then every model, one at a time."""
    report = VerifyReport()
    if model_id is None:
        report.errors += lib.store.log_problems()
        report.errors += log_errors(lib.store)
        report.unpublished_manifests = len(orphan_manifest_keys(lib.store))
        try:
            _verify_fragments(lib, report, progress)
        except DamagedError as e:  # an unreadable data file: said, and the models are still checked
            report.errors.append(str(e))
        models = lib.store.read("models", columns=["model_id", "ingest_seq", "raw_bytes"]).sort_by("ingest_seq")
        targets = models["model_id"].to_pylist()
        total = pc.sum(models["raw_bytes"]).as_py() or 0
    else:
        targets, total = [model_id], lib.model(model_id)["raw_bytes"]
    sink = _CountingSink("models", total, progress)
    walker = LibraryCore(lib.store, replace(lib.config, batch_bytes=MODEL_BATCH_BYTES))  # a restore's walk, in smaller steps
    for mid in targets:
        try:
            manifest = lib.manifest(mid)
            # A lossy model's bytes differ from the original's by design: verify checks its
            # fragments and layout, and reports its error bounds below.
            restore.write_model(walker, manifest, [sink for _ in manifest.files], rehash=not manifest.lossy)
            report.models_checked += 1
            report.files_checked += len(manifest.files)
            if model_id is not None:
                report.fragments_checked += len(manifest.fragment_ids)
        except (FragmentError, DamagedError) as e:
            report.errors.append(str(e))
            continue
        report.lossy_tensors.update({f"{mid}:{name}": e for name, e in manifest.lossy_tensors().items()})
    return report


def _verify_fragments(lib: LibraryCore, report: VerifyReport, progress: VerifyProgress | None) -> None:
    """Decode every stored fragment and check it against its id, a few rows at a time. A delta
    needs its reference's bytes: references (plain or deltas themselves) are kept in a bounded
    cache as they pass, and the ones it no longer holds are read back together, per batch,
    through their chains (haagenti.encode.decode_rows)."""
    store = lib.store
    total, refs = 0, _Distinct()
    for t in store.scan("fragments", ["raw_size", "ref_id"]):
        total += pc.sum(t["raw_size"]).as_py() or 0
        refs.add(t["ref_id"].drop_null())
    wanted = refs.array()  # only these are worth caching
    cache = RawCache(REF_CACHE_BYTES)
    bad: dict[str, str] = {}
    done = 0
    for t in store.scan("fragments", batch_rows=BLOB_BATCH_ROWS):
        rows = fragment_rows(t)
        keep = pc.is_in(t["fragment_id"], value_set=wanted).to_pylist()
        here: dict[str, bytes] = {}  # references taken from the cache now: fetching may evict them
        later: list[tuple[dict, bool]] = []  # deltas whose reference neither the batch nor the cache holds

        def check(row: dict, is_ref: bool, ref: bytes | None) -> None:
            raw = _check(row, ref, bad)
            if raw is not None and is_ref:
                here[row["fragment_id"]] = raw
                cache.put(row["fragment_id"], raw)

        for row, is_ref in zip(rows, keep):  # in order: references mostly come before their deltas
            ref = None
            if row["ref_id"] is not None:
                ref = here.get(row["ref_id"])
                if ref is None:
                    ref = cache.get(row["ref_id"])
                if ref is None:
                    later.append((row, is_ref))
                    continue
                here[row["ref_id"]] = ref
            check(row, is_ref, ref)
        fetched = _references(lib, {r["ref_id"] for r, _ in later} - here.keys(), cache)
        for row, is_ref in later:
            ref = here.get(row["ref_id"]) or fetched.get(row["ref_id"])
            if ref is None:
                bad[row["fragment_id"]] = f"fragment {row['fragment_id']}: its delta reference {row['ref_id']} is missing or failed verification"
            else:
                check(row, is_ref, ref)
        report.fragments_checked += len(rows)
        done += sum(r["raw_size"] or 0 for r in rows)  # a null raw_size is reported by its decode
        if progress:
            progress("fragments", done, total)
    report.fragments_checked -= len(bad)
    report.errors.extend(_name_users(store, bad))


def _references(lib: LibraryCore, ids: set[str], cache: RawCache) -> dict[str, bytes]:
    """Decoded bytes of the references `ids`, through their chains; a reference that fails to
    decode is left out (it is reported in its own turn)."""
    read = lambda wanted: lib.read_rows(wanted, complete=False)  # noqa: E731
    if not ids:
        return {}
    try:
        return decode_rows(read(ids), read, cache)
    except FragmentError:
        out = {}
        for i in sorted(ids):
            try:
                out.update(decode_rows(read({i}), read, cache))
            except FragmentError:
                pass
        return out


def _check(row: dict, ref: bytes | None, bad: dict[str, str]) -> bytes | None:
    """A fragment's verified raw bytes, or None with the reason recorded in `bad`."""
    try:
        return decode_row(row, ref, row["ref_dtype"])
    except FragmentError as e:
        bad[row["fragment_id"]] = str(e)
    except Exception as e:  # a damaged blob can fail inside any codec: it is a finding, not a crash
        bad[row["fragment_id"]] = f"fragment {row['fragment_id']}: cannot decode ({type(e).__name__}: {e})"
    return None


def _name_users(store: "LibraryStore", bad: dict[str, str]) -> list[str]:
    """One line per bad fragment, naming the models and tensors that use it."""
    if not bad:
        return []
    listed = sorted(bad)[:MAX_ERRORS]
    ids = pa.array(listed, pa.string())
    users: dict[str, list[str]] = {}
    for t in scan_manifests(store, ["model_id", "tensor_name", "fragment_id"]):
        hit = t.filter(pc.is_in(t["fragment_id"], value_set=ids))
        for mid, name, fid in zip(*(hit[c].to_pylist() for c in ("model_id", "tensor_name", "fragment_id"))):
            names = users.setdefault(fid, [])
            if len(names) < 3 and f"model {mid!r}, tensor {name!r}" not in names:
                names.append(f"model {mid!r}, tensor {name!r}")
    lines = [f"{bad[f]} (used by {'; '.join(users[f]) if f in users else 'no model'})" for f in listed]
    if len(bad) > len(listed):
        lines.append(f"... and {len(bad) - len(listed)} more fragment(s) failed verification")
    return lines


class _CountingSink(io.RawIOBase):
    """Discards what a verify restores, reporting the bytes as progress."""

    def __init__(self, phase: str, total: int, progress: VerifyProgress | None):
        self.phase, self.total, self.progress, self.done = phase, total, progress, 0

    def write(self, b) -> int:  # type: ignore[override]
        n = len(b)
        self.done += n
        if self.progress:
            self.progress(self.phase, min(self.done, self.total), self.total)
        return n


# ---- gc and rm ---------------------------------------------------------------------------
def rm(lib: LibraryCore, model_id: str) -> None:
    """Unpublish the model (one commit), then drop its manifest rows; `gc` frees fragments.
    Holds an rm lease on the id: an ingest of the same id meanwhile is refused."""
    with writing(lib.store, "rm", [model_id]):
        unpublish(lib.store, model_id, lib.model(model_id)["ingest_id"])


def referenced(store: "LibraryStore") -> pa.Array:
    """Distinct ids some model needs: its manifests' fragments and, hop by hop, the references
    of those that are deltas (a scan of the fragments' ids per hop, MAX_CHAIN_DEPTH + 1 in a
    library ingest wrote; more only in a crafted one, which then keeps its whole chains).
    Arrow strings, O(referenced fragments), never a Python set."""
    live = _Distinct()
    live.add(verbatim_refs(store)["fragment_id"])
    for t in scan_manifests(store, ["fragment_id"]):
        live.add(t["fragment_id"].drop_null())
    frontier = live.array()
    while len(frontier):
        known = live.array()
        step = _Distinct()
        for t in store.scan("fragments", ["fragment_id", "ref_id"]):
            refs = t["ref_id"].filter(pc.is_in(t["fragment_id"], value_set=frontier)).drop_null()
            step.add(refs.filter(pc.invert(pc.is_in(refs, value_set=known))))
        frontier = step.array()
        live.add(frontier)
    return live.array()


def verbatim_refs(store: "LibraryStore") -> pa.Table:
    """(model_id, fragment_id) of every published model's verbatim pieces (its models row names
    them, manifest.header_field), distinct; a `files.header` that is neither is damage."""
    models = store.read("models", columns=["model_id", "files", "format_version"])
    pairs = {(r["model_id"], fid) for r in models.to_pylist() if (r["format_version"] or 0) >= PIECES_FROM
             for f in r["files"] for fid in read_header_field(f["header"], f"model {r['model_id']!r}, file {f['name']!r}")[1]}
    return pa.table({"model_id": pa.array([m for m, _ in pairs], pa.string()), "fragment_id": pa.array([i for _, i in pairs], pa.string())})


def gc(lib: LibraryCore, wait: float = 0.0) -> dict[str, int]:
    """Delete what no published model owns (manifest rows of interrupted ingests, fragments no
    model references directly or as a delta reference, signatures of fragments no longer
    stored) and vacuum. Holds the gc lease, which excludes every other writer: refused (after
    `wait` seconds) while one runs."""
    with writing(lib.store, "gc", wait=wait):
        return _gc(lib)


def _gc(lib: LibraryCore) -> dict[str, int]:
    store = lib.store
    _refuse_damage(store)
    keep = referenced(store)
    dead, alive = _Distinct(), _Distinct()
    freed = 0
    for t in store.scan("fragments", ["fragment_id", "stored_size"]):
        held = pc.is_in(t["fragment_id"], value_set=keep)
        gone = t.filter(pc.invert(held))
        freed += pc.sum(gone["stored_size"]).as_py() or 0
        dead.add(gone["fragment_id"])
        alive.add(t["fragment_id"].filter(held))
    gone, present = dead.array(), alive.array()
    missing = len(keep) - len(present)
    if missing:  # a log entry lost, say: its data files look unreferenced, and vacuuming them would make the loss final
        raise DamagedError(f"gc refused: {missing} fragment(s) that published models reference are missing from the fragments table; nothing was deleted (run `haagenti verify`)")
    orphans = store.delete_owned("manifests", orphan_manifest_keys(store))
    # Index rows go before their fragments: a gc killed in between leaves fragments the index
    # does not know (the next gc removes them), never an index row that says "stored" for a
    # fragment that is gone. Rows a gc killed before this order left are removed too.
    lib.index.delete_except(present)
    removed = store.delete_fragments(gone)
    stale = _Distinct()
    for t in store.scan("signatures", ["fragment_id"]):
        stale.add(t["fragment_id"].filter(pc.invert(pc.is_in(t["fragment_id"], value_set=present))))
    store.delete_signatures(stale.array())
    files = store.vacuum()
    store.leases.clear_void()
    return {"fragments_removed": removed, "bytes_freed": freed, "files_vacuumed": files, "manifest_rows_removed": orphans}


def compact(lib: LibraryCore, target_bytes: int = 256 * 1024 * 1024, wait: float = 0.0) -> int:
    """Under the gc lease: the index layout's rewrite for lookups (gc's deletes rewrite its
    files: sort them again), then the metadata tables' small files merged and everything
    replaced vacuumed (LibraryStore.compact). Returns data files replaced."""
    with writing(lib.store, "gc", wait=wait):
        return lib.index.compact(target_bytes) + lib.store.compact()


def gc_line(r: dict[str, int]) -> str:
    """What a gc did, in one line; a run with nothing to collect says so."""
    if not any(r.values()):
        return "gc: nothing to collect"
    return f"gc: {r['fragments_removed']} fragments removed, {r['bytes_freed']:,} B freed, {r['files_vacuumed']} files vacuumed"


# ---- upgrade ----------------------------------------------------------------------------
TREE_FORMAT = 7  # records whose files.layout is the file's tree, verbatim bytes in files.header


def upgrade(url: str) -> list[str]:
    """Move a format-4 to 9 library to this format in place, under the gc lease. Formats 4-6:
    each published model's record is checked as its format defined it (its files' layout
    digests over their inline bytes and fragment ids, its content hash over their whole-file
    BLAKE3, and from format 5 its record digest), then rewritten as format 7 defines it: each
    file's tree (files.layout), the content hash over the trees, a fresh record digest. The
    whole-file BLAKE3 stays in files.blake3. A model whose record fails the check gets no
    digest, so every reader refuses it by name. Format 6 only added an encoding, which older
    rows never use. Format 8: the pieces of every file's verbatim bytes over 16 KiB are
    committed (those the library lacks), then every row, `files.header` in its format-8 form,
    in one commit of the models table (rows then say this format). Formats 9 and 10 only added
    codecs (`rans`, `rans2`), which older rows never use: from format 8 or 9 nothing but
    haagenti.json changes.
    Then haagenti.json says this format. Returns the
    failures, one line each. Killed before the marker is rewritten, the library keeps its
    format and a rerun does it all again (a row it rewrote already, at this format, has its
    verbatim bytes read back and is checked as format 7's; pieces stored are not stored twice)."""
    store = LibraryStore(url)
    found = store.marker_version()
    if found == LIBRARY_FORMAT_VERSION:
        return []
    if found not in UPGRADABLE_FROM:
        raise LibraryError(f"{store.url}: library format {found!r}; `haagenti upgrade` moves formats {', '.join(map(str, UPGRADABLE_FROM))} to {LIBRARY_FORMAT_VERSION} only")
    failed: list[str] = []
    with writing(store, "gc") as lease:
        if found < PIECES_FROM:  # formats 9 and 10 only added codecs: format 8's and 9's rows are this format's
            core = LibraryCore(store, LibraryConfig().settled(store.marker_doc(), store.url))
            rows, failed = _rewrite_records(core, found)
            store.replace_models(_with_verbatim_pieces(core, rows, lease.writer), f"upgrade to format {LIBRARY_FORMAT_VERSION}")
            store.learn_columns("fragments")  # chain depths (format 5): older rows read as nulls (docs/format.md)
            reached("upgraded-models")
        store.rewrite_marker(LIBRARY_FORMAT_VERSION)
    return failed


def _rewrite_records(core: LibraryCore, found: int) -> tuple[list[dict], list[str]]:
    """Every published model's record checked as format `found` wrote it (or as format 7's, on
    a rerun or from format 7) and rewritten as format 7's; the failures."""
    store = core.store
    failed: list[str] = []
    rewritten = []
    for model in store.read("models").to_pylist():
        rows = store.read("manifests", equals=("model_id", model["model_id"]))
        rows = rows.filter(pc.equal(rows["ingest_id"], strings([model["ingest_id"]])[0]))
        try:
            if model["format_version"] == LIBRARY_FORMAT_VERSION:  # rewritten by a run killed before its marker
                model = dict(core.with_verbatim(model), format_version=TREE_FORMAT)
            m = ModelManifest.from_rows(model, rows)
            if model["format_version"] == TREE_FORMAT:
                check_manifest(m)
                if record_digest(m, model["ingest_id"], model["n_tensors"], model["lossy"]) != model.get("record_digest"):
                    raise DamagedError(f"model {m.model_id!r}: its record does not match its digest")
            else:
                _check_old_record(m, model, found)
            files = [FileRecord.with_layout(f.name, f.format, f.size, f.blake3, f.header, [len(t.fragments) for t in tensors],
                                            [r.source_fragment_id for t in tensors for r in t.fragments])
                     for f, tensors in zip(m.files, m.file_tensors())]
            m = check_manifest(replace(m, files=files, content_hash=model_hash([f.identity for f in files])))
            digest = record_digest(m, model["ingest_id"], model["n_tensors"], model["lossy"])
            model = dict(model, files=[asdict(f) for f in files], content_hash=m.content_hash, record_digest=digest)
        except (HaagentiError, ValueError, TypeError, KeyError, AttributeError) as e:
            failed.append(f"model {model['model_id']!r}: left without a record digest, its record fails its check ({e})")
            model = dict(model, record_digest=None)
        rewritten.append(model if model["format_version"] == LIBRARY_FORMAT_VERSION else dict(model, format_version=TREE_FORMAT))
    return rewritten, failed


def _with_verbatim_pieces(core: LibraryCore, rows: list[dict], writer: str) -> pa.Table:
    """Format 7 to 8: the pieces of the format-7 rows' verbatim bytes committed (those the
    library lacks), and every row at this format. The record digests stay: they cover the
    verbatim bytes, which the pieces give back. (A row still at this format is one a rerun
    could not read back: left as it is, without a digest.)"""
    older = [r for r in rows if r["format_version"] == TREE_FORMAT]
    committer = Committer(core.store, core.index, writer, f"upgrade to format {LIBRARY_FORMAT_VERSION}", core.config.batch_bytes)
    committer.add_verbatim([[f["header"] for f in r["files"]] for r in older])
    committer.flush()
    for r in older:
        r["files"] = [FileRecord(**f).row() for f in r["files"]]
        r["format_version"] = LIBRARY_FORMAT_VERSION
    return pa.Table.from_pylist(rows, schema=SCHEMAS["models"])


_LAYOUT_V1 = "haagenti 2026-11-23 file layout v1"  # formats 3 to 6: a file's layout digest (docs/format.md, "Versions")


def _check_old_record(m: ModelManifest, model: dict, found: int) -> None:
    """Raise DamagedError unless `m` is a record as format `found` (4 to 6) wrote it: each
    byte-exact file's layout digest over its inline bytes (a spliced file's packed gaps, else
    its gaps) and fragment ids, the content hash over the files' BLAKE3, and (5, 6) the record digest."""
    where = f"model {m.model_id!r}"
    if found >= 5 and record_digest(m, model["ingest_id"], model["n_tensors"], model["lossy"]) != model.get("record_digest"):
        raise DamagedError(f"{where}: its record does not match its digest")
    if m.content_hash != model_hash([str(f.blake3) for f in m.files]):
        raise DamagedError(f"{where}: its recorded content hash is not the hash of its files' hashes")
    for f, tensors in zip(m.files, m.file_tensors()):
        fmt = container(f.format)
        if not fmt.byte_exact:
            continue
        inline = f.header if isinstance(fmt, SplicedFormat) else b"".join(fmt.splice(f.header, f.name).gaps)
        ids = [r.source_fragment_id for t in tensors for r in t.fragments]
        h = blake3(derive_key_context=_LAYOUT_V1)
        h.update(struct.pack("<QQ", len(inline), len(ids)) + inline + bytes.fromhex("".join(ids)))
        if h.hexdigest() != f.layout:
            raise DamagedError(f"{where}: {f.name} does not match its recorded layout (fragments missing or out of order)")


def _refuse_damage(store: "LibraryStore") -> None:
    """gc deletes what no record names, so it must not run on records verify finds damaged (a
    damaged log entry drops the rows it added, and their data files would look unreferenced),
    nor follow a link out of the library (vacuum and lease clearing delete what they list)."""
    problems = store.log_problems() + log_errors(store)
    if problems:
        raise DamagedError(f"gc refused: {problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; nothing was deleted (run `haagenti verify`)")
    links = store.links()
    if links:
        raise LibraryError(f"gc refused: {links[0]} is a symbolic link; gc never follows links out of the library (nothing was deleted)")


# ---- stats and relations -----------------------------------------------------------------
def stats(lib: LibraryCore) -> LibraryStats:
    """Reduction per model and family, and every byte on disk. A model's new stored bytes are
    those of the fragments it was the first (in ingest order) to reference, the pieces of its
    files' large verbatim bytes (headers, gaps of spliced files, side files) among them; its
    disk bytes add what its record keeps in the models row (small verbatim bytes, the pieces' ids)."""
    store = lib.store
    models = store.read("models", columns=["model_id", "family", "raw_bytes", "ingest_seq", "files"]).sort_by("ingest_seq")
    files = models["files"].combine_chunks()
    headers = pc.fill_null(pc.binary_length(pc.struct_field(pc.list_flatten(files), "header")), 0)
    verbatim = np.bincount(pc.list_parent_indices(files).to_numpy(), headers.to_numpy(), models.num_rows).astype(np.int64)
    ranks = pa.table({"model_id": models["model_id"], "rank": pa.array(range(models.num_rows), pa.int64())})
    pairs, counts = _Distinct("model_id", "fragment_id"), []
    pairs.add(verbatim_refs(store))
    for t in scan_manifests(store, ["model_id", "fragment_id", "source_fragment_id", "elem_count", "dtype"]):
        t = t.filter(pc.is_valid(t["fragment_id"]))
        lossy = pc.fill_null(pc.not_equal(t["fragment_id"], t["source_fragment_id"]), True)
        counts.append(pa.table({
            "model_id": t["model_id"],
            "refs": t["fragment_id"],
            "lossy": pc.cast(lossy, pa.int64()),
            "lossy_bytes": pc.if_else(lossy, pc.multiply(t["elem_count"], _itemsizes(t["dtype"])), 0),
        }).group_by("model_id").aggregate([("refs", "count"), ("lossy", "sum"), ("lossy_bytes", "sum")]))
        pairs.add(t.select(["model_id", "fragment_id"]))
    per = _sum_by(counts, "model_id", ["refs_count", "lossy_sum", "lossy_bytes_sum"])
    frags = []
    for t in store.scan("fragments", ["fragment_id", "stored_size", "encoding"]):
        frags.append(t.select(["fragment_id", "stored_size"]).append_column("plain", pc.equal(t["encoding"], Encoding.PLAIN.value))
                     .append_column("predicted", pc.equal(t["encoding"], Encoding.PREDICTED.value)))
    # One size per id (a fragment written twice by racing ingests is the same content).
    sizes = _concat(frags, ["fragment_id", "stored_size", "plain", "predicted"], [pa.string(), pa.int64(), pa.bool_(), pa.bool_()]).group_by(
        "fragment_id", use_threads=False).aggregate([("stored_size", "last"), ("plain", "last"), ("predicted", "last")])
    # Fragments no published model references (an interrupted ingest's) are not the models'
    # storage: counted apart, as what gc would free; plain and delta count the models' only.
    live = pc.is_in(sizes["fragment_id"], value_set=referenced(store))
    left = sizes.filter(pc.invert(live))
    unreferenced = pc.sum(left["stored_size_last"]).as_py() or 0
    sizes = sizes.filter(live)
    plain = pc.sum(pc.cast(sizes["plain_last"], pa.int64())).as_py() or 0
    pairs_t = pairs.table()
    users = pairs_t.group_by("fragment_id").aggregate([("model_id", "count")])
    shared = users.filter(pc.greater(users["model_id_count"], 1))["model_id_count"]
    first = pairs_t.join(ranks, "model_id").group_by("fragment_id").aggregate([("rank", "min")])
    sized = first.join(sizes, "fragment_id")
    missing = sized["stored_size_last"].null_count
    if missing:  # e.g. a fragments log entry lost: say so rather than count them as free
        raise DamagedError(f"{store.url}: {missing} fragment(s) that published models reference are missing from the fragments table (run `haagenti verify`)")
    new = sized.group_by("rank_min").aggregate([("stored_size_last", "sum")])
    new_by_rank = dict(zip(new["rank_min"].to_pylist(), new["stored_size_last_sum"].to_pylist()))
    per_model = []
    for rank, (mid, fam, raw) in enumerate(zip(*(models[c].to_pylist() for c in ("model_id", "family", "raw_bytes")))):
        refs, lossy, _ = per.get(mid, (0, 0, 0))
        new = new_by_rank.get(rank, 0)
        per_model.append(ModelStats(mid, fam, raw, new, refs, lossy, new + int(verbatim[rank])))
    families: dict[str, list[ModelStats]] = {}
    for s in per_model:
        if s.family:
            families.setdefault(s.family, []).append(s)
    per_family = {f: 1 - sum(s.disk_bytes for s in ms) / max(sum(s.raw_bytes for s in ms), 1) for f, ms in sorted(families.items())}
    parts = store.disk_bytes()
    by_part = {"fragments": parts["fragments"], "signatures": parts["signatures"], "index": sum(parts[t] for t in lib.index.tables),
               "manifests": parts["manifests"], "models": parts["models"], "logs": parts["logs"], "other": parts["other"]}
    lossy_refs = sum(v[1] for v in per.values())
    return LibraryStats(
        models=models.num_rows,
        fragments=sizes.num_rows,
        raw_bytes=pc.sum(models["raw_bytes"]).as_py() or 0,
        stored_bytes=pc.sum(sizes["stored_size_last"]).as_py() or 0,
        plain_fragments=plain,
        delta_fragments=sizes.num_rows - plain,
        predicted_fragments=pc.sum(pc.cast(sizes["predicted_last"], pa.int64())).as_py() or 0,
        shared_fragments=len(shared),
        refs_per_shared_fragment=(pc.sum(shared).as_py() / len(shared)) if len(shared) else 0.0,
        lossy_refs=lossy_refs,
        lossy_saved_bytes=sum(v[2] for v in per.values()),
        per_model=per_model,
        per_family=per_family,
        unreferenced_bytes=unreferenced,
        unreferenced_fragments=left.num_rows,
        disk_bytes=sum(by_part.values()),
        disk_by_part=by_part,
    )


def model_relations(lib: LibraryCore, model_ids: list[str] | None = None) -> dict[tuple[str, str], float]:
    """Share of model a's fragments that are b's fragments, or deltas against b's fragments,
    for every ordered pair of models (of `model_ids`, when given) that reference fragments.
    The basis of family inference and of the model-by-model similarity map."""
    pairs = _model_pairs(lib.store, model_ids)
    sizes = dict(zip(*_counts(pairs, "model_id")))
    out = {(a, b): 0.0 for a in sizes for b in sizes if a != b}
    hits = _shared_counts(lib.store, pairs, pairs)
    for a, b, n in zip(*(hits[c].to_pylist() for c in ("a", "b", "n"))):
        out[(a, b)] = n / sizes[a]
    return out


def closest_models(lib: LibraryCore, model_ids: list[str], pending: str | None = None) -> dict[str, tuple[str, float] | None]:
    """For each of `model_ids`, the other model it is most related to (either direction of
    `model_relations`; ties to the smallest id) and that share. Only relations touching these
    models are computed: a pipeline run infers families for the models it adds, not for the
    whole library."""
    if not model_ids:
        return {}
    everyone = _model_pairs(lib.store, None, pending)
    mine = everyone.filter(pc.is_in(everyone["model_id"], value_set=pa.array(model_ids, pa.string())))
    sizes = dict(zip(*_counts(everyone, "model_id")))
    scores: dict[str, dict[str, float]] = {m: {} for m in model_ids}
    for mine_is_a in (True, False):
        hits = _shared_counts(lib.store, mine, everyone) if mine_is_a else _shared_counts(lib.store, everyone, mine)
        for a, b, n in zip(*(hits[c].to_pylist() for c in ("a", "b", "n"))):
            m, other = (a, b) if mine_is_a else (b, a)
            scores[m][other] = max(scores[m].get(other, 0.0), n / sizes[a])
    out: dict[str, tuple[str, float] | None] = {}
    for mid in model_ids:
        s = scores[mid]
        others = [o for o in sizes if o != mid] if mid in sizes else []
        for o in others:  # related models with nothing shared still compete, at 0.0
            s.setdefault(o, 0.0)
        best = max(sorted(s), key=lambda o: s[o], default=None)
        out[mid] = (best, s[best]) if best is not None else None
    return out


def _model_pairs(store: "LibraryStore", model_ids: list[str] | None, pending: str | None = None) -> pa.Table:
    """Distinct (model_id, fragment_id) of the published manifests (and of ingest `pending`,
    not yet published: a pipeline run's own), optionally of some models only."""
    wanted = pa.array(model_ids, pa.string()) if model_ids is not None else None
    pairs = _Distinct("model_id", "fragment_id")
    for t in scan_manifests(store, ["model_id", "fragment_id"], pending):
        t = t.filter(pc.is_valid(t["fragment_id"]))
        if wanted is not None:
            t = t.filter(pc.is_in(t["model_id"], value_set=wanted))
        pairs.add(t)
    return pairs.table()


def _shared_counts(store: "LibraryStore", a_pairs: pa.Table, b_pairs: pa.Table) -> pa.Table:
    """(a, b, n): how many of a's fragments b holds too, or are deltas against one b holds."""
    ids = pc.unique(a_pairs["fragment_id"])
    refs = []
    for t in store.scan("fragments", ["fragment_id", "ref_id"]):
        t = t.filter(pc.and_(pc.is_valid(t["ref_id"]), pc.is_in(t["fragment_id"], value_set=ids)))
        refs.append(t)
    refs_t = _concat(refs, ["fragment_id", "ref_id"], [pa.string(), pa.string()]).group_by(["fragment_id", "ref_id"]).aggregate([])
    a = a_pairs.rename_columns(["a", "fragment_id"])
    direct = a.append_column("key", a["fragment_id"])
    via = a.join(refs_t, "fragment_id")
    keys = pa.concat_tables([direct, pa.table({"a": via["a"], "fragment_id": via["fragment_id"], "key": via["ref_id"]})])
    b = b_pairs.rename_columns(["b", "key"])
    hits = keys.join(b, "key").select(["a", "fragment_id", "b"])
    hits = hits.filter(pc.not_equal(hits["a"], hits["b"])).group_by(["a", "fragment_id", "b"]).aggregate([])
    n = hits.group_by(["a", "b"]).aggregate([("fragment_id", "count")])
    return pa.table({"a": n["a"], "b": n["b"], "n": n["fragment_id_count"]})


def _counts(t: pa.Table, key: str) -> tuple[list, list]:
    c = t.group_by(key).aggregate([(key, "count")])
    return c[key].to_pylist(), c[f"{key}_count"].to_pylist()


def _itemsizes(dtypes: pa.ChunkedArray) -> pa.Array:
    """Bytes per element of each row's dtype name."""
    names = pc.unique(dtypes)
    sizes = pa.array([lookup_dtype(n).itemsize for n in names.to_pylist()], pa.int64())
    return pc.take(sizes, pc.index_in(dtypes, value_set=names))


def _sum_by(parts: list[pa.Table], key: str, cols: list[str]) -> dict[str, tuple]:
    if not parts:
        return {}
    t = pa.concat_tables(parts).group_by(key).aggregate([(c, "sum") for c in cols])
    return {k: v for k, *v in zip(t[key].to_pylist(), *(t[f"{c}_sum"].to_pylist() for c in cols))}


def _concat(parts: list[pa.Table], names: list[str], types: list[pa.DataType]) -> pa.Table:
    return pa.concat_tables(parts) if parts else pa.table({n: pa.array([], ty) for n, ty in zip(names, types)})


class _Distinct:
    """Distinct rows of some string columns, gathered batch by batch and compacted as they
    accumulate, so memory stays at about the number of distinct rows (never one per row read)."""

    def __init__(self, *columns: str, compact_every: int = 1 << 20):
        self.columns = list(columns or ("id",))
        self.parts: list[pa.Table] = []
        self.pending = 0
        self.compact_every = compact_every

    def add(self, values: pa.Table | pa.Array | pa.ChunkedArray) -> None:
        t = values.select(self.columns) if isinstance(values, pa.Table) else pa.table({self.columns[0]: values})
        if t.num_rows:
            self.parts.append(t.group_by(self.columns).aggregate([]))
            self.pending += self.parts[-1].num_rows
            if self.pending >= self.compact_every:
                self.parts = [self.table()]
                self.pending = self.parts[0].num_rows
                self.compact_every = max(self.compact_every, 2 * self.pending)

    def table(self) -> pa.Table:
        if not self.parts:
            return pa.table({c: pa.array([], pa.string()) for c in self.columns})
        return pa.concat_tables(self.parts).group_by(self.columns).aggregate([]).select(self.columns)

    def array(self) -> pa.Array:
        """The distinct values of a one-column gathering."""
        return self.table()[self.columns[0]].combine_chunks()
