"""The global index as tables: its lookups give the references the in-memory index gave, an
ingest reads only the partitions and row groups its keys can hit, the pipeline's distributed
match equals the driver-side match it replaced, compaction keeps every answer."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from haagenti import ingest_steps
from haagenti.config import MAX_CHAIN_DEPTH, LibraryConfig
from haagenti.formats import open_model
from haagenti.fragment import FragmentId
from haagenti.index import open_index
from haagenti.index.bands import BAND_ROW_BYTES, BANDS, IDS, bands_rows, ids_rows
from haagenti.ingest_steps import MatchBands, grouped_pairs
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.matching import RunMatcher, bucket_pairs, choose_references, hamming_limit, library_rows, match_rows, shared_buckets
from haagenti.signature import compute_signatures
from haagenti.store import LibraryStore
from haagenti.store.files import DataFiles, data_file_uuid
from haagenti.store.keyed import append_keyed
from haagenti.executors import LocalExecutor

CONFIG = LibraryConfig(fragment_size=64 * 1024)


def all_reference_rows(lib: FragmentLibrary) -> pa.Table:
    """The library's whole index as ingest used to hold it: the signature and chain depth of
    every exact fragment with a depth below MAX_CHAIN_DEPTH that is plain, or a delta of another
    dtype's fragment that stored more than its band rows take, read from the fragments and
    signatures tables."""
    frags = lib.store.read("fragments", columns=["fragment_id", "depth", "quality", "encoding", "dtype", "ref_dtype", "stored_size"]).to_pylist()
    usable = pa.Table.from_pylist([f for f in frags if f["quality"] == "exact" and f["depth"] < MAX_CHAIN_DEPTH and (
        f["encoding"] == "plain" or (f["ref_dtype"] != f["dtype"] and f["stored_size"] > BAND_ROW_BYTES * CONFIG.signature.bands))])
    sigs = lib.store.read("signatures", columns=["fragment_id", "bits", "n_elements"])
    sigs = sigs.join(usable.select(["fragment_id", "depth"]), "fragment_id", join_type="inner")
    return match_rows(sigs, CONFIG.signature, np.full(sigs.num_rows, -1), sigs["depth"].to_numpy())


def signatures_of(paths: list[str]) -> pa.Table:
    """(fragment_id, bits, n_elements) of the distinct float fragments of some models, in order."""
    seen, ids, data = set(), [], []
    for path in paths:
        src = open_model([path])
        for t in src.tensors:
            if t.dtype.is_float and t.nbytes:
                for chunk in src.iter_chunks(t, CONFIG.fragment_elements * t.dtype.itemsize):
                    fid = FragmentId.of(chunk)
                    if fid not in seen:
                        seen.add(fid)
                        ids.append(fid)
                        data.append((chunk, t.dtype.name, t.dtype.itemsize))
    sigs = compute_signatures([(d, dt) for d, dt, _ in data], CONFIG.signature)
    return pa.table({"fragment_id": ids, "bits": pa.array([s.bits for s in sigs], pa.binary()), "n_elements": [len(d) // w for d, _, w in data]})


@pytest.fixture(scope="module")
def family_library(family, tmp_path_factory):
    """The base and two variants ingested; the rest of the family is what gets added."""
    lib = FragmentLibrary.open(str(tmp_path_factory.mktemp("idx") / "lib"), CONFIG)
    lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family[:3]])
    return lib


def test_lookups_give_the_references_of_the_in_memory_index(family, family_library):
    lib = family_library
    whole = all_reference_rows(lib)
    assert whole.num_rows > 30 * CONFIG.signature.bands
    index = open_index(lib.store, CONFIG)
    # A bucket lookup returns exactly the library's rows in those buckets.
    some = whole.slice(0, 40 * CONFIG.signature.bands).select(["band", "band_hash"])
    got = library_rows(index.propose(some)).sort_by([("band", "ascending"), ("band_hash", "ascending"), ("fragment_id", "ascending")])
    expected = whole.join(some.group_by(["band", "band_hash"]).aggregate([]), ["band", "band_hash"], join_type="left semi")
    assert got.to_pylist() == expected.sort_by([("band", "ascending"), ("band_hash", "ascending"), ("fragment_id", "ascending")]).to_pylist()
    # The rest of the family, batch by batch: the same references as with the whole index in memory.
    sigs = signatures_of([m.file for m in family[3:]])
    from_table, in_memory = RunMatcher(CONFIG, index.propose), RunMatcher(CONFIG, lambda buckets: whole)
    found = 0
    for start in range(0, sigs.num_rows, 97):
        batch = sigs.slice(start, 97)
        refs, depths = from_table.match(batch)
        assert (refs, depths) == in_memory.match(batch)
        found += sum(1 for cs in refs.values() for c in cs if c not in set(sigs["fragment_id"].to_pylist()))
    assert found > 0  # library fragments were chosen as references
    # Every stored id is known, with its dtype; a new one is not.
    frags = lib.store.read("fragments", columns=["fragment_id", "dtype"])
    known = open_index(lib.store, CONFIG).known(frags["fragment_id"].to_pylist() + ["ab" * 32])
    assert known == dict(zip(frags["fragment_id"].to_pylist(), frags["dtype"].to_pylist()))


def test_pipeline_match_gives_the_same_references(family, family_library, monkeypatch):
    lib = family_library
    sigs = signatures_of([m.file for m in family[3:]]).sort_by("fragment_id")
    pos = np.arange(sigs.num_rows)
    bands = pa.concat_tables([match_rows(sigs, CONFIG.signature, pos), all_reference_rows(lib)])
    limit = hamming_limit(CONFIG.signature, CONFIG.thresholds.similar_cosine)
    expected = choose_references(bucket_pairs(shared_buckets(bands), limit), sigs["fragment_id"].to_pylist(), CONFIG.candidates)
    matched = lambda: RunMatcher(CONFIG, None, pairs=grouped_pairs(LocalExecutor(), lib.store.url, CONFIG)).match(sigs)  # noqa: E731
    assert matched() == expected
    # Cut into many tasks of whole buckets (the pipeline's parts at scale): the same answer.
    parts = []
    monkeypatch.setattr(ingest_steps, "MATCH_PART_ROWS", 37)
    monkeypatch.setattr(ingest_steps, "MatchBands", lambda *a: (lambda part, step=MatchBands(*a): parts.append(part.num_rows) or step(part)))
    assert matched() == expected
    assert len(parts) > 10 and max(parts) < 37 + 16 and sum(parts) == sigs.num_rows * CONFIG.signature.bands
    assert any(c not in set(sigs["fragment_id"].to_pylist()) for cs in expected[0].values() for c in cs)


def test_compaction_sorts_files_and_keeps_answers(family, tmp_path):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[:3]:  # one ingest per model: three files per partition
        lib.ingest([m.file], m.model_id, m.family)
    index = open_index(lib.store, CONFIG)
    assert len(index.bands.files()) == 3
    buckets = all_reference_rows(lib).select(["band", "band_hash"])
    before = index.propose(buckets).sort_by([("band", "ascending"), ("band_hash", "ascending"), ("fragment_id", "ascending")])
    assert lib.index.compact() > 0
    index = open_index(lib.store, CONFIG)
    after = index.propose(buckets).sort_by([("band", "ascending"), ("band_hash", "ascending"), ("fragment_id", "ascending")])
    assert after.to_pylist() == before.to_pylist()
    [(path, lo, hi)] = index.bands.files()
    keys = pq.read_table(path, columns=["bucket"])["bucket"].to_numpy()
    assert (np.diff(keys) >= 0).all() and keys[0] == lo and keys[-1] == hi
    ids = lib.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist()
    assert open_index(lib.store, CONFIG).known(ids).keys() == set(ids)
    # gc drops deleted fragments' index rows.
    lib.rm(family[2].model_id)
    lib.gc()
    left = set(lib.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist())
    assert left < set(ids) and open_index(lib.store, CONFIG).known(ids).keys() == left


def test_compact_job_holds_the_gc_lease_and_refuses_relative_paths_in_a_job(family, tmp_path, monkeypatch, capsys):
    """jobs.compact rewrites index files as gc does: refused (one line) while another writer
    runs, and a relative --library inside a Ray job is refused as jobs.gc refuses it."""
    from jobs.compact import main

    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[:3]:
        lib.ingest([m.file], m.model_id, m.family)
    files = lambda: sorted(p for name in ("bands", "ids") for p in lib.store._paths(name, None))  # noqa: E731
    before = files()
    ingest = lib.store.leases.acquire("ingest", ["x"])  # a writer at work
    try:
        assert main(["--library", lib.store.url]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: gc refused") and len(err.strip().splitlines()) == 1, err
        assert files() == before  # nothing rewritten
    finally:
        ingest.release()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets
    assert main(["--library", "lib"]) == 1
    assert "is relative" in capsys.readouterr().err and files() == before
    assert main(["--library", lib.store.url]) == 0
    assert capsys.readouterr().out.startswith("compact: ") and files() != before
    sorted_files = files()
    assert main(["--library", lib.store.url]) == 0  # nothing new since: says so, rewrites nothing
    assert capsys.readouterr().out.startswith("compact: nothing to do") and files() == sorted_files
    assert lib.store.leases.all() == []


def synthetic_index(store: LibraryStore, n: int, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    ids = [rng.bytes(32).hex() for _ in range(n)]
    append_keyed(store, BANDS, bands_rows(ids, [rng.bytes(32) for _ in ids], [1] * n, [0] * n, CONFIG.signature))
    append_keyed(store, IDS, ids_rows(ids, ["BF16"] * n))


def test_an_ingest_reads_only_the_row_groups_its_keys_fall_in(tmp_path, monkeypatch):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    synthetic_index(lib.store, 40_000)  # 640k band rows in 625 row groups, 40k ids in 40
    opened, groups, whole = [], [], []
    real_open, real_groups, real_read = DataFiles.open, pq.ParquetFile.read_row_groups, LibraryStore.read

    def spy_open(self, path):
        opened.append(path)
        return real_open(self, path)

    def spy_groups(self, row_groups, *a, **k):
        groups.append((opened[-1], len(row_groups)))
        return real_groups(self, row_groups, *a, **k)

    def spy_read(self, name, *a, **k):
        whole.append(name)
        return real_read(self, name, *a, **k)

    monkeypatch.setattr(DataFiles, "open", spy_open)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy_groups)
    monkeypatch.setattr(LibraryStore, "read", spy_read)
    import torch
    from safetensors.torch import save_file

    model = str(tmp_path / "small.safetensors")  # 6 new fragments against 40k in the index
    save_file({f"w{i}": torch.randn(CONFIG.fragment_elements, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(6)}, model)
    report = lib.ingest([model], "small")
    monkeypatch.undo()
    assert report.plain > 0
    # Nothing read the fragments or signatures tables whole (the in-memory index and id set did).
    assert "fragments" not in whole and "signatures" not in whole
    read_bands = sum(n for path, n in groups if "/bands/" in path)
    read_ids = sum(n for path, n in groups if "/ids/" in path)
    total = sum(pq.ParquetFile(p).num_row_groups for p, *_ in open_index(lib.store, CONFIG).bands.files())
    # A reader that keeps no footers (the pipeline's, one task per band) answers the same.
    kept, dropped = open_index(lib.store, CONFIG), open_index(lib.store, CONFIG, keep_footers=False)
    keys = pq.read_table(kept.bands.files()[0][0], columns=["bucket"])["bucket"].to_numpy()[::5000]
    rows = CONFIG.signature.rows
    buckets = pa.table({"band": pa.array(keys >> rows, pa.int16()), "band_hash": pa.array(keys & ((1 << rows) - 1), pa.uint64())})
    got = kept.propose(buckets)
    assert got.num_rows >= len(keys) and got.to_pylist() == dropped.propose(buckets).to_pylist()
    assert kept.bands.footers and not dropped.bands.footers and dropped.bands.ranges
    # Each new fragment's 16 buckets hit one or two row groups each; far from all of them.
    assert report.fragments == 6 and 0 < read_bands <= 2 * CONFIG.signature.bands * report.fragments and read_bands < total / 4
    assert 0 < read_ids <= 2 * report.fragments
    assert all("/bands/" in p or "/ids/" in p for p in opened)


def test_raw_ids_and_bits_convert_without_python_objects_per_row():
    """The index's raw ids become the hex ids of every other table, and equal-width binary
    columns become (n, width) arrays, sliced or chunked; unequal widths are refused."""
    from haagenti.binary import fixed_width, hex_ids

    rng = np.random.default_rng(3)
    raw = [rng.bytes(32) for _ in range(50)]
    col = pa.chunked_array([pa.array(raw[:20], pa.binary()), pa.array(raw[20:], pa.binary())])
    assert hex_ids(col).to_pylist() == [r.hex() for r in raw]
    sliced = pa.array(raw, pa.binary()).slice(7, 11)
    assert fixed_width(sliced).tobytes() == b"".join(raw[7:18]) and fixed_width(sliced).shape == (11, 32)
    assert hex_ids(pa.array([], pa.binary())).to_pylist() == []
    with pytest.raises(ValueError):
        fixed_width(pa.array([b"ab", b"abc"], pa.binary()))


def fragments_files_read(lib: FragmentLibrary, monkeypatch, ids: list[str]) -> tuple[pa.Table, set[str]]:
    """read_fragments(ids) on a store opened afresh (no cache), and the fragments data files
    whose rows or id column it read."""
    store = LibraryStore(lib.store.url)
    touched: set[str] = set()
    real = DataFiles._groups_holding
    monkeypatch.setattr(DataFiles, "_groups_holding", lambda self, path, wanted: touched.add(path) or real(self, path, wanted))
    t = store.read_fragments(ids, ["fragment_id", "blob"], locate=open_index(store, lib.config).locate)
    monkeypatch.undo()
    return t, touched


def rows_of(lib: FragmentLibrary, ids: list[str]) -> dict[str, bytes]:
    """The fragments rows of `ids` found by reading the whole fragments table (the answer)."""
    t = lib.store.read("fragments", columns=["fragment_id", "blob"])
    t = t.filter(pc.is_in(t["fragment_id"], value_set=pa.array(ids)))
    return dict(zip(t["fragment_id"].to_pylist(), t["blob"].to_pylist()))


def test_read_fragments_opens_only_the_data_files_its_ids_are_in(family, tmp_path, monkeypatch):
    """Fragments are found through the ids table's data_file, read by key: a reference costs
    the files it is in, not every file of the library; gc's rewrites keep the hint working."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family[1:3]])  # one data file, two models
    [shared] = lib.store._paths("fragments", None)
    for m in family[3:6]:
        lib.ingest([m.file], m.model_id, m.family)
    paths = lib.store._paths("fragments", None)
    assert len(paths) >= 4
    mine = pq.read_table(shared, columns=["fragment_id"])["fragment_id"].to_pylist()
    ids = mine[:3] + mine[-3:]
    t, touched = fragments_files_read(lib, monkeypatch, ids)
    assert touched == {shared}
    assert dict(zip(t["fragment_id"].to_pylist(), t["blob"].to_pylist())) == rows_of(lib, ids) and t.num_rows == 6
    # An id the library does not hold is looked for everywhere (the error path: a record
    # naming a missing fragment), and not found.
    t, touched = fragments_files_read(lib, monkeypatch, ["ab" * 32, "not an id"])
    assert t.num_rows == 0 and touched == set(paths)
    # gc rewrites the shared file without the fragments only the removed model held.
    before = set(mine)
    lib.rm(family[2].model_id)
    lib.gc()
    paths = lib.store._paths("fragments", None)
    [rewritten] = [p for p in paths if p.split("/")[-1].startswith(shared.split("/")[-1][:47])]  # its uuid first
    assert rewritten != shared
    left = pq.read_table(rewritten, columns=["fragment_id"])["fragment_id"].to_pylist()
    assert 0 < len(left) < len(before) and set(left) < before
    t, touched = fragments_files_read(lib, monkeypatch, left[:4])
    assert touched == {rewritten}
    assert dict(zip(t["fragment_id"].to_pylist(), t["blob"].to_pylist())) == rows_of(lib, left[:4])


