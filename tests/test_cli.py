"""The command line as a user runs it: a subprocess, one-line errors, non-zero exits."""
import json
import os
import signal
import subprocess
import sys

from haagenti.library import FragmentLibrary
from tests.helpers import cli, sha256


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "haagenti.cli", *args], capture_output=True, text=True)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def test_cli_round_trip(tmp_path, family):
    lib = str(tmp_path / "lib")
    base, ft = family[0], family[1]
    out = run("ingest", lib, base.file, "--model-id", "base", "--family", "digits", "--fragment-size", "65536").stdout
    assert "ingested base" in out
    ft_id = "digits-ft-lr1e-4-of-the-round-trip"
    run("ingest", lib, ft.file, "--model-id", ft_id, "--family", "digits", "--fragment-size", "65536")
    stats = json.loads(run("stats", lib, "--json").stdout)
    assert stats["models"] == 2 and stats["reduction"] > 0
    text = run("stats", lib).stdout  # not a terminal: 80 columns, and still every id and figure whole
    assert "family digits" in text
    for m in stats["per_model"]:
        assert m["model_id"] in text and f"{m['raw_bytes']:,}" in text and f"{m['disk_bytes']:,}" in text, text
    assert "ok:" in run("verify", lib).stdout
    run("restore", lib, ft_id, str(tmp_path / "out"))
    assert sha256(tmp_path / "out" / "digits-ft-lr1e-4.safetensors") == sha256(ft.file)
    run("rm", lib, "base")
    assert "fragments removed" in run("gc", lib).stdout
    assert cli("gc", lib)[1].strip() == "gc: nothing to collect"  # a second gc says it did nothing
    run("verify", lib, ft_id)


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    p = run("ingest", str(tmp_path / "lib"), str(bad), ok=False)
    assert p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = run("restore", str(tmp_path / "lib"), "../etc", str(tmp_path / "o"), ok=False)
    assert "invalid model id" in p.stderr
    p = run("stats", str(tmp_path / "nowhere"), ok=False)
    assert "no haagenti library" in p.stderr


def test_cli_ingest_each_file_as_a_model(tmp_path, family):
    lib = str(tmp_path / "lib")
    out = run("ingest", lib, *[m.file for m in family[:3]], "--each", "--family", "digits").stdout
    for m in family[:3]:
        stem = m.file.rsplit("/", 1)[-1].split(".")[0]
        assert f"ingested {stem}:" in out
        run("restore", lib, stem, str(tmp_path / "out"))
        assert sha256(tmp_path / "out" / f"{stem}.safetensors") == sha256(m.file)
    assert json.loads(run("stats", lib, "--json").stdout)["models"] == 3
    assert "--each" in run("ingest", lib, family[0].file, "--each", "--model-id", "x", ok=False).stderr


def test_commands_and_pipeline_steps_start_without_torch():
    """torch costs ~1.1 s to import: the CLI and the pipeline's scan/fragment/encode steps must
    not pay it (only signatures, cross-dtype casts and PyTorch checkpoints import it)."""
    code = "import sys, haagenti.cli, pipelines.dedup, pipelines.steps, jobs.dedup; print('torch' in sys.modules)"
    # An unknown preset or sampler is refused before torch and diffusers are imported (seconds).
    code += ("\nfrom typer.testing import CliRunner\nfor bad in (['--preset', 'nope'], ['--sampler', 'nope']):\n"
             "    r = CliRunner().invoke(haagenti.cli.app, ['schedule', *bad])\n"
             "    print(r.exit_code, r.stderr.strip(), 'torch' in sys.modules or 'diffusers' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.splitlines() == [
        "False",
        "1 error: unknown preset 'nope'; use one of performance, balanced, quality, low_vram, conservative, noise_adaptive False",
        "1 error: unknown sampler 'nope'; use one of ddim, dpmpp2m, euler_a, heun False",
    ], p.stdout + p.stderr


def test_list_shows_whole_ids_and_restore_of_an_unknown_model_says_how_to_list(tmp_path, family):
    lib = str(tmp_path / "lib")
    long_ids = ["digits-ft-lr1e-4-" + "x" * 70, "digits-ft-lr1e-4-" + "y" * 70]  # alike for the 80 columns a table would cut at
    for mid, m in zip(long_ids, family[1:3]):
        assert cli("ingest", lib, m.file, "--model-id", mid, "--family", "digits", "--no-similarity")[0] == 0
    for command in ("list", "ls"):
        code, out, _ = cli(command, lib)
        assert code == 0 and [line.split()[0] for line in out.splitlines()] == long_ids
    code, _, err = cli("restore", lib, "digits-ft", str(tmp_path / "out"))
    assert code == 1 and f"model 'digits-ft' is not in the library; `haagenti list {lib}` lists the models it holds" in err
    assert not (tmp_path / "out").exists()


