"""FragmentLibrary: ingest models, restore them bit-exact, and keep the library tidy."""
from __future__ import annotations

from typing import BinaryIO

import pyarrow as pa

from haagenti import maintenance, restore
from haagenti.config import LibraryStats
from haagenti.core import LibraryCore
from haagenti.ingest import IngestProgress, IngestReport, ModelInput, ingest_models
from haagenti.libraryfs import LibraryFile, LibraryFileSystem
from haagenti.maintenance import VerifyProgress, VerifyReport
from haagenti.manifest import ModelManifest, validate_model_id


class FragmentLibrary(LibraryCore):
    """The library's public face: the core's catalogue and fragment reads (haagenti.core) plus
    the operations on it (ingest, restore, verify, rm, gc, stats, open_file), each one call into
    the module that does it."""

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
