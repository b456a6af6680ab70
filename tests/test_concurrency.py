"""Many writers on one library, as real processes: racing ingests of one model id, ingest
against gc and rm, two pipeline runs, on a local folder and on the S3 server; and writers
killed (-9), starved of disk (ENOSPC) or stalled at each commit point, each followed by a
re-ingest. After every trial the library must verify, every ingest that exited 0 must restore
bit-exact, and every refused writer must have said one line.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary, ModelInput
from tests.helpers import cli, sha256

ROOT = str(Path(__file__).resolve().parents[1])
FRAGMENT = ["--fragment-size", "65536", "--no-similarity"]
CONFIG = LibraryConfig(fragment_size=65536, similarity=False)
SIGNED = ["--fragment-size", "65536"]  # with similarity: an ingest also writes the signatures table
SIGNED_CONFIG = LibraryConfig(fragment_size=65536)
STAGGERS = [0.0, 0.15, 0.6]  # seconds between the racing writers' starts


def model_file(path: Path, seed: int, tensors: int = 4) -> str:
    """A small safetensors model: fp16 tensors of one 64 KiB fragment each."""
    rng = np.random.default_rng(seed)
    save_file({f"layer{i}.weight": rng.standard_normal((64, 512)).astype(np.float16) for i in range(tensors)}, str(path))
    return str(path)


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "haagenti.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def race(commands: list[list[str]], stagger: float) -> list[tuple[int, str, str]]:
    procs = []
    for i, cmd in enumerate(commands):
        if i:
            time.sleep(stagger)
        procs.append(start(*cmd))
    return [(p.wait(120), *p.communicate()) for p in procs]


def one_line_refusal(rc: int, out: str, err: str, *reasons: str) -> None:
    """A refused writer: exit 1, one line on stderr naming one of the expected reasons, no traceback."""
    assert rc == 1, (rc, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert any(r in lines[0] for r in reasons), lines[0]


def check(url: str, expected: dict[str, str], tmp: Path, absent: tuple[str, ...] = ()) -> FragmentLibrary:
    """The invariant: verify passes, each expected model restores bit-exact, absent ones are absent."""
    lib = FragmentLibrary.open(url, create=False)
    report = lib.verify()
    assert report.ok, report.errors
    ids = [m["model_id"] for m in lib.models()]
    assert len(ids) == len(set(ids)), ids
    for mid, path in expected.items():
        [p] = lib.restore(mid, str(tmp / f"restored-{mid}-{time.monotonic_ns()}"))
        assert sha256(p) == sha256(path), mid
    assert not set(absent) & set(ids)
    return lib


def no_stray_files(url: str) -> None:
    """Every data file of every table is in its latest version; no unpublished manifest rows; no leases."""
    lib = FragmentLibrary.open(url, create=False)
    fs, root = lib.store.fs, lib.store.root
    for name in ("fragments", "signatures", "manifests", "models"):
        listed = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{name}", detail=False) if p.endswith(".parquet")}
        assert listed == {p.rsplit("/", 1)[-1] for p in lib.store.table(name).file_uris()}, name
    assert lib.verify().unpublished_manifests == 0
    assert lib.store.leases.all() == []


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A library URL prefix: a local folder, or a bucket on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "lib")
    import boto3

    endpoint = request.getfixturevalue("s3_server")
    bucket = ("hgc-" + re.sub("[^a-z0-9]+", "-", request.node.name.lower()))[:60].strip("-")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/lib"


# ---- racing writers ------------------------------------------------------------------------
@pytest.mark.parametrize("same_file", [True, False], ids=["same-file", "different-files"])
def test_same_id_ingests_one_wins(tmp_path, where, same_file):
    a, b = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "b.safetensors", 2)
    for trial, stagger in enumerate(STAGGERS):
        url = f"{where}-{trial}"
        FragmentLibrary.open(url, CONFIG)  # the race is over the model id, not over creating the library
        files = [a, a if same_file else b]
        results = race([["ingest", url, f, "--model-id", "m", *FRAGMENT] for f in files], stagger)
        winners = [f for f, (rc, out, _) in zip(files, results) if rc == 0 and "nothing to do" not in out]
        assert len(winners) == 1, results
        for rc, out, err in results:
            if rc:  # the same file again, once published, is no error: "nothing to do"
                one_line_refusal(rc, out, err, "is being ingested by another writer", "with other bytes", "published by another writer")
            elif "nothing to do" in out:
                assert same_file, results
        check(url, {"m": winners[0]}, tmp_path)


GC_LOOP = """
import os, sys
from haagenti.errors import HaagentiError
from haagenti.library import FragmentLibrary, ModelInput
url, stop = sys.argv[1], sys.argv[2]
ran, refused = 0, []
while not os.path.exists(stop):
    try:
        FragmentLibrary.open(url, create=False).gc()
        ran += 1
    except HaagentiError as e:
        refused.append(str(e))
