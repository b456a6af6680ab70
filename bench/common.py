"""Shared bench helpers: the example family (trained once, cached) and timing."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CACHE = os.environ.get("HAAGENTI_BENCH_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))


# "largeK" families: 5.3x the bytes of the example family (d=512, 8 layers, 33.7 MB per
# model), for catalogs big enough that a job's fixed start-up cost no longer dominates.
LARGE = {"d": 512, "layers": 8}


def example_family(name: str = "family"):
    """Train an example family once into bench/.cache and reuse it. "family" is trained with
    seed 0, "familyK" (K >= 2) with seed K - 1, "largeK" (K >= 1) at LARGE size with seed K - 1:
    independent families of 7 models."""
    from haagenti.examples import FamilyMember, make_family, write_catalog

    out = os.path.join(CACHE, name)
    marker = os.path.join(out, "catalog.yaml")
    if not os.path.exists(marker):
        if name.startswith("large"):
            members = make_family(out, seed=int(name.removeprefix("large")) - 1, **LARGE)
        else:
            members = make_family(out, seed=0 if name == "family" else int(name.removeprefix("family")) - 1)
        write_catalog(members, out)
    import yaml

    with open(marker) as f:
        doc = yaml.safe_load(f)
    return [FamilyMember(m["id"], m["files"][0], m["family"], "") for m in doc["models"]]


@contextmanager
def timed(box: list):
    t = time.perf_counter()
    yield
    box.append(time.perf_counter() - t)


def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:8.1f}" if seconds > 0 else "     inf"


def start_moto(bucket: str) -> tuple["subprocess.Popen", str]:
    """moto's S3 API on a free loopback port, in its own process, with `bucket` created and the
    AWS_* environment (read by s3fs, boto3 and delta-rs) pointing at it; the caller terminates it."""
    import boto3

    from haagenti.testing import s3_environment, start_s3_server

    proc, endpoint = start_s3_server()
    os.environ.update(s3_environment(endpoint))
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return proc, endpoint
