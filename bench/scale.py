"""Cost of adding one model as the library grows: 10k to 10M fragments in its index.

    flock /tmp/haagenti-heavy.lock python bench/scale.py [--sizes 10000 100000 1000000 10000000]
        [--model-mb 1024] [--runs 2] [--s3-max 1000000] [--no-pipeline] [--plot docs/figures/scale.png]
        [--index bands|two-level]

Each library's index (bands and ids tables) is synthesised: N random 256-bit signatures and
random 32-byte ids (about 2.6 TB of 256 KiB fragments at 10M), written through the index's
own append code (`append_keyed`), sorted by key in files of at most CHUNK rows (the layout
`compact()` leaves); with `--index two-level`, the two-level layout's tables, the fragments in
shards of SHARD_ROWS (a 64 MiB commit of 256 KiB fragments). The model added is real: a safetensors file of bf16 normal(0, 0.02)
tensors, like an initialised LLM. For each size and store (local disk; moto's S3 server on
loopback) it is added `--runs` times through `haagenti ingest` and through the Ray pipeline
(2 CPUs, 75 MiB object store, actors started before the clock), the library's tables rolled
back to their previous version (Delta restore) after each run, so every run adds the same
model to the same library. Each run is its own process; peak memory is VmHWM of the driver
and of each Ray worker. Reads are counted with spies on the store's file opens, Parquet
row-group reads and s3fs requests. Rounds of runs go over every size and mode in turn, so each
round sees the same machine load. Generated data is deleted at the end (the model files in
bench/.cache/scale, and with --keep the local libraries, are kept for re-runs; delete them with
--clean).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import start_moto  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "scale")
CHUNK = 2_000_000  # rows per appended (sorted) file of the synthetic index
SHARD_ROWS = 256  # fragments per shard of a synthetic two-level index
BUCKET = "scale"


def vmhwm_mib(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))


# ---- the model added -------------------------------------------------------------------
def model_file(mb: int, seed: int = 0) -> str:
    """A safetensors file of bf16 normal(0, 0.02) tensors of 4096 x 1024 (8 MiB), `mb` MiB."""
    path = os.path.join(CACHE, f"model-{mb}mb-{seed}.safetensors")
    if not os.path.exists(path):
        import torch
        from safetensors.torch import save_file

        os.makedirs(CACHE, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        tensors = {f"layers.{i}.weight": (torch.randn(4096, 1024, generator=g) * 0.02).to(torch.bfloat16) for i in range(mb // 8)}
        save_file(tensors, path + ".partial")
        os.replace(path + ".partial", path)
    return path


# ---- the synthetic index ---------------------------------------------------------------
def build(url: str, n: int, index: str = "bands", seed: int = 1) -> dict:
    """An empty library whose index holds n synthetic plain fragments."""
    if index == "two-level":
        return build_two_level(url, n, seed)
    import numpy as np
    import pyarrow as pa

    from haagenti.index.bands import BANDS, IDS, buckets
    from haagenti.signature import band_hashes
    from haagenti.store.keyed import append_keyed
    from haagenti.library import FragmentLibrary
    from haagenti.signature import SignatureConfig

    t0 = time.perf_counter()
    cfg = SignatureConfig()
    lib = FragmentLibrary.open(url)
    ids, bits = synthetic(n, seed)
    raw_ids = _binary(ids)
    raw_bits = _binary(bits)
    hexes = pa.array(_hex(ids)).cast(pa.string())
    keys = ids[:, :8].copy().view(">u8").reshape(-1).astype(np.uint64).view(np.int64) ^ np.int64(-(2**63))
    order = np.argsort(keys, kind="stable")
    for a in range(0, n, CHUNK):
        take = pa.array(order[a : a + CHUNK])
        append_keyed(lib.store, IDS, pa.table({"id_key": pa.array(keys).take(take), "fragment_id": hexes.take(take), "dtype": pa.array(["BF16"] * len(take))}), "scale")
    keys = np.concatenate([buckets(band_hashes(bits[a : a + CHUNK], cfg), cfg) for a in range(0, n, CHUNK)])
    for b in range(cfg.bands):  # a band is a key range: its rows sorted, in files of CHUNK rows
        band = np.ascontiguousarray(keys[:, b])
        order = np.argsort(band, kind="stable")
        for a in range(0, n, CHUNK):
            take = pa.array(order[a : a + CHUNK])
            append_keyed(lib.store, BANDS, pa.table({
                "bucket": pa.array(band).take(take), "fragment_id": raw_ids.take(take), "bits": raw_bits.take(take),
                "n_elements": pa.array(np.full(len(take), 131072, np.int64)),
            }), "scale")
    return {"build_s": time.perf_counter() - t0}


def synthetic(n: int, seed: int):
    """(ids, bits) of n random fragments: (n, 32) uint8 each, the same for every layout."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32), dtype=np.uint8), rng.integers(0, 256, size=(n, 32), dtype=np.uint8)


