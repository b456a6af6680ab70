"""Cost of fetching a few fragments by id as the library grows: `read_fragments` of 64 ids.

    flock /tmp/haagenti-heavy.lock python bench/lookups.py [--sizes 10000 100000 1000000 10000000]
        [--runs 3] [--calls 5] [--stores local s3] [--s3-max 100000] [--appended 100000]
        [--before /path/to/older/checkout] [--compare-max 1000000] [--keep]

Each library holds N fragments in fragments data files of 256 rows (one 64 MiB commit of
256 KiB fragments), each row group 8 rows (2 MiB of 256 KiB blobs): the files an ingest
writes, written by the store's own writer (`LibraryStore._write_file`, as `append` calls it)
but with 16-byte blobs, and committed 1,000 add actions per Delta commit instead of one (the
log is shorter than a real library's; the data files are the same). The ids table is written
by the index's own `append_keyed` in sorted files of 2M rows with disjoint key ranges: the
layout `jobs.compact` leaves. Each id row names its data file (`data_file`).

Each measurement is a fresh process that opens the library and calls `read_fragments` on
`--calls` sets of 64 random ids of the library (the first call pays for every cache: footers,
the ids table's row-group ranges, the fragments id columns of the old scan; the tables' Delta logs are read before the clock
starts and timed apart, as `open`). Modes:
  hinted: this checkout's FragmentLibrary.read_rows (the index layout locates the ids by key,
          then read_fragments reads the data files it names)
  scan:   this checkout's exact scan of every data file's id column (DataFiles.fragments without
          hints: what read_fragments did before the ids table named data files)
  before: FragmentLibrary.read_rows of the checkout given by --before (e.g. `git worktree add --detach
          /tmp/before <commit>`), on the same library
Rounds go over every size and mode in turn, so each round sees the same machine load. Prints
min/median/max of the first call's and the later calls' seconds and the process's peak RSS.
Libraries are built under bench/.cache/lookups and deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.environ.get("LOOKUPS_CODE", ROOT))  # the haagenti measured: this checkout, or --before's
sys.path.insert(1, HERE)
CACHE = os.path.join(HERE, ".cache", "lookups")
FILE_ROWS, GROUP_ROWS, ADDS_PER_COMMIT, ID_CHUNK, ASK = 256, 8, 1000, 2_000_000, 64
BUCKET = "lookups"


def vm_mib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field + ":"))


# ---- the library -----------------------------------------------------------------------
def build(url: str, n: int, sets: int, appended: bool = False, seed: int = 1) -> dict:
    """A library of n fragments (see the module's docstring) and `sets` query sets of its ids.
    `appended`: the ids table as ingests leave it before any compaction, one file (and commit)
    per fragments data file, instead of sorted files with disjoint ranges."""
    import numpy as np
    import pyarrow as pa
    from deltalake.transaction import AddAction

    from haagenti.library import FragmentLibrary
    from haagenti.store import SCHEMAS
    from haagenti.store.delta import _scalar_columns
    from haagenti.store.files import data_file_uuid
    from haagenti.index.bands import IDS, id_keys
    from haagenti.store.keyed import append_keyed

    t0 = time.perf_counter()
    lib = FragmentLibrary.open(url)
    store = lib.store
    schema = SCHEMAS["fragments"]
    rng = np.random.default_rng(seed)
    ids = _hex_ids(rng, n)
    const = {
        "dtype": pa.array(["BF16"] * FILE_ROWS), "n_elements": pa.array([131072] * FILE_ROWS, pa.int64()),
        "raw_size": pa.array([262144] * FILE_ROWS, pa.int64()), "stored_size": pa.array([16] * FILE_ROWS, pa.int64()),
        "encoding": pa.array(["plain"] * FILE_ROWS), "codec": pa.array(["rotl:2:1+bytegroup:2+zstd:3"] * FILE_ROWS),
        "ref_id": pa.nulls(FILE_ROWS, pa.string()), "ref_dtype": pa.nulls(FILE_ROWS, pa.string()),
        "fragment_type": pa.array(["float"] * FILE_ROWS), "quality": pa.array(["exact"] * FILE_ROWS), "depth": pa.array([0] * FILE_ROWS, pa.int64()),
        "blob": pa.array([b"\0" * 16] * FILE_ROWS, pa.large_binary()),
    }
    scalar = _scalar_columns(schema)
    options = {"compression": "none", "use_dictionary": scalar, "write_statistics": scalar}  # LibraryStore.append's, for fragments
    actions: list[AddAction] = []
    files: list[str] = []
    for a in range(0, n, FILE_ROWS):
        k = min(FILE_ROWS, n - a)
        rows = pa.table({"fragment_id": ids.slice(a, k), **{c: v.slice(0, k) for c, v in const.items()}}, schema=schema)
        actions.append(store._write_file("fragments", (rows.slice(g, GROUP_ROWS) for g in range(0, k, GROUP_ROWS)), options))
        files.append(data_file_uuid(actions[-1].path))
        if len(actions) == ADDS_PER_COMMIT or a + k >= n:
            store.commit_add("fragments", actions)
            actions = []
    keys = _keys(ids)
    assert (keys[:1000] == id_keys(ids.slice(0, 1000).to_pylist())).all()
    order = np.argsort(keys, kind="stable")
    owner = pa.array(files).take(pa.array(np.arange(n) // FILE_ROWS))
    chunks = [np.arange(a, min(a + FILE_ROWS, n)) for a in range(0, n, FILE_ROWS)] if appended else [order[a : a + ID_CHUNK] for a in range(0, n, ID_CHUNK)]
    for chunk in chunks:
        take = pa.array(chunk)
        append_keyed(store, IDS, pa.table({
            "id_key": pa.array(keys).take(take), "fragment_id": ids.take(take), "dtype": pa.array(["BF16"] * len(take)), "data_file": owner.take(take),
        }), "lookups")
    picks = np.random.default_rng(seed + 1).choice(n, size=(sets, ASK), replace=False if sets * ASK <= n else True)
    queries = [ids.take(pa.array(p)).to_pylist() for p in picks]
    return {"build_s": time.perf_counter() - t0, "files": len(files), "queries": queries}


def _hex_ids(rng, n: int):
    """n random 64-hex-digit ids as a string array, built from buffers (no Python str per id)."""
    import numpy as np
    import pyarrow as pa

    chars = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), np.uint16)[rng.integers(0, 256, size=(n, 32), dtype=np.uint8)]
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * 64), pa.py_buffer(chars)])


def _keys(ids):
    """id_keys of a string array of hex ids, vectorised (haagenti.index.bands.id_keys, by buffers)."""
    import numpy as np

    raw = np.frombuffer(ids.buffers()[2], np.uint8).reshape(len(ids), 64)[:, :16]
    nib = np.where(raw >= ord("a"), raw - ord("a") + 10, raw - ord("0")).astype(np.uint64)
    v = np.zeros(len(ids), np.uint64)
    for j in range(16):
        v = (v << np.uint64(4)) | nib[:, j]
    return v.view(np.int64) ^ np.int64(-(2**63))


# ---- one measurement per process -------------------------------------------------------
def probe(url: str, mode: str, queries_path: str) -> dict:
    from haagenti.library import FragmentLibrary
    from haagenti.store import SCHEMAS
    from haagenti.store.files import DataFiles

    with open(queries_path) as f:
        queries = json.load(f)
    touched: set[str] = set()
    real = DataFiles._groups_holding
    DataFiles._groups_holding = lambda self, path, wanted: touched.add(path) or real(self, path, wanted)
    t = time.perf_counter()
    lib = FragmentLibrary.open(url)
    store = lib.store
    store._paths("fragments", None), store._paths("ids", None)  # the Delta logs, read by both modes: timed apart
    opened = time.perf_counter() - t
    rss0 = vm_mib("VmRSS")
    secs, found, files = [], [], []
    for ids in queries:
        touched.clear()
        t = time.perf_counter()
        if mode == "scan":
            out = store.files.fragments(store._paths("fragments", None), ids, SCHEMAS["fragments"].names)
        else:
            out = lib.read_rows(set(ids))  # the library's own read, whichever checkout
        secs.append(time.perf_counter() - t)
        found.append(len(out))
        files.append(len(touched))
    return {"open_s": opened, "first_s": secs[0], "later_s": secs[1:], "found": found, "files_read": files, "rss_before_mib": rss0, "peak_mib": vm_mib("VmHWM")}


def run_probe(url: str, mode: str, queries: str, before: str | None) -> dict:
    env = dict(os.environ, LOOKUPS_CODE=before if mode == "before" else ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", url, "scan" if mode == "scan" else "hinted", queries]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"probe {mode} {url} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    return " / ".join(fmt.format(x) for x in (min(xs), statistics.median(xs), max(xs)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--stores", nargs="+", default=["local"], choices=["local", "s3"])
    p.add_argument("--s3-max", type=int, default=100_000)
    p.add_argument("--appended", type=int, nargs="*", default=[100_000], help="sizes also measured with the ids table as appended (not compacted)")
    p.add_argument("--before", help="a checkout of the code to compare with (mode 'before')")
    p.add_argument("--modes", nargs="+", default=["hinted", "scan"], choices=["hinted", "scan", "before"])
    p.add_argument("--compare-max", type=int, default=1_000_000,
                   help="largest size measured in modes scan and before (the code before held every data file's footer: ~13 GB at 10M)")
    p.add_argument("--keep", action="store_true", help="keep the local libraries for another run")
    p.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(*args.probe)))
        return
    modes = args.modes + (["before"] if args.before and "before" not in args.modes else [])
    print(f"load average at start: {os.getloadavg()}", flush=True)
    moto = None
    libs: list[tuple[str, str, int, str]] = []  # (store and layout, url, n, queries file)
    try:
        for store in args.stores:
            if store == "s3":
                from common import start_moto

                moto, _ = start_moto(BUCKET)
            for n, appended in [(n, False) for n in args.sizes] + [(n, True) for n in args.appended]:
                if store == "s3" and n > args.s3_max:
                    continue
                name = f"lib-{n}" + ("-appended" if appended else "")
                url = os.path.join(CACHE, name) if store == "local" else f"s3://{BUCKET}/{name}"
                queries = os.path.join(CACHE, f"queries-{store}-{name}.json")
                if store == "s3" or not os.path.exists(queries):
                    if store == "local":
                        shutil.rmtree(url, ignore_errors=True)
                    os.makedirs(CACHE, exist_ok=True)
                    info = build(url, n, args.calls, appended)
                    with open(queries, "w") as f:
                        json.dump(info.pop("queries"), f)
                    print(f"built {store} {name}: {info['files']:,} data files in {info['build_s']:.1f} s", flush=True)
                libs.append((store + (" (ids appended)" if appended else ""), url, n, queries))
        results: dict[tuple, list[dict]] = {}
        for r in range(args.runs):
            for store, url, n, queries in libs:
                for mode in [m for m in modes if m == "hinted" or n <= args.compare_max]:
                    got = run_probe(url, mode, queries, args.before)
                    results.setdefault((store, n, mode), []).append(got)
                    print(f"run {r + 1} {store} {n:>10,} {mode:6}: open {got['open_s']:.3f} s, first {got['first_s']:.3f} s, later {spread(got['later_s'])} s, "
                          f"files {got['files_read']}, found {got['found']}, peak {got['peak_mib']} MiB (before the calls {got['rss_before_mib']})", flush=True)
        print(f"load average at end: {os.getloadavg()}")
        print("\n| store | fragments | mode | first call s min/med/max | later calls s min/med/max | peak RSS MiB min/med/max | data files read (first call) |")
        print("|---|---|---|---|---|---|---|")
        for (store, n, mode), rs in results.items():
            later = [s for r in rs for s in r["later_s"]]
            print(f"| {store} | {n:,} | {mode} | {spread([r['first_s'] for r in rs])} | {spread(later)} | "
                  f"{spread([r['peak_mib'] for r in rs], '{:.0f}')} | {rs[0]['files_read'][0]:,} |")
    finally:
        if moto is not None:
            moto.terminate()
        if not args.keep:
            shutil.rmtree(CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
