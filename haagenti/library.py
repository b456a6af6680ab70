"""FragmentLibrary: ingest models, restore them bit-exact, and keep the library tidy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from haagenti import restore
from haagenti.config import LibraryConfig, LibraryStats, ModelStats
from haagenti.encode import RawCache, decode_rows, fragment_rows
from haagenti.errors import DamagedError, FragmentError, LibraryError
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import Encoding
from haagenti.ingest import IngestReport, ModelInput, Progress, ingest_models
from haagenti.manifest import ModelManifest, TensorRef, validate_model_id
from haagenti.parallel import Workers
from haagenti.records import trusted_manifest
from haagenti.store import LibraryStore


@dataclass
class VerifyReport:
    fragments_checked: int = 0
    models_checked: int = 0
    files_checked: int = 0
    lossy_tensors: dict[str, dict[str, float]] = field(default_factory=dict)  # "model:tensor" -> errors
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class FragmentLibrary:
    def __init__(self, store: LibraryStore, config: LibraryConfig):
        self.store = store
        self.config = config

    @classmethod
    def open(cls, url: str, config: LibraryConfig | None = None, create: bool = True) -> "FragmentLibrary":
        """The library at `url` (created with `config`'s invariants unless `create` is False).
        Its config takes the library's invariants; one `config` sets to another value is refused."""
        store = LibraryStore(url)
        config = config or LibraryConfig()
        if not store.exists():
            if store.fs.isfile(store.root):
                raise LibraryError(f"{url}: is a file, not a library folder")
            if not create:
                raise LibraryError(f"{url}: no haagenti library here")
            store.create(config.invariants())
        return cls(store, config.settled(store.marker(), url))

    # ---- catalogue ----------------------------------------------------------------------
    def models(self) -> list[dict]:
        return sorted(self.store.read("models").to_pylist(), key=lambda m: m["ingest_seq"])

    def model(self, model_id: str) -> dict:
        validate_model_id(model_id)
        rows = self.store.read("models", equals=("model_id", model_id)).to_pylist()
        if not rows:
            raise LibraryError(f"model {model_id!r} is not in the library")
        return rows[0]

    def manifest(self, model_id: str) -> ModelManifest:
        model = self.model(model_id)
        rows = self.store.read("manifests", equals=("model_id", model_id))
        return trusted_manifest(model, rows)  # names, counts and offsets are untrusted input

    def known_fragments(self) -> dict[str, str]:
        t = self.store.read("fragments", columns=["fragment_id", "dtype"])
        return dict(zip(t["fragment_id"].to_pylist(), t["dtype"].to_pylist()))

    def reference_signatures(self) -> pa.Table:
        """(fragment_id, bits, n_elements) of the fragments a delta may reference: plain and
        exact (references are never deltas, so chains stay one hop deep)."""
        frags = self.store.read("fragments", columns=["fragment_id", "encoding", "quality"])
        plain = frags.filter(pc.and_(pc.equal(frags["encoding"], Encoding.PLAIN.value), pc.equal(frags["quality"], "exact")))
        sigs = self.store.read("signatures", columns=["fragment_id", "bits", "n_elements"])
        return sigs.filter(pc.is_in(sigs["fragment_id"], plain["fragment_id"]))

    def fetch_raw(self, ids: Iterable[str], cache: RawCache | None = None, workers: Workers | None = None) -> dict[str, bytes]:
        """Decoded, hash-verified bytes of fragments (and nothing else from the library),
        decoded over `workers` when given."""
        ids = set(ids)
        held = {i: cache.get(i) for i in ids} if cache else {}
        held = {i: v for i, v in held.items() if v is not None}  # taken now: decoding may evict them
        todo = ids - held.keys()
        rows = fragment_rows(self.store.read_fragments(todo)) if todo else []
        missing = todo - {r["fragment_id"] for r in rows}
        if missing:
            raise FragmentError(f"fragment(s) missing from the library: {sorted(missing)[:3]}")
        out = decode_rows(rows, lambda s: fragment_rows(self.store.read_fragments(s)), cache, workers)
        out.update(held)
        return out

    # ---- ingest -------------------------------------------------------------------------
    def ingest(
        self,
        urls: list[str],
        model_id: str,
        family: str | None = None,
        progress: Progress | None = None,
        device: str = "cpu",
        quality: str = "exact",
        threads: int = 0,
    ) -> IngestReport:
        """Add a model. `quality` labels its new fragments: "exact" for models as published, or a
        precision tier ("int8", "int4") that never serves as a delta reference for exact data."""
        return self.ingest_many([ModelInput(list(urls), model_id, family)], progress, device, quality, threads)[0]

    def ingest_many(
        self,
        models: list[ModelInput],
        progress: Progress | None = None,
        device: str = "cpu",
        quality: str = "exact",
        threads: int = 0,
    ) -> list[IngestReport]:
        """Add several models in one set of commits (haagenti.ingest)."""
        return ingest_models(self, models, progress, device, quality, threads)

    # ---- restore (haagenti.restore) ----------------------------------------------------
    def iter_tensors(self, manifest: ModelManifest, cache: RawCache | None = None) -> Iterable[tuple[TensorRef, bytes]]:
        """(tensor, raw bytes) in manifest order, fetching fragments in bounded batches."""
        for t, parts in restore.iter_parts(self, manifest, cache):
            yield t, b"".join(parts)

    def restore(self, model_id: str, out_dir: str, rehash: bool = False, force: bool = False, threads: int = 0) -> list[str]:
        """Write the model's files into `out_dir` (haagenti.restore.restore_model); `threads`: 0 uses every core."""
        return restore.restore_model(self, model_id, out_dir, rehash, force, threads)

    def _write(self, manifest: ModelManifest, sinks: list[BinaryIO], rehash: bool) -> None:
        restore.write_model(self, manifest, sinks, rehash)

    def open_file(self, model_id: str, name: str):
        """A stored file, opened for reading by range without restoring it (haagenti.libraryfs)."""
        from haagenti.libraryfs import LibraryFileSystem

        return LibraryFileSystem(self).open(f"{validate_model_id(model_id)}/{name}", "rb")

    # ---- maintenance --------------------------------------------------------------------
    def verify(self, model_id: str | None = None) -> VerifyReport:
        """Re-hash fragments and restored files. With a model: every fragment it needs and every
        file it restores. Without: every stored fragment, then every model."""
        report = VerifyReport()
        if model_id is None:
            report.errors += self.store.log_problems()
            ids = self.known_fragments()
            try:
                report.fragments_checked += len(self.fetch_raw(ids))
            except FragmentError as e:
                report.errors.append(str(e))
            targets = [m["model_id"] for m in self.models()]
        else:
            targets = [model_id]
        for mid in targets:
            try:
                manifest = self.manifest(mid)
                # A lossy model's bytes differ from the original's by design: verify checks its
                # fragments and layout, and reports its error bounds below.
                self._write(manifest, [restore.NullSink() for _ in manifest.files], rehash=not manifest.lossy)
                report.models_checked += 1
                report.files_checked += len(manifest.files)
                if model_id is not None:
                    report.fragments_checked += len(manifest.fragment_ids)
            except (FragmentError, DamagedError) as e:
                report.errors.append(str(e))
                continue
            report.lossy_tensors.update({f"{mid}:{name}": e for name, e in manifest.lossy_tensors().items()})
        return report

    def rm(self, model_id: str) -> None:
        """Unpublish the model (one commit), then drop its manifest rows; `gc` frees fragments."""
        self.model(model_id)
        self.store.delete_models([model_id])
        self.store.delete_manifests([model_id])

    def referenced(self) -> set[str]:
        refs = set(self.store.read("manifests", columns=["fragment_id"])["fragment_id"].to_pylist()) - {None}
        frags = self.store.read("fragments", columns=["fragment_id", "ref_id"])
        for fid, ref in zip(frags["fragment_id"].to_pylist(), frags["ref_id"].to_pylist()):
            if ref and fid in refs:
                refs.add(ref)
        return refs

    def gc(self) -> dict[str, int]:
        """Delete fragments no model references (directly or as a delta reference) and vacuum.
        Must not run while an ingest into the same library is in flight (docs/decisions.md)."""
        keep = self.referenced()
        frags = self.store.read("fragments", columns=["fragment_id", "stored_size"])
        dead = [(f, s) for f, s in zip(frags["fragment_id"].to_pylist(), frags["stored_size"].to_pylist()) if f not in keep]
        ids = sorted({f for f, _ in dead})
        removed = self.store.delete_fragments(ids)
        orphan_sigs = self.store.read("signatures", columns=["fragment_id"])["fragment_id"].to_pylist()
        self.store.delete_signatures(ids + sorted(set(orphan_sigs) - set(frags["fragment_id"].to_pylist())))
        files = self.store.vacuum()
        return {"fragments_removed": removed, "bytes_freed": sum(s for _, s in dead), "files_vacuumed": files}

    def stats(self) -> LibraryStats:
        models = self.models()
        man = self.store.read("manifests", columns=["model_id", "fragment_id", "source_fragment_id", "elem_count", "dtype"])
        frags = self.store.read("fragments", columns=["fragment_id", "stored_size", "encoding"])
        stored = dict(zip(frags["fragment_id"].to_pylist(), frags["stored_size"].to_pylist()))
        encodings = frags["encoding"].to_pylist()
        users: dict[str, set[str]] = {}
        lossy_refs = lossy_saved = 0
        per_model_refs: dict[str, list[str]] = {}
        lossy_by_model: dict[str, int] = {}
        for mid, fid, src, n, dt in zip(*(man[c].to_pylist() for c in man.column_names)):
            if fid is None:
                continue
            users.setdefault(fid, set()).add(mid)
            per_model_refs.setdefault(mid, []).append(fid)
            if fid != src:
                lossy_refs += 1
                lossy_saved += n * lookup_dtype(dt).itemsize
                lossy_by_model[mid] = lossy_by_model.get(mid, 0) + 1
        shared = [u for u in users.values() if len(u) > 1]
        seen: set[str] = set()
        per_model = []
        for m in models:
            mine = set(per_model_refs.get(m["model_id"], []))
            new = mine - seen
            seen |= mine
            per_model.append(ModelStats(m["model_id"], m["family"], m["raw_bytes"], sum(stored.get(f, 0) for f in new), len(per_model_refs.get(m["model_id"], [])), lossy_by_model.get(m["model_id"], 0)))
        families: dict[str, list[ModelStats]] = {}
        for s in per_model:
            if s.family:
                families.setdefault(s.family, []).append(s)
        per_family = {f: 1 - sum(s.new_stored_bytes for s in ms) / max(sum(s.raw_bytes for s in ms), 1) for f, ms in sorted(families.items())}
        return LibraryStats(
            models=len(models),
            fragments=len(stored),
            raw_bytes=sum(m["raw_bytes"] for m in models),
            stored_bytes=sum(stored.values()),
            plain_fragments=encodings.count(Encoding.PLAIN.value),
            delta_fragments=len(encodings) - encodings.count(Encoding.PLAIN.value),
            shared_fragments=len(shared),
            refs_per_shared_fragment=(sum(len(u) for u in shared) / len(shared)) if shared else 0.0,
            lossy_refs=lossy_refs,
            lossy_saved_bytes=lossy_saved,
            per_model=per_model,
            per_family=per_family,
        )


def model_relations(library: FragmentLibrary, model_ids: list[str] | None = None) -> dict[tuple[str, str], float]:
    """Share of model a's fragments that are b's fragments, or deltas against b's fragments.
    The basis of family inference and of the model-by-model similarity map."""
    man = library.store.read("manifests", columns=["model_id", "fragment_id"])
    frags = library.store.read("fragments", columns=["fragment_id", "ref_id"])
    ref_of = {f: r for f, r in zip(frags["fragment_id"].to_pylist(), frags["ref_id"].to_pylist()) if r}
    owned: dict[str, set[str]] = {}
    for mid, fid in zip(man["model_id"].to_pylist(), man["fragment_id"].to_pylist()):
        if fid is not None and (model_ids is None or mid in model_ids):
            owned.setdefault(mid, set()).add(fid)
    out = {}
    for a, fa in owned.items():
        for b, fb in owned.items():
            if a != b and fa:
                out[(a, b)] = sum(1 for f in fa if f in fb or ref_of.get(f) in fb) / len(fa)
    return out
