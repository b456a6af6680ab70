"""Fast model switching: load models from a library through a bounded cache of decoded
fragments, so moving between models of one family reads only the fragments that differ."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from haagenti.encode import RawCache
from haagenti.library import FragmentLibrary
from haagenti.tensors import tensor_of


@dataclass
class LoadReport:
    model_id: str
    fragments: int
    fragments_fetched: int
    stored_bytes_read: int


class ModelLoader:
    def __init__(self, library: FragmentLibrary, cache_bytes: int = 1 << 30):
        self.library = library
        self.cache = RawCache(cache_bytes)
        self.last: LoadReport | None = None

    def load(self, model_id: str) -> dict[str, torch.Tensor]:
        """The model's tensors by name (CPU). Fragments already cached are not read again."""
        manifest = self.library.manifest(model_id)
        ids = manifest.fragment_ids
        missing = {i for i in ids if i not in self.cache}
        sizes = self.library.store.read_fragments(missing, columns=["fragment_id", "stored_size"]) if missing else None
        state: dict[str, torch.Tensor] = {}
        for t, data in self.library.iter_tensors(manifest, self.cache):
            state[t.name] = tensor_of(t, data)
        self.last = LoadReport(model_id, len(ids), len(missing), sum(sizes["stored_size"].to_pylist()) if sizes is not None else 0)
        return state
