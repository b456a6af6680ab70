"""The dedup pipeline: local and Ray executors, S3, incremental re-runs, faults."""
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest
import yaml
from safetensors.torch import load_file, save_file

from haagenti.config import LibraryConfig
from haagenti.errors import FormatError
from haagenti.library import FragmentLibrary
from haagenti.store import LIBRARY_FORMAT_VERSION
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor, RayExecutor
from pipelines.report import write_report
from tests.helpers import restore_counting_reads, sha256, verbatim_ids

CONFIG = LibraryConfig(fragment_size=64 * 1024)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def catalog(path, members, files=None, family=True):
    doc = {"models": [{"id": m.model_id, "family": m.family if family else None, "files": [files.get(m.model_id, m.file) if files else m.file]} for m in members]}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def content(lib: FragmentLibrary, table: str, key: str) -> list[dict]:
    t = lib.store.read(table)
    return sorted(t.to_pylist(), key=lambda r: r[key])


def test_local_pipeline_incremental_reruns(tmp_path, family, monkeypatch):
    lib_url = str(tmp_path / "lib")
    cat = catalog(tmp_path / "catalog.yaml", family, family=False)
    first = run_dedup(cat, lib_url, LocalExecutor(), CONFIG)
    assert first.added == [m.model_id for m in family] and first.delta_fragments > 0
    lib = FragmentLibrary.open(lib_url)
    assert {m["format_version"] for m in lib.models()} == {LIBRARY_FORMAT_VERSION}
    for m in family:
        [p] = lib.restore(m.model_id, str(tmp_path / "out" / m.model_id))
        assert sha256(p) == sha256(m.file)
    # Each model's new fragments have row groups of their own: the unrelated model reads only its rows.
    seen, rows_read = restore_counting_reads(lib, "unrelated", str(tmp_path / "out-again"), monkeypatch)
    assert rows_read["fragments"] == len(seen) == len(lib.manifest("unrelated").fragment_ids | verbatim_ids(lib, "unrelated"))
    # No family was declared: the family is inferred from shared and delta-referenced fragments.
    inferred = first.inferred_families
    assert inferred["unrelated"] is None
    assert {inferred[m.model_id] for m in family if m.model_id != "digits-base" and m.model_id != "unrelated"} == {"digits-base"}
    again = run_dedup(cat, lib_url, LocalExecutor(), CONFIG)
    assert again.nothing_to_do and "nothing to do" in again.summary()
    # Change one model, drop another: only those are processed.
    state = load_file(family[-1].file)
    name = sorted(state)[0]
    state[name] = state[name] * 2
    changed = tmp_path / "unrelated-v2.safetensors"
    save_file(state, str(changed))
    cat2 = catalog(tmp_path / "catalog2.yaml", [m for m in family if m.model_id != "digits-ft-lr1e-3"], {"unrelated": str(changed)}, family=False)
    third = run_dedup(cat2, lib_url, LocalExecutor(), CONFIG, prune=True)
    assert third.replaced == ["unrelated"] and third.removed == ["digits-ft-lr1e-3"] and third.added == []
    lib = FragmentLibrary.open(lib_url)
    [p] = lib.restore("unrelated", str(tmp_path / "out2"))
    assert sha256(p) == sha256(changed)
    assert "digits-ft-lr1e-3" not in {m["model_id"] for m in lib.models()}
    assert lib.verify().ok
    paths = write_report(lib, third)
    assert os.path.getsize(paths["report.html"]) > 10_000 and "replaced 1" in open(paths["report.txt"]).read()


