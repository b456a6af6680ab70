"""Model switching within a family: bytes read and time, haagenti's ModelLoader against loading
each model's safetensors file from scratch.

    python bench/switching.py [--repeats 7] [--family family]
The library holds the family (with similarity). Each round starts loaders with empty 1 GiB
fragment caches, one on one thread and one on every core, which load the base and then
switch to each other member in turn (a first visit: the manifest is read and the fragments the
loader does not hold are read, verified and decoded; a fine-tune reads its deltas, not the base
fragments they reference, and nothing for layers a partial fine-tune froze). Then both switch
to every member once more (a revisit: every fragment is held). Beside each load, interleaved,
the member's file is loaded with safetensors three ways: `load_file` as is (it maps the file
and returns tensors over the mapping, so no byte is read until used), `load_file` with every
tensor then summed ("touch": each byte read once, the fair baseline of a first visit, which
reads every byte it returns) and with `backend="pread"` (the bytes read into memory of the
tensors' own, as the loader returns them). The page cache is warm for all. A third loader
(one thread) switches a live state dict in place, on first visits and revisits
(`load(id, into=live)`, the base's tensors, for the members of the same names, dtypes and
shapes), beside safetensors' `load_file` + `copy_` into the same tensors.
Times are min / median / max over the rounds; a second table splits the one-thread loader's
first visits into manifest, fetch (read, verify, decode) and assembly.
"""
from __future__ import annotations

import argparse
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
from haagenti.parallel import thread_count


def spread(xs: list[float]) -> str:
    """min / median / max in ms."""
    return f"{min(xs) * 1e3:5.1f} {statistics.median(xs) * 1e3:5.1f} {max(xs) * 1e3:6.1f}"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--family", default="family", help="bench/common.py's example_family name (family, largeK)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    members = example_family(args.family)
    cores = thread_count(0)
    root = tempfile.mkdtemp(prefix="haagenti-switch-")
    try:
        lib = FragmentLibrary.open(os.path.join(root, "lib"), LibraryConfig(similarity=True))
        lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in members])
        cols = ["hg 1", f"hg {cores}", "into 1", "st mmap", "st touch", "st pread", "st into", "again 1", f"again {cores}", "again into"]
        t: dict[str, dict[str, list[float]]] = {m.model_id: {c: [] for c in cols} for m in members}
        reads: dict[str, tuple[int, int, int]] = {}
        phases: dict[str, list[tuple[float, float, float]]] = {m.model_id: [] for m in members}  # the 1-thread first visits
        for _ in range(args.repeats):
            loaders = {"1": ModelLoader(lib, cache_bytes=1 << 30, threads=1), str(cores): ModelLoader(lib, cache_bytes=1 << 30, threads=cores),
                       "into": ModelLoader(lib, cache_bytes=1 << 30, threads=1)}
            live = {k: v.clone() for k, v in load_file(members[0].file).items()}  # a live model: the base's tensors
            for m in members:  # the base first, then a switch to each member
                same = {k: (v.dtype, v.shape) for k, v in live.items()} == {k: (v.dtype, v.shape) for k, v in load_file(m.file).items()}
                for k, loader in loaders.items():
                    if k == "into":
                        if same:
                            t[m.model_id]["into 1"].append(timed(lambda: loader.load(m.model_id, into=live)))
                        continue
                    t[m.model_id][f"hg {k}"].append(timed(lambda: loader.load(m.model_id)))
                    r = loader.last
                    reads[m.model_id] = (r.fragments_fetched, r.fragments, r.stored_bytes_read)
                    if k == "1":
                        phases[m.model_id].append((r.manifest_seconds, r.fetch_seconds, r.assemble_seconds))
                t[m.model_id]["st mmap"].append(timed(lambda: load_file(m.file)))
                t[m.model_id]["st touch"].append(timed(lambda: [v.sum() for v in load_file(m.file).values()]))
                t[m.model_id]["st pread"].append(timed(lambda: load_file(m.file, backend="pread")))
                if same:
                    t[m.model_id]["st into"].append(timed(lambda: [live[k].copy_(v) for k, v in load_file(m.file).items()]))
            for m in members:  # back to each member: everything is held
                for k, loader in loaders.items():
                    if k != "into":
                        t[m.model_id][f"again {k}"].append(timed(lambda: loader.load(m.model_id)))
                    elif {k: (v.dtype, v.shape) for k, v in live.items()} == {k: (v.dtype, v.shape) for k, v in load_file(m.file).items()}:
                        t[m.model_id]["again into"].append(timed(lambda: loader.load(m.model_id, into=live)))
                    else:
                        continue
                    assert loader.last.stored_bytes_read == 0
            for loader in loaders.values():
                loader.close()
        print(f"{cores} cores; ms as min / median / max over {args.repeats} rounds; 'again': the revisit (nothing read); "
              "'into': into the base's live tensors (haagenti load(into=), 1 thread; safetensors load_file + copy_)")
        print(f"{'load (in order)':20s} {'fetched':>9s} {'read MB':>8s} {'file MB':>8s}" + "".join(f" {c:>18s}" for c in cols))
        for m in members:
            fetched, total, read = reads[m.model_id]
            print(f"{m.model_id:20s} {fetched:3d} / {total:3d} {read / 1e6:8.2f} {os.path.getsize(m.file) / 1e6:8.2f}"
                  + "".join(f" {spread(t[m.model_id][c]) if t[m.model_id][c] else '-':>18s}" for c in cols))
        print("\nfirst visits on 1 thread, where the time went (LoadReport), ms, median")
        print(f"{'load':20s} {'manifest':>9s} {'fetch':>7s} {'assemble':>9s}")
        for m in members:
            print(f"{m.model_id:20s}" + "".join(f" {statistics.median(p[i] for p in phases[m.model_id]) * 1e3:{w}.1f}" for i, w in enumerate((9, 7, 9))))
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
