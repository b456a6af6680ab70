"""Reading stored files without restoring them (haagenti://), and the library's tables read by
Ray Data as docs/format.md tells a downstream user to."""
import json
import os
import struct

import fsspec
import numpy as np
import pytest

from haagenti.config import LibraryConfig
from haagenti.errors import LibraryError
from haagenti.library import FragmentLibrary
from tests.helpers import spy_fetched, verbatim_ids


@pytest.fixture
def lib(tmp_path, exports):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=65536))  # a range can take a few fragments
    lib.ingest([exports["safetensors"]], "st")
    lib.ingest([exports["gguf-Q8_0"]], "q8")
    lib.ingest([exports["onnx"]], "onnx")
    lib.ingest([exports["diffusers"]], "org/diff")
    return lib


def test_every_file_reads_back_whole_and_by_range(lib, exports):
    rng = np.random.default_rng(0)
    cases = [("st", "digits-base.safetensors", exports["safetensors"]), ("q8", "base-Q8_0.gguf", exports["gguf-Q8_0"]),
             ("onnx", "base.onnx", exports["onnx"]), ("org/diff", "unet/diffusion_pytorch_model.safetensors",
             os.path.join(exports["diffusers"], "unet", "diffusion_pytorch_model.safetensors"))]
    for model, name, path in cases:
        original = open(path, "rb").read()
        with lib.open_file(model, name) as f:
            assert f.size == len(original)
            assert f.read() == original
            for a in rng.integers(0, len(original), 20):
                b = int(rng.integers(a, len(original) + 1))
                f.seek(int(a))
                assert f.read(b - int(a)) == original[a:b], (model, a, b)


def test_fsspec_urls_plain_and_chained(lib, exports):
    url = lib.store.url
    want = open(os.path.join(exports["diffusers"], "unet", "config.json"), "rb").read()
    with fsspec.open("haagenti://org/diff/unet/config.json", library=url) as f:
        assert f.read() == want
    with fsspec.open(f"haagenti://org/diff/unet/config.json::{url}") as f:
        assert f.read() == want
    fs = fsspec.filesystem("haagenti", library=url)
    assert set(fs.ls("", detail=False)) == {"st", "q8", "onnx", "org/diff"}
    assert "org/diff/unet" in fs.ls("org/diff", detail=False)
    assert fs.info("org/diff/unet/config.json")["size"] == len(want)
    with pytest.raises(FileNotFoundError):
        fs.open("org/diff/nope.json")
    with pytest.raises(LibraryError, match="read-only"):
        fs.open("st/digits-base.safetensors", "wb")


def test_one_tensor_read_fetches_only_its_fragments(lib, monkeypatch):
    """safetensors: read the header, then one tensor's range: only that tensor's fragments."""
    manifest = lib.manifest("st")
    target = max(manifest.tensors, key=lambda t: len(t.fragments))
    assert len(target.fragments) > 1
    seen = spy_fetched(lib, monkeypatch)
    with lib.open_file("st", "digits-base.safetensors") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        pieces = verbatim_ids(lib, "st")
        assert seen == pieces  # the header is the file's verbatim piece: no tensor fragment read
        begin, end = header[target.name]["data_offsets"]
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    assert seen - pieces == {r.fragment_id for r in target.fragments}
    assert data == b"".join(lib.fetch_raw([r.fragment_id for r in target.fragments])[r.fragment_id] for r in target.fragments)
    seen.clear()
    other = next(t for t in manifest.tensors if t.name != target.name and len(t.fragments) > 1)
    with lib.open_file("st", "digits-base.safetensors") as f:
        f.seek(8 + n + begin + 10)
        f.read(100)  # held decoded by the filesystem since the read above: nothing fetched
        assert seen <= pieces
        other_begin = header[other.name]["data_offsets"][0]
        f.seek(8 + n + other_begin + 10)
        f.read(100)  # 100 bytes inside another tensor: its first fragment only
    assert seen - pieces == {other.fragments[0].fragment_id}


