"""The object-storage path against a real S3 API server (moto) on loopback, and memory://."""
import subprocess
import sys

import pytest
from deltalake import DeltaTable

from haagenti.config import LibraryConfig
from haagenti.errors import LibraryError
from haagenti.library import FragmentLibrary
from tests.helpers import sha256


def test_ingest_restore_gc_on_s3(tmp_path, family, bucket):
    url = f"s3://{bucket}/lib"
    lib = FragmentLibrary.open(url, LibraryConfig(fragment_size=64 * 1024))
    for m in family[:3]:
        lib.ingest([m.file], m.model_id, m.family)
    again = FragmentLibrary.open(url)  # a fresh handle sees the committed snapshot
    for m in family[:3]:
        [p] = again.restore(m.model_id, str(tmp_path / m.model_id))
        assert sha256(p) == sha256(m.file)
    assert again.verify().ok
    again.rm(family[1].model_id)
    assert again.gc()["fragments_removed"] > 0
    [p] = again.restore(family[2].model_id, str(tmp_path / "after-gc"))
    assert sha256(p) == sha256(family[2].file)
    # Time travel: the first models-table version still lists the first model only.
    opts = lib.store.options
    first = DeltaTable(f"{url}/models", version=1, storage_options=opts).to_pyarrow_table()
    assert first["model_id"].to_pylist() == [family[0].model_id]


def test_model_files_read_from_s3(tmp_path, family, bucket):
    from haagenti.fsio import filesystem_for

    fs, _ = filesystem_for(f"s3://{bucket}")
    fs.put(family[0].file, f"{bucket}/models/base.safetensors")
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([f"s3://{bucket}/models/base.safetensors"], "base")
    [p] = lib.restore("base", str(tmp_path / "out"))
    assert sha256(p) == sha256(family[0].file)


def test_memory_library_round_trip_stays_in_its_process(tmp_path, family):
    """memory:// libraries, like fsspec's memory filesystem: shared by name within a process,
    gone when it exits, and refused by the Ray pipeline, whose workers are other processes."""
    import fsspec

    with open(family[0].file, "rb") as src, fsspec.open("memory://models/base.safetensors", "wb") as dst:
        dst.write(src.read())
    lib = FragmentLibrary.open("memory://lib")
    lib.ingest(["memory://models/base.safetensors"], "base")
    again = FragmentLibrary.open("memory://lib", create=False)  # same name, same library
    [p] = again.restore("base", str(tmp_path / "out"))
    assert sha256(p) == sha256(family[0].file)
    with pytest.raises(LibraryError, match="no haagenti library"):
        FragmentLibrary.open("memory://other", create=False)
    probe = "import sys; from haagenti.library import FragmentLibrary; FragmentLibrary.open('memory://lib', create=False)"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert child.returncode != 0 and "no haagenti library" in child.stderr  # another process does not see it


def test_ray_pipeline_refuses_a_memory_library(tmp_path, family, ray_cluster):
    from pipelines.dedup import run_dedup
    from pipelines.executors import RayExecutor

    cat = tmp_path / "catalog.yaml"
    cat.write_text(f"models:\n  - id: base\n    files: [{family[0].file}]\n")
    with pytest.raises(LibraryError, match="memory:// library lives in one process"):
        run_dedup(str(cat), "memory://pipe", RayExecutor(workers=1))


def test_stats_disk_bytes_are_the_objects_sizes(tmp_path, family, bucket, s3_server):
    """On an object store `disk_bytes` is the sum of the library's objects' sizes, as S3 lists them."""
    import boto3

    lib = FragmentLibrary.open(f"s3://{bucket}/lib", LibraryConfig(fragment_size=64 * 1024))
    lib.ingest([family[0].file], family[0].model_id)
    pages = boto3.client("s3", endpoint_url=s3_server).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="lib/")
    objects = sum(o["Size"] for page in pages for o in page.get("Contents", []))
    s = lib.stats()
    assert s.disk_bytes == objects > s.stored_bytes > 0


def test_a_command_reads_each_table_log_once_and_data_files_without_heads(tmp_path, family, bucket, monkeypatch):
    """Requests that cost nothing to skip: an ingest opens no table afresh at the version it has
    open (publish reads and commits the models table at the version it just looked at), and data
    files are opened with their sizes from the Delta log, so s3fs makes no HEAD per open."""
    import s3fs

    url = f"s3://{bucket}/lib"
    lib = FragmentLibrary.open(url, LibraryConfig(fragment_size=64 * 1024, similarity=False))
    lib.ingest([family[0].file], "a")
    lib = FragmentLibrary.open(url)
    opened, heads = [], []
    real_init, real_info = DeltaTable.__init__, s3fs.S3FileSystem._info

    def counting_init(self, table_uri, *a, **k):
        opened.append(table_uri.rsplit("/", 1)[-1])
        real_init(self, table_uri, *a, **k)

    async def counting_info(self, path, *a, **k):
        heads.append(path)
        return await real_info(self, path, *a, **k)

    monkeypatch.setattr(DeltaTable, "__init__", counting_init)
    monkeypatch.setattr(s3fs.S3FileSystem, "_info", counting_info)
    lib.ingest([family[1].file], "b")
    [p] = lib.restore("b", str(tmp_path / "b"))
    assert sha256(p) == sha256(family[1].file)
    assert sorted(opened) == sorted(set(opened)), opened  # each table's log read once
    assert not [h for h in heads if h.endswith(".parquet") and "/_delta_log/" not in h], heads
