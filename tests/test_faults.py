"""Defects the issue-31 fault campaign found, each held by a test: restore's staging, what ingest
accepts that restore would refuse, gc's reach, and refusals that say one line."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from haagenti.config import LibraryConfig
from haagenti.errors import FormatError, LibraryError
from haagenti.library import FragmentLibrary
from tests.helpers import cli, sha256

CONFIG = LibraryConfig(fragment_size=65536, similarity=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights(path, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((64, 64)).astype(np.float16)}, str(path))
    return str(path)


def folder(path, names: dict[str, bytes | None]) -> str:
    """A folder model: a safetensors file under each name mapped to None, else that side file."""
    for name, data in names.items():
        p = path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            weights(p, len(name))
        else:
            p.write_bytes(data)
    return str(path)


# ---- restore's staging ---------------------------------------------------------------------
def test_a_file_named_like_a_staged_one_restores_bit_exact(tmp_path):
    src = folder(tmp_path / "m", {"w.safetensors": None, "w.safetensors.partial": b"mine, not a staging file"})
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([src], "m")
    lib.restore("m", str(tmp_path / "out"), rehash=True)
    for name in ("w.safetensors", "w.safetensors.partial"):
        assert sha256(tmp_path / "out" / name) == sha256(tmp_path / "m" / name), name
    assert sorted(os.listdir(tmp_path / "out")) == ["w.safetensors", "w.safetensors.partial"]
    lib.ingest([weights(tmp_path / "v.safetensors")], "v")  # a file of the user's where a staging name once was
    (tmp_path / "out" / "v.safetensors.partial").write_bytes(b"the user's")
    lib.restore("v", str(tmp_path / "out"))
    assert (tmp_path / "out" / "v.safetensors.partial").read_bytes() == b"the user's"


def test_a_planted_link_is_never_written_through(tmp_path):
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([weights(tmp_path / "w.safetensors")], "m")
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    (tmp_path / "out").mkdir()
    for name in ("w.safetensors.partial", "w.safetensors.haagenti-partial", ".haagenti-restore.json"):
        os.symlink(outside, tmp_path / "out" / name)
    with pytest.raises(LibraryError, match="an earlier restore was interrupted"):  # the planted journal
        lib.restore("m", str(tmp_path / "out"))
    lib.restore("m", str(tmp_path / "out"), force=True)
    assert outside.read_bytes() == b"keep"
    assert sha256(tmp_path / "out" / "w.safetensors") == sha256(tmp_path / "w.safetensors")
    assert not os.path.lexists(tmp_path / "out" / ".haagenti-restore.json")


def test_a_name_part_of_255_bytes_restores(tmp_path):
    name = "n" * 243 + ".safetensors"
    assert len(name) == 255
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([folder(tmp_path / "m", {name: None})], "m")
    lib.restore("m", str(tmp_path / "out"), rehash=True)
    assert sha256(tmp_path / "out" / name) == sha256(tmp_path / "m" / name)


def test_names_differing_only_in_case_are_refused_on_ingest(tmp_path):
    src = folder(tmp_path / "m", {"w.safetensors": None, "Config.json": b"{}", "config.json": b"{}"})
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    with pytest.raises(FormatError, match="differ in more than case.*Config.json, config.json"):
        lib.ingest([src], "m")
    assert lib.models() == []


def test_restore_force_interrupted_while_moving_is_said_and_recovered(tmp_path, monkeypatch):
    src = folder(tmp_path / "m", {f"w{i}.safetensors": None for i in range(3)})
    url, out = str(tmp_path / "lib"), tmp_path / "out"
    FragmentLibrary.open(url, CONFIG).ingest([src], "m")
    monkeypatch.setenv("HAAGENTI_CHAOS", f"restore-moved=enospc:{tmp_path / 'marker'}")  # stops after its first move
    with pytest.raises(OSError):
        FragmentLibrary.open(url, create=False).restore("m", str(out))
    rc, _, err = cli("restore", url, "m", str(out))
    assert rc == 1 and "an earlier restore of 'm' was interrupted" in err and "--force" in err and len(err.strip().splitlines()) == 1, err
    assert cli("restore", url, "m", str(out), "--force")[0] == 0
    assert sorted(os.listdir(out)) == [f"w{i}.safetensors" for i in range(3)]  # no journal, no staged file left
    for i in range(3):
        assert sha256(out / f"w{i}.safetensors") == sha256(tmp_path / "m" / f"w{i}.safetensors")


def test_a_model_of_more_files_than_the_open_file_limit_restores(tmp_path):
    import resource

    src = folder(tmp_path / "m", {"w.safetensors": None, **{f"side/{i}.json": b"{}" for i in range(100)}})
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([src], "m")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    busy = [open(os.devnull) for _ in range(150)]  # a process with files open already
    held = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (held + 40, hard))  # room for 40 more: fewer than the model's files
    try:
        lib.restore("m", str(tmp_path / "out"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for f in busy:
            f.close()
    assert len(os.listdir(tmp_path / "out" / "side")) == 100


# ---- gc's reach and its refusals -----------------------------------------------------------
def two_models(tmp_path) -> FragmentLibrary:
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([weights(tmp_path / "a.safetensors", 1)], "a")
    lib.ingest([weights(tmp_path / "b.safetensors", 2)], "b")
    lib.rm("b")
    return lib


@pytest.mark.parametrize("where", ["_leases", "fragments/linked"])
def test_gc_never_deletes_through_a_link(tmp_path, where):
    lib = two_models(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    (elsewhere / "part-00000-0-c000.parquet").write_text("mine too")
    link = tmp_path / "lib" / where
    if link.exists():
        os.rename(link, tmp_path / "moved")
    os.symlink(elsewhere, link)
    rc, _, err = cli("gc", str(tmp_path / "lib"))
    assert rc == 1 and "is a symbolic link" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(elsewhere)) == ["notes.txt", "part-00000-0-c000.parquet"]
    with pytest.raises(LibraryError, match="symbolic link"):
        lib.store.compact()
    assert sorted(os.listdir(elsewhere)) == ["notes.txt", "part-00000-0-c000.parquet"]


def test_gc_refuses_a_library_whose_fragments_log_entry_is_emptied(tmp_path):
    lib = two_models(tmp_path)
    log = tmp_path / "lib" / "fragments" / "_delta_log"
    latest = sorted(log.glob("*.json"))[-1]  # the commit of b's fragments
    before = sorted(p.name for p in (tmp_path / "lib" / "fragments").glob("*.parquet"))
    latest.write_text("")
    rc, _, err = cli("gc", str(tmp_path / "lib"))
    assert rc == 1 and "gc refused" in err and "verify" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "lib" / "fragments").glob("*.parquet")) == before


def test_gc_refuses_when_referenced_fragments_are_missing(tmp_path):
    lib = two_models(tmp_path)
    [fid] = {r.fragment_id for t in lib.manifest("a").tensors for r in t.fragments}
    lib.store.delete("fragments", f"fragment_id = '{fid}'")  # as a lost log entry would
    with pytest.raises(Exception, match="gc refused: 1 fragment"):
        lib.gc()


def test_a_lease_stuck_choosing_does_not_block_gc_forever(tmp_path, monkeypatch):
    import json
    import time

    from haagenti.store import leases

    lib = two_models(tmp_path)
    monkeypatch.setattr(leases, "CHOOSING_SECONDS", 0.5)
    stuck = {"kind": "ingest", "writer": "f" * 32, "host": "elsewhere", "pid": 1, "created": time.time(),
             "expires": time.time() + 10**9, "model_ids": ["x"], "ticket": 0, "choosing": True}
    (tmp_path / "lib" / "_leases").mkdir(exist_ok=True)
    (tmp_path / "lib" / "_leases" / f"{'f' * 32}.json").write_text(json.dumps(stuck))
    start = time.monotonic()
    with pytest.raises(LibraryError, match="gc refused: the library is in use \\(ingest of x by elsewhere"):
        lib.gc(wait=0)
    assert time.monotonic() - start < 5


def test_a_lease_with_a_ticket_of_another_type_is_not_a_lease(tmp_path):
    import json

    lib = two_models(tmp_path)
    (tmp_path / "lib" / "_leases").mkdir(exist_ok=True)
    bad = {"kind": "ingest", "writer": "e" * 32, "host": "h", "pid": 1, "created": 0, "expires": 10**12, "model_ids": [], "ticket": "7", "choosing": False}
    (tmp_path / "lib" / "_leases" / "bad.json").write_text(json.dumps(bad))
    lib.ingest([weights(tmp_path / "c.safetensors", 3)], "c")
    assert lib.gc()["fragments_removed"] >= 1
    assert lib.store.leases.all() == []


# ---- damaged records say one line ------------------------------------------------------------
@pytest.fixture(scope="module")
def with_deltas(tmp_path_factory):
    """A library of a model and a near copy stored as deltas against it."""
    d = tmp_path_factory.mktemp("deltas")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 512)).astype(np.float16)
    save_file({"w": a}, str(d / "a.safetensors"))
    save_file({"w": a + np.float16(0.001) * rng.standard_normal(a.shape).astype(np.float16)}, str(d / "b.safetensors"))
    lib = FragmentLibrary.open(str(d / "lib"), LibraryConfig(fragment_size=65536))
    lib.ingest([str(d / "a.safetensors")], "a")
    lib.ingest([str(d / "b.safetensors")], "b")
    assert any(r["ref_id"] for r in lib.store.read("fragments", columns=["ref_id"]).to_pylist())
    return d / "lib"


def _marker(change):
    def apply(lib_dir):
        import json

        path = lib_dir / "haagenti.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return apply


def _rows(table, change):
    def apply(lib_dir):
        import pyarrow as pa

        store = FragmentLibrary.open(str(lib_dir), create=False).store
        t = store.read(table)
        rows = change(t.to_pylist())
        store.delete(table, "true")
        store.append(table, pa.Table.from_pylist(rows, schema=t.schema))
    return apply


def _each(key, value):
    def change(rows):
        for r in rows:
            r[key] = value(r) if callable(value) else value
        return rows
    return change


def _first(key, value):
    def change(rows):
        rows[0][key] = value
        return rows
    return change


def _deltas_point_at_each_other(rows):
    a, b = [r for r in rows if r["ref_id"]][:2]
    a["ref_id"], b["ref_id"] = b["fragment_id"], a["fragment_id"]
    return rows


DAMAGE = {
    "fragment-size-0": _marker(lambda m: {**m, "fragment_size": 0}),
    "fragment-size-big": _marker(lambda m: {**m, "fragment_size": "big"}),
    "no-signature": _marker(lambda m: {k: v for k, v in m.items() if k != "signature"}),
    "bands-0": _marker(lambda m: {**m, "signature": {**m["signature"], "bands": 0}}),
    "tensor-index-minus-1": _rows("manifests", _first("tensor_index", -1)),
    "delta-refers-to-itself": _rows("fragments", _each("ref_id", lambda r: r["fragment_id"] if r["ref_id"] else None)),
    "deltas-refer-to-each-other": _rows("fragments", _deltas_point_at_each_other),
    "raw-size-null": _rows("fragments", _each("raw_size", None)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_records_are_refused_in_one_line(with_deltas, tmp_path, damage):
    import shutil

    lib_dir = tmp_path / "lib"
    shutil.copytree(with_deltas, lib_dir)
    DAMAGE[damage](lib_dir)
    for args in (("restore", lib_dir, "b", tmp_path / "out"), ("verify", lib_dir)):
        rc, out, err = cli(*args)
        lines = [line for line in (err + out).splitlines() if line.strip()]
        assert rc == 1 and "Traceback" not in err, (args, out, err)
        assert args[0] == "verify" or len(err.strip().splitlines()) == 1, err
        assert any(w in line for w in ("damaged", "unreadable", "chain loops") for line in lines), lines
    assert not (tmp_path / "out").exists()


class _Payload:
    """Pickles as a call of eval: a global no test session replaces (Ray swaps builtins.print
    for its own, which then pickled under Ray's module name)."""

    def __reduce__(self):
        return (eval, ("'pwned'",))


def test_a_pickle_refusal_is_one_line_without_torchs_advice(tmp_path):
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": _Payload()}, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    rc, out, err = cli("ingest", tmp_path / "lib", tmp_path / "evil.pt", "--model-id", "evil")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "refused by torch.load(weights_only=True): Unsupported global: GLOBAL eval was not an allowed global" in err, err
    assert "weights_only=False" not in err and "will likely succeed" not in err and "Warning" not in err


def test_tier_add_writes_no_temporary_file(tmp_path, monkeypatch):
    """A tier add killed midway must leave nothing behind: while it ingests, no file of its own
    lies in the temporary folder (it used to write tier.safetensors there)."""
    import tempfile

    from haagenti.adaptive import tiers
    from haagenti.adaptive.tiers import add_tier

    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([weights(tmp_path / "w.safetensors")], "m")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen = []
    real = tiers.ingest_models  # what add_tier ingests the tier with
    monkeypatch.setattr(tiers, "ingest_models", lambda *a, **k: seen.append(sorted(os.listdir(scratch))) or real(*a, **k))
    add_tier(lib, "m", "int8")
    assert seen == [[]] and "m.int8" in {m["model_id"] for m in lib.models()}


def test_model_ids_and_file_paths_are_never_confused_in_haagenti_urls(tmp_path):
    import fsspec

    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([folder(tmp_path / "sd", {"unet/w.safetensors": None, "unet/config.json": b'{"of": "sd"}'})], "sd")
    lib.ingest([folder(tmp_path / "sdu", {"v.safetensors": None, "config.json": b'{"of": "sd/unet"}'})], "sd/unet")
    assert lib.open_file("sd", "unet/config.json").read() == b'{"of": "sd"}'
    assert lib.open_file("sd/unet", "config.json").read() == b'{"of": "sd/unet"}'
    with pytest.raises(LibraryError, match="names both model 'sd/unet'.s config.json and model 'sd'.s unet/config.json"):
        fsspec.open("haagenti://sd/unet/config.json", library=str(tmp_path / "lib")).open()
    with fsspec.open("haagenti://sd/unet/v.safetensors", library=str(tmp_path / "lib")) as f:  # one reading only: served
        assert f.read() == (tmp_path / "sdu" / "v.safetensors").read_bytes()
    with fsspec.open("haagenti://sd/unet/w.safetensors", library=str(tmp_path / "lib")) as f:
        assert f.read() == (tmp_path / "sd" / "unet" / "w.safetensors").read_bytes()


def test_an_onnx_with_two_initializers_of_one_name_is_refused(tmp_path):
    from tests.test_strict_containers import GOOD_ONNX, onnx_model

    model = onnx_model(GOOD_ONNX)
    model.graph.initializer.append(model.graph.initializer[0])  # "w" twice
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    with pytest.raises(FormatError, match="initializer 'w' is listed more than once"):
        lib.ingest([str(tmp_path / "m.onnx")], "m")
    assert lib.models() == []


# ---- matching's memory with many tiny tensors ----------------------------------------------
def _one_bucket(n: int, same_bits: bool, seed: int = 0):
    import pyarrow as pa

    from haagenti.matching import BAND_SCHEMA

    rng = np.random.default_rng(seed)
    rows = [{"band": 0, "band_hash": 7, "fragment_id": f"{k:064x}",
             "bits": bytes(32) if same_bits else rng.integers(0, 256, 32, dtype=np.uint8).tobytes(),
             "n_elements": 1, "pos": k, "is_new": True, "usable": True} for k in range(n)]
    return pa.Table.from_pylist(rows, schema=BAND_SCHEMA)


def test_bucket_pairs_scored_in_runs_equal_scored_at_once(monkeypatch):
    from haagenti import matching

    table = _one_bucket(400, same_bits=False)
    whole = matching.bucket_pairs(table, 128, 8, 64)
    monkeypatch.setattr(matching, "PAIR_CHUNK", 100)
    assert matching.bucket_pairs(table, 128, 8, 64).equals(whole) and whole.num_rows > 1000


def test_bucket_pairs_memory_is_bounded_by_the_chunk_not_the_bucket(monkeypatch):
    """20k one-element tensors share one signature: every new row pairs with the 1,024 before it
    (rows x 1,024 pairs at once reached 23.7 GB); scored in runs, memory is the run's."""
    import tracemalloc

    from haagenti import matching

    table = _one_bucket(2000, same_bits=True)
    monkeypatch.setattr(matching, "PAIR_CHUNK", 1 << 15)
    tracemalloc.start()
    try:
        pairs = matching.bucket_pairs(table, 128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pairs.num_rows == 1999 * 32 - sum(range(32))  # the 32 nearest (all at distance 0: the first 32)
    assert peak < 40 * 1024 * 1024, peak


def test_the_fault_bench_runs_clean_at_a_small_n(capsys, monkeypatch):
    """bench/faults.py itself, crafted libraries only (the classes with real processes take
    seconds a trial; test_concurrency and the tests above hold those faults one by one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("faults_bench", os.path.join(ROOT, "bench", "faults.py"))
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "faults_bench", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--trials", "3", "--where", "local", "--classes", "crafted"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["class", "where", "trials"]
    assert table[1].split() == ["crafted", "local", "3", "0", "0", "0", "0", "0"]


def test_an_index_row_whose_fragment_is_gone_is_not_taken_as_stored(tmp_path):
    """The exact-id path confirms an id by its fragment's row: an ids row left by an older gc
    killed between its deletes must cost a copy, never a published model that cannot restore."""
    import pyarrow as pa

    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    src = weights(tmp_path / "w.safetensors")
    lib.ingest([src], "m")
    lib.rm("m")
    ids = pa.array(sorted({r["fragment_id"] for r in lib.store.read("fragments", columns=["fragment_id"]).to_pylist()}), pa.string())
    lib.store.delete_fragments(ids)  # the fragments gone, their ids rows kept
    assert lib.store.read("ids").num_rows
    lib.ingest([src], "m")
    [out] = lib.restore("m", str(tmp_path / "out"), rehash=True)
    assert sha256(out) == sha256(src)
    lib.gc()  # and gc removes the stale rows
    assert set(lib.store.read("ids", columns=["fragment_id"])["fragment_id"].to_pylist()) == set(ids.to_pylist())
