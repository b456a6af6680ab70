"""Shared fixtures: a trained example family, a real S3 API server on loopback, one Ray cluster."""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

SMALL = {"d": 128, "layers": 2, "epochs": 2}
TEST_CACHE = os.path.join(tempfile.gettempdir(), "haagenti-test-cache")  # HAAGENTI_CACHE of the suite's trained families
TEST_FAMILIES = os.path.join(TEST_CACHE, "families")
TEST_EXPORTS = os.path.join(TEST_CACHE, "exports")  # the exports fixture's files, as families are kept


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """The example family, trained for real (small settings), with its catalog. Training is
    deterministic, so it is done once per machine into a cache keyed by the training code and
    settings (`examples.obtain_family`, as `haagenti examples make-family` does; parallel
    test runs share one training); each run gets its own copy, record included."""
    from haagenti import examples

    out = str(tmp_path_factory.mktemp("family"))
    members, _ = examples.obtain_family(out, cache=TEST_FAMILIES, **SMALL)
    examples.write_catalog(members, out)
    return members


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on 127.0.0.1 for the whole run, with the AWS_* environment set."""
    from haagenti.testing import s3_environment, start_s3_server

    proc, endpoint = start_s3_server()
    env = s3_environment(endpoint)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def bucket(s3_server, request):
    import boto3

    name = "hg-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run (2 CPUs: actor pools must stay below that),
    started as the pipeline starts one: it must leave no ~/.ray/auth_token, which would turn
    token auth on for every later head on the machine (a plain `ray job submit` then fails)."""
    import ray

    from pipelines.executors import init_local_ray

    token = os.path.expanduser("~/.ray/auth_token")
    had_token = os.path.exists(token)
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if not had_token and os.path.exists(token):
        pytest.fail(f"the test session left {token}: a later `ray start --head` turns token auth on")


@pytest.fixture(scope="session")
def exports(family, tmp_path_factory):
    """The family's base (and its partial fine-tune) in every container haagenti reads, written
    by the field's writers (haagenti.exports): GGUF F16/F32/Q8_0 (and split in 4, and a
    quantization ladder: F16 then Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 of its values), ONNX inline and
    with external data, HF folders of 1 and 4+ shards, a diffusers folder. Written once per
    machine into a cache keyed by the family's files, the exporting code and the writers'
    versions, as the family is (each pytest-xdist worker wrote them, 10-24 s of torch.onnx and
    GGUF writing); each run gets its own copy."""
    files = {m.model_id: m.file for m in family}
    home = os.path.join(TEST_EXPORTS, _exports_key(files))
    os.makedirs(TEST_EXPORTS, exist_ok=True)
    with open(home + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(home, "paths.json")):
            staging = tempfile.mkdtemp(dir=TEST_EXPORTS, prefix=".staging-")
            paths = _write_exports(files, Path(staging))
            with open(os.path.join(staging, "paths.json"), "w") as f:
                json.dump({k: _relative(v, staging) for k, v in paths.items()}, f)
            shutil.rmtree(home, ignore_errors=True)  # a copy left half-written by a killed run
            os.rename(staging, home)
    out = tmp_path_factory.mktemp("exports")
    shutil.copytree(home, out, dirs_exist_ok=True)
    with open(out / "paths.json") as f:
        relative = json.load(f)
    return {"safetensors": files["digits-base"], **{k: _under(v, out) for k, v in relative.items()}}


def _write_exports(files: dict[str, str], out: Path) -> dict[str, str | list[str]]:
    import torch
    from safetensors.torch import save_file

    from haagenti import exports as ex

    base = ex.load_example(files["digits-base"])
    partial = ex.load_example(files["digits-ft-partial"])
    f32, bf16 = ex.state_of(base, torch.float32), ex.state_of(base, torch.bfloat16)
    paths = {"f32-safetensors": str(out / "f32.safetensors")}
    save_file(f32, paths["f32-safetensors"])
    for q in ("F16", "F32", "Q8_0"):
        paths[f"gguf-{q}"] = str(out / f"base-{q}.gguf")
        ex.export_gguf(f32, paths[f"gguf-{q}"], q)
    paths["gguf-Q8_0-partial"] = str(out / "partial-Q8_0.gguf")
    ex.export_gguf(ex.state_of(partial, torch.float32), paths["gguf-Q8_0-partial"], "Q8_0")
    paths["gguf-Q8_0-ft"] = str(out / "ft-Q8_0.gguf")
    ft = ex.load_example(files["digits-ft-lr1e-4"])
    ex.export_gguf(ex.state_of(ft, torch.float32), paths["gguf-Q8_0-ft"], "Q8_0")
    paths["ladder"] = ex.export_ladder(files["digits-base"], str(out / "ladder"))
    paths["gguf-split"] = str(out / "split")
    ex.export_gguf(f32, str(out / "split" / "base.gguf"), "F16", split_max_tensors=len(f32) // 4 + 1)
    paths["onnx"] = str(out / "base.onnx")
    ex.export_onnx(base, paths["onnx"])
    paths["onnx-external"] = str(out / "onnx-external")
    (out / "onnx-external").mkdir()
    ex.export_onnx(base, str(out / "onnx-external" / "model.onnx"), external_data=True)
    paths["hf-1"], paths["hf-4"], paths["diffusers"] = str(out / "hf-1"), str(out / "hf-4"), str(out / "diffusers")
    ex.save_hf_folder(bf16, paths["hf-1"], shards=1)
    ex.save_hf_folder(bf16, paths["hf-4"], shards=4)
    ex.save_diffusers_folder(bf16, paths["diffusers"])
    return paths


def _exports_key(files: dict[str, str]) -> str:
    """What the exports are made of: the family's files, the code that writes them, the writers."""
    from importlib.metadata import version

    import haagenti.examples
    import haagenti.exports

    h = hashlib.sha256()
    for path in sorted(files.values()):
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    for code in (inspect.getsource(_write_exports), inspect.getsource(haagenti.exports), inspect.getsource(haagenti.examples)):
        h.update(code.encode())
    for package in ("torch", "onnx", "onnxruntime", "gguf", "safetensors", "diffusers", "huggingface_hub"):
        h.update(f"{package}={version(package)}".encode())
    return h.hexdigest()[:16]


def _relative(value: str | list[str], root: str) -> str | list[str]:
    return [os.path.relpath(v, root) for v in value] if isinstance(value, list) else os.path.relpath(value, root)


def _under(value: str | list[str], root: Path) -> str | list[str]:
    return [str(root / v) for v in value] if isinstance(value, list) else str(root / value)


# Test modules whose every test starts Ray or a Ray job (in-process or as a subprocess).
RAY_MODULES = {"test_pipeline", "test_job_submit", "test_agreement", "test_report"}


def pytest_collection_modifyitems(config, items):
    """`make test` runs three pytest-xdist workers (`-n 3 --dist loadgroup`): every test that
    uses Ray goes to one of them, so one session cluster serves them all and no two local
    clusters compete for the machine's cores."""
    for item in items:
        if "ray_cluster" in item.fixturenames or item.get_closest_marker("ray") or item.module.__name__.rpartition(".")[2] in RAY_MODULES:
            item.add_marker(pytest.mark.xdist_group("ray"))