def test_many_files_or_a_plain_folder_become_one_model_only_when_named(tmp_path, family):
    lib = str(tmp_path / "lib")
    folder = os.path.dirname(family[0].file)  # 7 models, catalog.yaml and family.json
    code, _, err = cli("ingest", lib, folder)
    name = os.path.basename(folder)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "7 weight files that are not shards of one file" in err and f"one model {name!r}; give --model-id {name}" in err
    code, _, err = cli("ingest", lib, *[m.file for m in family[:2]])
    assert code == 1 and "would become one model 'digits-base'" in err and "--each" in err
    code, _, err = cli("ingest", lib, family[0].file, str(tmp_path.parent / os.path.basename(folder) / "catalog.yaml"), "--each")
    assert code == 1 and "side files (catalog.yaml)" in err
    assert not os.path.exists(lib)  # refused before a library was made
    code, out, _ = cli("ingest", lib, *[m.file for m in family[:2]], "--model-id", "both", "--no-similarity")
    assert code == 0 and "ingested both:" in out


def test_each_names_models_without_any_known_extension(tmp_path, exports):
    lib = str(tmp_path / "lib")
    code, out, err = cli("ingest", lib, exports["gguf-Q8_0"], exports["onnx"], "--each", "--no-similarity")
    assert code == 0, err
    assert "ingested base-Q8_0:" in out and "ingested base:" in out
    assert [m["model_id"] for m in FragmentLibrary.open(lib, create=False).models()] == ["base-Q8_0", "base"]


def test_same_file_again_is_a_no_op_other_bytes_need_replace(tmp_path, family):
    lib = str(tmp_path / "lib")
    base, ft = family[0].file, family[1].file
    assert cli("ingest", lib, base, "--model-id", "m", "--no-similarity")[0] == 0
    code, out, _ = cli("ingest", lib, base, "--model-id", "m")
    assert code == 0 and out.strip() == "nothing to do: m is in the library with the same bytes"
    code, _, err = cli("ingest", lib, ft, "--model-id", "m")
    assert code == 1 and "'m' is in the library with other bytes; replace it with --replace" in err
    code, out, _ = cli("ingest", lib, ft, "--model-id", "m", "--replace")
    assert code == 0 and "ingested m:" in out
    run("restore", lib, "m", str(tmp_path / "out"))
    assert sha256(tmp_path / "out" / os.path.basename(ft)) == sha256(ft)
    assert cli("gc", lib)[1].startswith("gc: ") and cli("gc", lib)[1].strip() == "gc: nothing to collect"