print(ran, len(refused), refused[-1] if refused else "")
"""


def test_ingest_races_a_gc_loop_and_nothing_it_references_is_collected(tmp_path, where):
    """gc runs back to back in another process for the whole ingest (a scheduled gc next to
    ad-hoc ingests): the ingest's new fragments, committed before its models row, and the
    fragments it reuses from a removed model are never collected under it."""
    a, c, d = (model_file(tmp_path / f"{n}.safetensors", seed, tensors=12) for n, seed in (("a", 1), ("c", 3), ("d", 5)))
    for trial in range(2):
        url = f"{where}-{trial}"
        lib = FragmentLibrary.open(url, CONFIG)
        lib.ingest_many([ModelInput([a], "a"), ModelInput([c], "c")])
        lib.rm("c")
        stop = tmp_path / f"stop-{trial}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        loop = subprocess.Popen([sys.executable, "-c", GC_LOOP, url, str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(0.5 * trial)
        results = [_run("ingest", url, f, "--model-id", mid, *FRAGMENT) for mid, f in (("b", c), ("d", d))]
        stop.touch()
        out, err = loop.communicate(timeout=120)
        assert loop.returncode == 0, err
        ran, refused, last = out.split(" ", 2)
        assert int(ran) > 0, out  # gc did run between and around the ingests
        assert int(refused) == 0 or "gc refused: the library is in use (ingest of" in last, last
        assert [rc for rc, _, _ in results] == [0, 0], results  # an ingest waits for a gc ahead of it
        check(url, {"a": a, "b": c, "d": d}, tmp_path, absent=("c",))


def test_gc_waits_for_a_running_ingest_when_asked(tmp_path):
    url = str(tmp_path / "lib")
    a = model_file(tmp_path / "a.safetensors", 1)
    FragmentLibrary.open(url, CONFIG).ingest([a], "a")
    FragmentLibrary.open(url).rm("a")
    # A running ingest stalled at its manifests commit holds its lease while gc waits.
    stalled = start("ingest", url, a, "--model-id", "b", *FRAGMENT, env={"HAAGENTI_CHAOS": f"commit-manifests=stop:{tmp_path / 'm'}"})
    _wait_stopped(stalled)
    one_line_refusal(*_run("gc", url), "gc refused")
    waiting = start("gc", url, "--wait", "60")
    time.sleep(1.0)
    assert waiting.poll() is None  # still waiting
    os.kill(stalled.pid, signal.SIGCONT)
    assert stalled.wait(60) == 0, stalled.communicate()
    assert waiting.wait(60) == 0, waiting.communicate()
    check(url, {"b": a}, tmp_path, absent=("a",))


def test_ingest_races_rm_of_the_same_id(tmp_path, where):
    """rm of a published model against a new ingest of its id (new content): whatever the order,
    rm never takes the new ingest's rows and a successful ingest is restorable."""
    a, a2 = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "a2.safetensors", 4)
    for trial, stagger in enumerate(STAGGERS):
        url = f"{where}-{trial}"
        FragmentLibrary.open(url, CONFIG).ingest([a], "a")
        (rc_rm, *rm), (rc_i, *ing) = race([["rm", url, "a"], ["ingest", url, a2, "--model-id", "a", *FRAGMENT]], stagger)
        if rc_rm:
            one_line_refusal(rc_rm, *rm, "is being ingested by another writer")
        if rc_i:
            one_line_refusal(rc_i, *ing, "with other bytes", "is being removed by another writer")
        expected = {"a": a2} if rc_i == 0 else {} if rc_rm == 0 else {"a": a}
        check(url, expected, tmp_path, absent=() if expected else ("a",))


