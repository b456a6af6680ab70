"""The pipeline's changed-only scan (pipelines.stamps): a re-run reads no byte of a model whose
files keep their stamps, and hashes any file whose stamp changed."""
import os
import shutil
import time

import fsspec.implementations.local
import yaml

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor
from pipelines.stamps import STAMPS_FILE, read_stamps
from tests.helpers import sha256

CONFIG = LibraryConfig(fragment_size=64 * 1024)


def settled(*paths):
    """Give files an mtime past the stamps' settling time, each its own."""
    for i, p in enumerate(paths):
        old = time.time() - 600 + i
        os.utime(p, (old, old))


def write_catalog(path, files: dict) -> str:
    path.write_text(yaml.safe_dump({"models": [{"id": mid, "files": [f]} for mid, f in files.items()]}))
    return str(path)


def opened_under(monkeypatch, cls, prefix: str) -> list[str]:
    """Paths under `prefix` that filesystem class `cls` opens from now on."""
    seen = []
    real = cls._open

    def spy(self, path, *a, **kw):
        if str(path).startswith(prefix):
            seen.append(str(path))
        return real(self, path, *a, **kw)

    monkeypatch.setattr(cls, "_open", spy)
    return seen


def test_unchanged_catalog_is_not_read_and_changed_stamps_are_hashed(tmp_path, family, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    a, b = models / "a.safetensors", models / "b.safetensors"
    shutil.copy(family[0].file, a)
    shutil.copy(family[1].file, b)
    settled(a, b)
    cat, lib_url = write_catalog(tmp_path / "c.yaml", {"a": str(a), "b": str(b)}), str(tmp_path / "lib")
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).added == ["a", "b"]
    assert set(read_stamps(lib_url)) == {"a", "b"}
    opened = opened_under(monkeypatch, fsspec.implementations.local.LocalFileSystem, str(models))
    again = run_dedup(cat, lib_url, LocalExecutor(), CONFIG)
    assert again.nothing_to_do and opened == []
    # Touched, same bytes: hashed once, unchanged, and its new stamp kept.
    os.utime(a, (time.time() - 300, time.time() - 300))
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).nothing_to_do and set(opened) == {str(a)}  # its header, then its bytes
    opened.clear()
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).nothing_to_do and opened == []
    # Same size, other bytes, another mtime: replaced.
    data = bytearray(b.read_bytes())
    data[-1] ^= 1
    b.write_bytes(bytes(data))
    settled(b)
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).replaced == ["b"]
    [out] = FragmentLibrary.open(lib_url).restore("b", str(tmp_path / "out-b"))
    assert sha256(out) == sha256(b)


def test_rehash_finds_bytes_changed_under_an_unchanged_stamp(tmp_path, family):
    """A file rewritten in place with its size and mtime put back keeps its stamp: only
    --rehash (rehash=True) sees the change."""
    path = tmp_path / "m.safetensors"
    shutil.copy(family[0].file, path)
    settled(path)
    cat, lib_url = write_catalog(tmp_path / "c.yaml", {"m": str(path)}), str(tmp_path / "lib")
    run_dedup(cat, lib_url, LocalExecutor(), CONFIG)
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size - 1)
        last = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([last[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).nothing_to_do
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG, rehash=True).replaced == ["m"]


def test_a_file_removed_from_a_model_folder_replaces_the_model(tmp_path, family):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(family[0].file, folder / "model.safetensors")
    (folder / "notes.json").write_text('{"a": 1}')
    settled(folder / "model.safetensors", folder / "notes.json")
    cat, lib_url = write_catalog(tmp_path / "c.yaml", {"m": str(folder)}), str(tmp_path / "lib")
    run_dedup(cat, lib_url, LocalExecutor(), CONFIG)
    assert len(read_stamps(lib_url)["m"]) == 2
    (folder / "notes.json").unlink()
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).replaced == ["m"]
    assert [f.name for f in FragmentLibrary.open(lib_url).manifest("m").files] == ["model.safetensors"]
    assert [u.rsplit("/", 1)[1] for u in read_stamps(lib_url)["m"]] == ["model.safetensors"]


def test_a_file_replaced_on_s3_is_hashed_and_an_unchanged_one_is_not_read(tmp_path, family, bucket, monkeypatch):
    import s3fs

    from haagenti.fsio import filesystem_for

    fs, _ = filesystem_for(f"s3://{bucket}")
    fs.put(family[0].file, f"{bucket}/models/a.safetensors")
    fs.put(family[1].file, f"{bucket}/models/b.safetensors")
    files = {"a": f"s3://{bucket}/models/a.safetensors", "b": f"s3://{bucket}/models/b.safetensors"}
    cat, lib_url = write_catalog(tmp_path / "c.yaml", files), f"s3://{bucket}/lib"
    run_dedup(cat, lib_url, LocalExecutor(), CONFIG)
    assert fs.exists(f"{bucket}/lib/{STAMPS_FILE}")
    opened = opened_under(monkeypatch, s3fs.S3FileSystem, f"{bucket}/models")
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).nothing_to_do and opened == []
    data = bytearray(open(family[1].file, "rb").read())
    data[-1] ^= 1  # same size, a new object (a new ETag)
    fs.pipe(f"{bucket}/models/b.safetensors", bytes(data))
    fs.invalidate_cache()
    assert run_dedup(cat, lib_url, LocalExecutor(), CONFIG).replaced == ["b"] and f"{bucket}/models/a.safetensors" not in opened
    [out] = FragmentLibrary.open(lib_url).restore("b", str(tmp_path / "out-b"))
    assert open(out, "rb").read() == bytes(data)
