import os

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import save_file

from haagenti.config import LibraryConfig
from haagenti.errors import FormatError, FragmentError, LibraryError
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.loader import ModelLoader
from tests.helpers import restore_counting_reads, sha256, verbatim_ids

SMALL_FRAGMENTS = LibraryConfig(fragment_size=64 * 1024)


def every_dtype_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = 40_000  # not a multiple of any fragment size
    floats = torch.randn(n, generator=g)
    return {
        "f64": floats.double().reshape(200, 200),
        "f32": floats.reshape(8, 5000),
        "f16": floats.half(),
        "bf16": floats.bfloat16().reshape(400, 100),
        "f8_e4m3": floats.clamp(-400, 400).to(torch.float8_e4m3fn),
        "f8_e5m2": floats.to(torch.float8_e5m2),
        "i64": torch.randint(-(2**40), 2**40, (n,), generator=g),
        "i32": torch.randint(-(2**30), 2**30, (n,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-(2**14), 2**14, (n,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (n,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(n, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 7),
        "exact-multiple": torch.randn(32768, generator=g).bfloat16(),  # exactly one 64 KiB fragment
        "nan-inf": torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 1000),
    }


def test_round_trip_every_dtype_bit_exact(tmp_path):
    path = tmp_path / "all.safetensors"
    save_file(every_dtype_state(), str(path), metadata={"note": "every dtype"})
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    report = lib.ingest([str(path)], "all")
    assert report.nonfinite_tensors == ["nan-inf"]
    out = lib.restore("all", str(tmp_path / "out"))
    assert sha256(out[0]) == sha256(path)
    manifest = lib.manifest("all")
    sizes = {t.name: len(t.fragments) for t in manifest.tensors}
    assert sizes["empty"] == 0 and sizes["scalar"] == 1 and sizes["exact-multiple"] == 1
    assert sizes["f32"] == 2  # 40,000 fp32 elements over 32,768-element fragments


def test_sharded_folder_with_index_and_checkpoint(tmp_path, family):
    from haagenti.examples import DigitsTransformer

    model = DigitsTransformer(64, 2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = sorted(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    half = len(names) // 2
    save_file({k: state[k] for k in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    torch.save(state, str(tmp_path / "model.pt"))

    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest([str(folder)], "sharded")
    lib.ingest([str(tmp_path / "model.pt")], "checkpoint")
    restored = lib.restore("sharded", str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in restored) == sorted(os.listdir(folder))
    for p in restored:
        assert sha256(p) == sha256(folder / os.path.basename(p))
    [pt] = lib.restore("checkpoint", str(tmp_path / "out_pt"))
    back = torch.load(pt, weights_only=True)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    # The checkpoint holds the same tensors as the shards: it adds no fragment.
    assert lib.stats().per_model[1].new_stored_bytes == 0


def test_family_dedup_restore_and_stats(tmp_path, family):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    reports = {m.model_id: lib.ingest([m.file], m.model_id, m.family) for m in family}
    for m in family:
        [p] = lib.restore(m.model_id, str(tmp_path / "out" / m.model_id))
        assert sha256(p) == sha256(m.file), m.model_id
    s = lib.stats()
    assert s.models == len(family)
    by_id = {m.model_id: m for m in s.per_model}
    # The fp16 re-export is found through the index and stored as a tiny residual of the cast.
    assert reports["digits-base-fp16"].delta > 0 and by_id["digits-base-fp16"].reduction > 0.95
    # The frozen half of the partial fine-tune is shared byte for byte.
    assert reports["digits-ft-partial"].exact > 0
    # Fine-tunes are stored as deltas and shrink far more than the base does alone.
    for mid in ("digits-ft-lr1e-4", "digits-ft-lr1e-3", "digits-lora-merged"):
        assert reports[mid].delta > 0
        assert by_id[mid].reduction > by_id["digits-base"].reduction + 0.1, mid
    # The unrelated model shares nothing (no delta against the family, no exact fragment).
    assert reports["unrelated"].delta == 0 and reports["unrelated"].exact == 0
    assert s.shared_fragments > 0 and s.refs_per_shared_fragment >= 2
    assert 0 < s.per_family["digits"] < 1 and s.stored_bytes < s.raw_bytes
    assert lib.verify().ok


def test_ingest_many_commits_once_and_deduplicates_within_the_batch(tmp_path, family):
    one_by_one = FragmentLibrary.open(str(tmp_path / "seq"), SMALL_FRAGMENTS)
    for m in family:
        one_by_one.ingest([m.file], m.model_id, m.family)
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    before = lib.store.versions()
    reports = {r.model_id: r for r in lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family])}
    after = lib.store.versions()
    assert after["models"] == before["models"] + 1 and after["manifests"] == before["manifests"] + 1
    # Later models found the earlier, still uncommitted, fragments of the same batch.
    assert reports["digits-ft-lr1e-4"].delta > 0 and reports["digits-base-fp16"].delta > 0
    assert reports["unrelated"].delta == 0 and reports["unrelated"].exact == 0
    assert lib.stats().stored_bytes <= 1.01 * one_by_one.stats().stored_bytes
    for m in family:
        [p] = lib.restore(m.model_id, str(tmp_path / "out" / m.model_id))
        assert sha256(p) == sha256(m.file), m.model_id


def test_ingest_reads_each_byte_once_across_batches_and_commits(tmp_path, family, monkeypatch):
    """The library's ingest carries each fragment's bytes from the cut through the steps, and
    takes references to the run's earlier fragments from memory (held until committed, then
    cached): nothing is read again by byte range, however small its batches and commits."""
    from haagenti import ingest_steps

    class NoRangeReads:  # the steps' reader; the cut reads each file once through its own
        def read(self, *args):
            raise AssertionError("a step of the library's ingest read bytes by range")

    monkeypatch.setattr(ingest_steps, "RangeReader", NoRangeReads)
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=64 * 1024, batch_bytes=512 * 1024))
    reports = {r.model_id: r for r in lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family[:3]])}
    assert reports[family[1].model_id].delta > 0 and reports[family[2].model_id].delta > 0
    monkeypatch.undo()
    for m in family[:3]:
        [p] = lib.restore(m.model_id, str(tmp_path / "out" / m.model_id))
        assert sha256(p) == sha256(m.file), m.model_id


def test_ingest_holds_a_bounded_share_of_the_run(tmp_path, family, monkeypatch):
    """The library ingest's driver holds a run's bytes in its batches and RunBytes (the
    references: new fragments until their commit, then a bounded cache): both stay within its
    knobs however large the run, also when the run deduplicates so well that a commit's stored
    bytes cover many times their raw size (a cast and a merged LoRA of the base)."""
    from haagenti import ingest, ingest_steps
    from haagenti.writer import RAW_CHUNK_FACTOR

    encode, cache, commit = 128 * 1024, 256 * 1024, 256 * 1024
    monkeypatch.setattr(ingest_steps, "ENCODE_BATCH_BYTES", encode)
    monkeypatch.setattr(ingest_steps, "REF_CACHE_BYTES", cache)
    held: list[int] = []
    batches: list[int] = []

    class Recording(ingest_steps.RunBytes):
        def held(self) -> int:
            return sum(map(len, self.uncommitted.values())) + self.cache.size

        def hold(self, pieces):
            super().hold(pieces)
            held.append(self.held())

        def committed(self, ids):
            held.append(self.held())
            super().committed(ids)

    def recorded(tables, batch_bytes):
        for b in ingest_steps.occurrence_batches(tables, batch_bytes):
            batches.append(pc.sum(b["byte_len"]).as_py())
            yield b

    monkeypatch.setattr(ingest, "RunBytes", Recording)
    monkeypatch.setattr(ingest, "occurrence_batches", recorded)
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=64 * 1024, batch_bytes=commit))
    run = [family[i] for i in (0, 3, 4, 5)]  # base, partial fine-tune, merged LoRA, fp16 cast: 5.3 MB
    reports = lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in run])
    raw = sum(r.raw_bytes for r in reports)
    largest_fragment = 4 * 64 * 1024  # an fp32 fragment
    assert max(batches) <= encode + largest_fragment
    assert max(held) <= cache + RAW_CHUNK_FACTOR * commit + encode + largest_fragment < raw / 4