def test_two_pipeline_runs_on_one_library(tmp_path, where):
    files = [model_file(tmp_path / f"p{i}.safetensors", 10 + i) for i in range(3)]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("models:\n" + "".join(f"  - id: p{i}\n    files: [{f}]\n" for i, f in enumerate(files)))
    for trial, stagger in enumerate(STAGGERS[:2]):
        url = f"{where}-{trial}"
        cmd = ["dedup", str(catalog), "--library", url, "--executor", "local"]
        results = race([cmd, cmd], stagger)
        assert any(rc == 0 for rc, _, _ in results), results
        for rc, out, err in results:
            if rc:
                one_line_refusal(rc, out, err, "is being ingested by another writer")
            else:
                assert "added 3" in out or "nothing to do" in out, out
        check(url, {f"p{i}": f for i, f in enumerate(files)}, tmp_path)


def test_ingests_of_different_models_all_succeed(tmp_path, where):
    files = [model_file(tmp_path / f"d{i}.safetensors", 20 + i) for i in range(3)]
    results = race([["ingest", where, f, "--model-id", f"d{i}", *FRAGMENT] for i, f in enumerate(files)], 0.0)
    assert all(rc == 0 for rc, _, _ in results), results
    check(where, {f"d{i}": f for i, f in enumerate(files)}, tmp_path)


# ---- interrupted writers -------------------------------------------------------------------
KILL_POINTS = [
    "write-fragments", "commit-fragments", "committed-fragments", "committed-signatures",
    "commit-manifests", "committed-manifests", "commit-models", "published",
]


def _run(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    p = start(*args, env=env)
    return (p.wait(120), *p.communicate())


def _wait_stopped(p: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    raise AssertionError("the writer never reached its stop point")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_ingest_killed_at_each_commit_point_then_reingested(tmp_path, point):
    url = str(tmp_path / "lib")
    a, b = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "b.safetensors", 2)
    FragmentLibrary.open(url, SIGNED_CONFIG).ingest([a], "a")
    rc, out, err = _run("ingest", url, b, "--model-id", "b", *SIGNED, env={"HAAGENTI_CHAOS": f"{point}:{tmp_path / 'marker'}"})
    assert rc == -signal.SIGKILL, (rc, out, err)
    published = point == "published"
    lib = check(url, {"a": a, **({"b": b} if published else {})}, tmp_path, absent=() if published else ("b",))
    s = lib.stats()  # an interrupted ingest's rows are not counted as the models' storage (on disk they are, until gc)
    assert s.stored_reduction >= 0 and all(m.reduction >= 0 for m in s.per_model)
    if not published:  # the next run finishes the work (the killed writer's lease is void: its process is gone)
        FragmentLibrary.open(url, SIGNED_CONFIG).ingest([b], "b")
    check(url, {"a": a, "b": b}, tmp_path)
    FragmentLibrary.open(url).gc()  # collects the killed writer's files and rows at once
    no_stray_files(url)
    check(url, {"a": a, "b": b}, tmp_path)


@pytest.mark.parametrize("point", ["write-fragments", "write-signatures", "commit-manifests", "write-models", "commit-models"])
def test_ingest_out_of_disk_at_each_write_leaves_nothing_behind(tmp_path, point):
    url = str(tmp_path / "lib")
    a, b = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "b.safetensors", 2)
    FragmentLibrary.open(url, SIGNED_CONFIG).ingest([a], "a")
    rc, out, err = _run("ingest", url, b, "--model-id", "b", *SIGNED, env={"HAAGENTI_CHAOS": f"{point}=enospc:{tmp_path / 'marker'}"})
    one_line_refusal(rc, out, err, "No space left on device")
    check(url, {"a": a}, tmp_path, absent=("b",))
    lib = FragmentLibrary.open(url, SIGNED_CONFIG)
    for name in ("fragments", "signatures", "manifests", "models"):  # the failed append removed its file
        assert {p.name for p in (tmp_path / "lib" / name).glob("*.parquet")} == {p.rsplit("/", 1)[-1] for p in lib.store.table(name).file_uris()}
    lib.ingest([b], "b")
    check(url, {"a": a, "b": b}, tmp_path)
    lib.gc()
    no_stray_files(url)