def build_two_level(url: str, n: int, seed: int = 1) -> dict:
    """The two-level layout's tables for n synthetic plain fragments, SHARD_ROWS a shard in
    fragment order: level 1 the shards' sampled pair keys, level 2 their signatures, and every
    id with its shard's data file."""
    import numpy as np
    import pyarrow as pa

    from haagenti.config import LibraryConfig
    from haagenti.index.two_level import FRAGMENT_KEYS, SHARD_KEYS, SHARD_SIGNATURES, pair_keys, sampled
    from haagenti.library import FragmentLibrary
    from haagenti.store.keyed import append_keyed

    t0 = time.perf_counter()
    lib = FragmentLibrary.open(url, LibraryConfig(index="two-level"))
    cfg = lib.config.signature
    ids, bits = synthetic(n, seed)
    shard = (np.int64(12345) << 16) + np.arange(n, dtype=np.int64) // SHARD_ROWS
    raw_ids, raw_bits = _binary(ids), _binary(bits)
    for a in range(0, n, CHUNK):  # level 2: already in shard order
        take = pa.array(np.arange(a, min(a + CHUNK, n)))
        append_keyed(lib.store, SHARD_SIGNATURES, pa.table({
            "shard": pa.array(shard).take(take), "fragment_id": raw_ids.take(take), "bits": raw_bits.take(take),
            "n_elements": pa.array(np.full(len(take), 131072, np.int64)), "depth": pa.array(np.zeros(len(take), np.int64))}), "scale")
    keys = pair_keys(bits, cfg)
    owner = np.repeat(shard, keys.shape[1])
    keys = keys.reshape(-1)
    keep = sampled(keys)
    keys, owner = keys[keep], owner[keep]
    order = np.argsort(keys, kind="stable")
    for a in range(0, len(keys), CHUNK):
        take = order[a : a + CHUNK]
        append_keyed(lib.store, SHARD_KEYS, pa.table({"pair_key": pa.array(keys[take]), "shard": pa.array(owner[take])}), "scale")
    id_key = ids[:, :8].copy().view(">u8").reshape(-1).astype(np.uint64).view(np.int64) ^ np.int64(-(2**63))
    uuids = np.random.default_rng(seed).integers(0, 256, size=(n // SHARD_ROWS + 1, 16), dtype=np.uint8)  # a data file per shard
    files = pa.Array.from_buffers(pa.binary(16), len(uuids), [None, pa.py_buffer(uuids.tobytes())]).take(pa.array(np.arange(n) // SHARD_ROWS))
    order = np.argsort(id_key, kind="stable")
    for a in range(0, n, CHUNK):
        take = pa.array(order[a : a + CHUNK])
        append_keyed(lib.store, FRAGMENT_KEYS, pa.table({"id_key": pa.array(id_key).take(take), "fragment_id": raw_ids.take(take),
                                                          "dtype": pa.array(["BF16"] * len(take)), "data_file": files.take(take)}), "scale")
    return {"build_s": time.perf_counter() - t0}


def _binary(a):
    import numpy as np
    import pyarrow as pa

    n, w = a.shape
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * w).tobytes())
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(np.ascontiguousarray(a).tobytes())])


def _hex(a):
    import numpy as np

    table = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
    return table[a].view(f"S{2 * a.shape[1]}").reshape(-1)


