"""The run report as a catalog owner reads it: a per-model table, families with totals, the
run, the same numbers as Parquet, and one self-contained HTML page that a real browser renders."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile

import pyarrow.parquet as pq
import pytest
import yaml

from haagenti.library import FragmentLibrary
from jobs.dedup import main as dedup_main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def reported(family, tmp_path_factory):
    """A local (no Ray) dedup run of three family members, the unrelated model and the fp16
    export, by a relative --library as `make demo` gives it; returns (library path, stdout)."""
    root = tmp_path_factory.mktemp("report")
    picked = [m for m in family if m.model_id in ("digits-base", "digits-ft-lr1e-4", "unrelated")]
    cat = root / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"models": [{"id": m.model_id, "family": m.family, "files": [m.file]} for m in picked]}))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert dedup_main(["--catalog", str(cat), "--library", "lib", "--executor", "local", "--fragment-size", "65536"]) == 0
            assert dedup_main(["--catalog", str(cat), "--library", "lib", "--executor", "local"]) == 0  # nothing to do
    finally:
        os.chdir(cwd)
    return root / "lib", out.getvalue()


def test_report_paths_are_absolute_and_a_no_op_run_points_at_the_last_report(reported):
    lib, out = reported
    first, again = [line for line in out.splitlines() if line.startswith("report: ")]
    assert first == f"report: {lib}/reports/report.html"
    assert again == f"report: {lib}/reports/report.html (of the last run that changed the library)"


def test_report_tables_match_the_library_and_the_parquet(reported):
    lib, _ = reported
    stats = FragmentLibrary.open(str(lib), create=False).stats()
    doc = json.loads((lib / "reports" / "report.json").read_text())
    assert doc["library"] == str(lib) and re.match(r"\d{4}-\d\d-\d\dT", doc["time"]) and doc["run"]["seconds"] > 0
    rows = pq.read_table(lib / "reports" / "report.parquet").to_pylist()
    assert [r["model_id"] for r in rows] == [m.model_id for m in stats.per_model] == [r["model_id"] for r in doc["per_model"]]
    for r, m in zip(rows, stats.per_model):
        assert (r["raw_bytes"], r["stored_bytes_added"], r["disk_bytes_added"], r["fragments"]) == (m.raw_bytes, m.new_stored_bytes, m.disk_bytes, m.fragments)
        assert r["reduction"] == pytest.approx(m.reduction) and r["lossy"] is False
    by_id = {r["model_id"]: r for r in rows}
    assert by_id["digits-ft-lr1e-4"]["closest_model"] == "digits-base" and by_id["digits-ft-lr1e-4"]["closest_share"] > 0.5
    digits = next(f for f in doc["families"] if f["family"] == "digits")
    assert digits["models"] == 2 and digits["raw_bytes"] == by_id["digits-base"]["raw_bytes"] + by_id["digits-ft-lr1e-4"]["raw_bytes"]
    assert digits["disk_bytes_added"] == by_id["digits-base"]["disk_bytes_added"] + by_id["digits-ft-lr1e-4"]["disk_bytes_added"] > 0
    text = (lib / "reports" / "report.txt").read_text()
    assert "family digits: 2 models" in text and "digits-ft-lr1e-4" in text


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium); .ci/run installs it")
def test_report_renders_in_a_headless_browser(reported):
    """The page is one file that needs nothing else (no network, no files beside it) and its
    tables render: Chromium's DOM after load holds a row per model and per family."""
    lib, _ = reported
    page = (lib / "reports" / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(?!data:)[a-z]""", page)  # nothing fetched: styles inline, the plot a data: URL
    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", (lib / "reports" / "report.html").as_uri()],
            capture_output=True, text=True, timeout=90,
        )
    assert p.returncode == 0, p.stderr[-2000:]
    models = re.search(r'<table id="per-model">.*?<tbody>(.*?)</tbody>', p.stdout, re.S)
    assert models, p.stdout[:2000]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", models.group(1))]
    assert [c[0] for c in cells] == ["digits-base", "digits-ft-lr1e-4", "unrelated"] and all(len(c) == 8 for c in cells)
    assert re.search(r'<table id="families">.*?<td>digits</td>', p.stdout, re.S)
    assert "data:image/png;base64," in p.stdout
