"""A model's record (its files' names, formats, sizes, hashes, layouts and its manifest rows) is
verified like its fragments: a digest written in its models row at publication, checked by
every reader (restore, verify, ModelLoader, haagenti://) before it trusts a name. And the
upgrade of format-4 to 7 libraries (format 4 has no digests; formats before 7 identify a file by
its whole BLAKE3; formats before 8 hold every file's verbatim bytes in its models row), and of
formats 8 and 9 (their marker only), to format 10."""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pytest
from blake3 import blake3
from deltalake import DeltaTable, write_deltalake
from safetensors.numpy import save_file

from haagenti.config import LibraryConfig
from haagenti.errors import DamagedError, FragmentError, LibraryError
from haagenti.library import FragmentLibrary
from haagenti.loader import ModelLoader
from haagenti.hashing import model_hash
from haagenti.maintenance import upgrade
from haagenti.manifest import ModelManifest
from haagenti.records import record_digest
from haagenti.store import LIBRARY_FORMAT_VERSION, SCHEMAS, LibraryStore
from tests.helpers import cli, reseal, verbatim_ids

CONFIG = LibraryConfig(fragment_size=65536, similarity=False)
WHOLE = LibraryConfig(fragment_size=65536, similarity=False, file_blake3=True)  # files.blake3 recorded, as formats 2 to 6 always did
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


def with_tokenizer(path) -> str:
    """folder_model plus a side file large enough to be stored as pieces (tokenizer.json, ~100 KB)."""
    folder_model(path)
    (path / "tokenizer.json").write_text("{" + ", ".join(f'"tok{i}": {i}' for i in range(8000)) + "}")
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


def test_crafted_verbatim_piece_ids_are_refused_in_one_line(tmp_path):
    """`files.header` names the pieces of a file's large verbatim bytes: with an unknown tag,
    cut short of a whole id, naming a piece the library lacks, or its pieces reordered, every
    reader refuses the model with one line before writing a byte; gc refuses what it cannot
    read and keeps what a record names; `stats` ends in one line."""
    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, CONFIG)
    lib.ingest([with_tokenizer(tmp_path / "m")], "m")
    pristine = lib.model("m")
    [(k, tok)] = [(k, f) for k, f in enumerate(pristine["files"]) if f["name"] == "tokenizer.json"]  # stored as pieces

    def crafted(change):
        def rows(rows):
            files = rows[0]["files"] = [dict(f) for f in pristine["files"]]
            change(files)
            return rows
        return rows

    cases = {
        "not-whole-ids": (lambda fs: fs[k].update(header=tok["header"][:-1]), DamagedError, "verbatim pieces are not whole ids"),
        "unknown-tag": (lambda fs: fs[k].update(header=b"\x07" + tok["header"][1:]), DamagedError, "neither inline nor pieces"),
        "unknown-piece": (lambda fs: fs[k].update(header=b"\x01" + bytes(32)), FragmentError, "missing from the library"),
        "pieces-reordered": (lambda fs: fs[k].update(header=tok["header"][:1] + tok["header"][33:] + tok["header"][1:33]), FragmentError,
                             "tokenizer.json does not match its recorded layout"),
    }
    for case, (change, error, line) in cases.items():
        rewrite(lib, "models", "m", crafted(change))
        with pytest.raises(error, match=line):
            lib.restore("m", str(tmp_path / "out"))
        assert not (tmp_path / "out").exists(), case
        report = lib.verify()
        assert not report.ok and any(re.search(line, e) for e in report.errors), (case, report.errors)
        if case in ("not-whole-ids", "unknown-tag"):
            with pytest.raises(DamagedError, match=line):
                lib.gc()
        if case == "unknown-piece":
            with pytest.raises(DamagedError, match="missing from the fragments table"):
                lib.gc()
        if case == "pieces-reordered":  # every piece is still named: nothing to collect
            assert lib.gc()["fragments_removed"] == 0
    rc, out, err = cli("stats", url)  # the last case's record is damaged, its table rows readable
    assert rc == 0, err
    rewrite(lib, "models", "m", crafted(cases["not-whole-ids"][0]))
    rc, out, err = cli("restore", url, "m", str(tmp_path / "out"))
    assert rc == 1 and "not whole ids" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    rc, out, err = cli("stats", url)
    assert rc == 1 and "not whole ids" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_the_family_is_not_part_of_the_record(tmp_path):
    """A later run may record another family (pipelines infer them): the model still restores."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"), CONFIG)
    lib.ingest([folder_model(tmp_path / "m")], "m")
    lib.store.set_family("m", "other")
    assert lib.model("m")["family"] == "other"
    assert len(lib.restore("m", str(tmp_path / "out"))) == 3


def as_format_7(url: str) -> None:
    """Turn a library into what format 7 wrote: each file's verbatim bytes in its models row
    (its pieces gone from the fragments table), version 7 in its rows and marker."""
    lib = FragmentLibrary.open(url, create=False)
    rows = [lib.with_verbatim(r) | {"format_version": 7} for r in lib.store.read("models").to_pylist()]
    lib.store.replace_models(pa.Table.from_pylist(rows, schema=SCHEMAS["models"]), "as format 7")
    lib.gc()  # the pieces no row names now
    marker = json.loads(open(f"{url}/haagenti.json").read())
    open(f"{url}/haagenti.json", "w").write(json.dumps({**marker, "format_version": 7}))


def as_format_6(url: str, version: int = 6) -> None:
    """Turn a library ingested with whole-file hashes into what format 6 wrote (or 5: the same
    records): each file's layout digest over its inline bytes and fragment ids, the content hash
    over the files' BLAKE3, the record digests of those, `version` in its rows and marker."""
    as_format_7(url)
    store = LibraryStore(url)
    models = store.read("models").to_pylist()
    for model in models:
        m = ModelManifest.from_rows(model, store.read("manifests", equals=("model_id", model["model_id"])))  # unchecked: as stored
        files = []
        for f, tensors in zip(m.files, m.file_tensors()):
            inline = struct.pack("<Q", len(f.header)) + f.header if f.format == "safetensors" else f.header
            ids = [r.fragment_id for t in tensors for r in t.fragments]
            h = blake3(derive_key_context="haagenti 2026-11-23 file layout v1")
            h.update(struct.pack("<QQ", len(inline), len(ids)) + inline + bytes.fromhex("".join(ids)))
            files.append(replace(f, layout=h.hexdigest()))
        m = replace(m, files=files, content_hash=model_hash([f.blake3 for f in files]))
        model.update(files=[asdict(f) for f in files], content_hash=m.content_hash, format_version=version,
                     record_digest=record_digest(m, model["ingest_id"], model["n_tensors"], model["lossy"]))
    write_deltalake(f"{url}/models", pa.Table.from_pylist(models, schema=SCHEMAS["models"]), mode="overwrite")
    marker = json.loads(open(f"{url}/haagenti.json").read())
    open(f"{url}/haagenti.json", "w").write(json.dumps({**marker, "format_version": version}))


