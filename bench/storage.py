"""Storage and speed on the example family, side by side with the baselines, same bytes, one run.

    python bench/storage.py [--fragment-size 262144]
    flock /tmp/haagenti-heavy.lock python bench/storage.py --large [--runs 5] [--dtypes bf16,fp32] [--sizes 200,2000]
    flock /tmp/haagenti-heavy.lock python bench/storage.py --gguf [--runs 5] [--qtypes Q8_0,Q4_1]

--large: generated models with trained-like statistics (bench/large_models.py) of each dtype
and size (MB), each through zstandard level 3 (one thread), ZipNN in its dtype's mode (one
thread), glyd (one thread), haagenti exact and with similarity at --threads 1 and on all cores:
ingest (file -> store) and restore (store -> file), RUNS rounds interleaved over the methods,
MB/s min / median / max; haagenti's reduction counts every file of its library (on disk).
Generated files go under bench/.cache/large-PID and are deleted at the end.

--gguf: lone GGUF files of each quantized type gguf's quantizers write (--qtypes), made from
the example family's base and from the "large1" family's base (bench/common.py), through
zstd-3, zstd-19, ZipNN (float16 mode: GGUF scales are fp16; it has no quantized mode), glyd,
and haagenti exact and with similarity at --threads 1, the same rounds and columns as --large
(--families picks the bases).
Files go under bench/.cache/gguf-PID, deleted at the end.

Methods: plain zstd-3 per file; tensor-hash dedup + zstd-3; ZipNN-style byte grouping + zstd
per tensor; the name-paired XOR oracle (every fine-tune XORed against its known base tensor by
name, byte-grouped: what ZipLLM/BitX do when handed the base); haagenti exact-only; haagenti
with similarity. Throughput is single-threaded (one core), MB of raw model bytes per second;
each time is the median of REPEATS runs, taken round-robin over the methods so that every method
samples the same minutes (this VM's speed drifts by up to 2x over minutes). Baselines decode in
memory; haagenti's "out" restores files to disk, verifying every fragment and each file's layout.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Callable

import torch
import zstandard

from common import CACHE, example_family, mbps

from haagenti.codecs import DENSE, PLANES, chain_for
from haagenti.codecs.delta import cast_reference, residual
from haagenti.config import LibraryConfig
from haagenti.formats import open_model
from haagenti.fragment import Encoding
from haagenti.library import FragmentLibrary, ModelInput


REPEATS = 5


def median_runs(methods: list[tuple]) -> list[tuple]:
    """Each method is (fn, *args) with `fn` returning (..., seconds in, seconds out). All run
    REPEATS times round-robin; per method: the first run's other fields with the median times."""
    runs: list[list[tuple]] = [[] for _ in methods]
    for _ in range(REPEATS):
        for mine, (fn, *args) in zip(runs, methods):
            mine.append(fn(*args))
    return [(*r[0][:-2], statistics.median(x[-2] for x in r), statistics.median(x[-1] for x in r)) for r in runs]


def tensors_of(path: str) -> dict[str, tuple[str, bytes]]:
    src = open_model([path])
    return {t.name: (t.dtype.name, src.read(t, 0, t.nbytes)) for t in src.tensors}


def zstd_per_file(files, blobs):
    c, d = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    packed = [c.compress(blobs[f]) for f in files]
    t1 = time.perf_counter()
    for p in packed:
        d.decompress(p)
    return sum(map(len, packed)), t1 - t0, time.perf_counter() - t1


def tensor_hash_dedup(files, tensors):
    c, d = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    t0 = time.perf_counter()
    store: dict[str, bytes] = {}
    for f in files:
        for _, data in tensors[f].values():
            h = hashlib.sha256(data).digest()
            if h not in store:
                store[h] = c.compress(data)
    t1 = time.perf_counter()
    for f in files:
        for _, data in tensors[f].values():
            d.decompress(store[hashlib.sha256(data).digest()])
    return sum(map(len, store.values())), t1 - t0, time.perf_counter() - t1


def byte_grouped(files, tensors):
    t0 = time.perf_counter()
    packed = []
    for f in files:
        for dt, data in tensors[f].values():
            chain = chain_for(dt, 3)
            packed.append((chain, chain.encode(data), len(data)))
    t1 = time.perf_counter()
    for chain, p, size in packed:
        chain.decode(p, size)
    return sum(len(p) for _, p, _ in packed), t1 - t0, time.perf_counter() - t1


