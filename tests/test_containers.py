"""GGUF, ONNX, Hugging Face and diffusers folders: bit-exact round trips, fragments shared across
containers and shardings, quantized tensors cut on block boundaries. Material: `exports`."""
import os

import numpy as np
import pytest

from haagenti.errors import FormatError
from haagenti.formats import open_model
from haagenti.formats.source import validate_file_name
from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary, ModelInput
from tests.helpers import sha256


def tree(path: str) -> dict[str, str]:
    """sha256 of every file under a folder (or of one file), by relative path."""
    if os.path.isfile(path):
        return {os.path.basename(path): sha256(path)}
    return {os.path.relpath(os.path.join(d, f), path): sha256(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs}


def added_bytes(lib: FragmentLibrary, model_id: str, report) -> int:
    """What a model added to the library: its new fragments and its files' verbatim records."""
    return report.stored_bytes + sum(len(f.header) for f in lib.manifest(model_id).files)


@pytest.mark.parametrize("kind", ["gguf-F16", "gguf-Q8_0", "gguf-split", "onnx", "onnx-external", "hf-4", "diffusers"])
def test_round_trip_is_bit_exact(tmp_path, exports, kind):
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([exports[kind]], "m")
    out = tmp_path / "out"
    lib.restore("m", str(out), rehash=True)
    assert tree(str(out)) == tree(exports[kind])
    assert lib.verify("m").ok


def test_gguf_offsets_match_ggufs_own_reader(exports):
    import gguf

    for kind in ("gguf-F16", "gguf-Q8_0"):
        reader = gguf.GGUFReader(exports[kind])
        want = {t.name: (int(t.data_offset), int(t.n_bytes), t.tensor_type.name, tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors}
        with open_model([exports[kind]]) as src:
            got = {t.name: (t.data_begin, t.nbytes, t.dtype.name, t.shape) for t in src.tensors}
        assert got == want
        assert any(v[2] == "Q8_0" for v in got.values()) == (kind == "gguf-Q8_0")


def test_quantized_tensors_cut_on_blocks_and_shared_between_files(tmp_path, exports, family):
    """The partial fine-tune froze its lower layers: their Q8_0 blocks are identical in both
    GGUF files, so they share fragments; every fragment holds whole blocks."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=65536))  # several fragments per matrix
    lib.ingest([exports["gguf-Q8_0"]], "base-q8")
    report = lib.ingest([exports["gguf-Q8_0-partial"]], "partial-q8")
    base, partial = lib.manifest("base-q8"), lib.manifest("partial-q8")
    quant = [t for t in base.tensors if t.dtype == "Q8_0"]
    assert quant and any(len(t.fragments) > 1 for t in quant)
    for t in quant:
        assert sum(r.elem_count for r in t.fragments) * 32 == np.prod(t.shape)
        assert all(r.elem_count == 32768 // 32 for r in t.fragments[:-1])
    frozen = [t.name for t in quant if t.name.startswith(("embed", "layers.0."))]
    by_name = partial.tensors_by_name()
    assert frozen and all([r.fragment_id for r in by_name[n].fragments] == [r.fragment_id for r in base.tensors_by_name()[n].fragments] for n in frozen)
    changed = [t.name for t in quant if t.name.startswith("layers.1.")]
    assert changed and all(by_name[n].fragments[0].fragment_id != base.tensors_by_name()[n].fragments[0].fragment_id for n in changed)
    assert report.exact >= sum(len(by_name[n].fragments) for n in frozen)
    out = tmp_path / "out"
    lib.restore("partial-q8", str(out), rehash=True)
    assert tree(str(out)) == tree(exports["gguf-Q8_0-partial"])


def test_a_quantized_fine_tune_is_stored_as_deltas_on_the_base_blocks(tmp_path, exports):
    """XOR against the base's Q8_0 blocks pays (docs/decisions/0030-quantized-deltas.md): the fine-tune's changed
    blocks reference the base's, found by signatures of their dequantized values."""
    sizes = {}
    for similarity in (True, False):
        lib = FragmentLibrary.open(str(tmp_path / f"lib-{similarity}"), LibraryConfig(similarity=similarity))
        lib.ingest([exports["gguf-Q8_0"]], "base")
        report = lib.ingest([exports["gguf-Q8_0-ft"]], "ft")
        sizes[similarity] = report.stored_bytes
        assert (report.delta > 0) == similarity
        lib.restore("ft", str(tmp_path / f"out-{similarity}"), rehash=True)
        assert tree(str(tmp_path / f"out-{similarity}")) == tree(exports["gguf-Q8_0-ft"])
    assert sizes[True] < 0.6 * sizes[False]


@pytest.mark.parametrize("kind", ["gguf-F16", "gguf-F32", "onnx"])
def test_exports_of_a_stored_safetensors_model_add_at_most_5_percent(tmp_path, exports, kind):
    """The same weights in another container (GGUF's reversed dims, ONNX's transposed MatMul
    weights, F16/F32 instead of the published BF16) add <= 5% of their size."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([exports["safetensors"]], "st")
    report = lib.ingest([exports[kind]], "export")
    assert added_bytes(lib, "export", report) <= 0.05 * report.raw_bytes


def test_same_dtype_exports_share_fragments_exactly(tmp_path, exports):
    """F32 weights as safetensors, GGUF and ONNX (inline and external): the same fragment ids."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([exports["f32-safetensors"]], "st")
    st = {r.fragment_id for t in lib.manifest("st").tensors for r in t.fragments}
    for i, kind in enumerate(("gguf-F32", "onnx", "onnx-external")):
        lib.ingest([exports[kind]], f"m{i}")
        m = lib.manifest(f"m{i}")
        weights = [t for t in m.tensors if np.prod(t.shape) >= 128 * 128]  # ONNX adds small shape constants
        assert len(weights) >= 10 and all(r.fragment_id in st for t in weights for r in t.fragments), kind


@pytest.mark.parametrize("one,many", [("hf-1", "hf-4"), ("gguf-F16", "gguf-split")])
def test_reshard_invariance(tmp_path, exports, one, many):
    """The same weights as 1 and 4+ shards (HF folders), one GGUF and a split GGUF: the second
    adds <= 1% of its size (its shards' headers and index), every tensor fragment shared."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([exports[one]], "one")
    report = lib.ingest([exports[many]], "many")
    assert len(lib.manifest("many").files) >= len(lib.manifest("one").files) + 3
    assert report.stored_bytes == 0 and lib.manifest("one").fragment_ids == lib.manifest("many").fragment_ids
    assert added_bytes(lib, "many", report) <= 0.01 * report.raw_bytes


def test_onnx_inline_and_external_share_every_tensor_fragment(tmp_path, exports):
    """Moving initializers to an external data file changes the graph's bytes (its records are
    stored again, docs/decisions/0033-verbatim-per-model.md), never a fragment."""
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([exports["onnx"]], "one")
    report = lib.ingest([exports["onnx-external"]], "many")
    assert {f.format for f in lib.manifest("many").files} == {"onnx", "onnx_data"}
    assert report.stored_bytes == 0 and lib.manifest("one").fragment_ids == lib.manifest("many").fragment_ids


def test_hf_and_diffusers_folders_are_one_model_each(tmp_path, exports):
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([exports["hf-4"]], "hf")
    lib.ingest([exports["diffusers"]], "diff")
    hf = {f.name: f.format for f in lib.manifest("hf").files}
    assert hf["model.safetensors.index.json"] == "verbatim" and hf["tokenizer.json"] == "verbatim"
    assert sum(v == "safetensors" for v in hf.values()) >= 4
    diff = {f.name for f in lib.manifest("diff").files}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "scheduler/scheduler_config.json", "text_encoder/model.safetensors"} <= diff
    # the text encoder is the HF model's weights: nothing new for it
    te = [t for t in lib.manifest("diff").tensors if lib.manifest("diff").files[t.file_index].name.startswith("text_encoder/")]
    assert te and {r.fragment_id for t in te for r in t.fragments} <= lib.manifest("hf").fragment_ids


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a\\b", "", "a/"])
def test_file_names_outside_the_folder_are_refused(name):
    with pytest.raises(FormatError, match="invalid file name"):
        validate_file_name(name)


def test_the_pipeline_takes_gguf_and_folders_as_ingest_does(tmp_path, exports):
    """The pipeline (local executor) over GGUF files (quantized deltas included), an HF folder
    and a diffusers folder builds the tables `ingest_many` builds, and restores bit-exact."""
    import yaml

    from haagenti.ingest import ModelInput
    from pipelines.dedup import run_dedup
    from pipelines.executors import LocalExecutor

    models = [("base-q8", exports["gguf-Q8_0"]), ("ft-q8", exports["gguf-Q8_0-ft"]), ("hf", exports["hf-4"]), ("diff", exports["diffusers"])]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"id": mid, "family": "f", "files": [path]} for mid, path in models]}))
    run_dedup(str(catalog), str(tmp_path / "pipeline"), LocalExecutor())
    lib = FragmentLibrary.open(str(tmp_path / "ingest"))
    lib.ingest_many([ModelInput([path], mid, "f") for mid, path in models])
    piped = FragmentLibrary.open(str(tmp_path / "pipeline"), create=False)
    for table, key in (("fragments", "fragment_id"), ("manifests", "fragment_id")):
        # every column but ingest_id, the id of the run that wrote the row (one per library)
        cols = [c for c in lib.store.read(table).column_names if c != "ingest_id"]
        a, b = (sorted(map(str, x.store.read(table, cols).sort_by(key).to_pylist())) for x in (lib, piped))
        assert a == b, table
    assert any(r == "delta_xor" or r == "delta_sub" for r in piped.store.read("fragments")["encoding"].to_pylist())
    for mid, path in models:
        piped.restore(mid, str(tmp_path / "out" / mid), rehash=True)
        assert tree(str(tmp_path / "out" / mid)) == tree(path)


def test_loader_reads_gguf_tensors_in_torch_layout_and_refuses_quantized_ones(tmp_path, exports):
    """GGUF lists dims the other way round: a stored tensor has the shape torch gives it."""
    import torch
    from safetensors.torch import load_file

    from haagenti.loader import ModelLoader

    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([exports["gguf-F16"]], "f16")
    lib.ingest([exports["gguf-Q8_0"]], "q8")
    state = ModelLoader(lib).load("f16")
    want = load_file(exports["safetensors"])
    assert set(state) == set(want)
    for name, t in state.items():
        assert t.dtype == torch.float16 and t.shape == want[name].shape
        assert torch.equal(t, want[name].to(torch.float16))
    with pytest.raises(FormatError, match="quantized blocks"):
        ModelLoader(lib).load("q8")


def test_a_quantization_ladder_costs_its_float_base_and_restores_bit_exact(tmp_path, exports):
    """A GGUF F16 then its Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 (gguf's quantizers over its values):
    every quantized block is predicted from the F16 values, so each step adds under 2% of its
    size once the F16 is stored; both ingest paths store the same rows; every file restores
    bit-exact, and `stats` counts the predictions."""
    import pyarrow.compute as pc
    import yaml

    from pipelines.dedup import run_dedup
    from pipelines.executors import LocalExecutor

    ladder = exports["ladder"]
    names = [os.path.basename(p).removesuffix(".gguf").rpartition("-")[2] for p in ladder]
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    for name, path in zip(names, ladder):
        report = lib.ingest([path], name)
        if name != "F16":
            assert report.stored_bytes < 0.02 * os.path.getsize(path), (name, report)
    frags = lib.store.read("fragments", columns=["fragment_id", "dtype", "encoding", "ref_dtype", "codec", "blob"])
    quantized = frags.filter(pc.is_in(frags["dtype"], value_set=pa_strings(names[1:])))
    assert quantized.num_rows and set(quantized["encoding"].to_pylist()) == {"predicted"} and set(quantized["ref_dtype"].to_pylist()) == {"F16"}
    assert lib.stats().predicted_fragments == quantized.num_rows
    for name, path in zip(names, ladder):
        lib.restore(name, str(tmp_path / "out" / name), rehash=True)
        assert sha256(str(tmp_path / "out" / name / os.path.basename(path))) == sha256(path), name
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"id": n, "files": [p]} for n, p in zip(names, ladder)]}))
    run_dedup(str(catalog), str(tmp_path / "piped"), LocalExecutor(), LibraryConfig())
    together = FragmentLibrary.open(str(tmp_path / "together"))
    together.ingest_many([ModelInput([p], n) for n, p in zip(names, ladder)])
    piped, one_run = (FragmentLibrary.open(str(tmp_path / u), create=False).store.read("fragments", columns=frags.column_names).sort_by("fragment_id")
                      for u in ("piped", "together"))
    assert piped.equals(one_run) and set(piped.filter(pc.is_in(piped["dtype"], value_set=pa_strings(names[1:])))["encoding"].to_pylist()) == {"predicted"}


def test_onnx_int8_and_uint8_exports_cost_little_beside_their_fp32_file(tmp_path, family):
    """The fp32 ONNX export, then that file through onnxruntime's quantize_dynamic as int8 and as
    uint8, per tensor and per channel (haagenti.exports.export_onnx_ladder): each quantized
    weight's fragments are predicted from the fp32 weights' (MatMulInteger's and MatMul's
    operands both stored as W, so fragment k of either holds the same values), each file adds
    under 5% of its size, and every file restores bit-exact. The pipeline reads the transposed
    weights (the file holds W^T) by turning each tensor's byte range round where it runs, and
    stores the rows one ingest per file stores: in one run too, a per-channel fragment tries its
    float source, not the earlier exports' codes that sign as it does."""
    import pyarrow.compute as pc
    import yaml

    from haagenti.exports import export_onnx_ladder
    from pipelines.dedup import run_dedup
    from pipelines.executors import LocalExecutor

    files = dict(zip(("fp32", "int8", "uint8", "int8ch", "uint8ch"), export_onnx_ladder(family[0].file, str(tmp_path / "onnx"))))
    assert [os.path.basename(p) for p in files.values()] == [f"digits-base{s}.onnx" for s in ("", "-int8", "-uint8", "-int8ch", "-uint8ch")]
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    for name, path in files.items():
        report = lib.ingest([path], name)
        if name != "fp32":
            assert report.stored_bytes < 0.05 * os.path.getsize(path), (name, report)
    frags = lib.store.read("fragments", columns=["fragment_id", "dtype", "n_elements", "encoding", "ref_dtype", "fragment_type", "blob"])
    weights = pc.and_(pc.greater(frags["n_elements"], 1), pc.not_equal(frags["fragment_type"], "verbatim"))  # not the files' verbatim pieces
    codes = frags.filter(pc.and_(pc.is_in(frags["dtype"], value_set=pa_strings(["I8", "U8"])), weights))
    assert codes.num_rows and set(codes["encoding"].to_pylist()) == {"predicted"} and set(codes["ref_dtype"].to_pylist()) == {"F32"}
    for name, path in files.items():
        lib.restore(name, str(tmp_path / "out" / name), rehash=True)
        assert sha256(str(tmp_path / "out" / name / os.path.basename(path))) == sha256(path), name
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"id": n, "files": [p]} for n, p in files.items()]}))
    run_dedup(str(catalog), str(tmp_path / "piped"), LocalExecutor(), LibraryConfig())
    piped = FragmentLibrary.open(str(tmp_path / "piped"), create=False)
    assert piped.store.read("fragments", columns=frags.column_names).sort_by("fragment_id").equals(frags.sort_by("fragment_id"))
    for name in ("int8", "uint8ch"):
        piped.restore(name, str(tmp_path / "piped-out" / name), rehash=True)
        assert sha256(str(tmp_path / "piped-out" / name / os.path.basename(files[name]))) == sha256(files[name])


