"""Fast model switching: load models from a library through a bounded cache of decoded
fragments, so moving between models of one family reads only the fragments that differ."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from dataclasses import dataclass

import torch

from haagenti.core import LibraryCore
from haagenti.encode import RawCache
from haagenti.errors import LibraryError
from haagenti.formats.dtypes import dtype as lookup_dtype
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
    manifest_seconds: float = 0.0  # where the load's time went: its manifest,
    fetch_seconds: float = 0.0  # reading, verifying and decoding the fragments not held,
    assemble_seconds: float = 0.0  # and copying every fragment into the tensors


class ModelLoader:
    """Loads models, keeping what a switch would otherwise redo: decoded fragments (a bounded
    LRU, each verified against its id when it was read from storage; every later read from
    storage is verified again), the manifests of the models loaded (until the models table
    changes) and a pool of `threads` decode workers (0: every core)."""

    def __init__(self, library: LibraryCore, cache_bytes: int = 1 << 30, threads: int = 0):
        self.library = library
        self.cache = RawCache(cache_bytes)
        self.workers = Workers(threads)
        self._manifests: dict[str, tuple[int, ModelManifest]] = {}  # model id -> (models table version, manifest)
        self.last: LoadReport | None = None

    def load(self, model_id: str, into: dict[str, torch.Tensor] | None = None, names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """The model's tensors by name (CPU, each owning its memory). Fragments already cached
        are not read again. With `into` (a live model's state dict, say: the same names, dtypes
        and shapes, contiguous on the CPU; checked before anything is read) the weights are
        copied into those tensors and `into` is returned, so a switch allocates nothing once
        its fragments are held; a load that fails midway leaves `into` partly overwritten.
        With `names` only those tensors are loaded (and `into` holds just those): their own
        fragments are the only ones read, so a model can be brought in layer by layer."""
        start = time.perf_counter()
        manifest = self.manifest(model_id)
        if names is not None:
            manifest = _only(manifest, names)
        dtypes = _torch_dtypes(manifest)  # quantized blocks are refused before anything is read
        if into is not None:
            _check_into(manifest, into, dtypes)
        ids = manifest.fragment_ids
        fetched = sum(1 for i in ids if i not in self.cache)
        read: list[int] = []
        state: dict[str, torch.Tensor] = {}
        assemble = 0.0
        fetch_start = time.perf_counter()
        for t, parts in iter_parts(self.library, manifest, self.cache, self.workers, read):
            t0 = time.perf_counter()
            state[t.name] = tensor_of(t, parts, into[t.name] if into is not None else None)
            assemble += time.perf_counter() - t0
        end = time.perf_counter()
        self.last = LoadReport(model_id, len(ids), fetched, sum(read), fetch_start - start, end - fetch_start - assemble, assemble)
        return into if into is not None else state

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


def _only(manifest: ModelManifest, names: Collection[str]) -> ModelManifest:
    """The manifest cut down to the tensors named (LibraryError naming one it lacks)."""
    by_name = manifest.tensors_by_name()
    absent = sorted(set(names) - set(by_name))
    if absent:
        raise LibraryError(f"model {manifest.model_id!r} has no tensor {absent[0]!r}{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}")
    wanted = set(names)
    return dataclasses.replace(manifest, tensors=[t for t in manifest.tensors if t.name in wanted])


def _torch_dtypes(manifest: ModelManifest) -> dict[str, torch.dtype]:
    """Each tensor's torch dtype (FormatError for quantized blocks, which have none)."""
    return {t.name: lookup_dtype(t.dtype).torch_dtype for t in manifest.tensors}


def _check_into(manifest: ModelManifest, into: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> None:
    names = {t.name for t in manifest.tensors}
    if set(into) != names:
        odd = sorted(set(into) ^ names)
        raise LibraryError(f"model {manifest.model_id!r}: the tensors to load into differ in names from the model's ({', '.join(map(repr, odd[:3]))}{' ...' if len(odd) > 3 else ''})")
    for t in manifest.tensors:
        x = into[t.name]
        want = dtypes[t.name]
        if x.dtype != want or tuple(x.shape) != tuple(t.shape) or x.device.type != "cpu" or not x.is_contiguous():
            raise LibraryError(f"model {manifest.model_id!r}: tensor {t.name!r} is {want} {list(t.shape)}; the tensor to load it into is {x.dtype} {list(x.shape)} on {x.device}{'' if x.is_contiguous() else ', not contiguous'}")
