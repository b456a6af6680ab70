"""What the many-writers rule costs one ingest, on a local folder and on S3 (moto on loopback):
a lease taken and released (two lease writes, two listings, one delete) and a publication
record (one listing, one write, one delete), beside a whole small ingest that pays them.
Methods are sampled round-robin so they share the same minutes of a shared machine.

    python bench/leases.py [--runs 15]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from haagenti.config import LibraryConfig  # noqa: E402
from haagenti.library import FragmentLibrary  # noqa: E402
from haagenti.store.leases import writing  # noqa: E402
from haagenti.store.publication import record  # noqa: E402


def moto() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-leases-")
    server = moto()
    try:
        rng = np.random.default_rng(0)
        path = os.path.join(tmp, "m.safetensors")
        save_file({f"w{i}": rng.standard_normal((64, 512)).astype(np.float16) for i in range(4)}, path)
        config = LibraryConfig(fragment_size=65536, similarity=False)
        libs = {"local": FragmentLibrary.open(os.path.join(tmp, "lib"), config), "s3": FragmentLibrary.open("s3://bench/lib", config)}
        # Records of made-up versions go to libraries of their own (a real one would refuse them).
        scratch = {"local": FragmentLibrary.open(os.path.join(tmp, "scratch"), config), "s3": FragmentLibrary.open("s3://bench/scratch", config)}
        times: dict[tuple[str, str], list[float]] = {}
        for run in range(args.runs):
            for where, lib in libs.items():
                t0 = time.perf_counter()
                with writing(lib.store, "ingest", [f"x{run}"]):
                    pass
                t1 = time.perf_counter()
                record(scratch[where].store, run, [f"x{run}"])
                t2 = time.perf_counter()
                lib.ingest([path], f"m{run}")
                t3 = time.perf_counter()
                for name, dt in (("lease", t1 - t0), ("record", t2 - t1), ("ingest", t3 - t2)):
                    times.setdefault((where, name), []).append(dt * 1000)
        print(f"{args.runs} runs each, round-robin; a 262 KB model of 4 fragments, no similarity (machine shared)")
        print(f"{'':8s}{'what':34s}{'min':>9s}{'median':>9s}{'max':>9s}  ms")
        labels = {"lease": "lease taken and released", "record": "publication record", "ingest": "whole ingest (pays both)"}
        for (where, name), xs in times.items():
            print(f"{where:8s}{labels[name]:34s}{min(xs):9.1f}{statistics.median(xs):9.1f}{max(xs):9.1f}")
    finally:
        server.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