def pa_strings(xs):
    import pyarrow as pa

    return pa.array(xs, pa.string())


def test_k_quant_tensors_are_predicted_from_a_stored_f16_gguf(tmp_path):
    """Real Q2_K to Q6_K blocks (tests/data/kquants.npz, ggml's quantizer) of an F16 tensor in
    GGUF files beside the F16 file: ingested after it, each is stored as its prediction (its
    scales) and restores bit-exact."""
    import gguf
    import pyarrow.compute as pc

    z = np.load(os.path.join(os.path.dirname(__file__), "data", "kquants.npz"))
    files = {}
    kinds = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    for q in ["F16"] + kinds:
        files[q] = str(tmp_path / f"m-{q}.gguf")
        w = gguf.GGUFWriter(files[q], arch="digits")
        if q == "F16":
            w.add_tensor("w", z["source"])
        else:
            w.add_tensor("w", z[q], raw_dtype=gguf.GGMLQuantizationType[q])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=65536))
    for q, path in files.items():
        report = lib.ingest([path], q)
        if q != "F16":
            assert report.delta == 1 and report.stored_bytes < 0.3 * len(z[q].tobytes()), (q, report)
    frags = lib.store.read("fragments", columns=["dtype", "encoding"])
    assert sorted(frags.filter(pc.equal(frags["encoding"], "predicted"))["dtype"].to_pylist()) == kinds
    for q, path in files.items():
        lib.restore(q, str(tmp_path / "out" / q))
        assert sha256(str(tmp_path / "out" / q / os.path.basename(path))) == sha256(path), q
