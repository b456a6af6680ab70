"""Fuzz: generated malformed model files and damaged libraries, each through the command line.

Bad input: a non-zero exit, exactly one line on stderr, no traceback, and the library's files
unchanged. A damaged library: one line naming the damage (verify: one line per finding), and
a restore that succeeds only with the original bytes. In-process (typer's CliRunner) for speed;
a few cases also run the real `python -m haagenti.cli` entrypoint."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import cli, sha256, tree_digest, verbatim_ids


def st(header: object, data: bytes = b"", raw_header: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors file from a header object (or raw header bytes), with a lying length if asked."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def valid_model() -> bytes:
    g = torch.Generator().manual_seed(0)
    import io

    from safetensors.torch import save

    return save({"a.weight": torch.randn(16, 16, generator=g).bfloat16(), "b.bias": torch.randn(16, generator=g)})


def reference_reads(body: bytes) -> bool:
    """Whether the safetensors package (the reference implementation) loads these bytes."""
    from safetensors.torch import load

    try:
        load(body)
        return True
    except Exception:
        return False


def malformed_inputs() -> list[tuple[str, str, bytes]]:
    """(case, file name, bytes): at least 100 files that are not valid models."""
    rng = random.Random(15)
    good = valid_model()
    (n,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8 : 8 + n]), good[8 + n :]
    cases: list[tuple[str, str, bytes]] = []

    def add(case: str, body: bytes, name: str = "m.safetensors") -> None:
        cases.append((case, name, body))

    # header length lies
    for L in (0, 1, 2, n - 1, n + 1, n + 7, len(good), len(good) + 1, 2**31, 2**63, 2**64 - 1, 100 * 1024 * 1024 + 1):
        add(f"length-{L}", struct.pack("<Q", L) + good[8:])
    # truncations at random points and at the edges
    for cut in sorted({0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(good) - 1} | {rng.randrange(1, len(good)) for _ in range(12)}):
        add(f"truncated-at-{cut}", good[:cut])
    add("trailing-bytes", good + b"\0" * 3)
    # header JSON that is not a safetensors header
    for i, raw in enumerate([b"{", b"{}}", b'{"a": }', b"[1, 2]", b'"str"', b"{\xff\xfe}", b'{"a": 1}', b'{"a": null}', b'{"__metadata__": {"k": 1}}', b'{"__metadata__": [1]}', b"{" + b" " * 50, b'{"a": {"dtype": "F32"}}']):
        add(f"header-json-{i}", st(None, data, raw_header=raw))
    # per-field lies on one tensor
    def lie(field: str, value: object, tensor: str = "a.weight") -> bytes:
        h = json.loads(json.dumps(header))
        if value is KeyError:
            del h[tensor][field]
        else:
            h[tensor][field] = value
        return st(h, data)

    for v in ("F4", "f32", "", "BF16 ", 7, None, ["F32"], "U128", KeyError):
        add(f"dtype-{v!r}", lie("dtype", v))
    for v in ([-1, 16], [16.0, 16], [True, 16], "16,16", None, [2**63, 0], [0, 2**64], [16, 17], [255], [2**62, 2**62], KeyError):
        add(f"shape-{v!r}", lie("shape", v))
    a0, a1 = header["a.weight"]["data_offsets"]
    for v in ([a1, a0], [a0, a1 + 2], [a0 + 2, a1 + 2], [-2, a1 - 2], [a0], [a0, a1, 0], "0,512", None, [a0, 2**63], [0.0, 512.0], KeyError):
        add(f"offsets-{v!r}", lie("data_offsets", v))
    both = json.loads(json.dumps(header))
    both["b.bias"]["data_offsets"] = both["a.weight"]["data_offsets"]
    add("overlapping-tensors", st(both, data))
    add("entry-not-object", st(dict(header, **{"a.weight": [1, 2]}), data))
    add("duplicate-names", st(None, data, raw_header=good[8 : 8 + n].replace(b'"b.bias"', b'"a.weight"', 1)))
    # random byte flips inside the header; a flip the reference implementation still reads
    # (a changed name, say) made a valid file, not a malformed one
    flips = 0
    while flips < 20:
        body = bytearray(good)
        pos = rng.randrange(8, 8 + n)
        body[pos] = rng.choice(b'{}[]",:0123456789x\x00\xff')
        if not reference_reads(bytes(body)):
            add(f"header-flip-{flips}", bytes(body))
            flips += 1
    # not safetensors at all
    add("empty-file", b"")
    add("text", b"These are notes about a model, not a model.\n" * 10)
    add("html", b"<!doctype html><html><body>404 Not Found</body></html>")
    add("zeros", b"\0" * 64)
    for i in range(6):
        add(f"junk-{i}", rng.randbytes(rng.randrange(9, 4096)))
    # pickle, under every name it hides behind
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch /tmp/haagenti-fuzz-pwned",))

    evil = pickle.dumps({"w": Boom()}, protocol=2)
    for name in ("m.pkl", "m.pickle", "m.npy", "m.joblib"):
        add(f"pickle-{name}", evil, name)
    for name in ("m.pt", "m.bin", "m.ckpt", "m.pth"):
        add(f"pickle-in-{name}", evil, name)
    add("junk-checkpoint", rng.randbytes(512), "m.pt")
    add("unknown-extension", good, "m.gguf.exe")
    return cases


INPUTS = malformed_inputs()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A library holding two real models, and their original files."""
    d = tmp_path_factory.mktemp("fuzzlib")
    g = torch.Generator().manual_seed(1)
    files = []
    for i in range(2):
        state = {f"layers.{k}.weight": torch.randn(128, 512, generator=g).bfloat16() for k in range(3)}
        state["norm.weight"] = torch.ones(512)
        p = d / f"m{i}.safetensors"
        save_file(state, str(p))
        files.append(p)
    lib = d / "lib"
    for i, p in enumerate(files):
        code, _, err = cli("ingest", lib, p, "--model-id", f"m{i}", "--fragment-size", 65536)
        assert code == 0, err
    return lib, files


