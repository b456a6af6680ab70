"""A model's record (its files' names, formats, sizes, hashes, layouts and its manifest rows) is
verified like its fragments: a digest written in its models row at publication, checked by
every reader (restore, verify, ModelLoader, haagenti://) before it trusts a name. And the
upgrade of a format-4 library, which has no digests, to format 5."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from safetensors.numpy import save_file

from haagenti.config import LibraryConfig
from haagenti.errors import DamagedError, FragmentError, LibraryError
from haagenti.library import FragmentLibrary
from haagenti.loader import ModelLoader
from haagenti.maintenance import upgrade
from haagenti.store import LIBRARY_FORMAT_VERSION, SCHEMAS
from tests.helpers import cli, reseal

CONFIG = LibraryConfig(fragment_size=65536, similarity=False)
DIGEST = "its record does not match its digest"


def folder_model(path) -> str:
    """A small folder model: two safetensors shards and a config."""
    rng = np.random.default_rng(3)
    os.makedirs(path)
    for k in range(2):
        shapes = {f"w{k}.0": (256, 256), f"w{k}.1": (32, 32)}  # two fragments, and a part of one
        save_file({n: rng.standard_normal(s).astype(np.float16) for n, s in shapes.items()}, str(path / f"model-{k}.safetensors"))
    (path / "config.json").write_text('{"layers": 2}')
    return str(path)


def rewrite(lib, table: str, model_id: str, change) -> None:
    """Replace the model's rows of `table` with change(rows) (a list of row dicts)."""
    t = lib.store.read(table, equals=("model_id", model_id))
    rows = change(t.to_pylist())
    lib.store.delete(table, f"model_id = '{model_id}'")
    lib.store.append(table, pa.Table.from_pylist(rows, schema=t.schema))


def rename(*pairs):
    def change(rows):
        names = {a: b for a, b in pairs}
        for f in rows[0]["files"]:
            f["name"] = names.get(f["name"], f["name"])
        return rows
    return change


def set_format(rows):
    next(f for f in rows[0]["files"] if f["format"] == "safetensors")["format"] = "torch"
    return rows


def shift_counts(rows):
    rows.sort(key=lambda r: (r["tensor_index"], r["fragment_seq"]))
    a, b = next((x, y) for x, y in zip(rows, rows[1:]) if x["tensor_index"] == y["tensor_index"])
    a["elem_count"] -= 1
    b["elem_offset"] -= 1
    b["elem_count"] += 1
    return rows


def swap_fragments(rows):
    rows.sort(key=lambda r: (r["tensor_index"], r["fragment_seq"]))
    a, b = next((x, y) for x, y in zip(rows, rows[1:]) if x["tensor_index"] == y["tensor_index"])
    for k in ("fragment_id", "source_fragment_id"):
        a[k], b[k] = b[k], a[k]
    return rows