# ---- spies -----------------------------------------------------------------------------
def install_spies() -> None:
    """Count, per table: files opened, row groups read and their bytes, whole-table reads;
    and s3fs requests by kind. Installed in each process that reads (driver, Ray workers); the
    counts live on the pyarrow.parquet module, which a Ray actor keeps between calls (this
    script's own globals are shipped anew with each function a call sends)."""
    import pyarrow.parquet as pq

    from haagenti.store import SCHEMAS, LibraryStore
    from haagenti.store.files import DataFiles
    from haagenti.store.keyed import column_bytes

    SPY = pq._haagenti_scale_spy = dict(files={}, row_groups={}, bytes={}, whole={}, s3={})
    last = [""]
    real_open, real_groups, real_read = DataFiles.open, pq.ParquetFile.read_row_groups, LibraryStore.read

    def table_of(path: str) -> str:
        return next((p for p in path.split("/") if p in SCHEMAS), "?")

    def spy_open(self, path):
        last[0] = table_of(path)
        SPY["files"][last[0]] = SPY["files"].get(last[0], 0) + 1
        return real_open(self, path)

    def spy_groups(self, row_groups, columns=None, *a, **k):
        t = last[0]
        SPY["row_groups"][t] = SPY["row_groups"].get(t, 0) + len(row_groups)
        SPY["bytes"][t] = SPY["bytes"].get(t, 0) + column_bytes(self.metadata, row_groups, columns or self.metadata.schema.names)
        return real_groups(self, row_groups, columns, *a, **k)

    def spy_read(self, name, *a, **k):
        SPY["whole"][name] = SPY["whole"].get(name, 0) + 1
        return real_read(self, name, *a, **k)

    DataFiles.open, pq.ParquetFile.read_row_groups, LibraryStore.read = spy_open, spy_groups, spy_read
    try:
        import s3fs

        real_call = s3fs.S3FileSystem._call_s3

        async def spy_call(self, method, *a, **k):
            name = getattr(method, "__name__", str(method))
            SPY["s3"][name] = SPY["s3"].get(name, 0) + 1
            return await real_call(self, method, *a, **k)

        s3fs.S3FileSystem._call_s3 = spy_call
    except ImportError:
        pass


def spied() -> dict:
    import pyarrow.parquet as pq

    return dict(pq._haagenti_scale_spy, peak_mib=vmhwm_mib())


# ---- one run per process ---------------------------------------------------------------
def run_ingest(url: str, model: str) -> dict:
    from haagenti.cli import app

    install_spies()
    t = time.perf_counter()
    app(["ingest", url, model, "--model-id", "added"], standalone_mode=False)  # `haagenti ingest`, in this process
    secs = time.perf_counter() - t
    return {"seconds": secs, "driver": spied()}


def run_recall(url: str, n: str, queries: int = 256) -> dict:
    """How often the reference rule proposes a library fragment for a near-duplicate of it (its
    signature with `flips` bits flipped, as a fine-tune moves it), matched against this index:
    rows regenerated from `build`'s seed. `lsh`: the pair shares a band bucket; `proposed`: the
    rule (the nearest MAX_PARTNERS within the Hamming limit among the first MAX_SCAN of a bucket) pairs them.
    Two sets of queries, scoped as an ingest scopes its run (IndexLayout.scoper): `scattered`,
    near-duplicates of `queries` fragments drawn from the whole library (one from each of
    unrelated models); `model`, of 4 * `queries` consecutive fragments, in order (a fine-tune
    of one stored model)."""
    import numpy as np
    import pyarrow as pa

    from haagenti.library import FragmentLibrary
    from haagenti.matching import hamming_limit, match_rows, partner_pairs
    from haagenti.signature import band_hashes

    n = int(n)
    lib = FragmentLibrary.open(url)
    cfg = lib.config.signature
    ids, bits = synthetic(n, 1)
    index = lib.index
    limit = hamming_limit(cfg, lib.config.thresholds.similar_cosine)
    out = {"limit": limit}
    start = int(np.random.default_rng(3).integers(0, max(n - 4 * queries, 1)))
    for kind, pick in (("scattered", np.random.default_rng(2).choice(n, queries, replace=False)), ("model", np.arange(start, min(start + 4 * queries, n)))):
        for flips in (4, 8, 16):
            g = np.random.default_rng(flips)
            q = np.unpackbits(bits[pick], axis=1)
            for row in q:
                row[g.choice(cfg.bits, flips, replace=False)] ^= 1
            q = np.packbits(q, axis=1)
            qids = [g.bytes(32).hex() for _ in range(len(pick))]
            t = pa.table({"fragment_id": qids, "bits": pa.array([r.tobytes() for r in q], pa.binary()), "n_elements": pa.array(np.full(len(pick), 131072), pa.int64())})
            pairs = partner_pairs(index.scoper()(match_rows(t, cfg, np.arange(len(pick)))), index.propose, None, limit)
            got = set(zip(pairs["fragment_id"].to_pylist(), pairs["candidate_id"].to_pylist()))
            lsh = (band_hashes(q, cfg) == band_hashes(bits[pick], cfg)).any(axis=1)
            out[f"{kind} {flips}"] = {"lsh": float(lsh.mean()), "proposed": float(np.mean([(a, ids[i].tobytes().hex()) in got for a, i in zip(qids, pick)]))}
    return out


