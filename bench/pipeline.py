"""Pipeline scaling: MB/s of model bytes in, peak memory and object-store spill, for catalogs
of 1-14 models (or the sizes given; every 7 models are one more trained example family) on a
2-CPU Ray cluster with 1 and 2 step workers, against the single-process library ingest of the
same catalog (`ingest_many`: one process, one set of commits).

    python bench/pipeline.py [--large] [MODELS ...]   (catalog sizes; default 1 2 4 8 14)

--large takes the models from the "largeK" families (33.7 MB per model instead of 6.3 MB).
Each configuration runs in its own process; peak memory is that process's VmHWM (the parent's
RSS does not leak into it, as ru_maxrss does across fork+exec). Ray's object store is capped
at its 75 MiB minimum, so catalogs from 14 models up are bigger than the object store. A Ray
configuration runs first "cold", including starting the step actors (what a fresh
`ray job submit` pays), then WARM_RUNS times "warm", each into a fresh library on the same
actors (a long-lived driver re-running on a schedule); the library ingest runs WARM_RUNS
times. Reported: the cold time and the median of the others.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WARM_RUNS = 3


def families(n: int, large: bool = False) -> list:
    """Members of as many example families (7 models each) as n models need, trained on first use."""
    from common import example_family

    names = [f"large{k}" if large else ("family" if k == 1 else f"family{k}") for k in range(1, -(-n // 7) + 1)]
    return [m for name in names for m in example_family(name)]


def peak_rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))


def catalog(n: int, path: str, large: bool = False) -> int:
    import yaml

    chosen = families(n, large)[:n]
    with open(path, "w") as f:
        yaml.safe_dump({"models": [{"id": f"{m.model_id}-{i}", "family": m.family, "files": [m.file]} for i, m in enumerate(chosen)]}, f)
    return sum(os.path.getsize(m.file) for m in chosen)


def one(n: int, workers: int, mode: str, large: bool) -> dict:
    """Run one configuration in this process and return its figures."""
    sys.path.insert(0, os.path.dirname(HERE))
    with tempfile.TemporaryDirectory() as d:
        raw = catalog(n, os.path.join(d, "c.yaml"), large)
        lib = os.path.join(d, "lib")
        spilled = gpus = workers_peak = 0
        stages: dict = {}
        cold_stages: dict = {}
        if mode == "library":
            import yaml

            from haagenti.library import FragmentLibrary, ModelInput

            models = [ModelInput(m["files"], m["id"], m["family"]) for m in yaml.safe_load(open(os.path.join(d, "c.yaml")))["models"]]
            times = []
            for i in range(WARM_RUNS):
                t = time.perf_counter()
                FragmentLibrary.open(f"{lib}{i}").ingest_many(models)
                times.append(time.perf_counter() - t)
            secs = warm = statistics.median(times)
        else:
            import ray

            from pipelines.dedup import run_dedup
            from pipelines.executors import RayExecutor, init_local_ray

            init_local_ray(num_cpus=2, object_store_memory=75 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            t = time.perf_counter()
            ex = RayExecutor(workers=workers)
            cold_stages = run_dedup(os.path.join(d, "c.yaml"), lib, ex).stages
            secs = time.perf_counter() - t
            runs = []
            for i in range(WARM_RUNS):
                t = time.perf_counter()
                stages = run_dedup(os.path.join(d, "c.yaml"), f"{lib}-warm{i}", ex).stages
                runs.append((time.perf_counter() - t, stages))
            warm, stages = sorted(runs, key=lambda r: r[0])[WARM_RUNS // 2]
            gpus = ex.gpus
            workers_peak = max(ray.get([a.run.remote(peak_rss_mib) for a in ex.pool + ex.gpu_pool]))
            from ray._private.internal_api import memory_summary

            for line in memory_summary(stats_only=True).splitlines():
                if "Spilled" in line:
                    spilled = int(float(line.split("Spilled")[1].split("MiB")[0].strip()))
            ray.shutdown()
        peak = peak_rss_mib()
        return {"models": n, "workers": workers, "mode": mode, "raw_mb": raw / 1e6, "seconds": secs, "mb_s": raw / 1e6 / secs, "warm_mb_s": raw / 1e6 / warm, "driver_peak_mib": peak, "worker_peak_mib": workers_peak, "spilled_mib": spilled, "gpus": gpus, "cold_stages": cold_stages, "warm_stages": stages}


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        print(json.dumps(one(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "large")))
        return
    args = sys.argv[1:]
    large = "--large" in args
    sizes = [int(a) for a in args if a != "--large"] or [1, 2, 4, 8, 14]  # catalog sizes to run (models)
    families(max(sizes), large)  # trains the families the largest catalog needs, before any timing
    rows = []
    for n in sizes:
        for workers, mode in ((1, "library"), (1, "ray"), (2, "ray")):
            cmd = [sys.executable, __file__, "--one", str(n), str(workers), mode, "large" if large else "small"]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=900)
            if out.returncode:
                print(out.stderr[-2000:])
                raise SystemExit(1)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['models']:3d} models {r['raw_mb']:6.1f} MB  {r['mode']:8s} workers={r['workers']}  {r['seconds']:7.1f}s  {r['mb_s']:6.1f} MB/s (warm {r['warm_mb_s']:6.1f})  peak RSS driver {r['driver_peak_mib']:5d} MiB, worker {r['worker_peak_mib']:5d} MiB  spilled {r['spilled_mib']} MiB  gpus {r['gpus']}", flush=True)
            if r["mode"] == "ray":
                print(f"      stages (s) cold {r['cold_stages']}\n                 warm {r['warm_stages']}", flush=True)
    print(f"\nscaling (MB/s of model bytes in; ray: cold / median of {WARM_RUNS} warm; library: median of {WARM_RUNS}):")
    print(f"{'models':>6s} {'library 1 proc':>15s} {'ray 1 worker':>15s} {'ray 2 workers':>15s} {'library/ray1 cold, warm':>24s}")
    for n in sizes:
        lib, r1, r2 = (next(r for r in rows if r["models"] == n and r["mode"] == m and r["workers"] == c) for m, c in (("library", 1), ("ray", 1), ("ray", 2)))
        print(f"{n:6d} {lib['mb_s']:15.1f} {r1['mb_s']:7.1f} / {r1['warm_mb_s']:5.1f} {r2['mb_s']:7.1f} / {r2['warm_mb_s']:5.1f} "
              f"{lib['mb_s'] / r1['mb_s']:10.1f}x, {lib['mb_s'] / r1['warm_mb_s']:.1f}x")


if __name__ == "__main__":
    main()
