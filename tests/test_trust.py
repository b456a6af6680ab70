"""Restore never escapes or surprises, and a new user's mistakes get one clear line (issue 15)."""
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import save_file

from haagenti.config import LibraryConfig
from haagenti.errors import DamagedError, FormatError, LibraryError
from haagenti.library import FragmentLibrary
from haagenti.records import LossyRestoreWarning
from tests.helpers import cli, model_file, sha256, tree_digest

SMALL = LibraryConfig(fragment_size=64 * 1024)


@pytest.fixture
def lib_with_model(tmp_path):
    src = model_file(tmp_path / "m.safetensors")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL)
    lib.ingest([src], "m")
    return lib, src


def rewrite_model_row(lib, model_id, change):
    t = lib.store.read("models")
    rows = t.to_pylist()
    for r in rows:
        if r["model_id"] == model_id:
            change(r)
    lib.store.delete("models", f"model_id = '{model_id}'")
    lib.store.append("models", pa.Table.from_pylist([r for r in rows if r["model_id"] == model_id], schema=t.schema))


# ---- restore security ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x.safetensors", "ABSOLUTE", "a/../../x.safetensors", "a//b.safetensors", "..\\x.safetensors", "x\x00.safetensors", "..", "", "x\n.safetensors"])
def test_recorded_file_names_cannot_leave_the_output_folder(tmp_path, lib_with_model, name):
    lib, _ = lib_with_model
    name = str(tmp_path / "abs.safetensors") if name == "ABSOLUTE" else name
    rewrite_model_row(lib, "m", lambda r: r["files"][0].update(name=name))
    out = tmp_path / "deep" / "out"
    before = set(os.listdir(tmp_path))
    with pytest.raises(DamagedError, match="not a plain file name"):
        lib.restore("m", str(out))
    assert not out.exists() and set(os.listdir(tmp_path)) == before
    report = lib.verify()
    assert not report.ok and "not a plain file name" in report.errors[0]
    code, _, err = cli("restore", lib.store.url, "m", out)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a plain file name" in err
    code, _, err = cli("verify", lib.store.url)
    assert code == 1 and "not a plain file name" in err


def test_duplicate_recorded_file_names_are_refused(tmp_path, lib_with_model):
    lib, _ = lib_with_model
    rewrite_model_row(lib, "m", lambda r: r.update(files=r["files"] * 2))
    with pytest.raises(DamagedError, match="recorded twice"):
        lib.restore("m", str(tmp_path / "out"))


