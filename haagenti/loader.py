"""Fast model switching: load models from a library through a bounded cache of decoded
fragments, so moving between models of one family reads only the fragments that differ."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from haagenti.encode import RawCache
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.library import FragmentLibrary
from haagenti.manifest import ModelManifest
from haagenti.parallel import Workers
from haagenti.restore import iter_parts
from haagenti.tensors import tensor_of


@dataclass
class LoadReport:
    model_id: str
    fragments: int
    fragments_fetched: int
    stored_bytes_read: int


class ModelLoader:
    """Loads models, keeping what a switch would otherwise redo: decoded fragments (a bounded
    LRU, each verified against its id when it was read from storage; every later read from
    storage is verified again), the manifests of the models loaded (until the models table
    changes) and a pool of `threads` decode workers (0: every core)."""

    def __init__(self, library: FragmentLibrary, cache_bytes: int = 1 << 30, threads: int = 0):
        self.library = library
        self.cache = RawCache(cache_bytes)
        self.workers = Workers(threads)
        self._manifests: dict[str, tuple[int, ModelManifest]] = {}  # model id -> (models table version, manifest)
        self.last: LoadReport | None = None

    def load(self, model_id: str) -> dict[str, torch.Tensor]:
        """The model's tensors by name (CPU, each owning its memory). Fragments already cached
        are not read again."""
        manifest = self.manifest(model_id)
        for t in manifest.tensors:
            lookup_dtype(t.dtype).torch_dtype  # quantized blocks are refused before anything is read
        ids = manifest.fragment_ids
        fetched = sum(1 for i in ids if i not in self.cache)
        read: list[int] = []
        state = {t.name: tensor_of(t, parts) for t, parts in iter_parts(self.library, manifest, self.cache, self.workers, read)}
        self.last = LoadReport(model_id, len(ids), fetched, sum(read))
        return state

    def manifest(self, model_id: str) -> ModelManifest:
        """The model's manifest, read again only once the models table has a new version (a
        re-ingest, rm or family change publishes one; manifests of a published ingest never
        change)."""
        version = self.library.store.table("models").version()
        held = self._manifests.get(model_id)
        if held is not None and held[0] == version:
            return held[1]
        manifest = self.library.manifest(model_id)
        self._manifests[model_id] = (version, manifest)
        return manifest

    def close(self) -> None:
        self.workers.close()