def test_batch_results_keep_copies_not_views_of_a_steps_output():
    """On Ray a step's result arrives as views into one object-store buffer, blobs included;
    the few columns the driver keeps of each (for the whole run there) must not pin it."""
    from haagenti.ingest_steps import copied

    t = pa.table({"fragment_id": ["a", "b"], "encoding": ["plain", "zstd"], "stored_size": [1000, 1000], "blob": [b"x" * 1000, b"y" * 1000]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    whole = sink.getvalue()
    view = pa.ipc.open_stream(whole).read_all()  # its columns are slices of `whole`, as a Ray result's are of its object
    kept = copied(view.select(["fragment_id", "encoding", "stored_size"]))
    assert kept.equals(t.select(["fragment_id", "encoding", "stored_size"]))
    buffers = [b for col in kept.columns for chunk in col.chunks for b in chunk.buffers() if b is not None]
    assert buffers and not any(whole.address <= b.address < whole.address + whole.size for b in buffers)


def test_ingest_many_checks_everything_before_writing(tmp_path, family):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    before = lib.store.versions()
    with pytest.raises(LibraryError, match="repeat"):
        lib.ingest_many([ModelInput([family[0].file], "m"), ModelInput([family[1].file], "m")])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(FormatError):
        lib.ingest_many([ModelInput([family[0].file], "a"), ModelInput([str(bad)], "b")])
    assert lib.store.versions() == before and lib.models() == []


@pytest.mark.parametrize("together", [False, True], ids=["one-ingest-per-model", "one-ingest_many"])
def test_restore_reads_only_the_models_fragments(tmp_path, family, monkeypatch, together):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    if together:  # one data file for the whole family: each model's new rows get row groups of their own
        lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family])
    else:
        for m in family:
            lib.ingest([m.file], m.model_id, m.family)
    seen, rows_read = restore_counting_reads(lib, "unrelated", str(tmp_path / "out"), monkeypatch)
    assert seen == lib.manifest("unrelated").fragment_ids | verbatim_ids(lib, "unrelated")
    # Only row groups holding its fragments are read: the unrelated model shares nothing, so
    # that is exactly its own rows (fragment ids are hashes, so min/max statistics of any
    # other model's row groups would span them too), found through the ids table read by key:
    # at most one row group of 256 ids per fragment (files of one row group are read whole,
    # once), not the whole table.
    assert rows_read["fragments"] == len(seen)
    assert rows_read.get("ids", 0) <= 256 * len(seen) and set(rows_read) <= {"fragments", "ids"}