def test_stalled_writer_whose_lease_expired_commits_nothing(tmp_path):
    """A machine that stalls (SIGSTOP) past its lease's life: a gc may then run, and the writer,
    woken, must stop before its next commit instead of publishing fragments gc removed."""
    url = str(tmp_path / "lib")
    a = model_file(tmp_path / "a.safetensors", 1)
    FragmentLibrary.open(url, CONFIG).ingest([a], "a")
    FragmentLibrary.open(url).rm("a")
    env = {"HAAGENTI_LEASE_SECONDS": "4", "HAAGENTI_CHAOS": f"commit-manifests=stop:{tmp_path / 'm'}"}
    stalled = start("ingest", url, a, "--model-id", "b", *FRAGMENT, env=env)
    _wait_stopped(stalled)
    # On its own host a stopped process is alive: its lease holds until it expires.
    one_line_refusal(*_run("gc", url), "gc refused")
    time.sleep(4.5)
    assert _run("gc", url)[0] == 0  # the lease expired: gc removes the stalled writer's fragments
    os.kill(stalled.pid, signal.SIGCONT)
    rc, out, err = stalled.wait(60), *stalled.communicate()
    one_line_refusal(rc, out, err, "lease was last refreshed")
    check(url, {}, tmp_path, absent=("a", "b"))
    assert _run("ingest", url, a, "--model-id", "b", *FRAGMENT)[0] == 0
    check(url, {"b": a}, tmp_path)


def test_two_writers_creating_one_library_agree_on_its_invariants(tmp_path, where):
    """Both find no library; one stalls before writing haagenti.json while the other creates the
    library with another fragment size and stores a model. The stalled one, woken, must not
    rewrite the invariants under the stored fragments: it is refused in one line."""
    a, b = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "b.safetensors", 2)
    stalled = start("ingest", where, a, "--model-id", "a", *FRAGMENT, env={"HAAGENTI_CHAOS": f"create-marker=stop:{tmp_path / 'm'}"})
    _wait_stopped(stalled)
    assert _run("ingest", where, b, "--model-id", "b", "--fragment-size", "131072", "--no-similarity")[0] == 0
    os.kill(stalled.pid, signal.SIGCONT)
    rc, out, err = stalled.wait(60), *stalled.communicate()
    one_line_refusal(rc, out, err, "this library's fragment_size is 131072, not 65536")
    assert FragmentLibrary.open(where, create=False).config.fragment_size == 131072
    check(where, {"b": b}, tmp_path, absent=("a",))


