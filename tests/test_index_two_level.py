"""The "two-level" index layout (haagenti.index.two_level): a library that chooses it restores
bit-exact, both ingest paths build the same tables with it, gc, compact and verify keep it
whole, and it stores the family within 0.5% of the bytes a "bands" library stores."""
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from haagenti.binary import raw_ids
from haagenti.config import LibraryConfig
from haagenti.core import LIBRARY_TABLES
from haagenti.index import BandsLayout, TwoLevelLayout, open_index
from haagenti.index import two_level as two_level_module
from haagenti.index.bands import id_keys
from haagenti.index.two_level import sampled
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.matching import match_rows
from haagenti.store.files import data_file_uuid
from haagenti.store.keyed import ENCODED_ROWS, append_keyed
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor
from tests.helpers import sha256
from tests.test_agreement import KEYS, tables

SMALL = 64 * 1024
SHARD_BYTES = 256 * 1024  # commits of a few fragments: the family's references spread over a dozen shards


def config(index: str) -> LibraryConfig:
    return LibraryConfig(fragment_size=SMALL, index=index, batch_bytes=SHARD_BYTES)


def ingested(url: str, family, index: str) -> FragmentLibrary:
    """The family ingested one model per ingest: every reference is read from the library's index."""
    lib = FragmentLibrary.open(url, config(index))
    for m in family:
        lib.ingest([m.file], m.model_id, m.family)
    return lib


@pytest.fixture(scope="module")
def two_level(family, tmp_path_factory):
    return ingested(str(tmp_path_factory.mktemp("two-level") / "lib"), family, "two-level")


def test_the_layout_is_recorded_and_its_tables_filled(two_level):
    reopened = FragmentLibrary.open(two_level.store.url, create=False)
    assert reopened.config.index == "two-level" and reopened.index.name == "two-level"
    for name in ("shard_keys", "shard_signatures", "fragment_keys"):
        assert two_level.store.read(name).num_rows > 0, name
    assert sorted(two_level.store.present()) == sorted(LIBRARY_TABLES + TwoLevelLayout.tables)  # no empty "bands" tables
    ids = set(two_level.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist())
    files = {data_file_uuid(p) for p in two_level.store.snapshot("fragments")[0]}
    located = two_level.index.locate(ids)
    assert located.keys() == ids and set(located.values()) <= files  # where each was appended


def test_a_library_holds_the_tables_of_its_own_layout_only(tmp_path):
    lib = FragmentLibrary.open(str(tmp_path / "bands"))
    assert sorted(lib.store.present()) == sorted(LIBRARY_TABLES + BandsLayout.tables)
    assert not any(os.path.exists(tmp_path / "bands" / t) for t in TwoLevelLayout.tables)  # nothing on disk for another layout


def test_restores_bit_exact_and_verifies(two_level, family, tmp_path):
    for m in family:
        [p] = two_level.restore(m.model_id, str(tmp_path / m.model_id))
        assert sha256(p) == sha256(m.file), m.model_id
    assert two_level.verify().ok


def test_stores_within_half_a_percent_of_bands(two_level, family, tmp_path):
    bands = ingested(str(tmp_path / "bands"), family, "bands")
    two, one = two_level.stats(), bands.stats()
    assert abs(two.stored_bytes - one.stored_bytes) <= 0.005 * one.stored_bytes, (two.stored_bytes, one.stored_bytes)
    deltas = {m.model_id: m.reduction for m in two.per_model}
    assert deltas["digits-ft-lr1e-4"] > deltas["digits-base"] + 0.1  # fine-tunes found their base through the scope


def fragment_rows(url: str) -> list[dict]:
    return sorted(FragmentLibrary.open(url, create=False).store.read("fragments").to_pylist(), key=lambda r: r["fragment_id"])


def test_both_paths_build_identical_tables(family, tmp_path):
    """One run into an empty library (references among the run's fragments), and a run into a
    library that holds the base in several shards (references through the scopes too). The
    runs commit in one chunk: with chunks smaller than a model the two paths differ with the
    "bands" layout as well."""
    catalog = os.path.join(os.path.dirname(family[0].file), "catalog.yaml")
    one_chunk = LibraryConfig(fragment_size=SMALL, index="two-level")
    lib = FragmentLibrary.open(str(tmp_path / "ingest"), one_chunk)
    lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family])
    run_dedup(catalog, str(tmp_path / "local"), LocalExecutor(), one_chunk)
    a, b = tables(str(tmp_path / "ingest")), tables(str(tmp_path / "local"))
    for name in KEYS:
        assert a[name] == b[name], name
    for way in ("ingest-on-base", "dedup-on-base"):
        FragmentLibrary.open(str(tmp_path / way), config("two-level")).ingest([family[0].file], family[0].model_id, family[0].family)
    FragmentLibrary.open(str(tmp_path / "ingest-on-base"), one_chunk).ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family[1:]])
    run_dedup(catalog, str(tmp_path / "dedup-on-base"), LocalExecutor(), one_chunk)
    on_base = fragment_rows(str(tmp_path / "ingest-on-base"))
    assert on_base == fragment_rows(str(tmp_path / "dedup-on-base"))
    assert any(r["ref_id"] for r in on_base)