def test_corrupt_fragment_is_named(tmp_path, family):
    import pyarrow as pa

    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest([family[0].file], family[0].model_id)
    # Rewrite one stored blob with other valid-looking bytes: decode works, the hash must not.
    t = lib.store.read("fragments")
    rows = t.to_pylist()
    victim = next(r for r in rows if r["codec"] != "raw" and r["fragment_type"] != "verbatim")
    victim_id = victim["fragment_id"]
    other = next(r for r in rows if r["fragment_id"] != victim_id and r["codec"] == victim["codec"])
    lib.store.delete("fragments", f"fragment_id = '{victim_id}'")
    lib.store.append("fragments", pa.Table.from_pylist([dict(other, fragment_id=victim_id)], schema=t.schema))
    tensor = next(tr.name for tr in lib.manifest(family[0].model_id).tensors if any(r.fragment_id == victim_id for r in tr.fragments))
    with pytest.raises(FragmentError, match=rf"{family[0].model_id}.*{tensor}.*{victim_id}.*hash mismatch"):
        lib.restore(family[0].model_id, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # no half-written file is left behind, nor the folder the restore made
    r = lib.verify(family[0].model_id)
    assert not r.ok and victim_id in r.errors[0]


@pytest.mark.parametrize("tamper", ["fragments-swapped", "header-changed", "ref-marked-lossy"])
def test_restore_checks_each_files_layout(tmp_path, family, tamper):
    """Every fragment is verified against its id, but a manifest can still place verified
    fragments wrongly, or carry a wrong header: the file's recorded layout catches both."""
    import pyarrow as pa

    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    mid = family[0].model_id
    lib.ingest([family[0].file], mid)
    error = "does not match its recorded layout"
    if tamper != "header-changed":  # two fragments of one tensor trade places
        t = lib.store.read("manifests")
        rows = t.to_pylist()
        a, b = next((x, y) for x, y in zip(rows, rows[1:]) if x["tensor_index"] == y["tensor_index"] and x["fragment_id"] != y["fragment_id"] and x["elem_count"] == y["elem_count"])
        a["fragment_id"], b["fragment_id"] = b["fragment_id"], a["fragment_id"]
        if tamper == "fragments-swapped":
            a["source_fragment_id"], b["source_fragment_id"] = b["source_fragment_id"], a["source_fragment_id"]
        else:  # now they read as lossy refs, which a restore does not check byte for byte
            error = "lossy, its model record says otherwise"
        table = "manifests"
    else:  # one byte of the header changes (same length), in its metadata: a header that no
        # longer describes the tensors is refused before any byte is written (test_trust.py)
        from haagenti.manifest import header_field

        t = lib.store.read("models")
        rows = t.to_pylist()
        header = lib.manifest(mid).files[0].header
        i = header.index(b'"haagenti_example":"') + len(b'"haagenti_example":"')
        assert chr(header[i]).isalpha()
        rows[0]["files"][0]["header"] = header_field(header[:i] + bytes([header[i] ^ 0x20]) + header[i + 1 :])  # small: held inline
        table = "models"
    lib.store.delete(table, f"model_id = '{mid}'")
    lib.store.append(table, pa.Table.from_pylist(rows, schema=t.schema))
    for rehash in (False, True):
        with pytest.raises(FragmentError, match=f"{mid}.*{error}"):
            lib.restore(mid, str(tmp_path / "out"), rehash=rehash)
        assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    for report in (lib.verify(mid), lib.verify()):
        assert not report.ok and error in report.errors[-1]


def test_rm_and_gc_reference_counting(tmp_path, family):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    base, ft = family[0], family[1]
    lib.ingest([base.file], base.model_id)
    lib.ingest([ft.file], ft.model_id)
    n_both = lib.stats().fragments
    # The fine-tune's deltas reference the base's fragments: removing the base must keep them.
    lib.rm(base.model_id)
    freed = lib.gc()
    assert 0 < freed["fragments_removed"] < n_both
    [p] = lib.restore(ft.model_id, str(tmp_path / "out"))
    assert sha256(p) == sha256(ft.file)
    lib.rm(ft.model_id)
    lib.gc()
    assert lib.stats().fragments == 0
    with pytest.raises(LibraryError, match="not in the library"):
        lib.rm(ft.model_id)


def test_verbatim_bytes_are_pieces_shared_across_models_and_kept_while_named(tmp_path):
    """A side file (a tokenizer) two models hold is stored once, as pieces; a third whose copy
    has one value changed (a longer one: the bytes after it shift) shares every piece but the
    ones around the change. `stats` counts each piece once; gc keeps the pieces a model still
    names and frees them with the last; the pipeline stores the same rows."""
    import pyarrow.compute as pc
    import yaml

    from pipelines.dedup import run_dedup
    from pipelines.executors import LocalExecutor

    vocab = ("{" + ", ".join(f'"tok{i}": {i}' for i in range(40000)) + "}").encode()  # ~0.6 MB
    tokenizers = {"a": vocab, "b": vocab, "c": vocab.replace(b'"tok20000": 20000', b'"tok20000": 2000000')}
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    for mid, tok in tokenizers.items():
        (tmp_path / mid).mkdir()
        save_file({"w": torch.arange(4096, dtype=torch.float16).reshape(64, 64)}, str(tmp_path / mid / "model.safetensors"))
        (tmp_path / mid / "tokenizer.json").write_bytes(tok)
        lib.ingest([str(tmp_path / mid)], mid)
    pieces = {mid: verbatim_ids(lib, mid) for mid in tokenizers}
    assert pieces["a"] == pieces["b"] and len(pieces["a"]) >= 8 and len(pieces["c"] - pieces["a"]) <= 2
    frags = lib.store.read("fragments", columns=["fragment_id", "fragment_type"])
    verbatim = frags.filter(pc.equal(frags["fragment_type"], "verbatim"))["fragment_id"].to_pylist()
    assert sorted(verbatim) == sorted(pieces["a"] | pieces["c"])  # each stored once
    stats = lib.stats()
    assert stats.fragments == len(set(frags["fragment_id"].to_pylist()))
    by_id = {m.model_id: m for m in stats.per_model}
    assert by_id["b"].new_stored_bytes == 0 < by_id["c"].new_stored_bytes < by_id["a"].new_stored_bytes
    # The pipeline's driver commits the pieces, whatever its executor.
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"models": [{"id": mid, "files": [str(tmp_path / mid)]} for mid in tokenizers]}))
    run_dedup(str(tmp_path / "catalog.yaml"), str(tmp_path / "piped"), LocalExecutor(), SMALL_FRAGMENTS)
    piped = FragmentLibrary.open(str(tmp_path / "piped"), create=False)
    columns = ["fragment_id", "dtype", "encoding", "codec", "fragment_type", "blob"]
    assert piped.store.read("fragments", columns=columns).sort_by("fragment_id").equals(lib.store.read("fragments", columns=columns).sort_by("fragment_id"))
    assert {m["model_id"]: m["files"] for m in piped.models()} == {m["model_id"]: m["files"] for m in lib.models()}
    lib.rm("a")
    assert lib.gc()["fragments_removed"] == 0  # b names all of a's pieces, and its tensors are a's
    lib.restore("b", str(tmp_path / "out"), rehash=True)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == vocab
    lib.rm("b")
    assert lib.gc()["fragments_removed"] == len(pieces["a"] - pieces["c"])
    assert lib.verify().ok