def test_a_lease_of_another_host_holds_until_it_expires(tmp_path):
    from haagenti.store.leases import Lease

    url = str(tmp_path / "lib")
    a = model_file(tmp_path / "a.safetensors", 1)
    lib = FragmentLibrary.open(url, CONFIG)
    lib.ingest([a], "a")
    now = time.time()
    other = Lease("ingest", "f" * 32, "elsewhere", 1, now, now + 60, ["x"], ticket=1, choosing=False)
    lib.store.leases.write(other)
    one_line_refusal(*cli("gc", url), "gc refused", "ingest of x by elsewhere pid 1")  # in this process: the lease is another host's
    one_line_refusal(*cli("ingest", url, a, "--model-id", "x", *FRAGMENT), "model 'x' is being ingested by another writer (ingest of x by elsewhere")
    lib.store.leases.write(Lease(**{**other.__dict__, "expires": now - 1}))  # crashed long ago
    assert cli("gc", url)[0] == 0
    assert lib.store.leases.all() == []  # gc cleared the void lease
    check(url, {"a": a}, tmp_path)


# ---- what readers see of interrupted writes --------------------------------------------------
def test_reingest_after_orphan_manifests_restores_and_stats_ignore_them(tmp_path):
    url = str(tmp_path / "lib")
    a, b = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "b.safetensors", 2)
    FragmentLibrary.open(url, CONFIG).ingest([a], "a")
    rc, _, err = _run("ingest", url, b, "--model-id", "b", *FRAGMENT, env={"HAAGENTI_CHAOS": f"committed-manifests:{tmp_path / 'm'}"})
    assert rc == -signal.SIGKILL, err
    lib = FragmentLibrary.open(url)
    assert lib.verify().unpublished_manifests == 1
    s = lib.stats()
    assert s.models == 1 and s.stored_reduction > 0 and s.unreferenced_bytes > 0
    assert "gc removes them" in _run("verify", url)[1]
    assert _run("ingest", url, b, "--model-id", "b", *FRAGMENT)[0] == 0  # its rows never mix with the orphans
    check(url, {"a": a, "b": b}, tmp_path)
    assert lib.gc()["manifest_rows_removed"] == 4
    no_stray_files(url)


def test_verify_notices_a_vanished_models_log_entry(tmp_path, where):
    a, b = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "b.safetensors", 2)
    lib = FragmentLibrary.open(where, CONFIG)
    lib.ingest([a], "a")
    lib.ingest([b], "b")
    latest = lib.store.table("models").version()
    lib.store.fs.rm_file(f"{lib.store.root}/models/_delta_log/{latest:020d}.json")
    fresh = FragmentLibrary.open(where)
    assert [m["model_id"] for m in fresh.models()] == ["a"]
    report = fresh.verify()
    assert not report.ok and "published b" in report.errors[0] and f"{latest:020d}.json is missing" in report.errors[0]
    rc, out, err = _run("ingest", where, b, "--model-id", "c", *FRAGMENT)  # nothing is built on a damaged log
    one_line_refusal(rc, out, err, "is missing")


@pytest.mark.parametrize("point", ["deleted-ids", "deleted-fragments"])
def test_gc_stopped_between_its_deletes_then_the_removed_model_is_reingested(tmp_path, point, monkeypatch):
    """A gc stopped after one table's delete (a full disk at its next write; a kill leaves the
    same tables): no index row may outlive its fragment, or the next ingest of the same content
    says "known", stores nothing and publishes an unrestorable model."""
    url = str(tmp_path / "lib")
    a, b = model_file(tmp_path / "a.safetensors", 1), model_file(tmp_path / "b.safetensors", 2)
    lib = FragmentLibrary.open(url, SIGNED_CONFIG)
    lib.ingest([a], "a")
    lib.ingest([b], "b")
    lib.rm("b")
    monkeypatch.setenv("HAAGENTI_CHAOS", f"{point}=enospc:{tmp_path / 'marker'}")
    with pytest.raises(OSError):
        FragmentLibrary.open(url).gc()
    monkeypatch.delenv("HAAGENTI_CHAOS")
    FragmentLibrary.open(url, SIGNED_CONFIG).ingest([b], "b")
    check(url, {"a": a, "b": b}, tmp_path)
    FragmentLibrary.open(url).gc()
    check(url, {"a": a, "b": b}, tmp_path)