def test_at_least_a_hundred_malformed_inputs():
    assert len(INPUTS) >= 100 and len({c for c, _, _ in INPUTS}) == len(INPUTS)
    # the reference implementation refuses every one named .safetensors too
    assert not [c for c, name, body in INPUTS if name.endswith(".safetensors") and reference_reads(body)]


def test_malformed_inputs_get_one_line_and_leave_the_library_unchanged(library, tmp_path):
    lib, _ = library
    before = tree_digest(lib)
    checked = 0
    for case, name, body in INPUTS:
        path = tmp_path / case.replace("/", "_") / name
        path.parent.mkdir()
        path.write_bytes(body)
        code, out, err = cli("ingest", lib, path, "--model-id", "bad")
        assert code != 0, f"{case}: accepted ({out})"
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, f"{case}: {err!r}"
        assert tree_digest(lib) == before, f"{case}: the library changed"
        checked += 1
    assert checked == len(INPUTS) and not os.path.exists("/tmp/haagenti-fuzz-pwned")
    code, out, _ = cli("verify", lib)
    assert code == 0 and "2 models" in out


def test_malformed_inputs_through_the_real_entrypoint(library, tmp_path):
    lib, _ = library
    before = tree_digest(lib)
    picks = [c for c in INPUTS if c[0] in ("length-18446744073709551615", "text", "pickle-in-m.pt", "empty-file", "truncated-at-9")]
    assert len(picks) == 5
    for case, name, body in picks:
        path = tmp_path / case / name
        path.parent.mkdir()
        path.write_bytes(body)
        p = subprocess.run([sys.executable, "-m", "haagenti.cli", "ingest", str(lib), str(path), "--model-id", "bad"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, (case, p.stderr)
    assert tree_digest(lib) == before


# ---- damaged libraries ------------------------------------------------------------------------
def data_files(lib, table):
    return sorted(str(p) for p in (lib / table).glob("*.parquet"))


def log_entries(lib, table):
    return sorted(str(p) for p in (lib / table / "_delta_log").glob("*.json"))


def flip_blob(path: str) -> None:
    """One byte flipped in the middle of one stored blob, the file otherwise rewritten as is."""
    t = pq.read_table(path)
    blobs = t["blob"].to_pylist()
    i = max(range(len(blobs)), key=lambda k: len(blobs[k]))
    b = bytearray(blobs[i])
    b[len(b) // 2] ^= 0x5A
    blobs[i] = bytes(b)
    t = t.set_column(t.schema.get_field_index("blob"), "blob", pa.array(blobs, t.schema.field("blob").type))
    pq.write_table(t, path, compression="none")


def damages(lib) -> list[tuple[str, callable]]:
    """(case, damage) pairs: each damage takes the path of a copy of the library."""
    out = []

    def cut(frac):
        return lambda p: open(p, "r+b").truncate(int(os.path.getsize(p) * frac))

    def scribble(where):
        def f(p):
            size = os.path.getsize(p)
            with open(p, "r+b") as fh:
                fh.seek(int(size * where))
                fh.write(b"\xde\xad\xbe\xef" * 8)
        return f

    for table in ("fragments", "signatures", "manifests", "models"):
        for i, _ in enumerate(data_files(lib, table)):
            for kind, fn in (("empty", cut(0)), ("half", cut(0.5)), ("footer-cut", lambda p: open(p, "r+b").truncate(os.path.getsize(p) - 9)),
                             ("head-scribbled", scribble(0.0)), ("page-scribbled", scribble(0.05)), ("deleted", os.remove)):
                out.append((f"{table}-file{i}-{kind}", table, ("data", i), fn))
        for i, _ in enumerate(log_entries(lib, table)):
            for kind, fn in (("log-half", cut(0.5)), ("log-junk", lambda p: open(p, "wb").write(b"\x00not json\xff")), ("log-empty", cut(0))):
                out.append((f"{table}-log{i}-{kind}", table, ("log", i), fn))
    for i, _ in enumerate(data_files(lib, "fragments")):
        out.append((f"fragments-file{i}-blob-flipped", "fragments", ("data", i), flip_blob))
    for kind, body in (("truncated", b'{"format": "haag'), ("junk", b"\xff\xfe\x00"), ("list", b"[]"), ("empty", b""), ("old-version", b'{"format": "haagenti", "format_version": 1}')):
        out.append((f"marker-{kind}", None, ("marker", 0), lambda p, body=body: open(p, "wb").write(body)))
    return out


def target(copy, table, spec):
    kind, i = spec
    if kind == "marker":
        return str(copy / "haagenti.json")
    return (data_files if kind == "data" else log_entries)(copy, table)[i]


def test_damaged_libraries_say_what_is_damaged_and_never_restore_wrong_bytes(library, tmp_path):
    lib, files = library
    cases = damages(lib)
    assert len(cases) >= 60
    problems: list[str] = []  # every case runs; the failure lists them all

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    for n, (case, table, spec, damage) in enumerate(cases):
        copy = tmp_path / f"c{n}"
        shutil.copytree(lib, copy)
        damage(target(copy, table, spec))
        broken = False
        for mid, original in (("m0", files[0]), ("m1", files[1])):
            out = tmp_path / f"o{n}-{mid}"
            code, _, err = cli("restore", copy, mid, out)
            if code == 0:  # never wrong bytes
                check(sha256(out / original.name) == sha256(original), f"{case}: restore of {mid} returned wrong bytes")
            else:
                broken = True
                check(len(err.strip().splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, f"{case}: restore said {err!r}")
                check(not out.exists() or os.listdir(out) == [], f"{case}: a failed restore left files")
        code, _, err = cli("verify", copy)
        lines = err.strip().splitlines()
        check("Traceback" not in err and all(line.startswith("error:") for line in lines), f"{case}: verify said {err!r}")
        if broken or spec[0] == "marker":  # verify never says ok on a library a restore fails on
            check(code == 1 and bool(lines), f"{case}: verify said ok on a damaged library")
        code, _, err = cli("stats", copy)
        check(code == 0 or (len(err.strip().splitlines()) == 1 and "Traceback" not in err), f"{case}: stats said {err!r}")
        shutil.rmtree(copy)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", ["fragments-file0-blob-flipped", "models-log1-log-junk"])
def test_damaged_library_through_the_real_entrypoint(library, tmp_path, case):
    lib, _ = library
    [(_, table, spec, damage)] = [c for c in damages(lib) if c[0] == case]
    copy = tmp_path / "copy"
    shutil.copytree(lib, copy)
    damage(target(copy, table, spec))
    failed = []
    for mid in ("m0", "m1"):  # the damage is in one model's rows (or in both)
        p = subprocess.run([sys.executable, "-m", "haagenti.cli", "restore", str(copy), mid, str(tmp_path / mid)], capture_output=True, text=True, timeout=120)
        if p.returncode:
            assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
            assert "damaged" in p.stderr or "failed verification" in p.stderr, p.stderr
            failed.append(mid)
    assert failed


def test_a_blob_that_would_decode_past_its_record_is_refused_unread(library, tmp_path):
    """A zstd frame is a promise of its size: a blob swapped for frames of 64 MiB of zeros each
    (a few KB stored) must be refused from its header, not inflated and then found wrong."""
    import zstandard

    from haagenti.codecs import codec_chain

    lib, files = library
    copy = tmp_path / "copy"
    shutil.copytree(lib, copy)
    path = data_files(copy, "fragments")[0]
    t = pq.read_table(path)
    specs = t["codec"].to_pylist()
    i = next(k for k, s in enumerate(specs) if "zstd" in s)
    streams = codec_chain(specs[i]).codecs[-1].streams
    frame = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    bomb = b"".join(struct.pack("<BI", 1, len(frame)) for _ in range(streams)) + frame * streams
    blobs = t["blob"].to_pylist()
    blobs[i] = bomb
    t = t.set_column(t.schema.get_field_index("blob"), "blob", pa.array(blobs, t.schema.field("blob").type))
    pq.write_table(t, path, compression="none")
    errors = []
    for mid in ("m0", "m1"):
        code, _, err = cli("restore", copy, mid, tmp_path / mid)
        if code:
            errors.append(err)
    assert errors and all(len(e.strip().splitlines()) == 1 for e in errors), errors
    assert any(f"more than the {t['raw_size'][i].as_py()} recorded" in e for e in errors), errors


@pytest.mark.parametrize("case", ["tree-lies", "gap-changed"])
def test_a_lying_file_tree_or_gap_is_refused_in_one_line(library, tmp_path, case):
    """A file's hash is its tree over its gaps and fragment ids (files.layout): a record whose
    tree lies, or whose gap bytes no longer give its tree, with the record digest made again
    (a tamperer who knows the scheme), is refused by restore, restore --rehash and verify in one line."""
    from haagenti.hashing import model_hash
    from haagenti.library import FragmentLibrary
    from tests.helpers import reseal

    lib, files = library
    copy = tmp_path / "copy"
    shutil.copytree(lib, copy)
    store = FragmentLibrary.open(str(copy), create=False).store
    [row] = store.read("models", equals=("model_id", "m0")).to_pylist()
    header = row["files"][0]["header"]
    if case == "tree-lies":  # and the content hash made of it
        row["files"][0]["layout"] = "0" * 64
        row["content_hash"] = model_hash([f["layout"] for f in row["files"]])
    else:  # the header's trailing padding: the JSON still parses and says the same
        assert header.endswith(b" "), header[-20:]
        row["files"][0]["header"] = header[:-1] + b"\t"
    store.delete("models", "model_id = 'm0'")
    store.append("models", pa.Table.from_pylist([row], schema=store.read("models").schema))
    reseal(FragmentLibrary.open(str(copy), create=False), "m0")
    for args in (("restore", copy, "m0", tmp_path / "o"), ("restore", copy, "m0", tmp_path / "r", "--rehash"), ("verify", copy, "m0")):
        code, _, err = cli(*args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
        assert "m0" in err and "does not match its recorded layout" in err, (args, err)
    code, _, _ = cli("restore", copy, "m1", tmp_path / "m1")
    assert code == 0 and sha256(tmp_path / "m1" / files[1].name) == sha256(files[1])


# ---- crafted reference chains -------------------------------------------------------------------
def chain_library(tmp_path):
    """A library of one model whose tensor's six fragments are each a genuine delta of the one
    before (fragment k differs from k-1 in one element), and its rows, to be rewired."""
    import numpy as np

    from haagenti.config import LibraryConfig
    from haagenti.encode import PendingFragment, encode_fragment
    from haagenti.fragment import FragmentId, FragmentType
    from haagenti.ingest_steps import fragment_table
    from haagenti.library import FragmentLibrary

    config = LibraryConfig(fragment_size=64 * 1024)
    n = config.fragment_elements
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(n).astype(np.float32)]
    for k in range(1, 6):
        parts.append(parts[-1].copy())
        parts[-1][k] += 1.0
    values = torch.from_numpy(np.concatenate(parts)).bfloat16()
    save_file({"w": values}, str(tmp_path / "m.safetensors"))
    lib = FragmentLibrary.open(str(tmp_path / "lib"), config)
    lib.ingest([str(tmp_path / "m.safetensors")], "m")
    data = [values[k * n:(k + 1) * n].view(torch.int16).numpy().tobytes() for k in range(6)]
    ids = [FragmentId.of(d) for d in data]
    rows = [encode_fragment(PendingFragment(ids[0], "BF16", data[0], FragmentType.GENERIC, 0), [], 3)]
    for k in range(1, 6):
        p = PendingFragment(ids[k], "BF16", data[k], FragmentType.GENERIC, k * n)
        rows.append(encode_fragment(p, [(ids[k - 1], data[k - 1], "BF16", k - 1)], 3))
    assert [r["depth"] for r in rows] == [0, 1, 2, 3, 4, 5]
    return lib, rows, fragment_table


def rewire(lib, rows, fragment_table, refs: dict[int, int]) -> None:
    """The model's fragments replaced by `rows`, fragment k's reference made fragment refs[k]."""
    for k, r in refs.items():
        rows[k] = dict(rows[k], ref_id=rows[r]["fragment_id"], encoding="delta_xor", ref_dtype="BF16")
    lib.store.delete("fragments", "fragment_type != 'verbatim'")  # the file's header piece stays
    lib.store.append("fragments", fragment_table(rows))


@pytest.mark.parametrize("case", ["deeper-than-the-maximum", "a-cycle", "a-delta-of-itself"])
def test_crafted_reference_chains_are_refused_in_bounded_work(tmp_path, case):
    """A chain one hop deeper than MAX_CHAIN_DEPTH (every delta genuine), two deltas referencing
    each other, a delta referencing itself: restore, verify, fetching by id and gc's reachability
    each end with one clear line (gc: the whole loop kept), never loop."""
    from haagenti.errors import FragmentError
    from haagenti.maintenance import referenced

    lib, rows, table = chain_library(tmp_path)
    refs = {"deeper-than-the-maximum": {}, "a-cycle": {2: 3, 3: 2}, "a-delta-of-itself": {4: 4}}[case]
    rewire(lib, rows, table, refs)
    want = "deeper than 4 hops" if case.startswith("deeper") else "loops or is deeper"
    code, _, err = cli("restore", lib.store.url, "m", tmp_path / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1 and want in err and "Traceback" not in err, err
    code, _, err = cli("verify", lib.store.url)
    assert code == 1 and "Traceback" not in err and all(line.startswith("error:") for line in err.strip().splitlines()), err
    with pytest.raises(FragmentError, match="reference chain"):
        lib.fetch_raw({rows[5]["fragment_id"]})
    assert set(referenced(lib.store).to_pylist()) == {r["fragment_id"] for r in rows} | verbatim_ids(lib, "m")


# ---- crafted predicted quantized fragments ------------------------------------------------------
def ladder_library(tmp_path):
    """A library holding a GGUF F16 tensor and its Q4_1 (gguf's quantizer over the F16 values),
    the Q4_1's fragments stored as predictions from the F16's, and its fragment rows."""
    import numpy as np

    from haagenti.config import LibraryConfig
    from haagenti.exports import export_gguf
    from haagenti.library import FragmentLibrary

    w = torch.from_numpy(np.random.default_rng(7).normal(0, 0.02, (256, 256)).astype(np.float16))
    for q in ("F16", "Q4_1"):
        export_gguf({"w": w, "norm": torch.ones(256)}, str(tmp_path / f"m-{q}.gguf"), q)
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=64 * 1024))
    lib.ingest([str(tmp_path / "m-F16.gguf")], "f16")
    lib.ingest([str(tmp_path / "m-Q4_1.gguf")], "q4_1")
    rows = lib.store.read("fragments").to_pylist()
    assert sum(r["encoding"] == "predicted" for r in rows) == 2
    return lib, rows


@pytest.mark.parametrize("case", ["scale-plane-flipped", "residual-plane-flipped", "reference-of-other-size", "integer-reference", "reference-missing"])
def test_crafted_predicted_fragments_are_refused_in_one_line(tmp_path, case):
    """A predicted Q4_1 fragment whose stored scale or code residual is flipped, or whose
    reference is another fragment of the wrong size, claims an integer dtype or is gone: restore
    ends with one clear line, never other bytes; the F16 model still restores."""
    lib, rows = ladder_library(tmp_path)
    k = next(i for i, r in enumerate(rows) if r["encoding"] == "predicted")
    r = rows[k]
    blob = bytearray(r["blob"])
    if case == "scale-plane-flipped":  # the first plane: the low bytes of the scale fields
        blob[5 * 20 + 1] ^= 0x01
    elif case == "residual-plane-flipped":
        blob[-2] ^= 0x01
    rows[k] = {**r, "blob": bytes(blob)}
    other = next(x for x in rows if x["dtype"] == "F16" and x["n_elements"] == 256)  # the norm
    if case == "reference-of-other-size":
        rows[k]["ref_id"] = other["fragment_id"]
        rows[k]["ref_dtype"] = other["dtype"]
    elif case == "integer-reference":
        rows[k]["ref_dtype"] = "I16"
    elif case == "reference-missing":
        rows = [x for x in rows if x["fragment_id"] != r["ref_id"]]
    restore_refused_in_one_line(lib, rows, tmp_path, "q4_1", source="f16" if case != "reference-missing" else None)


def restore_refused_in_one_line(lib, rows, tmp_path, model: str, source: str | None) -> None:
    """The library's tensor fragments replaced by the crafted `rows`: restoring `model` ends with
    one clear line, never other bytes; its float `source`, when still stored, restores."""
    from haagenti.ingest_steps import fragment_table

    lib.store.delete("fragments", "fragment_type != 'verbatim'")  # the file's header piece stays
    lib.store.append("fragments", fragment_table(rows))
    code, _, err = cli("restore", lib.store.url, model, tmp_path / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert any(w in err for w in ("damaged", "failed verification", "missing")), err
    if source is not None:
        assert cli("restore", lib.store.url, source, tmp_path / source)[0] == 0


# ---- crafted range-coded quantized fragments -------------------------------------------------
@pytest.mark.parametrize("case", ["models-flipped", "words-flipped", "cut", "models-lie", "spec-of-another-type"])
def test_crafted_range_coded_fragments_are_refused_in_one_line(tmp_path, case):
    """A lone Q4_1 GGUF's range-coded fragment whose models or coded words are flipped, which
    is cut short, whose models claim more blocks, or whose spec names another block layout:
    restore ends with one clear line, never other bytes."""
    import numpy as np
    import zstandard

    from haagenti.codecs import DENSE
    from haagenti.config import LibraryConfig
    from haagenti.exports import export_gguf
    from haagenti.library import FragmentLibrary

    w = torch.from_numpy(np.random.default_rng(7).normal(0, 0.02, (256, 256)).astype(np.float32))
    export_gguf({"w": w, "norm": torch.ones(256)}, str(tmp_path / "m.gguf"), "Q4_1")
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=64 * 1024, zstd_level=DENSE))
    lib.ingest([str(tmp_path / "m.gguf")], "q4_1")
    rows = lib.store.read("fragments").to_pylist()
    k = next(i for i, r in enumerate(rows) if r["codec"].startswith("rans2:"))
    blob = bytearray(rows[k]["blob"])
    (size,) = struct.unpack_from("<I", blob)
    if case == "models-flipped":
        blob[4 + size // 2] ^= 0x08
    elif case == "words-flipped":
        blob[-5] ^= 0x01
    elif case == "cut":
        del blob[len(blob) // 2 :]
    elif case == "models-lie":
        models = bytearray(zstandard.ZstdDecompressor().decompress(bytes(blob[4 : 4 + size])))
        models[0:4] = struct.pack("<I", struct.unpack_from("<I", models)[0] + 1)
        packed = zstandard.ZstdCompressor().compress(bytes(models))
        blob = bytearray(struct.pack("<I", len(packed)) + packed + blob[4 + size :])
    rows[k] = {**rows[k], "blob": bytes(blob)}
    if case == "spec-of-another-type":
        rows[k]["codec"] = "rans2:s2.n16"
    restore_refused_in_one_line(lib, rows, tmp_path, "q4_1", source=None)


# ---- crafted predicted ONNX int8/uint8 fragments ----------------------------------------------
def onnx_int8_library(tmp_path, per_channel: bool = False):
    """A library holding a MatMul-and-bias fp32 ONNX file and its uint8 quantization (onnxruntime's
    quantize_dynamic, per tensor or per channel), the weight's uint8 fragment stored as a
    prediction from the fp32 one."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from haagenti.library import FragmentLibrary

    w = np.random.default_rng(13).normal(0, 0.02, (256, 128)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones(128, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    quantize_dynamic(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QUInt8, per_channel=per_channel)
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([str(tmp_path / "m.onnx")], "fp32")
    lib.ingest([str(tmp_path / "q.onnx")], "uint8")
    rows = lib.store.read("fragments").to_pylist()
    assert [r["dtype"] for r in rows if r["encoding"] == "predicted"] == ["U8"]
    return lib, rows


@pytest.mark.parametrize("case", ["scale-flipped", "zero-point-flipped", "residual-flipped", "residual-cut", "reference-of-other-size", "reference-missing",
                                  "channel-run-changed", "channel-scale-flipped"])
def test_crafted_predicted_onnx_int8_fragments_are_refused_in_one_line(tmp_path, case):
    """A predicted uint8 fragment whose stored scale, zero point or code residual is flipped,
    whose residual is cut, or whose reference is another fragment or gone; a per-channel one
    whose run length no longer fits its scales, or whose first run's scale is flipped: restore
    ends with one clear line, never other bytes; the fp32 model still restores."""
    from haagenti.codecs import codec_chain
    from haagenti.codecs.predict import CHANNELS_HEADER, CHANNELS_MARK, residual_bytes

    lib, rows = onnx_int8_library(tmp_path, per_channel=case.startswith("channel"))
    k = next(i for i, r in enumerate(rows) if r["encoding"] == "predicted")
    r = rows[k]
    residual = bytearray(codec_chain(r["codec"]).decode(r["blob"], residual_bytes(r["dtype"], r["raw_size"])))
    at = {"scale-flipped": (3, 0x20), "zero-point-flipped": (4, 0x01), "residual-flipped": (1000, 0x01),  # the scale's exponent
          "channel-run-changed": (5, 0x01), "channel-scale-flipped": (CHANNELS_HEADER + 3, 0x20)}.get(case)  # run 256 -> 0
    assert (residual[:4] == CHANNELS_MARK) == case.startswith("channel")
    if at is not None:
        residual[at[0]] ^= at[1]
    if case == "residual-cut":
        residual = residual[:-1]
    rows[k] = {**r, "codec": "raw", "blob": bytes(residual)}
    other = next(x for x in rows if x["dtype"] == "F32" and x["fragment_id"] != r["ref_id"])
    if case == "reference-of-other-size":
        rows[k]["ref_id"], rows[k]["ref_dtype"] = other["fragment_id"], other["dtype"]
    elif case == "reference-missing":
        rows = [x for x in rows if x["fragment_id"] != r["ref_id"]]
    restore_refused_in_one_line(lib, rows, tmp_path, "uint8", source="fp32" if case != "reference-missing" else None)