def test_local_executor_on_threads_builds_the_same_tables(tmp_path, family):
    from pipelines.executors import make_executor

    cat = catalog(tmp_path / "catalog.yaml", family)
    run_dedup(cat, str(tmp_path / "one"), LocalExecutor(), CONFIG)
    with make_executor("local", workers=2) as executor:  # `dedup --executor local --workers 2`
        assert executor.workers.threads == 2
        run_dedup(cat, str(tmp_path / "two"), executor, CONFIG)
    a, b = FragmentLibrary.open(str(tmp_path / "one")), FragmentLibrary.open(str(tmp_path / "two"))
    for table, key in (("fragments", "fragment_id"), ("signatures", "fragment_id"), ("models", "model_id")):
        rows = [[{k: v for k, v in r.items() if k not in ("ingest_id", "record_digest")} for r in content(lib, table, key)] for lib in (a, b)]
        assert rows[0] == rows[1], table


@pytest.mark.timeout(600)
def test_ray_pipeline_on_s3_is_identical_to_local(tmp_path, family, bucket, ray_cluster):
    from haagenti.fsio import filesystem_for

    fs, _ = filesystem_for(f"s3://{bucket}")
    remote = {}
    for m in family:
        fs.put(m.file, f"{bucket}/models/{os.path.basename(m.file)}")
        remote[m.model_id] = f"s3://{bucket}/models/{os.path.basename(m.file)}"
    local_cat = catalog(tmp_path / "catalog.yaml", family)
    fs.put(catalog(tmp_path / "remote.yaml", family, remote), f"{bucket}/catalog.yaml")
    s3_lib = f"s3://{bucket}/lib"
    ray_run = run_dedup(f"s3://{bucket}/catalog.yaml", s3_lib, RayExecutor(), CONFIG)
    local_run = run_dedup(local_cat, str(tmp_path / "lib"), LocalExecutor(), CONFIG)
    assert ray_run.stored_bytes_added == local_run.stored_bytes_added
    a, b = FragmentLibrary.open(s3_lib), FragmentLibrary.open(str(tmp_path / "lib"))
    for table, key in (("fragments", "fragment_id"), ("signatures", "fragment_id")):
        assert content(a, table, key) == content(b, table, key), table
    for m in family:
        [p] = a.restore(m.model_id, str(tmp_path / "from-s3" / m.model_id))
        assert sha256(p) == sha256(m.file)
    assert write_report(a, ray_run)["report.json"].startswith("s3://")


@pytest.mark.timeout(600)
def test_worker_killed_mid_run_is_retried_with_identical_output(tmp_path, family, ray_cluster, monkeypatch):
    members = family[:3]
    cat = catalog(tmp_path / "catalog.yaml", members)
    marker = tmp_path / "killed"
    monkeypatch.setenv("HAAGENTI_CHAOS", f"encode:{marker}")
    run_dedup(cat, str(tmp_path / "disturbed"), RayExecutor(), CONFIG)
    assert marker.exists()  # a worker really died (SIGKILL) in the encode step
    monkeypatch.delenv("HAAGENTI_CHAOS")
    run_dedup(cat, str(tmp_path / "calm"), LocalExecutor(), CONFIG)
    a, b = FragmentLibrary.open(str(tmp_path / "disturbed")), FragmentLibrary.open(str(tmp_path / "calm"))
    rows = content(a, "fragments", "fragment_id")
    assert len({r["fragment_id"] for r in rows}) == len(rows)  # no duplicates
    assert rows == content(b, "fragments", "fragment_id")  # nothing missing, nothing different
    assert a.verify().ok


