"""The object-storage path against a real S3 API server (moto) on loopback."""
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
    import fsspec

    from haagenti.fsio import filesystem_for

    fs, _ = filesystem_for(f"s3://{bucket}")
    fs.put(family[0].file, f"{bucket}/models/base.safetensors")
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([f"s3://{bucket}/models/base.safetensors"], "base")
    [p] = lib.restore("base", str(tmp_path / "out"))
    assert sha256(p) == sha256(family[0].file)


def test_memory_url_library_is_refused_clearly():
    with pytest.raises(LibraryError, match="memory://"):
        FragmentLibrary.open("memory://lib")
