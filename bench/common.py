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


def master_export(members):
    """The family with its fp16 re-export replaced by an fp16 export of the fp32 master weights,
    as hubs publish them (the example family's export is cast from the published bf16 base, so
    it holds the base's values exactly). The master is the bf16 base plus noise below half a
    bf16 step, so the base is its bf16 rounding; the export is its fp16 rounding, and differs
    from the base cast to fp16 in the low mantissa bits. Written once next to the family."""
    import dataclasses

    import torch
    from safetensors.torch import load_file, save_file

    [cast] = [m for m in members if m.model_id.endswith("fp16")]
    base = members[0]
    path = os.path.join(os.path.dirname(cast.file), "digits-base-fp16-master.safetensors")
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(25)
        state = {}
        for k, v in load_file(base.file).items():
            x = v.float()
            step = torch.where(x == 0, 0.0, torch.ldexp(torch.ones_like(x), torch.frexp(x)[1] - 9))  # half a bf16 step at x (a whole one below a power of two)
            master = x + (torch.rand(x.shape, generator=g) - 0.5) * 0.98 * step
            assert torch.equal(master.bfloat16(), v)
            state[k] = master.half()
        save_file(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    export = dataclasses.replace(cast, model_id="digits-base-fp16-master", file=path)
    return [export if m is cast else m for m in members]


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
