"""Streamed maintenance (haagenti.maintenance) gives the same answers as plain Python over
whole tables, finds damage batch by batch, and never asks for more than a batch at a time."""
from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa
import pytest

from haagenti import maintenance
from haagenti.config import LibraryConfig
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.library import FragmentLibrary, ModelInput

CONFIG = LibraryConfig(fragment_size=64 * 1024)


@pytest.fixture(scope="module")
def built(family, tmp_path_factory):
    """The example family in one library: deltas, shared fragments and one model ingested
    with lossy sharing."""
    root = tmp_path_factory.mktemp("maint")
    lib = FragmentLibrary.open(str(root / "lib"), CONFIG)
    lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family if m is not family[1]])
    lossy = FragmentLibrary(lib.store, LibraryConfig(fragment_size=64 * 1024, lossy_threshold=0.05))
    lossy.ingest([family[1].file], family[1].model_id, family[1].family)  # close to the base: lossy refs
    return lib, family


def _oracle_stats(lib: FragmentLibrary) -> dict:
    """The statistics as plain Python over whole tables (the pre-streaming implementation)."""
    models = sorted(lib.store.read("models").to_pylist(), key=lambda m: m["ingest_seq"])
    man = lib.store.read("manifests").to_pylist()
    frags = lib.store.read("fragments", columns=["fragment_id", "stored_size", "encoding"]).to_pylist()
    stored = {f["fragment_id"]: f["stored_size"] for f in frags}
    users: dict[str, set] = {}
    refs: dict[str, list] = {}
    lossy: dict[str, int] = {}
    lossy_saved = 0
    for r in man:
        if r["fragment_id"] is None:
            continue
        users.setdefault(r["fragment_id"], set()).add(r["model_id"])
        refs.setdefault(r["model_id"], []).append(r["fragment_id"])
        if r["fragment_id"] != r["source_fragment_id"]:
            lossy[r["model_id"]] = lossy.get(r["model_id"], 0) + 1
            lossy_saved += r["elem_count"] * lookup_dtype(r["dtype"]).itemsize
    for m in models:  # each file's verbatim pieces: fragments the models row names
        for fid in _pieces(m):
            users.setdefault(fid, set()).add(m["model_id"])
    shared = [u for u in users.values() if len(u) > 1]
    seen: set = set()
    per_model = []
    for m in models:
        mine = set(refs.get(m["model_id"], [])) | _pieces(m)
        per_model.append((m["model_id"], sum(stored[f] for f in mine - seen), len(refs.get(m["model_id"], [])), lossy.get(m["model_id"], 0)))
        seen |= mine
    plain = sum(f["encoding"] == "plain" for f in frags)
    return {
        "fragments": len(stored), "stored_bytes": sum(stored.values()), "plain": plain, "delta": len(frags) - plain,
        "shared": len(shared), "per_shared": sum(len(u) for u in shared) / len(shared), "lossy_refs": sum(lossy.values()),
        "lossy_saved": lossy_saved, "per_model": per_model,
    }


def _pieces(model: dict) -> set:
    """The ids its models row names in `files.header` (tag 1, then 32 bytes each)."""
    return {f["header"][k : k + 32].hex() for f in model["files"] if f["header"][0] == 1 for k in range(1, len(f["header"]), 32)}


def _oracle_relations(lib: FragmentLibrary) -> dict:
    frags = lib.store.read("fragments", columns=["fragment_id", "ref_id"]).to_pylist()
    ref_of = {f["fragment_id"]: f["ref_id"] for f in frags if f["ref_id"]}
    owned: dict[str, set] = {}
    for r in lib.store.read("manifests", columns=["model_id", "fragment_id"]).to_pylist():
        if r["fragment_id"] is not None:
            owned.setdefault(r["model_id"], set()).add(r["fragment_id"])
    return {(a, b): sum(f in fb or ref_of.get(f) in fb for f in fa) / len(fa) for a, fa in owned.items() for b, fb in owned.items() if a != b}


def _oracle_referenced(lib: FragmentLibrary) -> set:
    refs = {r for r in lib.store.read("manifests", columns=["fragment_id"])["fragment_id"].to_pylist() if r}
    refs |= {fid for m in lib.store.read("models").to_pylist() for fid in _pieces(m)}
    for f in lib.store.read("fragments", columns=["fragment_id", "ref_id"]).to_pylist():
        if f["ref_id"] and f["fragment_id"] in refs:
            refs.add(f["ref_id"])
    return refs