def test_crash_between_commits_leaves_previous_snapshot(tmp_path, family, monkeypatch):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest([family[0].file], family[0].model_id)
    real = lib.store.append

    def crash_on_manifest(name, rows, *rest):
        if name == "manifests":
            raise KeyboardInterrupt("killed mid-write")
        real(name, rows, *rest)

    monkeypatch.setattr(lib.store, "append", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        lib.ingest([family[1].file], family[1].model_id)
    monkeypatch.undo()
    assert [m["model_id"] for m in lib.models()] == [family[0].model_id]
    assert lib.verify().ok
    assert lib.gc()["fragments_removed"] > 0  # the orphaned fragments of the killed ingest
    lib.ingest([family[1].file], family[1].model_id)  # the next run finishes the work
    [p] = lib.restore(family[1].model_id, str(tmp_path / "out"))
    assert sha256(p) == sha256(family[1].file)


def test_append_killed_before_its_commit_leaves_an_orphan_that_gc_collects_at_once(tmp_path, family, monkeypatch):
    from deltalake import DeltaTable

    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest([family[0].file], family[0].model_id)
    frag_dir = tmp_path / "lib" / "fragments"
    before = {p.name for p in frag_dir.glob("*.parquet")}
    real = DeltaTable.create_write_transaction

    def killed(self, *args, **kwargs):
        if self.table_uri.rstrip("/").endswith("fragments"):  # the chunk's signatures commit before it
            raise KeyboardInterrupt("killed between the data file and the commit")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", killed)
    with pytest.raises(KeyboardInterrupt):
        lib.ingest([family[1].file], family[1].model_id)
    monkeypatch.setattr(DeltaTable, "create_write_transaction", real)
    [orphan] = {p.name for p in frag_dir.glob("*.parquet")} - before
    assert [m["model_id"] for m in lib.models()] == [family[0].model_id] and lib.verify().ok
    lib.gc()  # under gc's lease no append can be running: however young, the orphan goes
    assert not (frag_dir / orphan).exists()
    assert {p.name for p in frag_dir.glob("*.parquet")} == before
    lib.ingest([family[1].file], family[1].model_id)
    [p] = lib.restore(family[1].model_id, str(tmp_path / "out"))
    assert sha256(p) == sha256(family[1].file)


def test_same_id_same_bytes_is_a_no_op_other_bytes_need_replace(tmp_path, family):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    lib.ingest([family[0].file], "m")
    before = [m["ingest_id"] for m in lib.models()]
    again = lib.ingest([family[0].file], "m", family="digits")  # same bytes: nothing stored, the family set
    assert again.unchanged and again.fragments == 0
    assert [m["ingest_id"] for m in lib.models()] == before and lib.models()[0]["family"] == "digits"
    with pytest.raises(LibraryError, match="'m' is in the library with other bytes; replace it with --replace"):
        lib.ingest([family[1].file], "m")
    assert [m["ingest_id"] for m in lib.models()] == before
    report = lib.ingest_many([ModelInput([family[1].file], "m")], replace=True)[0]
    assert not report.unchanged and report.fragments > 0
    [p] = lib.restore("m", str(tmp_path / "out"))
    assert sha256(p) == sha256(family[1].file) and len(lib.models()) == 1


def test_lossy_sharing_is_opt_in_bounded_and_reported(tmp_path, family):
    lossless = FragmentLibrary.open(str(tmp_path / "a"), SMALL_FRAGMENTS)
    lossy = FragmentLibrary.open(str(tmp_path / "b"), LibraryConfig(fragment_size=64 * 1024, lossy_threshold=0.05))
    base, ft = family[0], family[1]  # lr 1e-4 fine-tune: close to the base
    for lib in (lossless, lossy):
        lib.ingest([base.file], base.model_id)
        lib.ingest([ft.file], ft.model_id)
    assert lossless.stats().lossy_refs == 0
    s = lossy.stats()
    assert s.lossy_refs > 0 and s.lossy_saved_bytes > 0
    report = lossy.verify(ft.model_id)
    assert report.ok and report.lossy_tensors
    assert all(e["rel_l2_error"] <= 0.05 for e in report.lossy_tensors.values())
    # The restored tensors are within the stated bound of the originals.
    from safetensors.torch import load_file

    [p] = lossy.restore(ft.model_id, str(tmp_path / "out"))
    orig, back = load_file(ft.file), load_file(p)
    for name in orig:
        a, b = orig[name].double(), back[name].double()
        if a.numel():
            assert (a - b).norm() <= 0.05 * a.norm() + 1e-12, name


def test_loader_switches_within_a_family_reading_only_new_fragments(tmp_path, family):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    for m in family:
        lib.ingest([m.file], m.model_id, m.family)
    loader = ModelLoader(lib, cache_bytes=256 << 20)
    from safetensors.torch import load_file

    base = loader.load("digits-base")
    first = loader.last
    assert first.fragments_fetched == first.fragments
    partial = loader.load("digits-ft-partial")
    assert loader.last.fragments_fetched < loader.last.fragments  # frozen layers came from the cache
    expected = load_file(family[3].file)
    assert all(torch.equal(partial[k], expected[k]) for k in expected)
    assert all(torch.equal(base[k], v) for k, v in load_file(family[0].file).items())
    tiny = ModelLoader(lib, cache_bytes=64 * 1024)  # a cache too small still loads correctly
    assert all(torch.equal(tiny.load("digits-ft-partial")[k], expected[k]) for k in expected)


def test_a_fine_tune_of_a_delta_references_it_and_gc_keeps_the_whole_chain(tmp_path, monkeypatch):
    """A bf16 model stored as a delta of an fp16 release that came first starts the bf16 lineage:
    it is the best reference of its own fine-tune (chain depth 2), in a later ingest too.
    Removing the middle model and collecting keeps every fragment of the chain; verify, restore,
    ModelLoader and haagenti:// reads all decode through it bit-exact."""
    import fsspec

    g = torch.Generator().manual_seed(5)
    a = {f"l{i}.weight": torch.randn(256, 512, generator=g) for i in range(2)}
    b = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    c = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in b.items()}
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    for name, state, dtype in (("a", a, torch.float16), ("b", b, torch.bfloat16), ("c", c, torch.bfloat16)):
        save_file({k: v.to(dtype) for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
        lib.ingest([str(tmp_path / f"{name}.safetensors")], name)
    frags = lib.store.read("fragments", columns=["fragment_id", "depth", "ref_id"])
    depth = dict(zip(frags["fragment_id"].to_pylist(), frags["depth"].to_pylist()))
    assert {depth[f] for f in lib.manifest("b").fragment_ids} == {1}  # deltas of a's (a cast each)
    assert {depth[f] for f in lib.manifest("c").fragment_ids} == {2}  # deltas of b's
    assert lib.verify().ok  # every fragment decoded through its chain
    from haagenti import maintenance

    monkeypatch.setattr(maintenance, "REF_CACHE_BYTES", 0)  # every reference read back through its chain
    monkeypatch.setattr(maintenance, "BLOB_BATCH_ROWS", 1)
    assert lib.verify().ok
    monkeypatch.undo()
    lib.rm("b")
    lib.gc()
    assert lib.stats().fragments == len(depth)  # b's fragments stay: c needs them, and a's
    assert lib.verify().ok
    [p] = lib.restore("c", str(tmp_path / "out"))
    assert sha256(p) == sha256(str(tmp_path / "c.safetensors"))
    loaded = ModelLoader(lib, cache_bytes=1 << 20).load("c")
    assert all(torch.equal(loaded[k], v.bfloat16()) for k, v in c.items())
    with fsspec.open(f"haagenti://c/c.safetensors::{lib.store.url}", "rb") as f:
        assert f.read() == open(str(tmp_path / "c.safetensors"), "rb").read()


def test_stats_counts_every_byte_on_disk(tmp_path, family):
    """`disk_bytes` is the bytes of every file of the library (du -b, less the folders' own
    entries), split by part; the headline reduction is against it, not the blobs alone; each
    model's adds its record's verbatim bytes; `stats --json` carries both byte counts."""
    import json

    from tests.helpers import cli

    def files() -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(tmp_path / "lib") for f in names)

    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    empty = files()
    code, out, _ = cli("ingest", lib.store.url, family[0].file, family[1].file, "--each")
    assert code == 0
    files = files()
    s = lib.stats()
    assert s.disk_bytes == files and sum(s.disk_by_part.values()) == files
    assert s.disk_by_part["fragments"] > s.stored_bytes > 0 and min(s.disk_by_part[p] for p in ("index", "logs", "manifests", "models")) > 0
    assert s.reduction == 1 - files / s.raw_bytes < s.stored_reduction
    assert f"the library grew by {files - empty:,} B on disk" in out
    for m in s.per_model:
        assert m.disk_bytes > m.new_stored_bytes  # its safetensors header
    code, out, _ = cli("stats", lib.store.url, "--json")
    doc = json.loads(out)
    assert doc["disk_bytes"] == files and doc["stored_bytes"] == s.stored_bytes
    assert [m["disk_bytes"] for m in doc["per_model"]] == [m.disk_bytes for m in s.per_model]


def test_rehash_recomputes_each_file_tree_from_the_bytes_written(tmp_path, family, monkeypatch):
    """A restore checks the ids it wrote; --rehash cuts the written file by its recorded layout
    and hashes each piece again, so bytes changed after their fragment was verified (one flipped
    on its way to the disk) fail it, naming the file."""
    from haagenti import restore

    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL_FRAGMENTS)
    m = family[0]
    lib.ingest([m.file], m.model_id)
    write = restore._pwrite

    def flipped(fd, data, offset):
        data = bytearray(data)
        data[-1] ^= 1
        write(fd, bytes(data), offset)

    monkeypatch.setattr(restore, "_pwrite", flipped)
    lib.restore(m.model_id, str(tmp_path / "unchecked"))  # the ids it wrote are right: unseen
    with pytest.raises(FragmentError, match=f"{m.model_id}'.*restored {os.path.basename(m.file)} has tree"):
        lib.restore(m.model_id, str(tmp_path / "out"), rehash=True)
    monkeypatch.setattr(restore, "_pwrite", write)
    lib.restore(m.model_id, str(tmp_path / "out"), rehash=True)