def xor_oracle(members, tensors):
    """Each family member against its hand-given base ('digits-base'), tensor by tensor by name,
    byte-grouped with the same zstd preset haagenti uses, so only the matching differs."""
    from haagenti.formats.dtypes import dtype

    base = next(m for m in members if m.model_id == "digits-base")
    t0 = time.perf_counter()
    total = 0
    for m in members:
        for name, (dt, data) in tensors[m.file].items():
            d = dtype(dt)
            chain = chain_for(dt)
            if m.family and m is not base and name in tensors[base.file] and d.is_float:
                bdt, bdata = tensors[base.file][name]
                ref = cast_reference(bdata, bdt, dt)
                total += min(len(chain.encode(residual(Encoding.DELTA_XOR, data, ref, d.itemsize))), len(data))
            else:
                total += min(len(chain.encode(data)), len(data))
    return total, time.perf_counter() - t0, float("nan")


def haagenti(members, config: LibraryConfig, batch: bool = True):
    """The family into a fresh library: one `ingest_many` (one set of commits, what
    `haagenti ingest --each` and the pipeline do) or one `ingest` call per model."""
    root = tempfile.mkdtemp(prefix="haagenti-bench-")
    try:
        lib = FragmentLibrary.open(os.path.join(root, "lib"), config)
        t0 = time.perf_counter()
        if batch:
            lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in members])
        else:
            for m in members:
                lib.ingest([m.file], m.model_id, m.family)
        t1 = time.perf_counter()
        for m in members:
            lib.restore(m.model_id, os.path.join(root, "out", m.model_id))  # fresh files, as a user restores
        t2 = time.perf_counter()
        stats = lib.stats()
        disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(root, "lib")) for f in fs)
        return stats, disk, t1 - t0, t2 - t1
    finally:
        shutil.rmtree(root)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fragment-size", type=int, default=256 * 1024)
    ap.add_argument("--large", action="store_true", help="generated 200 MB / 2 GB models instead of the example family")
    ap.add_argument("--runs", type=int, default=REPEATS)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--sizes", default="200,2000", help="model sizes in MB")
    ap.add_argument("--methods", default="", help="comma-separated substrings: only the methods whose label has one")
    ap.add_argument("--gguf", action="store_true", help="lone quantized GGUF files of the example and large1 bases instead")
    ap.add_argument("--qtypes", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,TQ1_0,TQ2_0,MXFP4", help="GGUF types for --gguf")
    ap.add_argument("--families", default="family,large1", help="whose base models --gguf quantizes (bench/common.py)")
    args = ap.parse_args()
    if args.large:
        return large(args)
    if args.gguf:
        return gguf(args)
    torch.set_num_threads(1)
    members = example_family()
    files = [m.file for m in members]
    blobs = {f: open(f, "rb").read() for f in files}
    tensors = {f: tensors_of(f) for f in files}
    raw = sum(map(len, blobs.values()))
    # The set-up's ~270k objects (torch, scikit-learn, the family) would otherwise be scanned by
    # every full garbage collection inside a timed run: measured 24-163 ms per pass, 5 passes a
    # run, landing on whichever method was running. Frozen, a pass scans only what the measured
    # code itself keeps (docs/decisions/0006-plain-coding.md).
    gc.freeze()
    configs = {label: LibraryConfig(fragment_size=args.fragment_size, similarity=sim)
               for label, sim in (("haagenti exact dedup only", False), ("haagenti + similarity", True))}
    baselines = [
        ("zstd-3 per file", (zstd_per_file, files, blobs)),
        ("tensor-hash dedup + zstd-3", (tensor_hash_dedup, files, tensors)),
        ("byte-grouped zstd-3 (ZipNN-style)", (byte_grouped, files, tensors)),
        ("XOR vs known base by name (oracle)", (xor_oracle, members, tensors)),
    ]
    ours = [(haagenti, members, c, batch) for c in configs.values() for batch in (True, False)]
    results = median_runs([m for _, m in baselines] + ours)
    theirs, mine = results[: len(baselines)], results[len(baselines) :]
    rows = [("raw", raw, float("nan"), float("nan"))] + [(label,) + r for (label, _), r in zip(baselines, theirs)]
    per_model = {}
    for label, (stats, disk, tin, tout), (_, _, tin1, _) in zip(configs, mine[::2], mine[1::2]):
        rows.append((label + " (blobs)", stats.stored_bytes, tin, tout))
        rows.append((label + " (on disk, all tables)", disk, tin, tout))
        rows.append(("  same, one ingest call per model", stats.stored_bytes, tin1, float("nan")))
        per_model[label] = stats
    print(f"example family: {len(members)} models, {raw / 1e6:.1f} MB raw, fragment size {args.fragment_size // 1024} KiB, 1 thread, median of {REPEATS} round-robin runs")
    print(f"{'method':42s} {'stored MB':>10s} {'reduction':>10s} {'in MB/s':>9s} {'out MB/s':>9s}")
    for name, size, tin, tout in rows:
        red = 1 - size / raw
        fin = mbps(raw, tin) if tin == tin else "       -"
        fout = mbps(raw, tout) if tout == tout else "       -"
        print(f"{name:42s} {size / 1e6:10.2f} {red:10.1%} {fin:>9s} {fout:>9s}")
    stats = per_model["haagenti + similarity"]
    print("\nper model (haagenti + similarity; new stored bytes each model added):")
    for m in stats.per_model:
        print(f"  {m.model_id:22s} {m.family or '-':8s} {m.raw_bytes / 1e6:7.2f} MB -> {m.new_stored_bytes / 1e6:7.2f} MB  {m.reduction:6.1%}")
    for fam, red in stats.per_family.items():
        print(f"  family {fam}: {red:.1%}")


# ---- --large -------------------------------------------------------------------------------
def zstd_file(path: str, work: str, level: int = 3) -> tuple[int, float, float]:
    """zstandard at `level` on one thread, streaming file to file and back."""
    packed, back = os.path.join(work, "z.zst"), os.path.join(work, "z.out")
    t0 = time.perf_counter()
    with open(path, "rb") as src, open(packed, "wb") as dst:
        zstandard.ZstdCompressor(level=level).copy_stream(src, dst)
    t1 = time.perf_counter()
    with open(packed, "rb") as src, open(back, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    t2 = time.perf_counter()
    return os.path.getsize(packed), t1 - t0, t2 - t1


def zipnn_file(path: str, work: str, mode: str) -> tuple[int, float, float]:
    """ZipNN in its dtype mode on one thread, over 64 MiB chunks of the file (its compress
    rewrites its input in place, so each chunk is a fresh bytearray)."""
    from zipnn import ZipNN

    z = ZipNN(bytearray_dtype=mode, input_format="byte", threads=1)
    packed, back = os.path.join(work, "z.znn"), os.path.join(work, "z.out")
    step = 64 << 20
    t0 = time.perf_counter()
    with open(path, "rb") as src, open(packed, "wb") as dst:
        while chunk := bytearray(src.read(step)):
            out = z.compress(chunk)
            dst.write(len(out).to_bytes(8, "little"))
            dst.write(out)
    t1 = time.perf_counter()
    with open(packed, "rb") as src, open(back, "wb") as dst:
        while head := src.read(8):
            dst.write(z.decompress(src.read(int.from_bytes(head, "little"))))
    t2 = time.perf_counter()
    return os.path.getsize(packed), t1 - t0, t2 - t1


def glyd_file(path: str, work: str) -> tuple[int, float, float]:
    """glyd at its default level ("max") on one thread, the whole file in one call: it reads
    the safetensors header to model the tensors (cut into 64 MiB chunks, every chunk but the
    first compressed like zstd-3: 7.0% against 16.2% on the fp32 200 MB model)."""
    import glyd

    packed, back = os.path.join(work, "z.glyd"), os.path.join(work, "z.out")
    t0 = time.perf_counter()
    with open(path, "rb") as src, open(packed, "wb") as dst:
        dst.write(glyd.compress(src.read(), threads=1))
    t1 = time.perf_counter()
    with open(packed, "rb") as src, open(back, "wb") as dst:
        dst.write(glyd.decompress(src.read()))
    t2 = time.perf_counter()
    return os.path.getsize(packed), t1 - t0, t2 - t1


def haagenti_file(path: str, work: str, similarity: bool, threads: int, level: int | str = PLANES) -> tuple[int, float, float]:
    """One model into a fresh library and back to a file; the size is every file of the
    library (stats' disk_bytes: blobs, index, logs, ...), what a user's `du` sees. `level` DENSE
    is `--dense-quantized`."""
    lib = FragmentLibrary.open(os.path.join(work, "lib"), LibraryConfig(similarity=similarity, zstd_level=level))
    t0 = time.perf_counter()
    lib.ingest([path], "m", threads=threads)
    t1 = time.perf_counter()
    lib.restore("m", os.path.join(work, "out"), threads=threads)
    t2 = time.perf_counter()
    return lib.stats().disk_bytes, t1 - t0, t2 - t1


def compare_file(path: str, name: str, methods: list[tuple[str, Callable[[str], tuple[int, float, float]]]], runs: int, folder: str) -> None:
    """`runs` rounds of every method over one file, interleaved; each round printed as it ends
    (a stopped run keeps what it measured), then reduction and MB/s min / median / max."""
    size = os.path.getsize(path)
    measured: dict[str, list[tuple[int, float, float]]] = {label: [] for label, _ in methods}
    for k in range(runs):
        for label, fn in methods:
            work = tempfile.mkdtemp(prefix="haagenti-bench-", dir=folder)
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            try:
                measured[label].append(fn(work))
            finally:
                shutil.rmtree(work)
            stored, tin, tout = measured[label][-1]
            used = resource.getrusage(resource.RUSAGE_SELF)
            cpu_per_wall = (used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime) / (tin + tout)  # did a second thread get a second core?
            print(f"  {name} {size / 1e6:.1f} MB round {k + 1} {time.strftime('%H:%M:%S')}: {label}: "
                  f"{1 - stored / size:.2%}, in {size / tin / 1e6:.1f} MB/s, out {size / tout / 1e6:.1f} MB/s, "
                  f"CPU/wall {cpu_per_wall:.2f}, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{name}, {size / 1e6:.1f} MB ({path})")
    print(f"{'method':36s} {'reduction':>9s}   {'ingest MB/s min / med / max':>28s}   {'restore MB/s min / med / max':>28s}")
    for label, rs in measured.items():
        red = 1 - rs[0][0] / size
        fin = sorted(size / r[1] / 1e6 for r in rs)
        fout = sorted(size / r[2] / 1e6 for r in rs)
        cell = lambda v: f"{v[0]:8.1f} / {statistics.median(v):8.1f} / {v[-1]:8.1f}"
        print(f"{label:36s} {red:9.2%}   {cell(fin)}   {cell(fout)}", flush=True)


def large(args) -> None:
    from large_models import write_model

    folder = os.path.join(CACHE, f"large-{os.getpid()}")  # two runs never delete each other's files
    os.makedirs(folder, exist_ok=True)
    cores = os.cpu_count() or 1
    modes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    print(f"machine: {cores} cores, shared with other work while this ran; {args.runs} rounds interleaved; MB/s of model bytes")
    try:
        for dt in args.dtypes.split(","):
            for mb in map(int, args.sizes.split(",")):
                path = write_model(os.path.join(folder, f"{dt}-{mb}MB.safetensors"), mb * 1_000_000, dt)
                methods = [
                    ("zstd-3, 1 thread", lambda w: zstd_file(path, w)),
                    (f"ZipNN {modes[dt]}, 1 thread", lambda w: zipnn_file(path, w, modes[dt])),
                    ("glyd max, 1 thread", lambda w: glyd_file(path, w)),
                    ("haagenti exact, --threads 1", lambda w: haagenti_file(path, w, False, 1)),
                    (f"haagenti exact, --threads {cores}", lambda w: haagenti_file(path, w, False, cores)),
                    ("haagenti + similarity, --threads 1", lambda w: haagenti_file(path, w, True, 1)),
                    (f"haagenti + similarity, --threads {cores}", lambda w: haagenti_file(path, w, True, cores)),
                ]
                if args.methods:
                    methods = [m for m in methods if any(k in m[0] for k in args.methods.split(","))]
                compare_file(path, f"{dt} {mb} MB", methods, args.runs, folder)
                os.remove(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def gguf(args) -> None:
    from safetensors.torch import load_file

    from haagenti.exports import export_gguf

    folder = os.path.join(CACHE, f"gguf-{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, shared with other work while this ran; {args.runs} rounds interleaved; MB/s of file bytes")
    try:
        for family in args.families.split(","):
            state = load_file(example_family(family)[0].file)
            for qtype in args.qtypes.split(","):
                path = os.path.join(folder, f"{family}-base-{qtype}.gguf")
                export_gguf(state, path, qtype)
                methods = [
                    ("zstd-3, 1 thread", lambda w: zstd_file(path, w)),
                    ("zstd-19, 1 thread", lambda w: zstd_file(path, w, 19)),
                    ("ZipNN float16, 1 thread", lambda w: zipnn_file(path, w, "float16")),
                    ("glyd max, 1 thread", lambda w: glyd_file(path, w)),
                    ("haagenti exact, --threads 1", lambda w: haagenti_file(path, w, False, 1)),
                    ("haagenti + similarity, --threads 1", lambda w: haagenti_file(path, w, True, 1)),
                    ("haagenti exact --dense-quantized, --threads 1", lambda w: haagenti_file(path, w, False, 1, DENSE)),
                    ("haagenti + similarity --dense-quantized, --threads 1", lambda w: haagenti_file(path, w, True, 1, DENSE)),
                ]
                if args.methods:
                    methods = [m for m in methods if any(k in m[0] for k in args.methods.split(","))]
                compare_file(path, f"{family} base {qtype}", methods, args.runs, folder)
                os.remove(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