def test_streamed_results_equal_whole_table_results_on_the_example_family(built):
    lib, family = built
    s, want = lib.stats(), _oracle_stats(lib)
    assert s.delta_fragments > 0 and s.shared_fragments > 0 and s.lossy_refs > 0  # the family exercises every branch
    got = {
        "fragments": s.fragments, "stored_bytes": s.stored_bytes, "plain": s.plain_fragments, "delta": s.delta_fragments,
        "shared": s.shared_fragments, "per_shared": s.refs_per_shared_fragment, "lossy_refs": s.lossy_refs,
        "lossy_saved": s.lossy_saved_bytes, "per_model": [(m.model_id, m.new_stored_bytes, m.fragments, m.lossy_fragments) for m in s.per_model],
    }
    assert got == want
    rel = maintenance.model_relations(lib)
    assert rel == _oracle_relations(lib)
    assert 0 < rel[("digits-ft-lr1e-4", "digits-base")] <= 1
    # Family inference: the old loop over every relation, against the vectorised closest model.
    closest = maintenance.closest_models(lib, [m.model_id for m in family])
    for m in family:
        scores: dict[str, float] = {}
        for (a, b), share in rel.items():
            if m.model_id in (a, b):
                other = b if a == m.model_id else a
                scores[other] = max(scores.get(other, 0.0), share)
        best = max(sorted(scores), key=lambda o: scores[o])
        assert closest[m.model_id] == (best, scores[best])
    assert set(lib.referenced().to_pylist()) == _oracle_referenced(lib)


def test_model_relations_of_some_models_only(built):
    lib, family = built
    some = [m.model_id for m in family[:3]]
    full = _oracle_relations(lib)  # a pair's share depends on those two models only
    assert maintenance.model_relations(lib, some) == {(a, b): full[(a, b)] for a in some for b in some if a != b}


def test_rm_then_gc_removes_exactly_the_unreferenced(built, tmp_path):
    import shutil

    lib0, family = built
    shutil.copytree(lib0.store.url, tmp_path / "lib")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[:2] + family[3:]:  # one fine-tune stays: the base's fragments it is a delta of stay too
        lib.rm(m.model_id)
    keep = _oracle_referenced(lib)
    assert keep - set(lib.store.read("manifests", columns=["fragment_id"])["fragment_id"].to_pylist())  # kept only as references
    frags = lib.store.read("fragments", columns=["fragment_id", "stored_size"]).to_pylist()
    dead = [f for f in frags if f["fragment_id"] not in keep]
    r = lib.gc()
    assert r["fragments_removed"] == len(dead) > 0 and r["bytes_freed"] == sum(f["stored_size"] for f in dead)
    left = set(lib.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist())
    assert left == {f["fragment_id"] for f in frags} - {f["fragment_id"] for f in dead}
    assert set(lib.store.read("signatures", columns=["fragment_id"])["fragment_id"].to_pylist()) <= left
    assert lib.verify().ok


def test_gc_rewrites_a_partly_dead_file_in_its_own_row_groups(built, tmp_path):
    """A fragments file holding dead and live fragments is replaced by its live rows in its own
    row groups (a restore reads ~2 MiB groups), blobs still uncompressed and without statistics.
    delta-rs' `delete` rewrote such a file whole into one zstd row group, holding it in memory."""
    import shutil

    import pyarrow.parquet as pq

    lib0, family = built
    shutil.copytree(lib0.store.url, tmp_path / "lib")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[:2] + family[3:]:
        lib.rm(m.model_id)
    keep = _oracle_referenced(lib)

    def groups(path: str) -> list[list[str]]:
        f = pq.ParquetFile(path)
        return [f.read_row_group(g, columns=["fragment_id"])["fragment_id"].to_pylist() for g in range(f.num_row_groups)]

    before = {p: groups(p) for p in lib.store._paths("fragments", None)}
    want = []  # per partly dead file: its row groups less the dead fragments
    for gs in before.values():
        live = [[i for i in g if i in keep] for g in gs]
        if 0 < sum(map(len, live)) < sum(map(len, gs)):
            want.append([g for g in live if g])
    assert want, "the family's files must hold some dead and some live fragments"
    lib.gc()
    after = {p: groups(p) for p in lib.store._paths("fragments", None)}
    assert sorted(gs for p, gs in after.items() if p not in before) == sorted(want)
    for p in after:
        md = pq.ParquetFile(p).metadata
        blob = next(md.row_group(0).column(i) for i in range(md.num_columns) if md.row_group(0).column(i).path_in_schema == "blob")
        assert (blob.compression, blob.is_stats_set) == ("UNCOMPRESSED", False)
    assert lib.verify().ok