def test_whole_file_blake3_is_opt_in_and_then_checked(tmp_path, family):
    """files.blake3 (b3sum's hash, for published checksums) is recorded only when asked for,
    computed from the pieces as they are cut; verify and restore --rehash then check it too."""
    from blake3 import blake3

    from tests.helpers import cli, reseal

    m = family[0]
    plain, whole = tmp_path / "plain", tmp_path / "whole"
    assert cli("ingest", plain, m.file, "--model-id", "m")[0] == 0
    assert cli("ingest", whole, m.file, "--model-id", "m", "--file-blake3")[0] == 0
    [p], [w] = (FragmentLibrary.open(str(d), create=False).models() for d in (plain, whole))
    assert p["files"][0]["blake3"] is None and w["files"][0]["blake3"] == blake3(open(m.file, "rb").read()).hexdigest()
    assert p["files"][0]["layout"] == w["files"][0]["layout"] and p["content_hash"] == w["content_hash"]  # the file's identity either way
    lib = FragmentLibrary.open(str(whole), create=False)
    [row] = lib.store.read("models").to_pylist()
    row["files"][0]["blake3"] = "0" * 64
    lib.store.delete("models", "model_id = 'm'")
    lib.store.append("models", pa.Table.from_pylist([row], schema=lib.store.read("models").schema))
    reseal(lib, "m")
    lib.restore("m", str(tmp_path / "out"))  # without --rehash nothing hashes the whole file
    code, _, err = cli("restore", whole, "m", tmp_path / "out2", "--rehash")
    assert code == 1 and f"has blake3 {w['files'][0]['blake3']}, expected {'0' * 64}" in err
    assert not lib.verify("m").ok