@pytest.mark.parametrize("lie", ["size", "elem_count", "elem_offset", "file_index", "dtype", "fragment_id"])
def test_lying_counts_offsets_and_lengths_are_refused(tmp_path, lib_with_model, lie):
    lib, _ = lib_with_model
    if lie == "size":  # a restore would reserve a petabyte
        rewrite_model_row(lib, "m", lambda r: r["files"][0].update(size=2**50))
    else:
        t = lib.store.read("manifests")
        rows = t.to_pylist()
        r = next(x for x in rows if x["tensor_index"] == 1 and x["fragment_seq"] == 0)  # the row a tensor's fields are read from
        r.update({"elem_count": 2**40} if lie == "elem_count" else {"elem_offset": 5} if lie == "elem_offset" else
                 {"file_index": 7} if lie == "file_index" else {"dtype": "X9"} if lie == "dtype" else {"fragment_id": "'; DROP", "source_fragment_id": "'; DROP"})
        lib.store.delete("manifests", "model_id = 'm'")
        lib.store.append("manifests", pa.Table.from_pylist(rows, schema=t.schema))
    with pytest.raises(DamagedError):
        lib.restore("m", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not lib.verify("m").ok


# ---- restore never surprises -----------------------------------------------------------------
def test_restore_refuses_to_overwrite_without_force(tmp_path, lib_with_model):
    lib, src = lib_with_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.safetensors").write_bytes(b"mine")
    with pytest.raises(LibraryError, match="already exist.*--force"):
        lib.restore("m", str(out))
    assert (out / "m.safetensors").read_bytes() == b"mine" and os.listdir(out) == ["m.safetensors"]
    code, _, err = cli("restore", lib.store.url, "m", out)
    assert code == 1 and "--force" in err and (out / "m.safetensors").read_bytes() == b"mine"
    code, _, _ = cli("restore", lib.store.url, "m", out, "--force")
    assert code == 0 and sha256(out / "m.safetensors") == sha256(src) and os.listdir(out) == ["m.safetensors"]


def test_a_failed_forced_restore_leaves_the_old_files(tmp_path, lib_with_model, monkeypatch):
    lib, _ = lib_with_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.safetensors").write_bytes(b"old")
    from haagenti import restore as restore_module

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(restore_module, "_pwrite", broken)  # every write of a restore to files
    with pytest.raises(OSError):
        lib.restore("m", str(out), force=True)
    assert os.listdir(out) == ["m.safetensors"] and (out / "m.safetensors").read_bytes() == b"old"


@pytest.fixture
def lossy_lib(tmp_path):
    base = model_file(tmp_path / "base.safetensors", seed=0)
    ft = model_file(tmp_path / "ft.safetensors", seed=1, scale=0.002, base_seed=0)
    lib = FragmentLibrary.open(str(tmp_path / "lossy"), LibraryConfig(fragment_size=64 * 1024, lossy_threshold=0.05))
    lib.ingest([base], "base")
    lib.ingest([ft], "ft")
    assert lib.model("ft")["lossy"]
    return lib, ft


def test_a_lossy_restore_says_so_every_time_and_rehash_fails(tmp_path, lossy_lib):
    lib, ft = lossy_lib
    for i in range(2):  # every restore, not once per process
        with pytest.warns(LossyRestoreWarning, match=r"'ft' was stored lossy: \d+ tensor\(s\).*relative L2"):
            lib.restore("ft", str(tmp_path / f"out{i}"))
    with pytest.warns(LossyRestoreWarning), pytest.raises(Exception, match="differs from the original, as the model is stored lossy"):
        lib.restore("ft", str(tmp_path / "rehash"), rehash=True)
    assert not (tmp_path / "rehash").exists()  # nor an empty folder: the restore made it, the restore removes it
    code, out, err = cli("restore", lib.store.url, "ft", tmp_path / "cli")
    assert code == 0 and "warning:" in err and "stored lossy" in err and "relative L2" in err
    code, _, err = cli("restore", lib.store.url, "ft", tmp_path / "cli2" / "deeper", "--rehash")
    assert code == 1 and "differs from the original" in err and not (tmp_path / "cli2").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    assert cli("restore", lib.store.url, "ft", tmp_path / "mine", "--rehash")[0] == 1 and (tmp_path / "mine").is_dir()
    assert lib.verify().ok  # verify checks its fragments and layout, and reports the bounds


def test_catalog_dedup_restores_exact_and_applies_the_catalogs_family(tmp_path, lossy_lib):
    from pipelines.dedup import run_dedup
    from pipelines.executors import LocalExecutor

    lib, ft = lossy_lib
    base = str(tmp_path / "base.safetensors")
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"models": [{"id": "base", "family": "fam", "files": [base]}, {"id": "ft", "family": "fam", "files": [ft]}]}))
    run = run_dedup(str(cat), lib.store.url, LocalExecutor(), SMALL)
    assert run.relabeled == ["base"] and run.replaced == ["ft"] and not run.unchanged
    lib = FragmentLibrary.open(lib.store.url, create=False)
    assert {m["model_id"]: (m["family"], m["lossy"]) for m in lib.models()} == {"base": ("fam", False), "ft": ("fam", False)}
    [p] = lib.restore("ft", str(tmp_path / "exact"), rehash=True)
    assert sha256(p) == sha256(ft)
    again = run_dedup(str(cat), lib.store.url, LocalExecutor(), SMALL)
    assert again.nothing_to_do and sorted(again.unchanged) == ["base", "ft"]


# ---- bad input ---------------------------------------------------------------------------------
def test_f8_e8m0_and_c64_round_trip_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = {
        "scales": torch.randint(0, 256, (5000,), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "phases": torch.randn(3000, generator=g, dtype=torch.complex64),
        "w": torch.randn(100, 100, generator=g).bfloat16(),
    }
    path = tmp_path / "mx.safetensors"
    save_file(state, str(path))
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL)
    lib.ingest([str(path)], "mx")
    [p] = lib.restore("mx", str(tmp_path / "out"), rehash=True)
    assert sha256(p) == sha256(path)


def test_a_fifo_named_safetensors_is_refused_not_read(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=cli("ingest", tmp_path / "lib", fifo)), daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "wb"):
            pass
        t.join(10)
        pytest.fail("ingest blocked reading a FIFO")
    code, _, err = result["r"]
    assert code == 1 and "not a regular file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lib").exists()


