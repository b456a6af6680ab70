"""The library and the pipeline are one ingest: the same catalog through `haagenti ingest --each`,
`haagenti dedup --executor local` and `haagenti dedup` on Ray gives the same tables."""
import os
import subprocess
import sys

import pytest

from haagenti.library import FragmentLibrary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Row order of each table (contents are compared as sorted rows, every column).
KEYS = {
    "fragments": ("fragment_id",),
    "signatures": ("fragment_id",),
    "manifests": ("model_id", "tensor_index", "fragment_seq"),
    "models": ("model_id",),
}


def haagenti(*commands: list[str]) -> None:
    """Each command a `haagenti` process, all at once (each writes its own library): each must exit 0."""
    procs = [subprocess.Popen([sys.executable, "-m", "haagenti.cli", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    for p in procs:
        out, err = p.communicate(timeout=500)
        assert p.returncode == 0, out[-2000:] + err[-3000:]


def tables(url: str) -> dict[str, list[dict]]:
    """Every table's rows, sorted. `family` is left out of models rows: the pipeline infers a
    family for a catalog entry without one (from shared fragments), `ingest` takes a single
    --family for every file; nothing else may differ (ids, encodings, references, blobs, layouts,
    ingest order). `ingest_id` names the run that wrote a row, a fresh id per run: it is checked
to be one id for all manifests and models rows of the run, then left out too, and so is the
record digest that covers it, once each model's record is checked against its digest."""
    lib = FragmentLibrary.open(url, create=False)
    out = {}
    runs = set()
    for name, key in KEYS.items():
        rows = lib.store.read(name).to_pylist()
        for r in rows:
            r.pop("family", None)
            if name in ("manifests", "models"):
                runs.add(r.pop("ingest_id"))
            if name == "models":
                lib.manifest(r["model_id"])  # raises unless the record matches its digest
                r.pop("record_digest")
        out[name] = sorted(rows, key=lambda r: tuple(r[k] for k in key))
    assert len(runs) == 1, runs
    return out


@pytest.mark.timeout(900)
def test_ingest_each_local_dedup_and_ray_dedup_build_identical_tables(tmp_path, family):
    catalog = os.path.join(os.path.dirname(family[0].file), "catalog.yaml")
    files = [os.path.abspath(m.file) for m in family]  # the catalog's files, in its order
    haagenti(["ingest", str(tmp_path / "ingest"), *files, "--each"],
             ["dedup", catalog, "--library", str(tmp_path / "local"), "--executor", "local"],
             ["dedup", catalog, "--library", str(tmp_path / "ray"), "--executor", "ray", "--workers", "1"])
    ingest, local, ray = (tables(str(tmp_path / d)) for d in ("ingest", "local", "ray"))
    assert len(ingest["models"]) == len(family)
    frags = ingest["fragments"]
    assert {r["encoding"] for r in frags} > {"plain"} and any(r["ref_id"] for r in frags)  # deltas were chosen
    for name in KEYS:
        assert local[name] == ingest[name], name
        assert ray[name] == ingest[name], name


def test_both_paths_commit_in_the_one_order(tmp_path, family, monkeypatch):
    """docs/format.md: chunks of (signatures, fragments), then manifests, then models last; each
    chunk's fragment rows in one run of row groups per model."""
    import re

    import yaml

    from haagenti.config import LibraryConfig
    from haagenti.library import ModelInput
    from haagenti.store import LibraryStore
    from pipelines.dedup import run_dedup
    from pipelines.executors import LocalExecutor

    commits: list[tuple[str, int]] = []
    real = LibraryStore.append

    def logged(self, name, rows, note="", runs=None, **kw):
        commits.append((name, len(runs or [rows.num_rows])))
        return real(self, name, rows, note, runs, **kw)

    monkeypatch.setattr(LibraryStore, "append", logged)
    small = LibraryConfig(fragment_size=64 * 1024, batch_bytes=2 * 1024 * 1024)  # several chunks
    FragmentLibrary.open(str(tmp_path / "lib"), small).ingest_many([ModelInput([m.file], m.model_id) for m in family])
    by_library, commits[:] = list(commits), []
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"id": m.model_id, "files": [m.file]} for m in family]}))
    run_dedup(str(catalog), str(tmp_path / "pipe"), LocalExecutor(), small)
    for log in (by_library, commits):
        names = "".join(name[0] for name, _ in log)  # s(ignatures) f(ragments) m(anifests) m(odels)
        assert re.fullmatch(r"(s?f)+mm", names), names
        assert names.count("f") > 1 and log[-2][0] == "manifests" and log[-1][0] == "models"
        assert sum(runs for name, runs in log if name == "fragments") >= len(family)  # a run per model at least
