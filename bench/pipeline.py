"""Pipeline scaling: MB/s of model bytes in, peak memory and object-store spill, for catalogs
of 1-14 models (or the sizes given; every 7 models are one more trained example family) on a 2-CPU Ray cluster with 1 and 2 step workers, against the single-process
library ingest of the same catalog (`ingest_many`: one process, one set of commits).

    python bench/pipeline.py [MODELS ...]      (catalog sizes; default 1 2 4 8 14)
Each configuration runs in its own process (clean peak RSS); Ray's object store is capped at
its 75 MiB minimum so the largest catalog (~88 MB) is bigger than the object store. A Ray
configuration runs twice on one executor: "cold" includes starting the step actors (what a
fresh `ray job submit` pays), "warm" is a second run into a fresh library on the same actors
(a long-lived driver re-running on a schedule).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def families(n: int) -> list:
    """Members of as many example families (7 models each) as n models need, trained on first use."""
    from common import example_family

    return [m for k in range(1, -(-n // 7) + 1) for m in example_family("family" if k == 1 else f"family{k}")]


def catalog(n: int, path: str) -> int:
    import yaml

    chosen = families(n)[:n]
    with open(path, "w") as f:
        yaml.safe_dump({"models": [{"id": f"{m.model_id}-{i}", "family": m.family, "files": [m.file]} for i, m in enumerate(chosen)]}, f)
    return sum(os.path.getsize(m.file) for m in chosen)


def one(n: int, workers: int, mode: str) -> dict:
    """Run one configuration in this process and return its figures."""
    import resource

    sys.path.insert(0, os.path.dirname(HERE))
    with tempfile.TemporaryDirectory() as d:
        raw = catalog(n, os.path.join(d, "c.yaml"))
        lib = os.path.join(d, "lib")
        spilled = gpus = 0
        stages: dict = {}
        if mode == "library":
            from haagenti.library import FragmentLibrary
            import yaml

            from haagenti.library import ModelInput

            t = time.perf_counter()
            fl = FragmentLibrary.open(lib)
            fl.ingest_many([ModelInput(m["files"], m["id"], m["family"]) for m in yaml.safe_load(open(os.path.join(d, "c.yaml")))["models"]])
            secs = warm = time.perf_counter() - t
        else:
            import ray

            from pipelines.dedup import run_dedup
            from pipelines.executors import RayExecutor

            ray.init(num_cpus=2, object_store_memory=75 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            t = time.perf_counter()
            ex = RayExecutor(workers=workers)
            run_dedup(os.path.join(d, "c.yaml"), lib, ex)
            secs = time.perf_counter() - t
            t = time.perf_counter()
            stages = run_dedup(os.path.join(d, "c.yaml"), lib + "-warm", ex).stages
            warm = time.perf_counter() - t
            gpus = ex.gpus
            from ray._private.internal_api import memory_summary

            for line in memory_summary(stats_only=True).splitlines():
                if "Spilled" in line:
                    spilled = int(float(line.split("Spilled")[1].split("MiB")[0].strip()))
            ray.shutdown()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        return {"models": n, "workers": workers, "mode": mode, "raw_mb": raw / 1e6, "seconds": secs, "mb_s": raw / 1e6 / secs, "warm_mb_s": raw / 1e6 / warm, "driver_peak_mib": peak, "spilled_mib": spilled, "gpus": gpus, "warm_stages": stages}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps(one(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
        return
    sizes = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8, 14]  # catalog sizes to run (models)
    families(max(sizes))  # trains the families the largest catalog needs, before any timing
    rows = []
    for n in sizes:
        for workers, mode in ((1, "library"), (1, "ray"), (2, "ray")):
            out = subprocess.run([sys.executable, __file__, "--one", str(n), str(workers), mode], capture_output=True, text=True, cwd=HERE, timeout=900)
            if out.returncode:
                print(out.stderr[-2000:])
                raise SystemExit(1)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['models']:3d} models {r['raw_mb']:6.1f} MB  {r['mode']:8s} workers={r['workers']}  {r['seconds']:7.1f}s  {r['mb_s']:6.1f} MB/s (warm {r['warm_mb_s']:6.1f})  driver peak {r['driver_peak_mib']:5d} MiB  spilled {r['spilled_mib']} MiB  gpus {r['gpus']}  warm stages {r['warm_stages']}", flush=True)
    print("\nscaling (MB/s of model bytes in; ray: cold / warm):")
    print(f"{'models':>6s} {'library 1 proc':>15s} {'ray 1 worker':>15s} {'ray 2 workers':>15s} {'library/ray1 cold, warm':>24s}")
    for n in sizes:
        lib, r1, r2 = (next(r for r in rows if r["models"] == n and r["mode"] == m and r["workers"] == c) for m, c in (("library", 1), ("ray", 1), ("ray", 2)))
        print(f"{n:6d} {lib['mb_s']:15.1f} {r1['mb_s']:7.1f} / {r1['warm_mb_s']:5.1f} {r2['mb_s']:7.1f} / {r2['warm_mb_s']:5.1f} "
              f"{lib['mb_s'] / r1['mb_s']:10.1f}x, {lib['mb_s'] / r1['warm_mb_s']:.1f}x")


if __name__ == "__main__":
    main()