def test_streaming_verify_finds_corruption_and_names_model_and_tensor(built, tmp_path, monkeypatch):
    import shutil

    lib0, family = built
    shutil.copytree(lib0.store.url, tmp_path / "lib")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    t = lib.store.read("fragments")
    rows = t.to_pylist()
    # A plain fragment that deltas use as their reference: damaging it damages them too.
    ref_ids = {r["ref_id"] for r in rows if r["ref_id"]}
    victim = next(r for r in rows if r["fragment_id"] in ref_ids and r["codec"] != "raw")
    other = next(r for r in rows if r["fragment_id"] != victim["fragment_id"] and r["codec"] == victim["codec"] and r["ref_id"] is None)
    vid = victim["fragment_id"]
    lib.store.delete("fragments", f"fragment_id = '{vid}'")
    lib.store.append("fragments", pa.Table.from_pylist([dict(other, fragment_id=vid)], schema=t.schema))
    dependents = {r["fragment_id"] for r in rows if r["ref_id"] == vid}
    users = {(r["model_id"], r["tensor_name"]) for r in lib.store.read("manifests").to_pylist() if r["fragment_id"] == vid}
    # Small batches and a tiny reference cache: references are read back batch by batch.
    monkeypatch.setattr(maintenance, "BLOB_BATCH_ROWS", 4)
    monkeypatch.setattr(maintenance, "REF_CACHE_BYTES", 64 * 1024)
    asked: list[int] = []  # ids per read of the fragments pass
    real, real_pass, in_pass = lib.store.read_fragments, maintenance._verify_fragments, []
    phases: dict[str, tuple[int, int]] = {}

    def spy(ids, *a, **k):
        ids = set(ids)
        if in_pass:
            asked.append(len(ids))
        return real(ids, *a, **k)

    def fragments_pass(*a, **k):
        in_pass.append(True)
        try:
            return real_pass(*a, **k)
        finally:
            in_pass.clear()

    monkeypatch.setattr(lib.store, "read_fragments", spy)
    monkeypatch.setattr(maintenance, "_verify_fragments", fragments_pass)
    r = lib.verify(progress=lambda phase, done, total: phases.__setitem__(phase, (done, total)))
    assert not r.ok
    line = next(e for e in r.errors if e.startswith(f"fragment {vid}"))
    assert "hash mismatch" in line and any(f"model {m!r}, tensor {n!r}" in line for m, n in users)
    assert {d for d in dependents if any(e.startswith(f"fragment {d}") for e in r.errors)} == dependents
    assert r.fragments_checked == len(rows) - 1 - len(dependents), r.errors
    assert asked and max(asked) <= 4  # no read beyond one batch's references
    assert phases["fragments"][0] == phases["fragments"][1] == sum(lib.store.read("fragments", columns=["raw_size"])["raw_size"].to_pylist())
    assert phases["models"][1] == sum(m["raw_bytes"] for m in lib.models())
    # The models pass names them too, as a restore would.
    assert any(f"model {m!r}, tensor {n!r}" in e and vid in e for e in r.errors for m, n in users)


def test_verify_of_a_whole_library_reads_it_in_batches(built, monkeypatch):
    lib, _ = built
    sizes: list[int] = []
    real = lib.store.scan

    def spy(name, columns=None, batch_rows=65536, version=None):
        for t in real(name, columns, batch_rows, version):
            if columns is None or "blob" in columns:
                sizes.append(t.num_rows)
            yield t

    monkeypatch.setattr(lib.store, "scan", spy)
    monkeypatch.setattr(maintenance, "BLOB_BATCH_ROWS", 8)
    r = lib.verify()
    assert r.ok and r.fragments_checked == lib.stats().fragments
    assert len(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == r.fragments_checked
