"""ModelLoader: what it keeps between switches (decoded fragments, manifests, threads) never
serves bytes that were not verified when read from storage, nor a model that changed."""
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from haagenti.config import LibraryConfig
from haagenti.errors import FragmentError, LibraryError
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.loader import ModelLoader
from tests.helpers import verbatim_ids

SMALL_FRAGMENTS = LibraryConfig(fragment_size=64 * 1024)


def members(family, *names):
    by_id = {m.model_id: m for m in family}
    return [by_id[n] for n in names]


def equal(state, path) -> bool:
    want = load_file(path)
    return set(state) == set(want) and all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in want.items())


def flip_stored_byte(lib_path, fragment_id: str) -> None:
    """One byte flipped in the middle of a fragment's stored blob, in place: the data file keeps
    its size and layout (open readers keep valid footers), only the blob's bytes change."""
    for path in sorted((lib_path / "fragments").glob("*.parquet")):
        t = pq.read_table(path, columns=["fragment_id", "blob"])
        ids = t["fragment_id"].to_pylist()
        if fragment_id in ids:
            blob = t["blob"][ids.index(fragment_id)].as_py()
            data = bytearray(path.read_bytes())
            at = data.find(blob)
            assert at >= 0 and data.find(blob, at + 1) < 0
            data[at + len(blob) // 2] ^= 0x5A
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"{fragment_id} is not stored")


def test_a_fragment_damaged_on_disk_is_caught_after_switches(tmp_path, family):
    base, ft, partial = members(family, "digits-base", "digits-ft-lr1e-4", "digits-ft-partial")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in (base, ft, partial)])
    loader = ModelLoader(lib, cache_bytes=256 << 20, threads=2)
    assert equal(loader.load(base.model_id), base.file)
    assert equal(loader.load(partial.model_id), partial.file)
    held = lib.manifest(base.model_id).fragment_ids | lib.manifest(partial.model_id).fragment_ids
    [target, *_] = sorted(lib.manifest(ft.model_id).fragment_ids - held)
    flip_stored_byte(tmp_path / "lib", target)
    with pytest.raises(FragmentError, match=target):
        loader.load(ft.model_id)
    # What the loader holds was verified when it was read: switching back serves it unchanged.
    assert equal(loader.load(base.model_id), base.file)
    # A held fragment damaged on disk afterwards is still caught by every new read from storage.
    [held_target, *_] = sorted(lib.manifest(base.model_id).fragment_ids - lib.manifest(ft.model_id).fragment_ids)
    flip_stored_byte(tmp_path / "lib", held_target)
    assert equal(loader.load(base.model_id), base.file)
    with pytest.raises(FragmentError, match=held_target):
        ModelLoader(lib, threads=1).load(base.model_id)


def test_loader_reports_the_bytes_it_reads_and_threads_agree(tmp_path, family):
    base, ft = members(family, "digits-base", "digits-ft-lr1e-4")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in (base, ft)])
    stored = dict(zip(*lib.store.read("fragments", columns=["fragment_id", "stored_size"]).to_pydict().values()))
    refs = {k: v for k, v in zip(*lib.store.read("fragments", columns=["fragment_id", "ref_id"]).to_pydict().values()) if v}
    ft_ids = lib.manifest(ft.model_id).fragment_ids
    needs = ft_ids | {refs[i] for i in ft_ids if i in refs}  # its fragments and their delta references
    assert needs - ft_ids  # a fine-tune stored as deltas
    for threads in (1, 2):
        loader = ModelLoader(lib, threads=threads)
        assert equal(loader.load(ft.model_id), ft.file)
        assert loader.last.stored_bytes_read == sum(stored[i] for i in needs)  # references read too
        assert loader.last.fragments_fetched == len(ft_ids)
        assert equal(loader.load(base.model_id), base.file)
        assert loader.last.stored_bytes_read == sum(stored[i] for i in lib.manifest(base.model_id).fragment_ids - needs)
        assert equal(loader.load(ft.model_id), ft.file)
        assert (loader.last.fragments_fetched, loader.last.stored_bytes_read) == (0, 0)
        loader.close()