def test_read_fragments_without_hints_or_with_stale_ones_reads_every_file(family, tmp_path, monkeypatch):
    """A hint is never trusted for an answer: ids whose data file was rewritten by another tool
    (delta-rs' compaction names files its own way), or whose ids rows have no data_file (a
    library written before format 4 had it), are found by the exact scan of every file; an
    ingest then adds the column to the table, and index compaction keeps it."""
    from deltalake import write_deltalake

    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[1:4]:
        lib.ingest([m.file], m.model_id, m.family)
    ids = lib.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist()
    asked = ids[::7]
    # The ids table as a format-4 library written before data_file had it.
    old = lib.store.read("ids").drop_columns(["data_file"])
    write_deltalake(lib.store.table_uri("ids"), old, mode="overwrite", schema_mode="overwrite")
    assert "data_file" not in pq.read_table(lib.store._paths("ids", None)[0]).column_names
    t, touched = fragments_files_read(lib, monkeypatch, asked)
    assert touched == set(lib.store._paths("fragments", None)) and len(touched) == 3
    assert dict(zip(t["fragment_id"].to_pylist(), t["blob"].to_pylist())) == rows_of(lib, asked)
    assert open_index(LibraryStore(lib.store.url), CONFIG).known(ids).keys() == set(ids)
    # An ingest into it: its ids rows carry their data file, and compaction keeps them.
    lib = FragmentLibrary.open(lib.store.url)
    lib.ingest([family[4].file], family[4].model_id, family[4].family)
    assert lib.index.compact() > 0
    hinted = lib.store.read("ids").filter(pc.is_valid(lib.store.read("ids")["data_file"]))
    new = [p for p in lib.store._paths("fragments", None) if data_file_uuid(p) in set(hinted["data_file"].to_pylist())]
    assert len(new) == 1 and hinted.num_rows == pq.read_metadata(new[0]).num_rows
    t, touched = fragments_files_read(lib, monkeypatch, hinted["fragment_id"].to_pylist()[:5])
    assert touched == set(new) and t.num_rows == 5
    # Fragments files rewritten by delta-rs: every hint is stale, the answers stay exact.
    lib.store.table("fragments").optimize.compact()
    t, touched = fragments_files_read(lib, monkeypatch, asked + hinted["fragment_id"].to_pylist()[:5])
    assert dict(zip(t["fragment_id"].to_pylist(), t["blob"].to_pylist())) == rows_of(lib, asked + hinted["fragment_id"].to_pylist()[:5])
    assert touched == set(lib.store._paths("fragments", None))


