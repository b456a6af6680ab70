"""FragmentLibrary: ingest models, restore them bit-exact, and keep the library tidy."""
from __future__ import annotations

from typing import BinaryIO, Callable, Iterable

import pyarrow.compute as pc

from haagenti import maintenance, restore
from haagenti.config import LibraryConfig, LibraryStats
from haagenti.encode import RawCache, decode_rows, fragment_rows
from haagenti.errors import FragmentError, LibraryError, UnknownModelError
from haagenti.fragment import Encoding
from haagenti.index import layout_class, open_index
from haagenti.ingest import IngestProgress, IngestReport, ModelInput, ingest_models
from haagenti.maintenance import VerifyProgress, VerifyReport
from haagenti.manifest import ModelManifest, validate_model_id
from haagenti.parallel import Workers
from haagenti.records import trusted_manifest
from haagenti.store import LibraryStore
from haagenti.store.files import strings


class FragmentLibrary:
    def __init__(self, store: LibraryStore, config: LibraryConfig):
        self.store = store
        self.config = config
        self.index = open_index(store, config)  # its ids reader's footers serve every fragment read

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
            layout_class(config.index)  # a layout this haagenti knows, before it is recorded
            store.create(config.invariants())
        return cls(store, config.settled(store.marker(), url))

    # ---- catalogue ----------------------------------------------------------------------
    def models(self) -> list[dict]:
        return sorted(self.store.read("models").to_pylist(), key=lambda m: m["ingest_seq"])

    def model(self, model_id: str) -> dict:
        validate_model_id(model_id)
        rows = self.store.read("models", equals=("model_id", model_id)).to_pylist()
        if not rows:
            raise UnknownModelError(f"model {model_id!r} is not in the library")
        return rows[0]

    def manifest(self, model_id: str) -> ModelManifest:
        model = self.model(model_id)
        rows = self.store.read("manifests", equals=("model_id", model_id))
        rows = rows.filter(pc.equal(rows["ingest_id"], strings([model["ingest_id"]])[0]))  # not an interrupted ingest's rows
        return trusted_manifest(model, rows)  # names, counts and offsets are untrusted input

    def known_fragments(self) -> dict[str, str]:
        t = self.store.read("fragments", columns=["fragment_id", "dtype"])
        return dict(zip(t["fragment_id"].to_pylist(), t["dtype"].to_pylist()))

    def fetch_raw(self, ids: Iterable[str], cache: RawCache | None = None, workers: Workers | None = None,
                  tally: list[int] | None = None, place: Callable[[str, bytes], bool] | None = None,
                  rows: list[dict] | None = None) -> dict[str, bytes]:
        """Decoded, hash-verified bytes of fragments (and nothing else from the library),
        decoded over `workers` when given; `tally` gets the stored size of every row read;
        `place` takes fragments as they are decoded (haagenti.encode.decode_rows); `rows`: the
        rows of `ids` already read (`read_rows`)."""
        ids = set(ids)
        held = {i: cache.get(i) for i in ids} if cache else {}
        held = {i: v for i, v in held.items() if v is not None}  # taken now: decoding may evict them
        todo = ids - held.keys()
        if rows is None:
            rows = self.read_rows(todo, tally) if todo else []
        out = decode_rows(rows, lambda wanted: self.read_rows(wanted, tally, complete=False), cache, workers, place)
        out.update(held)
        return out

    def read_rows(self, ids: set[str], tally: list[int] | None = None, complete: bool = True) -> list[dict]:
        """The stored rows of fragments, blobs as views into Arrow's buffers (`fetch_raw` decodes
        them); every one of `ids` must be there when `complete`."""
        rows = fragment_rows(self.store.read_fragments(ids, locate=self.index.locate))
        if tally is not None:
            tally.extend(len(r["blob"]) for r in rows)
        missing = ids - {r["fragment_id"] for r in rows} if complete else set()
        if missing:
            raise FragmentError(f"fragment(s) missing from the library: {sorted(missing)[:3]}")
        return rows

    # ---- ingest -------------------------------------------------------------------------
    def ingest(
        self,
        urls: list[str],
        model_id: str,
        family: str | None = None,
        progress: IngestProgress | None = None,
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
        progress: IngestProgress | None = None,
        device: str = "cpu",
        quality: str = "exact",
        threads: int = 0,
        wait: float = 60.0,
        replace: bool = False,
    ) -> list[IngestReport]:
        """Add several models in one set of commits (haagenti.ingest), waiting up to `wait`
        seconds for a running gc. A model stored already with the same bytes is left as it is
        (its report `unchanged`); one stored with other bytes is refused unless `replace`."""
        return ingest_models(self, models, progress, device, quality, threads, wait, replace)

    # ---- restore (haagenti.restore) ----------------------------------------------------
    def restore(self, model_id: str, out_dir: str, rehash: bool = False, force: bool = False, threads: int = 0) -> list[str]:
        """Write the model's files into `out_dir` (haagenti.restore.restore_model); `threads`: 0 uses every core."""
        return restore.restore_model(self, model_id, out_dir, rehash, force, threads)

    def _write(self, manifest: ModelManifest, sinks: list[BinaryIO], rehash: bool) -> None:
        restore.write_model(self, manifest, sinks, rehash)

    def open_file(self, model_id: str, name: str):
        """A stored file, opened for reading by range without restoring it (haagenti.libraryfs)."""
        from haagenti.libraryfs import LibraryFile, LibraryFileSystem

        fs = LibraryFileSystem(self)
        manifest, i = fs.model_file(validate_model_id(model_id), name)  # by model and name: never a path to split
        return LibraryFile(fs, f"{model_id}/{name}", manifest, i, cache_type="none")

    # ---- maintenance (haagenti.maintenance: streamed, in bounded memory) ------------------
    def verify(self, model_id: str | None = None, progress: VerifyProgress | None = None) -> VerifyReport:
        """Re-hash fragments and restored files (every stored fragment and every model, or one
        model's); `progress(phase, done, total)` follows the bytes."""
        return maintenance.verify(self, model_id, progress)

    def rm(self, model_id: str) -> None:
        """Unpublish the model (one commit), then drop its manifest rows; `gc` frees fragments."""
        maintenance.rm(self, model_id)

    def referenced(self) -> pa.Array:
        """Distinct ids some model needs, directly or as a delta reference (Arrow strings)."""
        return maintenance.referenced(self.store)

    def gc(self, wait: float = 0.0) -> dict[str, int]:
        """Delete what no published model owns and vacuum, under the gc lease (refused, after
        `wait` seconds, while another writer runs)."""
        return maintenance.gc(self, wait)

    def compact(self, target_bytes: int = 256 * 1024 * 1024) -> int:
        """Rewrite the index for lookups, then merge the metadata tables' small files and vacuum
        (haagenti.maintenance.compact); returns data files replaced."""
        return maintenance.compact(self, target_bytes)

    def stats(self) -> LibraryStats:
        return maintenance.stats(self)
