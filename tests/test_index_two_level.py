"""The "two-level" index layout (haagenti.index.two_level): a library that chooses it restores
bit-exact, both ingest paths build the same tables with it, gc, compact and verify keep it
whole, and it stores the family within 0.5% of the bytes a "bands" library stores."""
import os

import numpy as np
import pyarrow as pa
import pytest

from haagenti.config import LibraryConfig
from haagenti.core import LIBRARY_TABLES
from haagenti.index import BandsLayout, TwoLevelLayout, open_index
from haagenti.index import two_level as two_level_module
from haagenti.index.two_level import sampled
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.matching import match_rows
from haagenti.store.files import data_file_uuid
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


def test_scope_depends_on_the_fragments_before_only(two_level, monkeypatch):
    """Scoping a run in one call or batch by batch gives every fragment the same scope, with a
    window short enough to move over the family."""
    monkeypatch.setattr(two_level_module, "WINDOW", 16)
    monkeypatch.setattr(two_level_module, "SHARDS", 2)
    sigs = two_level.store.read("signatures", columns=["fragment_id", "bits", "n_elements"])
    rows = match_rows(sigs, two_level.config.signature, np.arange(sigs.num_rows))
    whole = two_level.index.scoper()(rows)
    scope = two_level.index.scoper()
    pos = rows["pos"].to_numpy()
    cut = pa.concat_tables([scope(rows.filter(pa.array((pos >= lo) & (pos < lo + 7)))) for lo in range(0, sigs.num_rows, 7)])
    assert dict(zip(cut["fragment_id"].to_pylist(), cut["scope"].to_pylist())) == dict(zip(whole["fragment_id"].to_pylist(), whole["scope"].to_pylist()))
    scopes = set(whole["scope"].to_pylist())
    assert len(scopes) > 2 and all(len(v.split(",")) <= 4 for v in scopes if v)


def test_sampled_is_a_an_eighth():
    keys = np.random.default_rng(0).integers(0, 2**40, 1 << 18)
    assert abs(sampled(keys).mean() - 1 / 8) < 0.004