def test_a_safetensors_file_with_no_tensors_is_stored_bit_exact(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path), metadata={"note": "no tensors"})
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(struct.pack("<Q", 2) + b"{}")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), SMALL)
    for p, mid in ((path, "empty"), (bare, "bare")):
        lib.ingest([str(p)], mid)
        [out] = lib.restore(mid, str(tmp_path / mid), rehash=True)
        assert sha256(out) == sha256(p)
    assert lib.verify().ok
    # beside models with tensors: in one ingest, and through the pipeline
    from haagenti.library import ModelInput
    from pipelines.dedup import run_dedup
    from pipelines.executors import LocalExecutor

    full = model_file(tmp_path / "full.safetensors")
    lib.ingest_many([ModelInput([str(path)], "empty2"), ModelInput([full], "full")])
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"models": [{"id": "empty", "files": [str(path)]}, {"id": "full", "files": [full]}]}))
    assert run_dedup(str(cat), str(tmp_path / "piped"), LocalExecutor()).added == ["empty", "full"]
    piped = FragmentLibrary.open(str(tmp_path / "piped"), create=False)
    for l, mid, p in ((lib, "empty2", path), (lib, "full", full), (piped, "empty", path), (piped, "full", full)):
        [out] = l.restore(mid, str(tmp_path / "again" / l.store.url.rsplit("/", 1)[-1] / mid), rehash=True)
        assert sha256(out) == sha256(p)


def test_ids_from_file_names_keep_their_dots(tmp_path):
    files = [model_file(tmp_path / n, seed=i) for i, n in enumerate(["v0.0-alex.safetensors", "v0.1-alex.safetensors", "llama-3.1-8b.safetensors"])]
    code, out, err = cli("ingest", tmp_path / "lib", *files, "--each", "--fragment-size", 65536)
    assert code == 0, err
    for mid in ("v0.0-alex", "v0.1-alex", "llama-3.1-8b"):
        assert f"ingested {mid}:" in out
    code, out, _ = cli("ingest", tmp_path / "lib2", files[2])
    assert code == 0 and "ingested llama-3.1-8b:" in out


def test_a_text_file_named_safetensors_is_called_what_it_is(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("Some notes about the model, not weights.\n" * 20)
    with pytest.raises(FormatError, match="not a safetensors file"):
        FragmentLibrary.open(str(tmp_path / "lib")).ingest([str(p)], "x")
    code, _, err = cli("ingest", tmp_path / "lib2", p)
    assert code == 1 and "not a safetensors file" in err and "exceeds" not in err


def test_a_library_path_that_is_a_file_gets_one_line(tmp_path):
    f = tmp_path / "lib"
    f.write_text("x")
    src = model_file(tmp_path / "m.safetensors")
    for args in (("ingest", f, src), ("stats", f), ("verify", f), ("restore", f, "m", tmp_path / "o")):
        code, _, err = cli(*args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "is a file, not a library folder" in err, (args, err)
    assert f.read_text() == "x"


def test_a_failed_first_ingest_leaves_no_library_folder(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b'{"a": 1}  ')
    good = model_file(tmp_path / "good.safetensors")
    code, _, _ = cli("ingest", tmp_path / "lib", bad)
    assert code == 1 and not (tmp_path / "lib").exists()
    code, _, _ = cli("ingest", tmp_path / "lib", good, bad, "--each")  # fails on the second file's check
    assert code == 1 and not (tmp_path / "lib").exists()
    assert cli("ingest", tmp_path / "lib", good)[0] == 0
    before = tree_digest(tmp_path / "lib")
    assert cli("ingest", tmp_path / "lib", bad, "--model-id", "b")[0] == 1
    assert tree_digest(tmp_path / "lib") == before  # an existing library is never removed


def test_a_damaged_marker_file_gets_one_line(tmp_path, lib_with_model):
    lib, _ = lib_with_model
    (tmp_path / "lib" / "haagenti.json").write_bytes(b'{"format": "haag')
    for args in (("stats", lib.store.url), ("verify", lib.store.url), ("restore", lib.store.url, "m", tmp_path / "o")):
        code, _, err = cli(*args)
        assert code == 1 and "haagenti.json is damaged" in err and len(err.strip().splitlines()) == 1


def test_tiers_before_add_tier_and_from_the_cli(tmp_path, lib_with_model):
    from haagenti.adaptive.precision import AdaptiveError
    from haagenti.adaptive.tiers import load_model

    lib, _ = lib_with_model
    with pytest.raises(AdaptiveError, match="has no int8 tier; add it first"):
        load_model(lib, "m", precision="int8")
    code, out, _ = cli("tier", "list", lib.store.url)
    assert code == 0 and "m: no tiers" in out
    code, out, err = cli("tier", "add", lib.store.url, "m", "int8")
    assert code == 0 and "added tier m.int8" in out, err
    assert cli("tier", "list", lib.store.url, "m")[1].strip() == "m: int8"
    state = load_model(FragmentLibrary.open(lib.store.url, create=False), "m", precision="int8")
    assert set(state) == {f"layers.{i}.mlp.weight" for i in range(3)}
    code, _, err = cli("tier", "add", lib.store.url, "m", "fp8")
    assert code == 1 and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["bad-catalog", "missing-file", "memory-library", "library-is-a-file"])
def test_dedup_fails_before_starting_ray(tmp_path, case):
    cat = tmp_path / "catalog.yaml"
    good = model_file(tmp_path / "a.safetensors")
    files = {"bad-catalog": "[a.safetensors]", "missing-file": f"[{good}, {tmp_path}/nonexistent.safetensors]"}.get(case, f"[{good}]")
    cat.write_text(f"models: [{{id: {'../x' if case == 'bad-catalog' else 'a'}, files: {files}}}]")
    library = "memory://x" if case == "memory-library" else str(tmp_path / "lib")
    if case == "library-is-a-file":
        (tmp_path / "lib").write_text("x")
    code = f"import sys; from jobs.dedup import main; rc = main(['--catalog', {str(cat)!r}, '--library', {library!r}]); print(rc, 'ray' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["1", "False"], p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error:")
    assert {"bad-catalog": "invalid model id", "missing-file": "no such file", "memory-library": "memory://", "library-is-a-file": "is a file"}[case] in p.stderr


