"""Project-shape checks: the library never imports Ray, and its tables read without haagenti."""
import subprocess
import sys

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary


def test_library_package_does_not_import_ray():
    code = (
        "import sys, haagenti.prelude, haagenti.cli, haagenti.adaptive, haagenti.adaptive.evaluate, haagenti.adaptive.tiers, haagenti.examples;"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tables_read_with_polars_duckdb_and_pyarrow(tmp_path, family):
    import struct

    import duckdb
    import polars as pl
    import zstandard
    from blake3 import blake3
    from deltalake import DeltaTable

    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, LibraryConfig(fragment_size=64 * 1024))
    for m in family[:2]:
        lib.ingest([m.file], m.model_id, m.family)
    models = pl.read_delta(f"{url}/models")
    assert sorted(models["model_id"].to_list()) == sorted(m.model_id for m in family[:2])
    manifests = DeltaTable(f"{url}/manifests").to_pyarrow_table()
    per_model = duckdb.sql("select model_id, count(distinct fragment_id) as n from manifests group by model_id order by model_id").fetchall()
    assert [r[0] for r in per_model] == sorted(m.model_id for m in family[:2]) and all(r[1] > 0 for r in per_model)
    frags = DeltaTable(f"{url}/fragments").to_pyarrow_table(columns=["fragment_id", "encoding", "stored_size"])
    assert set(frags["encoding"].to_pylist()) <= {"plain", "delta_xor", "delta_sub"}
    # files.layout (the file's tree), computed from the tables alone as docs/format.md says
    order = manifests.sort_by([("tensor_index", "ascending"), ("fragment_seq", "ascending")])
    blobs = DeltaTable(f"{url}/fragments").to_pyarrow_table(columns=["fragment_id", "blob"])
    blobs = dict(zip(blobs["fragment_id"].to_pylist(), blobs["blob"].to_pylist()))
    for model in models.to_dicts():
        [f] = model["files"]
        rows = [(t, i) for m, t, i in zip(*(order[c].to_pylist() for c in ("model_id", "tensor_index", "fragment_id"))) if m == model["model_id"]]
        ids = [i for _, i in rows if i is not None]
        counts = [sum(1 for t, i in rows if t == k and i is not None) for k in sorted({t for t, _ in rows})]
        # files.header: tag 0 then the header, or tag 1 then its pieces' ids, 32 bytes each, each
        # piece a `zstd:1` fragment, one stream: <u8 compressed><u32 length> then a zstd frame (or the bytes)
        pieces = [blobs[f["header"][k : k + 32].hex()] for k in range(1, len(f["header"]), 32)] if f["header"][0] == 1 else []
        header = b"".join(zstandard.ZstdDecompressor().decompressobj().decompress(b[5:]) if b[0] else b[5:] for b in pieces) or f["header"][1:]
        gap = struct.pack("<Q", len(header)) + header  # a safetensors file's one gap
        h = blake3(derive_key_context="haagenti 2026-12-07 file tree v1")
        h.update(struct.pack("<QQ", 1, len(gap)))
        h.update(struct.pack(f"<Q{4 * len(counts)}Q", len(counts), *(v for n in counts for v in (n, 0, 0, 0))))
        h.update(blake3(gap).digest())
        h.update(struct.pack("<Q", len(ids)))
        h.update(bytes.fromhex("".join(ids)))
        assert h.hexdigest() == f["layout"]


def test_each_append_commits_one_file_with_statistics(tmp_path, family):
    """Readers (ours, DuckDB, Spark) skip data files by the add actions' statistics: they must
    be right, and a fragment commit is one Parquet file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, LibraryConfig(fragment_size=64 * 1024))
    lib.ingest([family[0].file], family[0].model_id, family[0].family)
    lib.ingest([family[1].file], family[1].model_id, family[1].family)
    dt = DeltaTable(f"{url}/fragments")
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    assert len(actions) == 2  # one file per ingest
    for a in actions:
        rows = pq.read_table(f"{url}/fragments/{a['path']}")
        assert a["num_records"] == rows.num_rows and a["size_bytes"] == (tmp_path / "lib" / "fragments" / a["path"]).stat().st_size
        assert (a["min.fragment_id"], a["max.fragment_id"]) == (pc.min(rows["fragment_id"]).as_py(), pc.max(rows["fragment_id"]).as_py())
        assert a["null_count.ref_id"] == rows["ref_id"].null_count
    models = pa.table(DeltaTable(f"{url}/models").get_add_actions(flatten=True)).to_pylist()
    assert sorted((a["min.model_id"], a["max.model_id"]) for a in models) == sorted((m.model_id, m.model_id) for m in family[:2])


def test_a_library_of_another_format_version_is_refused(tmp_path, family):
    import json

    import pytest

    from haagenti.errors import LibraryError
    from haagenti.store import LIBRARY_FORMAT_VERSION

    url = tmp_path / "lib"
    FragmentLibrary.open(str(url)).ingest([family[0].file], family[0].model_id)
    (url / "haagenti.json").write_text(json.dumps({"format": "haagenti", "format_version": 1}))
    with pytest.raises(LibraryError, match=f"library format 1, this haagenti reads format {LIBRARY_FORMAT_VERSION}"):
        FragmentLibrary.open(str(url))