def test_safetensors_and_gguf_readers_load_from_the_library(lib, exports, monkeypatch):
    import gguf
    from safetensors.torch import load

    with fsspec.open("haagenti://st/digits-base.safetensors", library=lib) as f:
        tensors = load(f.read())
    assert set(tensors) == {t.name for t in lib.manifest("st").tensors}
    with lib.open_file("q8", "base-Q8_0.gguf") as f:
        data = f.read()
    fd = os.memfd_create("gguf")  # GGUFReader memory-maps a file: give it one in memory, not on disk
    try:
        os.write(fd, data)
        reader = gguf.GGUFReader(f"/proc/self/fd/{fd}")
        want = gguf.GGUFReader(exports["gguf-Q8_0"])
        assert [(t.name, t.tensor_type, bytes(t.data)) for t in reader.tensors] == [(t.name, t.tensor_type, bytes(t.data)) for t in want.tensors]
    finally:
        os.close(fd)


def test_duckdb_reads_a_stored_config(lib):
    import duckdb

    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("haagenti", library=lib.store.url))
    rows = con.sql("select num_train_timesteps from read_json('haagenti://org/diff/scheduler/scheduler_config.json')").fetchall()
    assert rows == [(100,)]


def test_checkpoints_are_not_served_by_range(tmp_path):
    import torch

    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(4)}, path)
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([str(path)], "pt")
    with pytest.raises(LibraryError, match="PyTorch checkpoint"):
        lib.open_file("pt", "m.pt")


def test_s3_library_serves_one_tensor_by_range(tmp_path, exports, bucket, monkeypatch):
    url = f"s3://{bucket}/lib"
    lib = FragmentLibrary.open(url, LibraryConfig(fragment_size=65536))
    lib.ingest([exports["gguf-F16"]], "g")
    from haagenti.formats import open_model

    with open_model([exports["gguf-F16"]]) as src:
        t = max(src.tensors, key=lambda t: t.nbytes)
        want = src.read(t, 0, t.nbytes)
    fs = fsspec.filesystem("haagenti", library=lib)
    seen = spy_fetched(lib, monkeypatch)
    with fs.open("g/base-F16.gguf") as f:
        f.seek(t.data_begin)
        assert f.read(t.nbytes) == want
    assert seen - verbatim_ids(lib, "g") == {r.fragment_id for r in lib.manifest("g").tensors_by_name()[t.name].fragments}
    with fsspec.open(f"haagenti://g/base-F16.gguf::{url}") as f:  # chained, through the URL alone
        f.seek(t.data_begin)
        assert f.read(64) == want[:64]


@pytest.mark.ray
@pytest.mark.parametrize("where", ["local", "s3"])
def test_ray_data_joins_manifests_to_fragments(tmp_path, exports, ray_cluster, where, request):
    """As docs/format.md says: ray.data.read_parquet over each table's Delta file list."""
    import pyarrow.fs as pafs
    from deltalake import DeltaTable

    storage, filesystem = None, None
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("bucket")
        url = f"s3://{bucket}/lib"
        storage = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
        filesystem = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="testing", secret_key="testing", region="us-east-1")
    else:
        url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url)
    lib.ingest([exports["safetensors"]], "st")
    lib.ingest([exports["gguf-F16"]], "g16")
    ray = ray_cluster

    def table(name):
        uris = DeltaTable(f"{url}/{name}", storage_options=storage).file_uris()
        return ray.data.read_parquet([u.removeprefix("s3://") for u in uris] if filesystem else uris, filesystem=filesystem)

    manifests = table("manifests").filter(lambda r: r["model_id"] == "g16" and r["fragment_id"] is not None)
    fragments = table("fragments").select_columns(["fragment_id", "encoding", "stored_size", "ref_id"])
    joined = manifests.join(fragments, join_type="inner", num_partitions=2, on=("fragment_id",)).take_all()
    m = lib.manifest("g16")
    assert sorted(r["fragment_id"] for r in joined) == sorted(r.fragment_id for t in m.tensors for r in t.fragments)
    assert {r["encoding"] for r in joined} >= {"delta_xor"} or {r["encoding"] for r in joined} >= {"delta_sub"}
    assert all(r["ref_id"] for r in joined if r["encoding"] != "plain")
    if where == "local":  # a Ray Data job reads a stored file itself through haagenti:// (workers rebuild the filesystem from its URL)
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs = PyFileSystem(FSSpecHandler(fsspec.filesystem("haagenti", library=url)))
        [row] = ray.data.read_binary_files(["g16/base-F16.gguf"], filesystem=fs).take_all()
        assert row["bytes"] == open(exports["gguf-F16"], "rb").read()