def test_load_names_reads_only_those_tensors_fragments(tmp_path, family):
    """A model brought in a few tensors at a time (a switcher streaming a tier layer by layer)
    reads those tensors' fragments and no other; a name the model lacks is one LibraryError."""
    (base,) = members(family, "digits-base")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest([base.file], base.model_id, base.family)
    by_name = lib.manifest(base.model_id).tensors_by_name()
    names = sorted(by_name)[:2]
    seen: set[str] = set()
    real = lib.store.read_fragments
    lib.store.read_fragments = lambda ids, *a, **k: (seen.update(ids), real(ids, *a, **k))[1]
    loader = ModelLoader(lib, cache_bytes=0, threads=1)
    want = load_file(base.file)
    into = {n: torch.empty_like(want[n]) for n in names}
    assert loader.load(base.model_id, into=into, names=names) is into
    assert all(torch.equal(into[n], want[n]) for n in names)
    pieces = verbatim_ids(lib, base.model_id)  # its record's: the file's header
    assert seen - pieces == {r.fragment_id for n in names for r in by_name[n].fragments}
    assert loader.last.fragments == len(seen - pieces)
    with pytest.raises(LibraryError, match=r"model 'digits-base' has no tensor 'nope'"):
        loader.load(base.model_id, names=[names[0], "nope"])


def test_loader_rereads_a_manifest_once_the_model_changes(tmp_path, family):
    base, ft = members(family, "digits-base", "digits-ft-lr1e-4")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest([base.file], "m")
    loader = ModelLoader(lib, threads=1)
    assert equal(loader.load("m"), base.file)
    assert equal(loader.load("m"), base.file)  # the kept manifest
    lib.rm("m")
    with pytest.raises(LibraryError, match="not in the library"):
        loader.load("m")
    lib.ingest([ft.file], "m")
    assert equal(loader.load("m"), ft.file)


def test_load_into_switches_live_tensors_in_place_and_refuses_a_mismatch_untouched(tmp_path, family):
    base, ft, fp16 = members(family, "digits-base", "digits-ft-lr1e-4", "digits-base-fp16")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in (base, ft, fp16)])
    loader = ModelLoader(lib, threads=2)
    live = loader.load(base.model_id)
    where = {k: v.data_ptr() for k, v in live.items()}
    assert loader.load(ft.model_id, into=live) is live
    assert equal(live, ft.file) and {k: v.data_ptr() for k, v in live.items()} == where
    assert loader.load(base.model_id, into=live) is live and equal(live, base.file)  # back, from the cache
    assert (loader.last.fragments_fetched, loader.last.stored_bytes_read) == (0, 0)
    before = {k: v.clone() for k, v in live.items()}
    held = len(loader.cache._d)
    with pytest.raises(LibraryError, match=r"is torch\.float16 \[.*\]; the tensor to load it into is torch\.(bfloat16|float32) "):
        loader.load(fp16.model_id, into=live)  # the same names, another dtype
    name = next(iter(live))
    with pytest.raises(LibraryError, match=f"differ in names .*{name!r}"):
        loader.load(ft.model_id, into={k: v for k, v in live.items() if k != name})
    matrix = next(k for k, v in live.items() if v.dim() == 2 and v.shape[0] != v.shape[1])
    transposed = torch.empty(live[matrix].shape[::-1], dtype=live[matrix].dtype).T  # the right shape, not contiguous
    with pytest.raises(LibraryError, match=f"{matrix!r} .* not contiguous"):
        loader.load(ft.model_id, into={**live, matrix: transposed})
    assert len(loader.cache._d) == held and all(torch.equal(live[k], v) for k, v in before.items())  # nothing read, nothing written



def test_arrow_arrays_built_from_buffers_equal_pyarrows():
    """The read path's pandas-free builders (haagenti.store.files) give what pyarrow gives."""
    import numpy as np
    import pyarrow as pa

    from haagenti.store.files import positions, strings

    for values in (["ab", None, "ü", "", "x" * 70], [], [None], ["only"]):
        assert strings(values).equals(pa.array(values, pa.string()))
    mask = pa.chunked_array([pa.array([True, False, True]), pa.array([False, True])])
    for m in (mask, mask.chunk(0), mask.chunk(1).slice(1), pa.array([False, False])):
        assert positions(m).tolist() == np.flatnonzero(np.array(m.to_pylist(), bool)).tolist()
