"""Model switching within a family: bytes read and time, haagenti's ModelLoader against loading
each model's safetensors file from scratch.

    python bench/switching.py
The library holds the example family (with similarity). One loader with a 1 GiB fragment cache
loads the base, then switches to each other member in turn; a switch reads only the fragments it
does not hold (a fine-tune's deltas, not the base fragments they reference; nothing for layers a
partial fine-tune froze). The baseline reads the member's whole file with safetensors
(`load_file`, page cache warm: the file was just written). Times are medians of REPEATS runs.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import torch
from safetensors.torch import load_file

from common import example_family

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.loader import ModelLoader

REPEATS = 3


def main() -> None:
    torch.set_num_threads(1)
    members = example_family()
    root = tempfile.mkdtemp(prefix="haagenti-switch-")
    try:
        lib = FragmentLibrary.open(os.path.join(root, "lib"), LibraryConfig(similarity=True))
        lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in members])
        runs: dict[str, list[tuple[float, int, int, int, float]]] = {m.model_id: [] for m in members}
        for _ in range(REPEATS):
            loader = ModelLoader(lib, cache_bytes=1 << 30)
            for m in members:  # the base first, then a switch to each member
                t0 = time.perf_counter()
                loader.load(m.model_id)
                secs = time.perf_counter() - t0
                t0 = time.perf_counter()
                load_file(m.file)
                file_secs = time.perf_counter() - t0
                r = loader.last
                runs[m.model_id].append((secs, r.fragments_fetched, r.fragments, r.stored_bytes_read, file_secs))
        print(f"{'load (in order)':22s} {'fetched':>12s} {'bytes read':>12s} {'file bytes':>11s} {'haagenti ms':>12s} {'file ms':>8s}")
        for m in members:
            rs = runs[m.model_id]
            secs, fetched, total, read, _ = rs[0]
            size = os.path.getsize(m.file)
            print(f"{m.model_id:22s} {fetched:5d} / {total:4d} {read / 1e6:9.2f} MB {size / 1e6:8.2f} MB "
                  f"{statistics.median(r[0] for r in rs) * 1e3:12.1f} {statistics.median(r[4] for r in rs) * 1e3:8.1f}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