def as_format_4(url: str) -> None:
    """Turn a library into what format 4 wrote: format 6's records without a record_digest
    column in its models table nor depth in its fragments table (nor in the tables' schemas),
    format_version 4 in its rows and its marker."""
    as_format_6(url, 4)
    store = LibraryStore(url)
    write_deltalake(f"{url}/models", store.read("models").drop_columns(["record_digest"]), mode="overwrite", schema_mode="overwrite")
    frags = store.read("fragments").drop_columns(["depth"])  # format 4 had no chain depths
    write_deltalake(f"{url}/fragments", frags, mode="overwrite", schema_mode="overwrite")


def test_a_format_6_library_is_refused_until_upgraded_which_rewrites_its_records_as_trees(tmp_path):
    """Format 7 identifies a file by its tree over its fragment ids: the upgrade checks each
    record as format 6 defined it, rewrites its layouts, content hash and digest in one models
    commit (as an ingest now records them), keeps the whole-file BLAKE3, and leaves the
    fragments and manifests as they are."""
    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, WHOLE)
    lib.ingest([folder_model(tmp_path / "m")], "m")
    [now] = lib.models()
    as_format_6(url)
    with pytest.raises(LibraryError, match=f"library format 6, this haagenti reads format {LIBRARY_FORMAT_VERSION}: run `haagenti upgrade"):
        FragmentLibrary.open(url)
    versions = {t: DeltaTable(f"{url}/{t}").version() for t in ("fragments", "manifests")}
    assert upgrade(url) == []
    assert {t: DeltaTable(f"{url}/{t}").version() for t in versions} == versions
    lib = FragmentLibrary.open(url, create=False)
    [row] = lib.models()
    keys = ("files", "content_hash", "record_digest", "format_version")
    assert {k: row[k] for k in keys} == {k: now[k] for k in keys}
    assert lib.verify().ok and json.loads(open(f"{url}/haagenti.json").read())["format_version"] == LIBRARY_FORMAT_VERSION


