"""The command line as a user runs it: a subprocess, one-line errors, non-zero exits."""
import json
import subprocess
import sys

from tests.helpers import sha256


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "haagenti.cli", *args], capture_output=True, text=True)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def test_cli_round_trip(tmp_path, family):
    lib = str(tmp_path / "lib")
    base, ft = family[0], family[1]
    out = run("ingest", lib, base.file, "--model-id", "base", "--family", "digits", "--fragment-size", "65536").stdout
    assert "ingested base" in out
    run("ingest", lib, ft.file, "--model-id", "ft", "--family", "digits", "--fragment-size", "65536")
    stats = json.loads(run("stats", lib, "--json").stdout)
    assert stats["models"] == 2 and stats["reduction"] > 0
    assert "family digits" in run("stats", lib).stdout
    assert "ok:" in run("verify", lib).stdout
    run("restore", lib, "ft", str(tmp_path / "out"))
    assert sha256(tmp_path / "out" / "digits-ft-lr1e-4.safetensors") == sha256(ft.file)
    run("rm", lib, "base")
    assert "fragments removed" in run("gc", lib).stdout
    run("verify", lib, "ft")


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
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False", p.stdout + p.stderr