def test_footers_kept_for_fragment_reads_are_bounded(family, tmp_path, monkeypatch):
    """A process that reads fragments from many data files over its life keeps the parsed
    footers of the last ones only (FOOTER_CACHE_BYTES of serialized footers), and still answers."""
    from haagenti.store import files

    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[1:5]:
        lib.ingest([m.file], m.model_id, m.family)
    paths = lib.store._paths("fragments", None)
    one = max(pq.read_metadata(p).serialized_size for p in paths)
    monkeypatch.setattr(files, "FOOTER_CACHE_BYTES", 2 * one)
    store = LibraryStore(lib.store.url)
    ids = [pq.read_table(p, columns=["fragment_id"])["fragment_id"][0].as_py() for p in paths]
    t = store.read_fragments(ids, ["fragment_id", "blob"], locate=open_index(store, lib.config).locate)
    assert dict(zip(t["fragment_id"].to_pylist(), t["blob"].to_pylist())) == rows_of(lib, ids) and t.num_rows == len(paths) == 4
    assert store.files._footers.size <= 2 * one and 0 < len([p for p in paths if p in store.files._footers]) < len(paths)


def test_fetching_fragments_by_id_imports_no_pandas(family_library):
    """A cold process's first read_fragments and known-id lookup build no Arrow data through
    pandas (pa.array on numpy and Schema.empty_table import it: 0.2-0.5 s of the first call)."""
    import subprocess
    import sys

    ids = family_library.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist()[:8]
    code = (
        "import sys; from haagenti.library import FragmentLibrary\n"
        f"lib = FragmentLibrary.open({family_library.store.url!r}); ids = {ids!r}\n"
        "assert len(lib.read_rows(set(ids))) == 8 and lib.store.read_fragments([], locate=lib.index.locate).num_rows == 0\n"
        "assert lib.index.known(ids + ['ab' * 32]).keys() == set(ids)\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_uncompacted_id_files_are_read_once_per_process(family, tmp_path, monkeypatch):
    """Before compaction every commit's ids file spans the whole key range, so every lookup
    touches all of them: each (one row group) is read once into the column cache, and later
    lookups and fetches open none of them again (on S3, a request per file per lookup)."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[1:4]:
        lib.ingest([m.file], m.model_id, m.family)
    ids_files = set(lib.store._paths("ids", None))
    assert len(ids_files) == 3
    store = LibraryStore(lib.store.url)
    index = open_index(store, CONFIG)
    opened: list[str] = []
    real = DataFiles.open
    monkeypatch.setattr(DataFiles, "open", lambda self, path: opened.append(path) or real(self, path))
    ids = lib.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist()
    assert index.known(ids[:5]).keys() == set(ids[:5])
    assert set(opened) & ids_files == ids_files
    opened.clear()
    assert index.known(ids[5:]).keys() == set(ids[5:])
    assert store.read_fragments(ids[::9], locate=index.locate).num_rows == len(ids[::9])
    assert not set(opened) & ids_files


def test_a_damaged_ids_file_costs_the_hints_not_the_fragments(family, tmp_path):
    """read_fragments only takes hints from the ids table: with an ids data file cut short, a
    restore still finds every fragment (by the exact scan) and writes the model byte-identical,
    while a known-id check, which has no other source, refuses with one line."""
    from haagenti.errors import DamagedError
    from tests.helpers import sha256

    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    for m in family[1:3]:
        lib.ingest([m.file], m.model_id, m.family)
    for path in lib.store._paths("ids", None):
        with open(path, "r+b") as f:
            f.truncate(100)
    lib = FragmentLibrary.open(lib.store.url)
    [out] = lib.restore(family[2].model_id, str(tmp_path / "out"))
    assert sha256(out) == sha256(family[2].file)
    with pytest.raises(DamagedError, match="is damaged") as e:
        open_index(lib.store, CONFIG).known(lib.manifest(family[1].model_id).fragment_ids)
    assert "\n" not in str(e.value)


def test_the_index_layout_is_an_invariant_and_absent_means_bands(family, tmp_path, monkeypatch):
    """A library records its index layout's name; one written before names were recorded reads
    as "bands"; an unknown name is refused in one line before anything is created, and a layout
    registered by name is the one every path then goes through."""
    import json

    from haagenti.errors import LibraryError
    from haagenti.index import BandsLayout, layout, register_layout

    url = tmp_path / "lib"
    lib = FragmentLibrary.open(str(url), CONFIG)
    marker = json.loads((url / "haagenti.json").read_text())
    assert marker["index"] == "bands" and type(lib.index) is BandsLayout
    del marker["index"]
    (url / "haagenti.json").write_text(json.dumps(marker))
    assert FragmentLibrary.open(str(url)).config.index == "bands"
    with pytest.raises(LibraryError, match="index is bands, not two-level"):
        FragmentLibrary.open(str(url), LibraryConfig(index="two-level"))
    with pytest.raises(LibraryError, match="index layout is 'three-level', which this haagenti does not know") as e:
        FragmentLibrary.open(str(tmp_path / "new"), LibraryConfig(index="three-level"))
    assert "\n" not in str(e.value) and not (tmp_path / "new" / "haagenti.json").exists()

    calls: list[str] = []
    monkeypatch.setattr(layout, "LAYOUTS", dict(layout.LAYOUTS))  # the registry as it was, after the test

    @register_layout
    class Counted(BandsLayout):
        name = "counted"

        def append(self, *a, **k):
            calls.append("append")
            return super().append(*a, **k)

        def propose(self, wanted):
            calls.append("propose")
            return super().propose(wanted)

        def known(self, ids):
            calls.append("known")
            return super().known(ids)

    other = FragmentLibrary.open(str(tmp_path / "counted"), LibraryConfig(fragment_size=CONFIG.fragment_size, index="counted"))
    for m in family[:2]:
        other.ingest([m.file], m.model_id, m.family)
    assert {"append", "propose", "known"} <= set(calls)
    assert FragmentLibrary.open(str(tmp_path / "counted")).config.index == "counted"