def test_relative_paths_in_a_ray_job_are_refused(tmp_path, monkeypatch):
    from jobs.dedup import main

    monkeypatch.chdir(tmp_path)
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"models": [{"id": "a", "files": [model_file(tmp_path / "a.safetensors")]}]}))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets
    for argv, flag in ((["--catalog", str(cat), "--library", "rel_lib"], "--library"), (["--catalog", "catalog.yaml", "--library", str(tmp_path / "lib")], "--catalog")):
        assert main(argv) == 1
    cat.write_text(yaml.safe_dump({"models": [{"id": "a", "files": ["a.safetensors"]}]}))
    assert main(["--catalog", str(cat), "--library", str(tmp_path / "lib")]) == 1
    assert not (tmp_path / "rel_lib").exists() and not (tmp_path / "lib").exists()


def test_relative_path_refusal_message(monkeypatch):
    from jobs import JobPathError, refuse_relative_in_job

    assert refuse_relative_in_job("--library", "rel") == "rel"  # outside a job: resolved against the cwd as usual
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(JobPathError, match="relative.*temporary copy of --working-dir.*absolute path or a URL"):
        refuse_relative_in_job("--library", "rel")
    assert refuse_relative_in_job("--library", "s3://b/lib") == "s3://b/lib"
    assert refuse_relative_in_job("--library", "/abs/lib") == "/abs/lib"


def test_a_local_cluster_leaves_no_token_file_behind(tmp_path, monkeypatch):
    from pipelines.executors import _private_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    _private_token()
    assert len(os.environ["RAY_AUTH_TOKEN"]) == 64 and not (tmp_path / ".ray").exists()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("theirs")
    _private_token()  # the user's own token stands
    assert "RAY_AUTH_TOKEN" not in os.environ


# ---- progress ----------------------------------------------------------------------------------
def test_dedup_reports_each_stage(tmp_path):
    from pipelines.dedup import STAGES, run_dedup
    from pipelines.executors import LocalExecutor

    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"models": [{"id": f"m{i}", "files": [model_file(tmp_path / f"m{i}.safetensors", seed=i)]} for i in range(2)]}))
    seen = []
    run_dedup(str(cat), str(tmp_path / "lib"), LocalExecutor(), SMALL, progress=seen.append)
    assert seen == list(STAGES)
    code, out, err = cli("dedup", cat, "--library", tmp_path / "lib2", "--executor", "local")
    assert code == 0 and all(f"dedup: {s} done" in err for s in STAGES), err


def test_make_family_reuses_a_trained_family(family):
    from haagenti.examples import cached_family
    from tests.conftest import SMALL as SETTINGS

    folder = os.path.dirname(family[0].file)
    assert cached_family(folder, **SETTINGS) == family
    assert cached_family(folder, **dict(SETTINGS, epochs=SETTINGS["epochs"] + 1)) is None
    code, out, _ = cli("examples", "make-family", folder, "--small")
    assert code == 0 and "reusing the family trained in" in out


def test_schedule_evaluate_reports_each_stage(tmp_path):
    from haagenti.adaptive.report import STAGES

    code, out, err = cli("schedule", "evaluate", "--out", f"{tmp_path}/", "--models", "mlp", "--samplers", "ddim", "--steps", 4, "--samples", 16, "--train-iters", 20)
    assert code == 0 and [line for line in err.splitlines() if line.endswith(" done")] == [f"evaluate: {s} done" for s in STAGES]
    assert (tmp_path / "adaptive.json").exists() and f"wrote {tmp_path}/adaptive.md, " in out  # not eval//adaptive.md