def test_a_format_7_library_is_refused_until_upgraded_which_stores_its_verbatim_bytes_once(tmp_path):
    """Format 8 stores each file's verbatim bytes over 16 KiB as pieces the models row names:
    the upgrade stores the pieces (one copy of what two models share) and rewrites the models
    rows and the marker; manifests and signatures stay as they are."""
    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, CONFIG)
    lib.ingest([with_tokenizer(tmp_path / "m")], "m")
    lib.ingest([str(tmp_path / "m")], "m2")  # the same files: the same verbatim bytes
    now = {r["model_id"]: r for r in lib.models()}
    as_format_7(url)
    with pytest.raises(LibraryError, match=f"library format 7, this haagenti reads format {LIBRARY_FORMAT_VERSION}: run `haagenti upgrade"):
        FragmentLibrary.open(url)
    kept = {t: DeltaTable(f"{url}/{t}").version() for t in ("manifests", "signatures")}
    n_fragments = len(DeltaTable(f"{url}/fragments").to_pyarrow_table(columns=["fragment_id"]))
    assert upgrade(url) == []
    assert {t: DeltaTable(f"{url}/{t}").version() for t in kept} == kept
    lib = FragmentLibrary.open(url, create=False)
    assert {r["model_id"]: (r["files"], r["record_digest"]) for r in lib.models()} == {k: (r["files"], r["record_digest"]) for k, r in now.items()}
    files = {f["name"]: f["header"] for f in lib.model("m")["files"]}
    assert [n for n, h in files.items() if h[0] == 1] == ["tokenizer.json"]  # pieces; the small headers stay inline
    pieces = verbatim_ids(lib, "m")
    assert len(pieces) >= 2 and len(DeltaTable(f"{url}/fragments").to_pyarrow_table(columns=["fragment_id"])) == n_fragments + len(pieces)
    assert lib.verify().ok and json.loads(open(f"{url}/haagenti.json").read())["format_version"] == LIBRARY_FORMAT_VERSION
    assert {r["format_version"] for r in lib.models()} == {LIBRARY_FORMAT_VERSION}
    lib.restore("m2", str(tmp_path / "out"), rehash=True)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "m" / "tokenizer.json").read_bytes()


def test_an_upgrade_leaves_a_format_6_record_whose_layout_lies_unverifiable(tmp_path):
    """Two fragment rows swapped, the record digest made again: only the old layout digest
    shows it, and the upgrade must not bless the record with a fresh tree."""
    url = str(tmp_path / "lib")
    FragmentLibrary.open(url, WHOLE).ingest([folder_model(tmp_path / "m")], "m")
    as_format_6(url)
    store = LibraryStore(url)
    rows = store.read("manifests").sort_by([("file_index", "ascending"), ("tensor_index", "ascending"), ("fragment_seq", "ascending")]).to_pylist()
    a, b = rows[0], rows[1]  # the first tensor's two fragments
    for k in ("fragment_id", "source_fragment_id"):
        a[k], b[k] = b[k], a[k]
    write_deltalake(f"{url}/manifests", pa.Table.from_pylist(rows, schema=SCHEMAS["manifests"]), mode="overwrite")
    [model] = store.read("models").to_pylist()
    m = ModelManifest.from_rows(model, store.read("manifests"))
    model["record_digest"] = record_digest(m, model["ingest_id"], model["n_tensors"], model["lossy"])
    write_deltalake(f"{url}/models", pa.Table.from_pylist([model], schema=SCHEMAS["models"]), mode="overwrite")
    [line] = upgrade(url)
    assert line.startswith("model 'm': left without a record digest") and "layout" in line, line
    with pytest.raises(DamagedError, match="model 'm'"):
        FragmentLibrary.open(url, create=False).restore("m", str(tmp_path / "out"))


def test_a_format_4_library_is_refused_until_upgraded_then_restores(tmp_path):
    url = str(tmp_path / "lib")
    FragmentLibrary.open(url, WHOLE).ingest([folder_model(tmp_path / "m")], "m")
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
    lib = FragmentLibrary.open(url, WHOLE)
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
    FragmentLibrary.open(url, WHOLE).ingest([folder_model(tmp_path / "m")], "m")
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


@pytest.mark.parametrize("old", [8, 9])
def test_a_format_8_or_9_library_is_refused_until_upgraded_which_rewrites_only_its_marker(tmp_path, old):
    """Formats 9 and 10 added codecs (`rans`, `rans2`), which an older haagenti would call
    damage: a format-8 or 9 library is refused until upgraded, and the upgrade rewrites
    haagenti.json alone (their rows are format 10's); its models then restore and verify."""
    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, CONFIG)
    lib.ingest([with_tokenizer(tmp_path / "m")], "m")
    store = LibraryStore(url)
    rows = [r | {"format_version": old} for r in store.read("models").to_pylist()]
    store.replace_models(pa.Table.from_pylist(rows, schema=SCHEMAS["models"]), f"as format {old}")
    marker = json.loads(open(f"{url}/haagenti.json").read())
    open(f"{url}/haagenti.json", "w").write(json.dumps({**marker, "format_version": old}))
    with pytest.raises(LibraryError, match=f"library format {old}, this haagenti reads format {LIBRARY_FORMAT_VERSION}: run `haagenti upgrade"):
        FragmentLibrary.open(url)
    tables = {t: DeltaTable(f"{url}/{t}").version() for t in ("fragments", "manifests", "models", "signatures")}
    assert upgrade(url) == []
    assert {t: DeltaTable(f"{url}/{t}").version() for t in tables} == tables
    assert json.loads(open(f"{url}/haagenti.json").read())["format_version"] == LIBRARY_FORMAT_VERSION == 10
    lib = FragmentLibrary.open(url, create=False)
    assert lib.verify().ok
    lib.restore("m", str(tmp_path / "out"), rehash=True)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "m" / "tokenizer.json").read_bytes()
