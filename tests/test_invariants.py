"""A library's invariants (fragment size, signature and matching settings) are written when it
is created and used from then on; an explicit conflicting setting is refused in one line."""
import json
import os
import subprocess
import sys

import pytest

from haagenti.config import LibraryConfig
from haagenti.errors import LibraryError
from haagenti.library import FragmentLibrary
from haagenti.signature import SignatureConfig
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "haagenti.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_invariants_are_recorded_and_used_from_then_on(tmp_path, family):
    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, LibraryConfig(fragment_size=64 * 1024))
    marker = json.loads((tmp_path / "lib" / "haagenti.json").read_text())
    assert marker["fragment_size"] == 64 * 1024 and marker["signature"]["seed"] == SignatureConfig().seed
    assert marker["thresholds"]["similar_cosine"] == 0.9 and marker["candidates"] == 2
    lib.ingest([family[0].file], "a")
    # Opened without settings, the library cuts with its own fragment size: the same file again
    # is all exact matches (with the default 256 KiB it would share nothing).
    again = FragmentLibrary.open(url)
    assert again.config.fragment_size == 64 * 1024
    report = again.ingest([family[0].file], "b")
    assert report.exact == report.fragments > len(again.manifest("b").tensors) and report.stored_bytes == 0
    assert {r.elem_count for t in again.manifest("b").tensors for r in t.fragments} <= set(range(1, 32 * 1024 + 1))


def test_conflicting_settings_are_refused_in_one_line(tmp_path, family):
    url = str(tmp_path / "lib")
    FragmentLibrary.open(url, LibraryConfig(fragment_size=64 * 1024)).ingest([family[0].file], "a")
    with pytest.raises(LibraryError, match="fragment_size is 65536, not 131072"):
        FragmentLibrary.open(url, LibraryConfig(fragment_size=128 * 1024))
    with pytest.raises(LibraryError, match="signature is bits=256"):
        FragmentLibrary.open(url, LibraryConfig(signature=SignatureConfig(seed=1)))
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"models:\n  - id: b\n    files: [{family[1].file}]\n")
    with pytest.raises(LibraryError, match="fragment_size is 65536, not 131072"):
        run_dedup(str(catalog), url, LocalExecutor(), LibraryConfig(fragment_size=128 * 1024))
    p = cli("ingest", url, family[1].file, "--fragment-size", "131072")
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "fragment_size is 65536, not 131072" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert [m["model_id"] for m in FragmentLibrary.open(url).models()] == ["a"]  # nothing written
    ok = cli("ingest", url, family[1].file, "--fragment-size", "65536")  # the library's own value is fine
    assert ok.returncode == 0, ok.stderr