def test_gc_and_compact_keep_the_rest_restorable(family, tmp_path):
    base, ft = family[0], family[1]
    lib = FragmentLibrary.open(str(tmp_path / "lib"), config("two-level"))
    lib.ingest([base.file], base.model_id)
    lib.ingest([ft.file], ft.model_id)
    before = lib.store.read("fragment_keys").num_rows
    lib.rm(base.model_id)
    assert lib.gc()["fragments_removed"] > 0
    kept = set(lib.store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist())
    assert lib.store.read("fragment_keys").num_rows == len(kept) < before
    assert set(open_index(lib.store, lib.config).known(kept)) == kept
    lib.compact()
    [p] = lib.restore(ft.model_id, str(tmp_path / "out"))
    assert sha256(p) == sha256(ft.file) and lib.verify().ok
    lib.rm(ft.model_id)
    lib.gc()
    assert lib.stats().fragments == 0
    for name in ("shard_keys", "shard_signatures", "fragment_keys"):
        assert lib.store.read(name).num_rows == 0, name


SPECS = (two_level_module.SHARD_KEYS, two_level_module.SHARD_SIGNATURES, two_level_module.FRAGMENT_KEYS)


def encodings_on_disk(lib: FragmentLibrary) -> dict[str, set[tuple[str, str]]]:
    """{table: (column, encoding)} of the columns stored without a dictionary in any row group
    of any data file of the layout's tables."""
    out: dict[str, set[tuple[str, str]]] = {}
    for spec in SPECS:
        found = out.setdefault(spec.name, set())
        for path in lib.store.snapshot(spec.name)[0]:
            md = lib.store.files.footer(path)
            for g in range(md.num_row_groups):
                for c in (md.row_group(g).column(i) for i in range(md.num_columns)):
                    found.update((c.path_in_schema, e) for e in c.encodings if not c.has_dictionary_page and e != "RLE")
    return out


def test_the_index_tables_keep_their_encodings_through_compaction_and_gc(family, tmp_path):
    """Small commits are appended as before (no encodings below ENCODED_ROWS rows: the bench
    family's files stay as they were); compaction (delta-rs's writer) writes each table's
    columns in its KeyedTable's encodings, every other column as a dictionary, and gc's
    rewrite of a file keeps them."""
    want = {spec.name: set(spec.encodings) for spec in SPECS}
    lib = FragmentLibrary.open(str(tmp_path / "lib"), config("two-level"))
    for m in family[:3]:
        lib.ingest([m.file], m.model_id)
    assert encodings_on_disk(lib) == {"shard_keys": set(), "shard_signatures": {("fragment_id", "PLAIN"), ("bits", "PLAIN")},
                                      "fragment_keys": {("fragment_id", "PLAIN")}}  # as written before ENCODED_ROWS
    lib.compact()  # one file per table: gc below rewrites it
    assert encodings_on_disk(lib) == want
    compacted = {name: set(lib.store.snapshot(name)[0]) for name in want}
    lib.rm(family[1].model_id)
    assert lib.gc()["fragments_removed"] > 0
    for name in ("shard_signatures", "fragment_keys"):  # gc rewrote their file (shard_keys: no shard emptied)
        assert set(lib.store.snapshot(name)[0]) - compacted[name], name
    assert encodings_on_disk(lib) == want
    [p] = lib.restore(family[2].model_id, str(tmp_path / "out"))
    assert sha256(p) == sha256(family[2].file) and lib.verify().ok


def test_a_commit_of_encoded_rows_is_appended_in_the_encodings_and_read_back(tmp_path):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), config("two-level"))
    ids = [bytes(i).hex() for i in np.random.default_rng(0).integers(0, 256, size=(ENCODED_ROWS, 32), dtype=np.uint8)]
    data_file = str(uuid.uuid4())
    append_keyed(lib.store, two_level_module.FRAGMENT_KEYS, pa.table({
        "id_key": pa.array(id_keys(ids)), "fragment_id": raw_ids(pa.array(ids)), "dtype": pa.array(["BF16"] * len(ids)),
        "data_file": pa.array([uuid.UUID(data_file).bytes] * len(ids), pa.binary(16))}))
    assert encodings_on_disk(lib)["fragment_keys"] == set(two_level_module.FRAGMENT_KEYS.encodings)
    assert lib.index.locate(set(ids[::7])) == dict.fromkeys(ids[::7], data_file)