def run_pipeline(url: str, model: str) -> dict:
    import ray
    import yaml

    from pipelines.dedup import run_dedup
    from pipelines.executors import RayExecutor, init_local_ray

    with tempfile.TemporaryDirectory() as d:
        cat = os.path.join(d, "catalog.yaml")
        with open(cat, "w") as f:
            yaml.safe_dump({"models": [{"id": "added", "files": [model]}]}, f)
        init_local_ray(num_cpus=2, object_store_memory=75 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        ex = RayExecutor()
        ray.get([a.run.remote(install_spies) for a in ex.pool])
        started = time.perf_counter() - t
        install_spies()
        t = time.perf_counter()
        report = run_dedup(cat, url, ex)
        secs = time.perf_counter() - t
        workers = ray.get([a.run.remote(spied) for a in ex.pool])
        driver = spied()
        ray.shutdown()
    return {"seconds": secs, "start_s": started, "stages": report.stages, "driver": driver, "workers": workers}


# ---- the S3 server and the stores ------------------------------------------------------
def index_tables(url: str) -> tuple[str, ...]:
    from haagenti.library import FragmentLibrary

    return FragmentLibrary.open(url, create=False).index.tables


def index_bytes(url: str) -> int:
    from haagenti.fsio import filesystem_for

    fs, root = filesystem_for(url)
    return sum(fs.du(f"{root}/{t}") for t in index_tables(url))


def rollback(url: str, versions: dict[str, int]) -> None:
    """Every table back to its version before the run (a Delta restore commit)."""
    from deltalake import DeltaTable

    from haagenti.store.delta import storage_options_for

    for name, v in versions.items():
        dt = DeltaTable(f"{url}/{name}", storage_options=storage_options_for(url))
        if dt.version() != v:
            dt.restore(v)


def worker(mode: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, *args]
    if mode == "pipeline":
        cmd = ["flock", "/tmp/haagenti-ray.lock", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=3600)
    if out.returncode:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise SystemExit(f"worker {mode} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def library(store: str, n: int, work: str, keep: bool, index: str) -> tuple[str, dict, dict, int]:
    """(url, table versions, build figures, index bytes) of a library whose index holds n
    fragments. With `keep`, local ones are kept in bench/.cache/scale/lib-N and reused."""
    from haagenti.store import LibraryStore

    layout = "" if index == "bands" else f"{index}-"
    if store == "s3":
        url = f"s3://{BUCKET}/lib{layout}{n}"
    else:
        url = os.path.join(CACHE if keep else work, f"lib-{layout}{n}")
    done = url + ".json"
    if store == "local" and keep and os.path.exists(done):
        with open(done) as f:
            built, size = json.load(f)
    else:
        if store == "local":
            shutil.rmtree(url, ignore_errors=True)
        built = worker("build", url, str(n), index)
        size = index_bytes(url)
        if store == "local" and keep:
            with open(done, "w") as f:
                json.dump([built, size], f)
    return url, LibraryStore(url).versions(), built, size


def fmt_reads(d: dict, table: str) -> str:
    return f"{d['files'].get(table, 0)}f/{d['row_groups'].get(table, 0)}rg/{d['bytes'].get(table, 0) / 1e6:.1f}MB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--model-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--s3-max", type=int, default=1_000_000)
    ap.add_argument("--stores", nargs="+", default=["local", "s3"])
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument("--modes", nargs="+", default=["ingest", "pipeline"], choices=["ingest", "pipeline"])
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(HERE), "docs", "figures", "scale.png"))
    ap.add_argument("--json", default=os.path.join(HERE, ".cache", "scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep the local libraries in bench/.cache/scale for re-runs")
    ap.add_argument("--clean", action="store_true")
    ap.add_argument("--index", default="bands", help="the index layout of the synthetic libraries (bands or two-level)")
    a = ap.parse_args()
    if a.worker:
        mode, *rest = a.worker
        fn = {"build": lambda u, n, index: build(u, int(n), index), "ingest": run_ingest, "pipeline": run_pipeline, "recall": run_recall}[mode]
        print(json.dumps(fn(*rest)))
        return
    if a.clean:
        shutil.rmtree(CACHE, ignore_errors=True)
        return
    model = model_file(a.model_mb)
    raw = os.path.getsize(model)
    print(f"model added: {raw / 1e6:.0f} MB of bf16 normal(0, 0.02) ({model}); machine shared with other sessions", flush=True)
    rows = []
    work = tempfile.mkdtemp(prefix="scale-", dir=os.path.join(HERE, ".cache"))
    moto = None
    modes = [m for m in a.modes if not (a.no_pipeline and m == "pipeline")]
    try:
        for store in a.stores:
            if store == "s3":
                moto, _ = start_moto(BUCKET)
            libs = {}
            for n in a.sizes:
                if store == "s3" and n > a.s3_max:
                    print(f"s3 {n:>10,}: skipped (moto_server keeps every object in memory; the index alone would take {n * 1.1e-6:.0f} GB of it)", flush=True)
                    continue
                libs[n] = library(store, n, work, a.keep, a.index)
            for n, (url, *_) in libs.items():
                rec = worker("recall", url, str(n))
                print(f"{store:5s} {n:>10,} near-duplicate recall of the rule (Hamming limit {rec.pop('limit')}): "
                      + "  ".join(f"{f} bits flipped: shares a bucket {r['lsh']:.3f}, proposed {r['proposed']:.3f}" for f, r in rec.items()), flush=True)
            results = {(n, mode): [] for n in libs for mode in modes}
            for r in range(a.runs):  # sizes and modes interleaved: each round sees the same machine load
                for n, (url, versions, built, size) in libs.items():
                    for mode in modes:
                        got = worker(mode, url, model)
                        rollback(url, versions)
                        results[(n, mode)].append(got)
                        print(f"  run {r + 1}: {store} {n:>10,} {mode:8s} {got['seconds']:7.1f} s", flush=True)
            for (n, mode), runs in results.items():
                url, versions, built, size = libs[n]
                secs = [r["seconds"] for r in runs]
                rows.append({"store": store, "index": a.index, "fragments": n, "mode": mode, "seconds": secs, "build_s": built["build_s"], "index_bytes": size, "runs": runs})
                d = runs[-1]["driver"]
                wk = runs[-1].get("workers", [])
                dpeak = max(r["driver"]["peak_mib"] for r in runs)
                wpeak = max((w["peak_mib"] for r in runs for w in r.get("workers", [])), default=0)
                tables = index_tables(url)
                wb = {k: sum(w[k].get(t, 0) for w in wk for t in tables) for k in ("files", "row_groups", "bytes")}
                s3 = sum(d["s3"].values()) + sum(sum(w["s3"].values()) for w in wk)
                print(
                    f"{store:5s} {n:>10,} {mode:8s} {min(secs):7.1f} / {statistics.median(secs):7.1f} / {max(secs):7.1f} s  "
                    f"{raw / 1e6 / statistics.median(secs):6.1f} MB/s  driver {dpeak:5d} MiB  workers {wpeak:5d} MiB  "
                    f"index {size / n:6.0f} B/frag  " + "  ".join(f"{t} {fmt_reads(d, t)}" for t in tables)
                    + f" (workers {wb['files']}f/{wb['row_groups']}rg/{wb['bytes'] / 1e6:.1f}MB)  "
                    f"whole-table reads {d['whole']}  s3 requests {s3}  (build {built['build_s']:.0f} s)",
                    flush=True,
                )
            if moto is not None:
                moto.terminate()
                moto.wait(30)
                moto = None
    finally:
        if moto is not None:
            moto.kill()
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(rows, f)
    plot(rows, a.plot, raw)


def plot(rows: list[dict], path: str, raw: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for store in ("local", "s3"):
        for mode in ("ingest", "pipeline"):
            pts = sorted((r["fragments"], statistics.median(r["seconds"]), min(r["seconds"]), max(r["seconds"])) for r in rows if r["store"] == store and r["mode"] == mode)
            if pts:
                xs, med, lo, hi = zip(*pts)
                ax.errorbar(xs, med, yerr=[[m - l for m, l in zip(med, lo)], [h - m for m, h in zip(med, hi)]], marker="o", capsize=3, label=f"{mode} ({store})")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("fragments in the library's index")
    ax.set_ylabel(f"seconds to add one {raw / 1e6:.0f} MB model")
    ax.set_title("haagenti: cost of adding a model vs library size (2 shared CPUs)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