FORMAT = "file {!r} is recorded as {}, which ingest never makes of a file of that name"
LAYOUT = "model-0.safetensors does not match its recorded layout"
SHORT = "fragment [0-9a-f]{64}: 65536 bytes where the manifest places 65534"
TAMPERS = {  # the tampered records of the fault campaign (issue 31): (table, change, refusal as tampered, with the digest recomputed)
    "config-renamed-deeper": ("models", rename(("config.json", "d/d/c.json")), DIGEST, None),
    "file-renamed-tilde": ("models", rename(("model-1.safetensors", "~/escape4.json")), *[FORMAT.format("~/escape4.json", "safetensors")] * 2),
    "names-swapped": ("models", rename(("model-0.safetensors", "model-1.safetensors"), ("model-1.safetensors", "model-0.safetensors")), DIGEST, None),
    "format-to-torch": ("models", set_format, *[FORMAT.format("model-0.safetensors", "torch")] * 2),
    "fragment-rows-swapped": ("manifests", swap_fragments, LAYOUT, LAYOUT),
    "counts-shifted": ("manifests", shift_counts, DIGEST, SHORT),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("resealed", [False, True], ids=["as-is", "resealed"])
def test_a_tampered_record_is_refused_by_every_reader(tmp_path, tamper, resealed):
    """As tampered, or with its digest recomputed (by someone who knows the scheme): then the
    record's own checks and the lengths of the fragments it places must refuse whatever would
    change bytes or where they go (a renamed or swapped name with its digest redone restores
    each file's own bytes under the name given)."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([folder_model(tmp_path / "m")], "m")
    table, change, as_is, checked = TAMPERS[tamper]
    rewrite(lib, table, "m", change)
    if resealed:
        reseal(lib, "m")
        if checked is None:
            return
    line = f"model 'm'.*{checked if resealed else as_is}"
    error = FragmentError if (checked if resealed else as_is) in (LAYOUT, SHORT) else DamagedError
    with pytest.raises(error, match=line):
        lib.restore("m", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    report = lib.verify()
    assert not report.ok and any(re.search(line, e) for e in report.errors), report.errors
    with pytest.raises(error, match=line):
        ModelLoader(lib, threads=1).load("m")
    with pytest.raises(error, match=line):
        lib.open_file("m", "model-0.safetensors").read()
    rc, out, err = cli("restore", str(tmp_path / "lib"), "m", str(tmp_path / "out2"))
    assert rc == 1 and re.search(line, err) and len(err.strip().splitlines()) == 1, err


def test_the_family_is_not_part_of_the_record(tmp_path):
    """A later run may record another family (pipelines infer them): the model still restores."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([folder_model(tmp_path / "m")], "m")
    lib.store.set_family("m", "other")
    assert lib.model("m")["family"] == "other"
    assert len(lib.restore("m", str(tmp_path / "out"))) == 3


def as_format_4(url: str) -> None:
    """Turn a library into what format 4 wrote: no record_digest column in its models table nor
    depth in its fragments table (nor in the tables' schemas), format_version 4 in its rows and
    its marker."""
    lib = FragmentLibrary.open(url, create=False)
    t = lib.store.read("models")
    t = t.drop_columns(["record_digest"])
    t = t.set_column(t.column_names.index("format_version"), "format_version", pa.array([4] * t.num_rows, pa.int32()))
    write_deltalake(f"{url}/models", t, mode="overwrite", schema_mode="overwrite")
    frags = lib.store.read("fragments").drop_columns(["depth"])  # format 4 had no chain depths
    write_deltalake(f"{url}/fragments", frags, mode="overwrite", schema_mode="overwrite")
    marker = json.loads(open(f"{url}/haagenti.json").read())
    open(f"{url}/haagenti.json", "w").write(json.dumps({**marker, "format_version": 4}))


def test_a_format_5_library_is_refused_until_upgraded_which_rewrites_its_marker_only(tmp_path):
    """Format 6 adds an encoding a format-5 library never holds: the upgrade rewrites the marker
    and leaves every table as it is."""
    url = str(tmp_path / "lib")
    FragmentLibrary.open(url, CONFIG).ingest([folder_model(tmp_path / "m")], "m")
    marker = json.loads(open(f"{url}/haagenti.json").read())
    open(f"{url}/haagenti.json", "w").write(json.dumps({**marker, "format_version": 5}))
    with pytest.raises(LibraryError, match=f"library format 5, this haagenti reads format {LIBRARY_FORMAT_VERSION}: run `haagenti upgrade"):
        FragmentLibrary.open(url)
    versions = {t: DeltaTable(f"{url}/{t}").version() for t in ("models", "fragments", "manifests")}
    assert upgrade(url) == []
    assert {t: DeltaTable(f"{url}/{t}").version() for t in versions} == versions
    lib = FragmentLibrary.open(url, create=False)
    assert lib.verify().ok and json.loads(open(f"{url}/haagenti.json").read())["format_version"] == LIBRARY_FORMAT_VERSION


def test_a_format_4_library_is_refused_until_upgraded_then_restores(tmp_path):
    url = str(tmp_path / "lib")
    FragmentLibrary.open(url, CONFIG).ingest([folder_model(tmp_path / "m")], "m")
    as_format_4(url)
    with pytest.raises(LibraryError, match=f"library format 4, this haagenti reads format {LIBRARY_FORMAT_VERSION}: run `haagenti upgrade"):
        FragmentLibrary.open(url)
    rc, out, err = cli("upgrade", url)
    assert rc == 0 and f"library format {LIBRARY_FORMAT_VERSION}" in out, (out, err)
    lib = FragmentLibrary.open(url, create=False)
    assert lib.verify().ok
    [row] = lib.models()
    assert row["format_version"] == LIBRARY_FORMAT_VERSION and len(row["record_digest"]) == 64
    out_dir = tmp_path / "out"
    lib.restore("m", str(out_dir), rehash=True)
    assert (out_dir / "config.json").read_text() == '{"layers": 2}'
    assert upgrade(url) == []  # a second upgrade has nothing to do
    assert "depth" in lib.store.table("fragments").schema().to_arrow().names  # reference chains' column
    rewrite(lib, "models", "m", rename(("config.json", "c.json")))  # and the digest now protects it
    with pytest.raises(DamagedError, match=DIGEST):
        lib.restore("m", str(tmp_path / "out3"))


def test_an_upgrade_leaves_a_model_whose_record_fails_unverifiable_and_says_so(tmp_path):
    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, CONFIG)
    lib.ingest([folder_model(tmp_path / "m")], "m")
    lib.ingest([folder_model(tmp_path / "n")], "n")
    rewrite(lib, "models", "n", rename(("config.json", "../config.json")))
    as_format_4(url)
    rc, out, err = cli("upgrade", url)
    assert rc == 0 and "1 model(s) left unverifiable" in out and "model 'n'" in err, (out, err)
    lib = FragmentLibrary.open(url, create=False)
    lib.restore("m", str(tmp_path / "out-m"))
    with pytest.raises(DamagedError, match="model 'n'"):
        lib.restore("n", str(tmp_path / "out-n"))
    lib.rm("n")  # what cannot be trusted can still be removed
    assert lib.verify().ok


def test_an_upgrade_stopped_before_its_marker_is_done_again(tmp_path, monkeypatch):
    url = str(tmp_path / "lib")
    FragmentLibrary.open(url, CONFIG).ingest([folder_model(tmp_path / "m")], "m")
    as_format_4(url)
    monkeypatch.setenv("HAAGENTI_CHAOS", f"upgraded-models=enospc:{tmp_path / 'marker'}")  # its models commit made, not its marker
    with pytest.raises(OSError):
        upgrade(url)
    with pytest.raises(LibraryError, match="run `haagenti upgrade"):
        FragmentLibrary.open(url)
    assert upgrade(url) == []
    lib = FragmentLibrary.open(url, create=False)
    assert lib.verify().ok and lib.restore("m", str(tmp_path / "out"))
    assert SCHEMAS["models"].names == lib.store.read("models").column_names