def test_an_id_probe_reads_whole_rows_only_of_the_row_groups_holding_an_id(tmp_path):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), config("two-level"))
    ids = [bytes(i).hex() for i in np.random.default_rng(0).integers(0, 256, size=(16 * 256, 32), dtype=np.uint8)]
    append_keyed(lib.store, two_level_module.FRAGMENT_KEYS, pa.table({  # 16 row groups
        "id_key": pa.array(id_keys(ids)), "fragment_id": raw_ids(pa.array(ids)), "dtype": pa.array(["BF16"] * len(ids)),
        "data_file": pa.array([uuid.UUID(int=1).bytes] * len(ids), pa.binary(16))}))
    absent = [bytes(i).hex() for i in np.random.default_rng(1).integers(0, 256, size=(64, 32), dtype=np.uint8)]
    reader = lib.index.ids
    assert lib.index.known(absent) == {}
    assert reader.counts.row_groups == 0  # the key column told every group apart
    md = pq.ParquetFile(reader.files()[0][0]).metadata
    key_bytes = sum(md.row_group(g).column(0).total_compressed_size for g in range(md.num_row_groups))
    assert 0 < reader.counts.bytes <= key_bytes < md.num_rows * 16
    assert lib.index.locate({ids[5], absent[0]}) == {ids[5]: str(uuid.UUID(int=1))}
    assert reader.counts.row_groups == 1


def scopes(rows: pa.Table) -> dict[str, str]:
    return dict(zip(rows["fragment_id"].to_pylist(), rows["scope"].to_pylist()))


def scoped_in_pieces(scope, rows: pa.Table, size: int) -> pa.Table:
    """`rows` scoped `size` fragments at a time, as the ingest driver calls a scoper: rows it
    cannot scope yet are given again with the next."""
    pos = rows["pos"].to_numpy()
    out, held = [], []
    for lo in range(0, int(pos.max()) + 1, size):
        held.append(rows.filter(pa.array((pos >= lo) & (pos < lo + size))))
        got = scope(pa.concat_tables(held), lo + size <= pos.max())
        if got is not None:
            out.append(got)
            held = []
    return pa.concat_tables(out)


def test_scope_depends_on_the_fragments_before_only(two_level, monkeypatch):
    """Scoping a run in one call or batch by batch gives every fragment the same scope, with a
    window short enough to move over the family."""
    monkeypatch.setattr(two_level_module, "WINDOW", 16)
    monkeypatch.setattr(two_level_module, "SHARDS", 2)
    sigs = two_level.store.read("signatures", columns=["fragment_id", "bits", "n_elements"])
    rows = match_rows(sigs, two_level.config.signature, np.arange(sigs.num_rows))
    whole = scopes(two_level.index.scoper()(rows))
    assert scopes(scoped_in_pieces(two_level.index.scoper(), rows, 7)) == whole
    assert len(set(whole.values())) > 2 and all(len(v.split(",")) <= 4 for v in whole.values() if v)


def test_a_runs_first_fragments_take_the_scope_of_its_first_hit(two_level, monkeypatch):
    """A run that opens with fragments hitting nothing in level 1 (the cold start: a fine-tune's
    first fragments whose sampled keys miss) scopes them with the shards of its first hit, in
    one call or piece by piece; with no hit within LEAD fragments they stay unscoped."""
    cfg = two_level.config.signature
    sigs = two_level.store.read("signatures", columns=["fragment_id", "bits", "n_elements"]).slice(0, 40)
    g = np.random.default_rng(5)
    cold = pa.table({"fragment_id": [g.bytes(32).hex() for _ in range(5)], "bits": [g.bytes(cfg.bits // 8) for _ in range(5)],
                     "n_elements": sigs["n_elements"][:5]})
    rows = match_rows(pa.concat_tables([cold, sigs]), cfg, np.arange(45))
    whole = scopes(two_level.index.scoper()(rows))
    first = whole[sigs["fragment_id"][0].as_py()]
    assert first and {whole[f] for f in cold["fragment_id"].to_pylist()} == {first}
    assert scopes(scoped_in_pieces(two_level.index.scoper(), rows, 2)) == whole
    monkeypatch.setattr(two_level_module, "LEAD", 3)
    assert {scopes(two_level.index.scoper()(rows))[f] for f in cold["fragment_id"].to_pylist()} == {""}


def test_a_runs_lead_held_over_batches_stores_what_one_batch_stores(family, tmp_path, monkeypatch):
    """The driver holds a run's first batches, signed, while their scope waits on a later
    fragment's hit (an unrelated model first, then a fine-tune of the stored base): one
    fragment a batch stores what one batch for the run stores."""
    from haagenti import ingest_steps
    from haagenti.matching import RunMatcher

    waited = []
    match = RunMatcher.match
    monkeypatch.setattr(RunMatcher, "match", lambda self, sigs, more=False: waited.append(r := match(self, sigs, more)) or r)
    got = []
    for encode in (64 * 1024 * 1024, SMALL):
        monkeypatch.setattr(ingest_steps, "ENCODE_BATCH_BYTES", encode)
        lib = FragmentLibrary.open(str(tmp_path / str(encode)), config("two-level"))
        lib.ingest([family[0].file], family[0].model_id)
        reports = lib.ingest_many([ModelInput([m.file], m.model_id) for m in (family[6], family[1])])
        got.append((fragment_rows(lib.store.url), [(r.plain, r.delta, r.exact, r.stored_bytes) for r in reports]))
    assert got[0] == got[1] and None in waited


def test_sampled_is_a_an_eighth():
    keys = np.random.default_rng(0).integers(0, 2**40, 1 << 18)
    assert abs(sampled(keys).mean() - 1 / 8) < 0.004