def test_job_killed_mid_write_keeps_last_snapshot_and_next_run_finishes(tmp_path, family):
    lib_url = str(tmp_path / "lib")
    run_dedup(catalog(tmp_path / "c1.yaml", family[:2]), lib_url, LocalExecutor(), CONFIG)
    cat = catalog(tmp_path / "c2.yaml", family[:4])
    env = dict(os.environ, HAAGENTI_CHAOS=f"after-fragments:{tmp_path / 'marker'}")
    p = subprocess.run([sys.executable, "-m", "jobs.dedup", "--executor", "local", "--catalog", cat, "--library", lib_url, "--fragment-size", "65536"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr  # SIGKILL between the fragment commit and the publish
    lib = FragmentLibrary.open(lib_url)
    assert [m["model_id"] for m in lib.models()] == [m.model_id for m in family[:2]]
    assert lib.verify().ok
    for m in family[:2]:
        [out] = lib.restore(m.model_id, str(tmp_path / "o" / m.model_id))
        assert sha256(out) == sha256(m.file)
    resumed = run_dedup(cat, lib_url, LocalExecutor(), CONFIG)
    assert resumed.added == [m.model_id for m in family[2:4]]
    calm = str(tmp_path / "calm")
    run_dedup(catalog(tmp_path / "c1b.yaml", family[:2]), calm, LocalExecutor(), CONFIG)
    run_dedup(cat, calm, LocalExecutor(), CONFIG)
    lib, ref = FragmentLibrary.open(lib_url), FragmentLibrary.open(calm)
    assert content(lib, "fragments", "fragment_id") == content(ref, "fragments", "fragment_id")
    for m in family[:4]:
        [out] = lib.restore(m.model_id, str(tmp_path / "r" / m.model_id))
        assert sha256(out) == sha256(m.file)


def test_a_file_changed_between_scan_and_fragmenting_is_refused(tmp_path, family):
    """Restores check a file's layout (its fragment ids), not its bytes, so the bytes cut must
    be the bytes whose tree the scan recorded."""
    from pipelines.steps import FragmentModel, scan_model

    path = tmp_path / "m.safetensors"
    shutil.copy(family[0].file, path)
    scanned = scan_model({"model_id": "m", "files": [str(path)], "family": None, "revision": None, "rank": 0}, CONFIG.fragment_elements)
    assert FragmentModel(CONFIG)(scanned)  # unchanged: fragments as scanned
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="changed between the scan and fragmenting"):
        FragmentModel(CONFIG)(scanned)


def test_sign_and_encode_steps_take_carried_bytes_as_the_ranges_they_read(tmp_path, family):
    """An executor in the driver's process carries fragments' bytes in the `data` column; the
    steps then read nothing, and give what they give from byte ranges."""
    from haagenti.formats.source import RangeReader
    from haagenti.ingest_steps import ASSIGNMENT_SCHEMA, EncodeFragments, SignFragments
    from pipelines.steps import FragmentModel, scan_model

    scanned = scan_model({"model_id": "m", "files": [family[0].file], "family": None, "revision": None, "rank": 0}, CONFIG.fragment_elements)
    _, occ = FragmentModel(CONFIG)(scanned)
    occ = occ.filter(occ["signs"]).slice(0, 6)
    reader = RangeReader()
    data = pa.array([reader.read(r["url"], r["byte_offset"], r["byte_len"]) for r in occ.to_pylist()], pa.binary())
    carried = occ.set_column(occ.schema.get_field_index("data"), "data", data)
    carried = carried.set_column(carried.schema.get_field_index("url"), "url", pa.array(["/nowhere"] * occ.num_rows))
    assert SignFragments(CONFIG.signature)(carried) == SignFragments(CONFIG.signature)(occ)
    lib_url = str(tmp_path / "lib")
    FragmentLibrary.open(lib_url, CONFIG)
    no_refs = {c: [[]] * occ.num_rows for c in ASSIGNMENT_SCHEMA.names if c.startswith("ref_")}
    ranged, held = (pa.table({**{c: t[c] for c in ASSIGNMENT_SCHEMA.names if c in t.column_names}, **no_refs}, schema=ASSIGNMENT_SCHEMA) for t in (occ, carried))
    assert EncodeFragments(lib_url, CONFIG)(held) == EncodeFragments(lib_url, CONFIG)(ranged)


def test_bad_catalog_is_a_clear_error(tmp_path):
    from pipelines.catalog import CatalogError, read_catalog

    (tmp_path / "c.yaml").write_text("models:\n  - id: ../evil\n    files: [x]\n")
    with pytest.raises(Exception, match="invalid model id"):
        read_catalog(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("models: 3\n")
    with pytest.raises(CatalogError, match="models"):
        read_catalog(str(tmp_path / "d.yaml"))
    (tmp_path / "e.yaml").write_text("models:\n  - {id: a, files: [x]}\n  - {id: a, files: [y]}\n")
    with pytest.raises(CatalogError, match="twice"):
        read_catalog(str(tmp_path / "e.yaml"))


def test_parquet_catalog(tmp_path, family):
    import pyarrow.parquet as pq

    from pipelines.catalog import read_catalog

    pq.write_table(pa.table({"id": [family[0].model_id], "family": ["digits"], "files": [[family[0].file]], "revision": ["main"]}), str(tmp_path / "c.parquet"))
    [entry] = read_catalog(str(tmp_path / "c.parquet")).entries
    assert entry.model_id == family[0].model_id and entry.files == (family[0].file,) and entry.revision == "main"


def test_cluster_yaml_declares_cpu_and_gpu_workers():
    doc = yaml.safe_load(open(os.path.join(REPO, "cluster.yaml")))
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types and {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("pip install -e" in c for c in doc["setup_commands"]) and any("torch==2.13.0" in c for c in doc["setup_commands"])
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert doc["provider"]["type"] == "aws"


@pytest.mark.timeout(300)
def test_ray_pipeline_runs_on_a_one_cpu_cluster(tmp_path, family):
    """A 1-CPU cluster (where the first, Ray Data based executor stalled) finishes the job;
    started as the suite's session cluster is (init_local_ray), it leaves no token file in ~."""
    cat = catalog(tmp_path / "catalog.yaml", family[:2])
    script = (
        "import sys\n"
        "from pipelines.executors import RayExecutor, init_local_ray\n"
        "init_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "from pipelines.dedup import run_dedup\n"
        "from haagenti.config import LibraryConfig\n"
        "r = run_dedup(sys.argv[1], sys.argv[2], RayExecutor(), LibraryConfig(fragment_size=65536))\n"
        "print(r.summary())\n"
    )
    home = tmp_path / "home"  # where Ray would leave ~/.ray/auth_token
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    p = subprocess.run([sys.executable, "-c", script, cat, str(tmp_path / "lib")], cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "added 2" in p.stdout and not (home / ".ray" / "auth_token").exists()
    assert "Token authentication" not in p.stderr, p.stderr  # Ray's warning that it chose token auth by default
    lib = FragmentLibrary.open(str(tmp_path / "lib"), create=False)
    for m in family[:2]:
        [out] = lib.restore(m.model_id, str(tmp_path / "out" / m.model_id))
        assert sha256(out) == sha256(m.file)


def test_the_pipeline_records_the_opt_in_whole_file_blake3_as_the_library_path_does(tmp_path, family):
    """files.blake3 is opt-in on both paths (LibraryConfig.file_blake3; `--file-blake3`): the
    pipeline's cut computes it from the pieces it cuts, and its models rows equal the library's."""
    from blake3 import blake3

    whole = LibraryConfig(fragment_size=64 * 1024, file_blake3=True)
    m = family[0]
    run_dedup(catalog(tmp_path / "catalog.yaml", [m]), str(tmp_path / "piped"), LocalExecutor(), whole)
    lib = FragmentLibrary.open(str(tmp_path / "lib"), whole)
    lib.ingest([m.file], m.model_id, m.family)
    rows = [FragmentLibrary.open(str(tmp_path / d), create=False).model(m.model_id) for d in ("piped", "lib")]
    keys = ("files", "content_hash", "raw_bytes", "n_tensors", "lossy")
    assert [{k: r[k] for k in keys} for r in rows][0] == {k: rows[1][k] for k in keys}
    assert rows[0]["files"][0]["blake3"] == blake3(open(m.file, "rb").read()).hexdigest()
