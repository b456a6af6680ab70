"""Do the threads use the cores? `haagenti ingest` / `restore` of a generated model at
--threads 1 and 2 (or --threads), interleaved in one process: MB/s, the process's CPU/wall,
each thread's share of the wall time (sampled from /proc every 20 ms), minor page faults and
system time, and the load average. On a shared machine MB/s alone cannot tell a serial stage
from a busy neighbour; CPU/wall and the per-thread shares can.

    PYTHONPATH=. .venv/bin/python bench/cores.py --dtype bf16 --size 200 --runs 3 [--similarity]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import CACHE  # noqa: E402
from large_models import write_model  # noqa: E402

from haagenti.config import LibraryConfig  # noqa: E402
from haagenti.library import FragmentLibrary  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process, by native id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


class Sampler:
    """Each thread's CPU time as last seen (threads of a pool end with it) and its name."""

    def __init__(self):
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="sampler")
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.02):
            self.snap()

    def snap(self) -> dict[int, float]:
        self.last.update(thread_cpu())
        self.names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id})
        return dict(self.last)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--size", type=int, default=200, help="model size in MB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--similarity", action="store_true")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="cores-", dir=CACHE)
    sampler = Sampler()
    speeds: dict[str, list[float]] = {}
    try:
        path = write_model(os.path.join(folder, "model.safetensors"), args.size * 1_000_000, args.dtype)
        size = os.path.getsize(path)
        print(f"{args.dtype} {size / 1e6:.0f} MB, similarity {args.similarity}, {os.cpu_count()} cores, shared machine")

        def phase(label: str, fn) -> None:
            r0, before, t0 = resource.getrusage(resource.RUSAGE_SELF), sampler.snap(), time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            r1, after = resource.getrusage(resource.RUSAGE_SELF), sampler.snap()
            cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
            shares: dict[str, float] = {}
            for tid, v in after.items():
                name = sampler.names.get(tid, "other")
                if name != "sampler" and v > before.get(tid, 0.0):
                    shares[name] = shares.get(name, 0.0) + (v - before.get(tid, 0.0)) / wall
            speeds.setdefault(label, []).append(size / wall / 1e6)
            print(f"  {time.strftime('%H:%M:%S')} {label:11s} {size / wall / 1e6:7.1f} MB/s  CPU/wall {cpu / wall:4.2f}  "
                  f"sys {r1.ru_stime - r0.ru_stime:4.2f} s  faults {r1.ru_minflt - r0.ru_minflt:6d}  load {os.getloadavg()[0]:4.1f}  "
                  + " ".join(f"{k}:{v:.2f}" for k, v in sorted(shares.items()) if v >= 0.01), flush=True)

        threads = [int(t) for t in args.threads.split(",")]
        for _ in range(args.runs):
            for n in threads:
                work = tempfile.mkdtemp(dir=folder)
                try:
                    lib = FragmentLibrary.open(os.path.join(work, "lib"), LibraryConfig(similarity=args.similarity))
                    phase(f"ingest t{n}", lambda: lib.ingest([path], "m", threads=n))
                    phase(f"restore t{n}", lambda: lib.restore("m", os.path.join(work, "out"), threads=n))
                finally:
                    shutil.rmtree(work)
        print("MB/s min / median / max")
        for label, v in speeds.items():
            v = sorted(v)
            print(f"  {label:11s} {v[0]:7.1f} / {statistics.median(v):7.1f} / {v[-1]:7.1f}")
        for op in ("ingest", "restore"):
            base = speeds[f"{op} t{threads[0]}"]
            for n in threads[1:]:
                print(f"  {op} t{n} / t{threads[0]}: of medians {statistics.median(speeds[f'{op} t{n}']) / statistics.median(base):.2f}, per round "
                      + " ".join(f"{a / b:.2f}" for a, b in zip(speeds[f"{op} t{n}"], base)))
    finally:
        sampler.stopped.set()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