def test_ctrl_c_during_an_ingest_says_what_is_left_and_gc_frees_it(tmp_path, family):
    lib = str(tmp_path / "lib")
    env = dict(os.environ, HAAGENTI_CHAOS=f"committed-fragments=interrupt:{tmp_path / 'marker'}")
    # As in a terminal, Ctrl-C's default action: a suite started in the background (`make test &`,
    # or under flock from a script) hands its children SIGINT ignored, and Python then keeps it so.
    p = subprocess.run([sys.executable, "-m", "haagenti.cli", "ingest", lib, family[0].file, "--no-similarity"],
                       capture_output=True, text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    [line] = [x for x in p.stderr.splitlines() if x.strip()]
    written = FragmentLibrary.open(lib, create=False).stats().unreferenced_bytes
    assert written > 0 and line == f"interrupted; nothing was published; `haagenti gc {lib}` frees {written:,} B"
    assert FragmentLibrary.open(lib, create=False).models() == []
    code, out, _ = cli("stats", lib)  # the leftovers are counted apart, not as the library's fragments
    assert code == 0 and out.startswith("0 models, 0 fragments (0 plain, 0 delta)") and f"other fragments, {written:,} B, no model references" in out
    code, out, _ = cli("gc", lib)
    assert code == 0 and f"{written:,} B freed" in out


def test_help_renders_flags_as_flags_and_names_the_formats():
    code, out, _ = cli("ingest", "--help")
    assert code == 0 and "<bool>" not in out and "--each " in out and "--replace " in out
    assert "the family the model belongs to" in out
    for fmt in ("safetensors", "GGUF", "ONNX", "PyTorch checkpoints", "diffusers"):
        assert fmt in out
    assert "<bool>" not in cli("restore", "--help")[1]


def test_make_family_reuses_a_family_trained_for_another_folder(tmp_path, family, monkeypatch):
    """The session's family was trained (once per machine) into the test cache: a new folder
    gets a copy, with no training."""
    from tests.conftest import TEST_CACHE

    monkeypatch.setenv("HAAGENTI_CACHE", TEST_CACHE)
    code, out, err = cli("examples", "make-family", tmp_path / "fam", "--small")
    assert code == 0 and "reusing the family trained before (same settings and code), copied into" in out, out + err
    assert "training" not in err
    for m in family:
        assert sha256(tmp_path / "fam" / os.path.basename(m.file)) == sha256(m.file)


def test_onnx_export_says_nothing_about_torchs_insides(tmp_path, capfd):
    """`examples export` printed torch.export's FutureWarning on every ONNX export (and the
    exporter's torchvision notices once per process): not the user's business."""
    import warnings

    import torch

    from haagenti.exports import export_onnx

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        export_onnx(torch.nn.Sequential(torch.nn.Linear(64, 8)), str(tmp_path / "m.onnx"))
    assert [str(w.message) for w in said] == [] and "torchvision" not in capfd.readouterr().err
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_examples_ladder_writes_the_quantization_ladder_and_stats_counts_its_predictions(tmp_path, family, exports):
    """`examples ladder` writes the same files as the exports fixture's ladder (F16, then five
    quantizations of its values); ingested in order, `stats` says how many were predicted."""
    code, out, err = cli("examples", "ladder", family[0].file, tmp_path / "ladder")
    written = out.split()
    assert code == 0 and [os.path.basename(p) for p in written] == [os.path.basename(p) for p in exports["ladder"]], out + err
    assert all(sha256(a) == sha256(b) for a, b in zip(written, exports["ladder"]))
    lib = str(tmp_path / "lib")
    for p in written:
        assert cli("ingest", lib, p)[0] == 0
    code, out, err = cli("stats", lib)
    assert code == 0 and "quantized blocks predicted from a float source" in out, out + err
    assert cli("examples", "ladder", tmp_path / "nothing.safetensors", tmp_path / "x")[0] == 1


def test_dense_quantized_range_codes_gguf_blocks_only_when_asked(tmp_path, exports):
    """The default keeps quantized blocks in their planes (restore ~2-3x faster); --dense-quantized
    range-codes them where smaller, and both restore bit-exact."""
    rows = {}
    for flags in ((), ("--dense-quantized",)):
        lib, out = str(tmp_path / f"lib{len(flags)}"), tmp_path / f"out{len(flags)}"
        code, _, err = cli("ingest", lib, exports["gguf-Q8_0"], "--model-id", "q", "--no-similarity", *flags)
        assert code == 0, err
        rows[flags] = FragmentLibrary.open(lib, create=False).store.read("fragments").to_pylist()
        assert cli("restore", lib, "q", out)[0] == 0
        assert (out / os.path.basename(exports["gguf-Q8_0"])).read_bytes() == open(exports["gguf-Q8_0"], "rb").read()
    assert not any(r["codec"].startswith("rans") for r in rows[()])
    dense = [r for r in rows[("--dense-quantized",)] if r["codec"].startswith("rans2:")]
    assert dense and all(r["dtype"] == "Q8_0" for r in dense)
    assert sum(len(r["blob"]) for r in rows[("--dense-quantized",)]) < sum(len(r["blob"]) for r in rows[()])


def test_a_command_leaves_pandas_unimported_and_to_pandas_still_works(tmp_path, family):
    """pyarrow imports pandas at its first array from Python objects, only to ask whether they are
    pandas objects: 0.2-0.3 s of CPU in every short command. The console entry answers that one
    look "absent"; a later to_pandas still imports pandas and converts."""
    lib = str(tmp_path / "lib")
    assert cli("ingest", lib, family[0].file, "--no-similarity")[0] == 0
    code = ("import sys\nfrom haagenti.cli import main\n"
            f"sys.argv = ['haagenti', 'stats', {lib!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('pandas' in sys.modules)\n"
            "import pyarrow as pa\nprint(pa.table({'a': [1, 2]}).to_pandas()['a'].sum())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-2:] == ["False", "3"], p.stdout
